"""SISO fwd+bwd GPU time (CUDA graph) under backward launch variants, config A.

    python benchmarks/gpu_bwd_sweep.py --out $OUT/bwd_sweep.json

Variants: the chunk backward's pipelining depth (BWD_NUM_STAGES), its column block and warps,
and the state-gradient pass as one reverse walk below WALK_MIN_PROGRAMS with more P slices.
Every variant's gradients are compared with the default's (relative error < 1e-2) before timing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from triton.testing import do_bench_cudagraph

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import benchmarks.gpu_kernels as gk  # noqa: E402
import mamba3.ops.mamba3.triton_siso_bwd as bw  # noqa: E402

VARIANTS = {
    "default": {},
    "stages1": dict(BWD_NUM_STAGES=1),
    "stages2": dict(BWD_NUM_STAGES=2),
    "stages4": dict(BWD_NUM_STAGES=4),
    "cols64_w4_s2": dict(BWD_COLS=64, BWD_NUM_STAGES=2),
    "cols64_w8": dict(BWD_COLS=64, BWD_NUM_WARPS=8),
    "cols64_w4_s1": dict(BWD_COLS=64, BWD_NUM_STAGES=1),
    "cols64_w4_s3": dict(BWD_COLS=64, BWD_NUM_STAGES=3),
    "cols128_w4_s1": dict(BWD_COLS=128, BWD_NUM_STAGES=1),
    "cols128_w4_s2": dict(BWD_COLS=128, BWD_NUM_STAGES=2),
    "cols64_w8_s2": dict(BWD_COLS=64, BWD_NUM_WARPS=8, BWD_NUM_STAGES=2),
    "walk_split2": dict(WALK_MIN_PROGRAMS=0, WALK_P_SPLIT=2),
    "walk_split4": dict(WALK_MIN_PROGRAMS=0, WALK_P_SPLIT=4),
    "walk_stages3": dict(WALK_NUM_STAGES=3),
    "walk_stages4": dict(WALK_NUM_STAGES=4),
    "walk_stages3_split1": dict(WALK_NUM_STAGES=3, WALK_P_SPLIT=1),
    "walk_split1": dict(WALK_P_SPLIT=1),
    "walk_p2": dict(WALK_P_SPLIT=2),     # "walk_split2" in gpu_bwd_sweep_s13d.json
    "walk_small2": dict(WALK_SMALL_P_SPLIT=2),
    "walk_small8": dict(WALK_SMALL_P_SPLIT=8),
}


def one_shape(B, T, names):
    xs, leaves, step = gk.siso_step(B, T, seed=5)

    def grads():
        step()
        return [leaves[n].grad.clone() for n in gk.NAMES]
    defaults = {k: getattr(bw, k) for v in VARIANTS.values() for k in v}
    ref = grads()
    res = {}
    for name in names:
        for k, v in defaults.items():
            setattr(bw, k, v)
        for k, v in VARIANTS[name].items():
            setattr(bw, k, v)
        try:
            err = max(gk.rel(a, b) for a, b in zip(grads(), ref))
            res[name] = dict(err=err, graph_ms=do_bench_cudagraph(step, return_mode="median"))
        except Exception as e:  # a variant that does not compile or fit: report, go on
            res[name] = dict(error=repr(e)[:300])
        print(B, T, name, res[name], flush=True)
    for k, v in defaults.items():
        setattr(bw, k, v)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8x2048,2x8192,1x16384")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default="bwd_sweep.json")
    a = ap.parse_args()
    out = gk.versions()
    for shape in a.shapes.split(","):
        B, T = (int(v) for v in shape.split("x"))
        out[shape] = one_shape(B, T, a.variants.split(","))
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
