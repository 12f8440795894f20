"""The SISO inference forward with and without the group core's one-chunk-ahead loads of v, skip and
the gate (``triton_siso_fwd.GROUP_PREFETCH``), at both pipelining depths, config A, bf16; plus the
training fwd+bwd (whose forward saves states and keeps the loads in step either way). Outputs are
compared with the setting off before timing.

    python benchmarks/gpu_fwd_prefetch.py --out $OUT/gpu_fwd_prefetch.json
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
import mamba3.ops.mamba3.triton_siso_fwd as fw  # noqa: E402


fwd = gk.siso_fwd


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="8x2048,2x8192,1x16384")
    ap.add_argument("--out", default="gpu_fwd_prefetch.json")
    a = ap.parse_args()
    res = gk.versions()
    defaults = fw.GROUP_PREFETCH, fw.GROUP_NUM_STAGES
    for shape in a.shapes.split(","):
        B, T = map(int, shape.split("x"))
        xs = gk.inputs(B, T)
        row = {}
        with torch.no_grad():
            fw.GROUP_PREFETCH = False
            y0, f0 = fwd(xs)
            for pf, stages in itertools.product((False, True), (1, 2)):
                fw.GROUP_PREFETCH, fw.GROUP_NUM_STAGES = pf, stages
                y, f = fwd(xs)
                key = f"prefetch{int(pf)}_stages{stages}"
                row["rel_" + key] = max(gk.rel(y, y0), gk.rel(f.ssm, f0.ssm))
                row["fwd_graph_" + key] = do_bench_cudagraph(lambda: fwd(xs), return_mode="median")
                row["fwd_" + key] = do_bench(lambda: fwd(xs), return_mode="median")
        fw.GROUP_PREFETCH, fw.GROUP_NUM_STAGES = defaults
        _, _, step = gk.siso_step(B, T)
        row["fwdbwd"] = do_bench(step, return_mode="median")
        res[shape] = row
        print(shape, json.dumps({k: round(v, 4) for k, v in row.items()}), flush=True)
    assert all(v < 1e-2 for r in res.values() if isinstance(r, dict) for k, v in r.items() if k.startswith("rel_"))
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
