"""The SISO backward's state-gradient pass two ways, checked against each other and timed (config A).

    python benchmarks/gpu_state_grad_walk.py --out $OUT/gpu_state_grad_walk.json

"walk": one reverse walk over the chunks per (batch, head, half of P), the gradient carried in
registers (_dstate_walk_kernel); "scan": chunk-local sums in parallel, then a serial scan over the
stored sums (_chunk_dstate_kernel + _dstate_scan_kernel). ssd_core_bwd takes the walk from
triton_siso_bwd.WALK_MIN_PROGRAMS batch x heads on; this measures where that pays. Each shape:
every input gradient of a full SISO fwd+bwd by both passes (relative difference < 1e-2 in bf16;
d angles, ill-conditioned in bf16, < 0.2 as in gpu_kernels.py's check),
then do_bench medians of fwd+bwd and the two passes' kernel times (torch.profiler).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import benchmarks.gpu_kernels as gk  # noqa: E402
import mamba3.ops.mamba3.triton_siso_bwd as bw  # noqa: E402

PASS_KERNELS = ("_dstate_walk_kernel", "_chunk_dstate_kernel", "_dstate_scan_kernel")


def run(B, T, walk):
    bw.WALK_MIN_PROGRAMS = bw.WALK_SMALL_MIN = 1 if walk else 1 << 30
    xs = gk.inputs(B, T, seed=5)
    leaves = {n: x.clone().requires_grad_(True) for n, x in xs.items()}
    dy = torch.randn(B, T, gk.H, gk.P, device="cuda", dtype=torch.bfloat16, generator=torch.Generator(
        device="cuda").manual_seed(6))

    def step():
        for x in leaves.values():
            x.grad = None
        gk.mamba3_siso_triton(*(leaves[n] for n in gk.NAMES), chunk_size=gk.CHUNK)[0].backward(dy)
    step()
    grads = {n: x.grad.clone() for n, x in leaves.items()}
    ms = do_bench(step, return_mode="median")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    kern = {e.key: e.device_time_total / 3e3 for e in prof.key_averages() if e.key in PASS_KERNELS}
    return grads, ms, kern


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="16x2048,8x2048,4x2048,2x8192")
    ap.add_argument("--out", default="benchmarks/results/gpu_state_grad_walk.json")
    a = ap.parse_args()
    res = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               default_walk_min_programs=bw.WALK_MIN_PROGRAMS, shapes={})
    default = bw.WALK_MIN_PROGRAMS, bw.WALK_SMALL_MIN
    for shape in a.shapes.split(","):
        B, T = (int(v) for v in shape.split("x"))
        g_walk, ms_walk, k_walk = run(B, T, True)
        g_scan, ms_scan, k_scan = run(B, T, False)
        diff = {n: gk.rel(g_walk[n], g_scan[n]) for n in g_walk}
        row = dict(batch_x_heads=B * gk.H, fwdbwd_walk_ms=ms_walk, fwdbwd_scan_ms=ms_scan,
                   pass_walk_ms=sum(k_walk.values()), pass_scan_ms=sum(k_scan.values()),
                   max_rel_diff=max(diff.values()), rel_diff=diff,
                   ok=all(v < (0.2 if n == "angles" else 1e-2) for n, v in diff.items()))
        res["shapes"][shape] = row
        print(shape, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "rel_diff"},
              flush=True)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    bw.WALK_MIN_PROGRAMS, bw.WALK_SMALL_MIN = default


if __name__ == "__main__":
    main()
