"""``mamba3 doctor``: what this machine will run, and a quick self-check of every path.

Prints versions (python, torch, triton, CUDA), the GPU and its limits, which kernel path each op
takes here and why, warnings for known-bad combinations, then checks every available path
against the float64 reference on small random inputs (about 5 seconds on a laptop CPU).
"""
from __future__ import annotations

import argparse
import importlib
import platform
import sys
import time
from typing import Callable

import torch

# Small float64 constructions of every mixer, for the forward-vs-recurrent self-check.
MIXER_SMOKE = {
    "mamba3": ("mamba3.layers.mamba3:Mamba3", dict(d_state=8, headdim=4, chunk_size=4)),
    "mamba3-mimo": ("mamba3.layers.mamba3:Mamba3", dict(d_state=8, headdim=4, is_mimo=True, mimo_rank=2, chunk_size=4)),
    "mamba2": ("mamba3.layers.mamba2:Mamba2", dict(d_state=8, headdim=4, chunk_size=4)),
    "mamba1": ("mamba3.layers.mamba1:Mamba1", dict(d_state=4)),
    "gdn": ("mamba3.layers.gated_deltanet:GatedDeltaNet", dict(head_dim=8, num_heads=2)),
    "attention": ("mamba3.layers.attention:Attention", dict(num_heads=2)),
    "s4d": ("mamba3.layers.s4d:S4D", dict(d_state=8)),
}


def _version(mod: str) -> str:
    try:
        return importlib.import_module(mod).__version__
    except Exception as e:  # not installed, or broken
        return f"not available ({type(e).__name__})"


def environment() -> dict:
    info = dict(python=platform.python_version(), platform=platform.platform(), torch=torch.__version__,
                triton=_version("triton"), cuda_available=torch.cuda.is_available(),
                cuda_runtime=torch.version.cuda)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, compute_capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1),
                    shared_memory_per_block_optin=getattr(p, "shared_memory_per_block_optin", None))
    return info


def kernel_paths(info: dict) -> list[tuple[str, str, str]]:
    """(op, path chosen by impl='auto', why) for each op family."""
    rows = []
    cuda = info["cuda_available"]
    triton_ok = not info["triton"].startswith("not available")
    try:
        from .ops.mamba3.interface import triton_available
        siso_triton = cuda and triton_available(torch.device("cuda"))
    except Exception:
        siso_triton = False
    for op in ("mamba3_siso", "mamba3_siso_step", "mamba3_mimo", "mamba2 ssd", "mamba1 selective_scan",
               "gated_delta_rule", "attention", "s4d"):
        if op == "attention":
            rows.append((op, "sdpa", "torch scaled_dot_product_attention (any device)"))
        elif op == "s4d":
            rows.append((op, "conv (FFT)", "time-invariant kernel: FFT convolution for sequences, recurrence for decode"))
        elif op.startswith("mamba3_siso") and siso_triton:
            rows.append((op, "triton", "CUDA device and triton kernels importable"))
        elif not cuda:
            rows.append((op, "chunked (PyTorch)", "no CUDA device: Triton kernels run only on GPUs"))
        elif not triton_ok:
            rows.append((op, "chunked (PyTorch)", "triton is not installed (pip install 'mamba3[triton]')"))
        else:
            rows.append((op, "chunked (PyTorch)", "no Triton kernel for this op yet"))
    return rows


def warnings_for(info: dict) -> list[str]:
    out = []
    tv = info["triton"]
    if info.get("compute_capability") == "9.0" and not tv.startswith("not"):
        parts = tuple(int(x) for x in tv.split(".")[:3] if x.isdigit())
        if parts < (3, 7, 1):
            out.append(f"triton {tv} on Hopper: other projects (flash-linear-attention) report miscompiled gated "
                       "backward kernels below 3.7.1. mamba3's own kernels are checked on this version by "
                       "the self-check below and by tests/ops/test_mamba3_triton.py; trust those results.")
    if info["cuda_available"] and tv.startswith("not"):
        out.append("a GPU is present but triton is missing: everything runs on the slower chunked PyTorch path")
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _check_mixer(target: str, kwargs: dict, device) -> float:
    mod, cls = target.split(":")
    Layer = getattr(importlib.import_module(mod), cls)
    torch.manual_seed(0)
    layer = Layer(16, layer_idx=0, **kwargs).to(device=device, dtype=torch.float64)
    u = torch.randn(2, 9, 16, dtype=torch.float64, device=device)
    with torch.no_grad():
        y = layer(u)
        cache = layer.allocate_inference_cache(2, 9, device=device, dtype=torch.float64)
        ys = torch.stack([layer.step(u[:, t], cache) for t in range(9)], 1)
    return _rel(ys, y)


def _check_siso(device, impl: str) -> float:
    from .ops.mamba3 import mamba3_siso
    g = torch.Generator(device="cpu").manual_seed(0)
    B, T, H, N, P, S = 2, 37, 4, 16, 8, 4
    r = lambda *s: torch.randn(*s, generator=g)
    dt = torch.nn.functional.softplus(r(B, T, H) - 1)
    args = [r(B, T, 1, N), r(B, T, 1, N), r(B, T, H, P), -dt * 0.5, dt, r(B, T, H), r(H, N), r(H, N), r(B, T, S),
            r(H), r(B, T, H, P)]
    ref, _ = mamba3_siso(*[a.double() for a in args], impl="reference")
    y, _ = mamba3_siso(*[a.to(device) for a in args], impl=impl, chunk_size=16)
    return _rel(y.cpu(), ref)


def self_checks(info: dict) -> list[tuple[str, bool, str]]:
    checks: list[tuple[str, Callable[[], float], float]] = [("mamba3_siso chunked vs reference (fp32)",
                                                             lambda: _check_siso("cpu", "chunked"), 1e-4)]
    if info["cuda_available"]:
        try:
            from .ops.mamba3.interface import triton_available
            if triton_available(torch.device("cuda")):
                checks.append(("mamba3_siso triton vs reference (fp32)", lambda: _check_siso("cuda", "triton"), 1e-2))
        except Exception:
            pass
    for name, (target, kw) in MIXER_SMOKE.items():
        checks.append((f"{name} layer: parallel forward vs recurrent step (fp64)",
                       lambda t=target, k=kw: _check_mixer(t, k, "cpu"), 1e-9))
    out = []
    for name, fn, tol in checks:
        try:
            err = fn()
            out.append((name, err < tol, f"rel err {err:.1e} (tol {tol:.0e})"))
        except Exception as e:  # report, never crash the doctor
            out.append((name, False, f"{type(e).__name__}: {e}"))
    return out


def run(args=None) -> int:
    t0 = time.perf_counter()
    info = environment()
    print("mamba3 doctor")
    for k, v in info.items():
        print(f"  {k:32s} {v}")
    print("\nkernel paths (impl='auto'):")
    for op, path, why in kernel_paths(info):
        print(f"  {op:24s} -> {path:20s} {why}")
    warns = warnings_for(info)
    if warns:
        print("\nwarnings:")
        for w in warns:
            print(f"  ! {w}")
    print("\nself-check against the float64 reference:")
    results = self_checks(info)
    for name, ok, detail in results:
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}: {detail}")
    failed = sum(not ok for _, ok, _ in results)
    print(f"\n{len(results) - failed} passed, {failed} failed in {time.perf_counter() - t0:.1f}s")
    return 1 if failed else 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("doctor", help="versions, GPU, kernel paths and a self-check of every path")
    p.set_defaults(func=run)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mamba3 doctor")
    ap.parse_args(argv)
    return run()


if __name__ == "__main__":
    sys.exit(main())
