"""Forward (no grad) of the Triton Mamba-3 SISO path: rotation inside the core (triton_siso_infer.py)
against the training forward (preparation kernel + core), launch settings swept; decode warps.

    python benchmarks/gpu_infer_sweep.py --out $OUT/gpu_infer_sweep.json

Config A (H=32, P=64, N=128, G=1, S=32, bf16) at the issue's shapes. Each shape is checked first:
the in-core forward against the training forward (bf16, same kernels' numerics) and against the
chunked PyTorch path in fp32 (relative L2 < 1e-2, output and final state).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import triton  # noqa: E402
from gpu_kernels import CHUNK, DECODE_B, NAMES, SHAPES, decode_inputs, guarded, inputs, rel  # noqa: E402
from mamba3.ops.mamba3 import mamba3_siso_chunked  # noqa: E402
from mamba3.ops.mamba3 import triton_siso, triton_siso_infer as inf  # noqa: E402
from mamba3.ops.mamba3.triton_siso import mamba3_siso_triton  # noqa: E402
from mamba3.ops.mamba3.triton_step import mamba3_siso_step_triton  # noqa: E402

VARIANTS = {  # name -> (rotate in core, phase mode, num_warps, num_stages)
    "old": (False, None, None, None),
    "p1_w8_s1": (True, 1, 8, 1),
    "p2_w8_s1": (True, 2, 8, 1),
    "p2_w4_s1": (True, 2, 4, 1),
    "p2_w8_s2": (True, 2, 8, 2),
    "p2_w4_s2": (True, 2, 4, 2),
}


def fwd(xs, chunk=CHUNK, final=False):
    with torch.no_grad():
        return mamba3_siso_triton(*(xs[n] for n in NAMES), chunk_size=chunk, return_final_state=final)


def configure(rotate, phase, nw, ns):
    triton_siso.ROTATE_IN_CORE = rotate
    inf.INFER_PHASE, inf.INFER_NUM_WARPS, inf.INFER_NUM_STAGES = phase or 2, nw or 8, ns or 1


def kernel_times(fn, reps=5):
    """{kernel name: ms per call} from torch.profiler over ``reps`` calls."""
    from torch.profiler import ProfilerActivity, profile as tprofile
    fn()
    torch.cuda.synchronize()
    with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            out[e.key[:60]] = t / reps / 1e3
    return out


def registers():
    """n_regs / n_spills of the compiled in-core kernels (whatever this Triton exposes)."""
    out = {}
    for name in ("_infer_out_kernel", "_infer_state_kernel", "_token_phase_kernel"):
        fn = getattr(inf, name)
        try:
            caches = fn.device_caches if hasattr(fn, "device_caches") else {}
            for dev, entry in caches.items():
                cache = entry[0] if isinstance(entry, tuple) else entry
                for key, k in cache.items():
                    k._init_handles()
                    out.setdefault(name, []).append(dict(n_regs=k.n_regs, n_spills=k.n_spills,
                                                         num_warps=k.metadata.num_warps,
                                                         num_stages=k.metadata.num_stages, shared=k.metadata.shared))
        except Exception as e:
            out[name] = repr(e)[:200]
    return out


def sweep_shape(B, T, res, S_in=None):
    xs = inputs(B, T, seed=B + T)
    if S_in is not None:
        xs["angles"] = xs["angles"][..., :S_in].contiguous()
    row = {}
    ref = {n: x.float() for n, x in xs.items()}
    with torch.no_grad():
        y_ref, f_ref = mamba3_siso_chunked(*(ref[n] for n in NAMES), return_final_state=True, chunk_size=CHUNK)
    for name, cfg in VARIANTS.items():
        configure(*cfg)
        try:
            y, f = fwd(xs, final=True)
            errs = dict(y=rel(y, y_ref), ssm=rel(f.ssm, f_ref.ssm))
            ok = all(v < 1e-2 for v in errs.values())
            row[name] = dict(errs, ok=ok)
            if ok:
                row[name]["wall_ms"] = do_bench(lambda: fwd(xs), return_mode="median")
                kt = kernel_times(lambda: fwd(xs))
                row[name]["kernels_ms"] = kt
                row[name]["kernel_sum_ms"] = sum(kt.values())
        except Exception as e:  # a setting that does not compile (shared memory) must not stop the rest
            row[name] = dict(error=repr(e)[:300], ok=False)
        r = row[name]
        print(f"{B}x{T} S={S_in} {name}: ok={r['ok']} wall={r.get('wall_ms', float('nan')):.4f} "
              f"kernels={r.get('kernel_sum_ms', float('nan')):.4f} "
              + " ".join(f"{k}={v:.4f}" for k, v in r.get("kernels_ms", {}).items() if v > 0.004), flush=True)
    configure(True, None, None, None)
    row["floor_fwd_ms"] = 5.74e-9 * B * T * 1e3
    res["prefill"][f"{B}x{T}" + (f"_S{S_in}" if S_in is not None else "")] = row


def sweep_decode(res):
    for B in DECODE_B:
        row = {}
        for sd in (torch.float32, torch.bfloat16):
            xs, st = decode_inputs(B, sd)
            for nw in (2, 4, 8):
                row[f"{str(sd)[6:]}_w{nw}"] = do_bench_cudagraph(
                    lambda: mamba3_siso_step_triton(*(xs[n] for n in NAMES), st, num_warps=nw), return_mode="median")
        res["decode"][f"B{B}"] = row
        print(f"decode B={B}: " + " ".join(f"{k}={v:.4f}" for k, v in row.items()), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default=",".join(f"{b}x{t}" for b, t in SHAPES))
    ap.add_argument("--no-decode", action="store_true")
    args = ap.parse_args()
    res = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, prefill={},
               decode={})
    for s in args.shapes.split(","):
        B, T = map(int, s.split("x"))
        guarded(sweep_shape, B, T, res)
    guarded(sweep_shape, *SHAPES[0], res, 0)    # no rotation: what the rotation costs
    res["registers"] = registers()
    print("registers", res["registers"], flush=True)
    if not args.no_decode:
        guarded(sweep_decode, res)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
