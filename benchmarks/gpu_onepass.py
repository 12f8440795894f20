"""One-pass SISO forward (preparation inside the core) vs the two-pass forward: check + sweep.

    python benchmarks/gpu_onepass.py --out $OUT/onepass.json

Config A (benchmarks/gpu_kernels.py), no-grad forward. For each shape: the two-pass forward's
output as the check (relative error < 1e-2 in bf16), then do_bench medians and GPU-only time
(CUDA graph) of every launch variant (internal chunk, P split, warps, pipeline stages).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import benchmarks.gpu_kernels as gk  # noqa: E402
import mamba3.ops.mamba3.triton_siso_onepass as op  # noqa: E402


def one_shape(B, T, variants):
    xs = gk.inputs(B, T, seed=3)
    args = [xs[n] for n in gk.NAMES]
    res = {}
    with torch.no_grad():
        ref = gk.mamba3_siso_triton(*args, chunk_size=gk.CHUNK)[0]
        res["twopass_ms"] = do_bench(lambda: gk.mamba3_siso_triton(*args, chunk_size=gk.CHUNK), return_mode="median")
        res["twopass_graph_ms"] = do_bench_cudagraph(lambda: gk.mamba3_siso_triton(*args, chunk_size=gk.CHUNK),
                                                     return_mode="median")
        q, k, v, dA, dt, trap, qb, kb, ang, D, z = args
        for chunk, split, nw, ns in variants:
            op.ONEPASS_NUM_WARPS, op.ONEPASS_NUM_STAGES = nw, ns
            fn = lambda: op.mamba3_onepass_fwd(q, k, v, dA, dt, trap, qb, kb, ang, D, z, None, None, chunk, p_split=split)
            name = f"C{chunk}_split{split}_w{nw}_s{ns}"
            try:
                y = fn()[0]
                err = gk.rel(y, ref)
                r = dict(err=err, ms=do_bench(fn, return_mode="median"),
                         graph_ms=do_bench_cudagraph(fn, return_mode="median"))
            except Exception as e:  # report a variant that fails to compile and go on
                r = dict(error=repr(e)[:300])
            res[name] = r
            print(B, T, name, r, flush=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8x2048,2x8192,1x16384")
    ap.add_argument("--variants", default="32,64:1,2:4,8:1,2")
    ap.add_argument("--out", default="onepass.json")
    a = ap.parse_args()
    lists = [[int(x) for x in part.split(",")] for part in a.variants.split(":")]
    variants = list(itertools.product(*lists))
    out = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=__import__("triton").__version__)
    for shape in a.shapes.split(","):
        B, T = (int(v) for v in shape.split("x"))
        out[shape] = one_shape(B, T, variants)
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
