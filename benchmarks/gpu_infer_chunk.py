"""SISO inference forward with the group output kernel at the caller's chunk (64) or at
INFER_CORE_CHUNK (32; chunk groups and their state pre-pass keep 64), config A, bf16, by CUDA graph,
the two settings alternated twice; outputs compared before timing.

    python benchmarks/gpu_infer_chunk.py --out $OUT/gpu_infer_chunk.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from triton.testing import do_bench_cudagraph

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import benchmarks.gpu_kernels as gk  # noqa: E402
import mamba3.ops.mamba3.triton_siso_fwd as fw  # noqa: E402


def fwd(xs):
    return gk.mamba3_siso_triton(*(xs[n] for n in gk.NAMES), chunk_size=gk.CHUNK, return_final_state=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="8x2048,4x2048,16x2048,2x8192,1x16384")
    ap.add_argument("--chunks", default="32", help="output-kernel chunks to compare with the caller's 64")
    ap.add_argument("--out", default="gpu_infer_chunk.json")
    a = ap.parse_args()
    res = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=__import__("triton").__version__)
    default = fw.INFER_CORE_CHUNK
    for shape in a.shapes.split(","):
        B, T = map(int, shape.split("x"))
        xs = gk.inputs(B, T)
        row = {}
        with torch.no_grad():
            fw.INFER_CORE_CHUNK = None
            y0, f0 = fwd(xs)
            for rnd in range(2):
                for setting in [None] + [int(c) for c in a.chunks.split(",")]:
                    fw.INFER_CORE_CHUNK = setting
                    y, f = fwd(xs)
                    key = f"chunk{setting or gk.CHUNK}"
                    row["rel_" + key] = max(gk.rel(y, y0), gk.rel(f.ssm, f0.ssm))
                    row.setdefault(key, []).append(do_bench_cudagraph(lambda: fwd(xs), return_mode="median"))
        fw.INFER_CORE_CHUNK = default
        res[shape] = row
        print(shape, json.dumps(row), flush=True)
    assert all(v < 1e-2 for r in res.values() if isinstance(r, dict) for k, v in r.items() if k.startswith("rel_"))
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
