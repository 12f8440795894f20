"""The forward's phase pre-pass (triton_siso_fwd.chunk_start_phases: block sums of dt pi tanh(angles),
then the fp64 scan over blocks), config A, bf16: its GPU time alone and the SISO inference forward's,
by CUDA graph, with 1 / 2 / 4 / 8 heads per program of the sums (``PHASE_SUM_HEADS``); the phases are
compared with the one-head setting (bitwise) before timing.

    python benchmarks/gpu_phase_prepass.py --out $OUT/gpu_phase_prepass.json
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="8x2048,2x8192,1x16384")
    ap.add_argument("--out", default="gpu_phase_prepass.json")
    a = ap.parse_args()
    res = gk.versions()
    default = fw.PHASE_SUM_HEADS
    rows = fw.prep_rows(gk.CHUNK)
    for shape in a.shapes.split(","):
        B, T = map(int, shape.split("x"))
        xs = gk.inputs(B, T)
        phases = lambda: fw.chunk_start_phases(xs["dt"], xs["angles"], None, rows)
        row = {}
        with torch.no_grad():
            fw.PHASE_SUM_HEADS = 1
            ref = phases()
            for hpp in (1, 2, 4, 8):
                fw.PHASE_SUM_HEADS = hpp
                out = phases()
                row[f"equal_h{hpp}"] = all(torch.equal(x, y) for x, y in zip(out, ref))
                row[f"phases_h{hpp}"] = do_bench_cudagraph(phases, return_mode="median")
                row[f"fwd_h{hpp}"] = do_bench_cudagraph(
                    lambda: gk.mamba3_siso_triton(*(xs[n] for n in gk.NAMES), chunk_size=gk.CHUNK), return_mode="median")
        fw.PHASE_SUM_HEADS = default
        res[shape] = row
        print(shape, json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    assert all(v for r in res.values() if isinstance(r, dict) for k, v in r.items() if k.startswith("equal_"))
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
