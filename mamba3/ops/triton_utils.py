"""Shared-memory accounting for the Triton kernels, and config pruning keyed on the device.

The Mamba-3 kernels (``mamba3/ops/mamba3/triton_*.py``) pick their tiles at launch from the
shapes: CHUNK = chunk_size, BLOCK_N = next_pow2(d_state) (>= 16 or 32), BLOCK_P =
next_pow2(headdim) (>= 16), 4 or 8 warps. The ``tl.dot`` operands of one program are staged in
shared memory, so a large chunk or d_state can exceed a small part's per-block limit (99 KB
opt-in on sm_86 / sm_89 consumer GPUs, 163 KB on A100, 227 KB on H100) and fail at launch with
"out of resource: shared memory".

Two ways to count, both without a GPU:
- :func:`compiled_smem`: compile the real kernel offline for a target arch (``triton.compile``
  with a ``GPUTarget``; needs only triton's bundled ptxas) and read ``metadata.shared``: exact.
- :func:`analytic_smem`: the dot-operand tiles of one program (an upper bound: Triton reuses
  buffers whose lifetimes do not overlap), for use inside launch-time prune functions.

Hooks for the kernels / autotune:
- ``triton.autotune(configs, key, prune_configs_by={"early_config_prune": smem_pruner(est)})``
  where ``est(kwargs, num_warps, num_stages) -> bytes``; the limit is the device's
  ``shared_memory_per_block_optin``.
- :func:`check_launch_fits` before a launch: a ValueError naming chunk_size / d_state / headdim
  instead of Triton's resource error.

``python -m mamba3.ops.triton_utils`` compiles every kernel over a grid of shapes and prints
the shared memory per config and which configs a 99 KB part has to prune.
"""
from __future__ import annotations

import functools
import inspect
import json
import os
from typing import Callable, Optional

import torch

from .utils import next_pow2

SMEM_99KB = 99 * 1024            # sm_86 / sm_89 opt-in limit per block (101376 bytes)
SMEM_BY_ARCH = {86: 99 * 1024, 89: 99 * 1024, 80: 163 * 1024, 90: 227 * 1024}

# Pointer arguments that carry the activation dtype (bf16 / fp32); all other pointers are fp32.
_DATA_PTRS = {"Q", "K", "V", "dY", "dV", "Z", "Y", "YPRE", "QS", "KS", "ST_K", "ST_V"}
_STATE_PTRS = {"ST", "GS"}
_INT_PARAMS = {"B", "T", "H", "N", "P", "G", "S", "PN", "CPG"}  # sizes; every other capitalised name is a pointer  # chunk states: activation dtype under bf16 (st_dtype), fp32 otherwise


def launch_params(kernel: str, chunk: int, d_state: int, headdim: int, dtype=None) -> tuple[dict, int]:
    """(constexprs, num_warps) the launchers pick for ``kernel`` (mirrors triton_siso_*.py; the
    MIMO path runs the same SSD-core kernels with CHUNK = chunk_size * R rows). ``dtype`` float32:
    full-precision dots, which take 8 warps in the chunk and group kernels (``chunk_warps``)."""
    ieee = dtype == torch.float32
    C, N, P = chunk, d_state, headdim
    BP = max(16, next_pow2(P))
    if kernel == "prep_qk":   # triton_siso_fwd.PREP_ROWS / PREP_NUM_WARPS
        return dict(ROWS=min(8, C), BLOCK_N2=max(16, next_pow2(N)) // 2, HAS_D=True), 1
    elif kernel == "step":
        BN, BP = next_pow2(max(N, 2)), next_pow2(P)
        return dict(BLOCK_N=BN, BLOCK_P=BP, P_BLOCK=BP, SPLIT=1, HAS_D=True, HAS_Z=True), (4 if BN * BP <= 8192 else 8)
    elif kernel == "prep_bwd":  # triton_siso_bwd.PREP_BWD_ROWS / PREP_BWD_NUM_WARPS; HG heads per q/k group
        return dict(ROWS=min(4, C), BLOCK_N2=max(32, next_pow2(N)) // 2, ANG_PER_HEAD=False, HG=4, HSPLIT=1), 1
    BN = max(16, next_pow2(N))
    const = dict(CHUNK=C, BLOCK_N=BN, BLOCK_P=BP)
    if kernel in ("group_state", "group_out"):   # triton_siso_fwd.GROUP_NUM_WARPS / GROUP_NUM_STAGES
        const["CPG_STATIC"] = 0
        if kernel == "group_out":
            const.update(HAS_SIN=True, WRITE_FINAL=True, HAS_SKIP=True, HAS_Z=True, SAVE=True, PREFETCH=False)
        return const, (8 if ieee else 4)
    if kernel == "chunk_bwd":
        const["HAS_SKIP"] = True   # the Mamba-3 backward adds skip dO to dV in this kernel
        if not ieee:                 # triton_siso_bwd.bwd_layout off Hopper: BWD_COLS_SMALL columns, BWD_NUM_WARPS
            const["NSPLIT"] = max(1, BN // 32)
            return const, 4
        const["NSPLIT"] = max(1, BN // 128)
    return const, (8 if ieee or C * max(BN, BP) > 4096 else 4)


GROUP_STAGES = 2          # software-pipelining depth of the group kernels on Hopper-class parts, bf16/fp16
HOPPER_SMEM = 200 * 1024  # parts with at least this much shared memory per block take the deeper pipeline


def group_stages(dtype: torch.dtype, smem_limit: int) -> int:
    """Pipelining depth the launcher gives the group kernels: 2 for 16-bit operands on a part with
    Hopper-class shared memory (H100 / H200, 227 KB), else 1 (fp32 at 2 stages needs 131 KB)."""
    return GROUP_STAGES if dtype != torch.float32 and smem_limit >= HOPPER_SMEM else 1

KERNELS = {  # name -> (module, attribute)
    "chunk_state": ("triton_siso_fwd", "_chunk_state_kernel"),
    "chunk_out": ("triton_siso_fwd", "_chunk_out_kernel"),
    "prep_qk": ("triton_siso_fwd", "_prep_qk_kernel"),
    "group_state": ("triton_siso_fwd", "_core_group_state_kernel"),
    "group_out": ("triton_siso_fwd", "_core_group_out_kernel"),
    "chunk_dstate": ("triton_siso_bwd", "_chunk_dstate_kernel"),
    "chunk_bwd": ("triton_siso_bwd", "_chunk_bwd_kernel"),
    "prep_bwd": ("triton_siso_bwd", "_prep_bwd_kernel"),
    "step": ("triton_step", "_step_kernel"),
}


def analytic_smem(kernel: str, chunk: int, d_state: int, headdim: int, dtype: torch.dtype, stages: int = 1) -> int:
    """Upper bound (bytes) from the dot operands one program stages in shared memory.

    fp32 inputs multiply as fp32 (4-byte operands); bf16 / fp16 as 2-byte. The step and the
    prep kernel have no dots: their shared memory is layout-conversion / reduction scratch
    (one fp32 [CHUNK, BLOCK_N2] tile, or a few [BLOCK_P] vectors)."""
    const, _ = launch_params(kernel, chunk, d_state, headdim, dtype)
    if kernel in ("prep_bwd", "prep_qk"):
        return const["ROWS"] * const["BLOCK_N2"] * 4 * 2
    if kernel == "step":
        return 8 * max(const["BLOCK_N"], const["BLOCK_P"]) * 4
    C, BN, BP = const["CHUNK"], const["BLOCK_N"], const["BLOCK_P"]
    b = 4 if dtype == torch.float32 else 2
    tiles = {
        "chunk_state": C * BP + C * BN,                       # (v w)^T, k
        "group_state": C * BP + C * BN,
        "chunk_dstate": C * BP + C * BN,                      # (dy w)^T, q
        "chunk_out": 2 * C * BN + C * C + C * BP + BN * BP,   # q, k, scores, v, state
        "group_out": 2 * C * BN + C * C + C * BP + BN * BP,
        # one column block: q k kw, dy v, a dsc, g s (fp32 at the defaults: 229376 bytes); N walked in
        # NB = BN / NSPLIT column blocks, twice: q k kw s / q k, dy v (x2), a dsc, g (x2)
        "chunk_bwd": (3 * C * BN + 2 * C * BP + 2 * C * C + 2 * BN * BP) if const.get("NSPLIT", 1) == 1 else
        (4 * C * (BN // const["NSPLIT"]) + 4 * C * BP + 2 * C * C + 2 * (BN // const["NSPLIT"]) * BP),
    }[kernel]
    # at small chunks the layout conversion of the fp32 [BLOCK_P, BLOCK_N] result dominates; the
    # one-block bf16 backward also converts a [P, N] operand
    extra = BP * BN * 2 if kernel == "chunk_bwd" and b == 2 and const.get("NSPLIT", 1) == 1 else 0
    if kernel in ("group_state", "group_out"):   # pipelined loads: one more buffer of the loop's tiles
        extra += (stages - 1) * ((2 if kernel == "group_out" else 1) * C * BN + C * BP) * b
    return max(tiles * b + extra, BP * BN * 4)


def _signature(fn, const: dict, dtype: torch.dtype) -> dict:
    tdt = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    sig = {}
    for name in inspect.signature(getattr(fn, "jit", fn).fn).parameters:
        if name in const:
            sig[name] = "constexpr"
        elif name in ("PREC",):
            sig[name] = "constexpr"
        elif name in _INT_PARAMS:
            sig[name] = "i32"
        elif name[0].isupper() or name in ("dA", "dY", "dQ", "dK", "dV", "ddA", "dSF", "dS0", "Dp"):
            sig[name] = "*" + (tdt if name in _DATA_PTRS or (name in _STATE_PTRS and tdt != "fp32") else "fp32")
        else:
            sig[name] = "i32"
    return sig


@functools.lru_cache(maxsize=None)
def compiled_smem(kernel: str, chunk: int, d_state: int, headdim: int, dtype: torch.dtype = torch.bfloat16,
                  arch: int = 86) -> int:
    """Shared memory (bytes) of the real kernel compiled offline for ``sm_<arch>``. Under
    TRITON_INTERPRET=1 (the CPU test setting) the kernels are interpreter objects, so the
    compile runs in a subprocess without it (see :func:`compiled_smem_batch`)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return compiled_smem_batch([(kernel, chunk, d_state, headdim, dtype, arch)])[0]
    return _compile(kernel, chunk, d_state, headdim, dtype, arch)


def compiled_smem_batch(queries) -> list:
    """[(kernel, chunk, d_state, headdim, dtype, arch)] -> bytes (or an error string), compiled
    in one subprocess with TRITON_INTERPRET=0."""
    import subprocess
    import sys
    q = [(k, c, n, p, str(dt).replace("torch.", ""), a) for k, c, n, p, dt, a in queries]
    code = ("import json, sys, torch\nfrom mamba3.ops.triton_utils import _compile\nout = []\n"
            "for k, c, n, p, dt, a in json.loads(sys.argv[1]):\n"
            "    try:\n        out.append(_compile(k, c, n, p, getattr(torch, dt), a))\n"
            "    except Exception as e:\n        out.append(f'error: {type(e).__name__}: {e}'[:300])\n"
            "print(json.dumps(out))\n")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    res = subprocess.run([sys.executable, "-c", code, json.dumps(q)], capture_output=True, text=True, env=env,
                         timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"offline compile subprocess failed: {res.stderr[-2000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    if len(queries) == 1 and isinstance(out[0], str):
        raise RuntimeError(out[0])
    return out


def _compile(kernel: str, chunk: int, d_state: int, headdim: int, dtype: torch.dtype, arch: int) -> int:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod, attr = KERNELS[kernel]
    fn = getattr(importlib.import_module(f"mamba3.ops.mamba3.{mod}"), attr)
    fn = getattr(fn, "jit", fn)   # the JITFunction under a fast_launch wrapper
    const, nw = launch_params(kernel, chunk, d_state, headdim, dtype)
    params = inspect.signature(fn.fn).parameters
    if "PREC" in params:
        const = {**const, "PREC": "ieee" if dtype == torch.float32 else "tf32"}
    src = ASTSource(fn=fn, signature=_signature(fn, const, dtype), constexprs=const)
    opts = {"num_warps": nw}
    if kernel in ("group_state", "group_out"):
        opts["num_stages"] = group_stages(dtype, SMEM_BY_ARCH.get(arch, SMEM_99KB))
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    return int(compiled.metadata.shared)


def device_smem_limit(device=None) -> int:
    """Opt-in shared memory per block of a CUDA device (bytes); 99 KB when unknown."""
    if device is None and not torch.cuda.is_available():
        return SMEM_99KB
    props = torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device())
    for attr in ("shared_memory_per_block_optin", "shared_memory_per_block"):
        v = getattr(props, attr, None)
        if v:
            return int(v)
    return SMEM_99KB


def smem_pruner(estimate: Callable[[dict, int, int], int], limit: Optional[int] = None):
    """An ``early_config_prune(configs, named_args, **kwargs)`` for ``triton.autotune``: drops the
    configs whose ``estimate(config.kwargs | named_args, num_warps, num_stages)`` exceeds the
    device limit (or ``limit``); keeps the smallest one if none fits (so the launch still reports
    a real resource error rather than 'no configs')."""
    def prune(configs, named_args, **kwargs):
        lim = limit if limit is not None else device_smem_limit()
        sized = [(estimate({**named_args, **kwargs, **c.kwargs}, c.num_warps, c.num_stages), c) for c in configs]
        keep = [c for s, c in sized if s <= lim]
        return keep or [min(sized, key=lambda sc: sc[0])[1]]
    return prune


def check_launch_fits(chunk: int, d_state: int, headdim: int, dtype: torch.dtype, device=None,
                      backward: bool = True, arch: Optional[int] = None) -> None:
    """Raise ValueError naming the sizes when a SISO launch would exceed the device's shared
    memory (forward only with ``backward=False``). Kernels whose analytic bound is over the
    limit are compiled for the device's arch (cached) before rejecting: the bound is loose in
    bf16, where Triton reuses operand buffers."""
    lim = device_smem_limit(device)
    if arch is None:
        arch = 86
        if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
            major, minor = torch.cuda.get_device_capability(device)
            arch = 10 * major + minor
    names = ["chunk_state", "chunk_out", "prep_qk", "group_state", "group_out"]
    if backward:
        names += ["chunk_dstate", "chunk_bwd"]
    for k in names:
        need = analytic_smem(k, chunk, d_state, headdim, dtype, group_stages(dtype, lim))
        if need > lim and need <= 2 * SMEM_BY_ARCH[90]:
            try:
                need = compiled_smem(k, chunk, d_state, headdim, dtype, arch)
            except Exception as e:  # no offline compiler: keep the (safe) bound
                import warnings
                warnings.warn(f"check_launch_fits: cannot compile {k} for sm_{arch} ({e}); using the analytic bound")
        if need > lim:
            raise ValueError(f"impl='triton': chunk_size={chunk}, d_state={d_state}, headdim={headdim} ({dtype}) "
                             f"needs ~{need // 1024} KB of shared memory in kernel {k}, the device allows "
                             f"{lim // 1024} KB per block; use a smaller chunk_size (or impl='chunked')")


GRID = dict(chunk=(16, 32, 64, 128), d_state=(64, 128, 256), headdim=(64, 128),
            dtype=(torch.bfloat16, torch.float32))


def sweep(kernels=None, grid=GRID, arch: int = 86, skip_above: int = 2 * SMEM_BY_ARCH[90]) -> list[dict]:
    """Compile every kernel over ``grid``; one record per config with exact and analytic bytes."""
    rows = []
    for kernel in kernels or [k for k in KERNELS]:
        for dtype in grid["dtype"]:
            for C in grid["chunk"]:
                for N in grid["d_state"]:
                    for P in grid["headdim"]:
                        if kernel == "step" and C != grid["chunk"][0]:
                            continue  # the step kernel has no chunk
                        est = analytic_smem(kernel, C, N, P, dtype, group_stages(dtype, SMEM_BY_ARCH.get(arch, SMEM_99KB)))
                        try:  # the dot kernels' bound is exact when nothing is reused: skip hopeless compiles
                            exact = (f"> {skip_above} (analytic, not compiled)" if est > skip_above
                                     else compiled_smem(kernel, C, N, P, dtype, arch))
                        except Exception as e:  # a config Triton itself rejects (e.g. register tiles)
                            exact = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                        rows.append(dict(kernel=kernel, dtype=str(dtype).replace("torch.", ""), chunk=C,
                                         d_state=N, headdim=P, smem=exact,
                                         analytic=est))
    return rows


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=86)
    ap.add_argument("--json", default=None, help="write the records here")
    ap.add_argument("--kernels", default=None, help="comma-separated subset of " + ",".join(KERNELS))
    ap.add_argument("--skip-above", type=int, default=2 * SMEM_BY_ARCH[90],
                    help="do not compile configs whose analytic bound exceeds this (bytes)")
    args = ap.parse_args(argv)
    rows = sweep(args.kernels.split(",") if args.kernels else None, arch=args.arch, skip_above=args.skip_above)
    lim = SMEM_BY_ARCH.get(args.arch, SMEM_99KB)
    over = [r for r in rows if (r["smem"] > lim if isinstance(r["smem"], int) else r["smem"].startswith(">"))]
    errors = [r for r in rows if isinstance(r["smem"], str) and r["smem"].startswith("error")]
    for r in rows:
        flag = " PRUNE" if r in over else (" ERROR" if r in errors else "")
        print(f"{r['kernel']:13s} {r['dtype']:9s} C={r['chunk']:<4d} N={r['d_state']:<4d} P={r['headdim']:<4d} "
              f"smem={r['smem']} analytic={r['analytic']}{flag}")
    summary = {"arch": args.arch, "limit": lim, "configs": len(rows), "over_limit": len(over),
               "compile_errors": len(errors),
               "analytic_is_upper_bound": all(r["analytic"] >= r["smem"] for r in rows
                                              if isinstance(r["smem"], int) and r["analytic"])}
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
