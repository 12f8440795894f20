"""Launch settings of the fused MIMO kernels (triton_mimo_fwd.py, triton_mimo_bwd.py), config A at
8x2048, R=4.

    python benchmarks/gpu_mimo_fwd_sweep.py --out $OUT/gpu_mimo_fwd_sweep.json
    python benchmarks/gpu_mimo_fwd_sweep.py --bwd --out $OUT/gpu_mimo_bwd_sweep.json

Forward: the preparation kernel alone over (tokens per program, warps), then the whole no-grad
forward over the epilogue's tokens per program. --bwd: the whole fwd+bwd over the preparation
backward's warps, the epilogue / X backward's tokens per program and the epilogue backward's warps,
one at a time (do_bench medians, ms). Correctness of the same paths is checked by
gpu_kernels.py --mimo (forward, inference forward and every gradient vs the fp32 chunked path).
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
import mamba3.ops.mamba3.triton_mimo_fwd as mf  # noqa: E402
from mamba3.ops.mamba3 import mamba3_mimo  # noqa: E402
from mamba3.ops.mamba3.triton_siso_fwd import chunk_start_phases  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/gpu_mimo_fwd_sweep.json")
    ap.add_argument("--bwd", action="store_true")
    a = ap.parse_args()
    xs = gk.mimo_inputs(8, 2048, 4)
    res = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               shape="8x2048 R=4", ms={})
    if a.bwd:
        sweep_bwd(xs, res)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
        return
    warps, tokens = mf.MIMO_PREP_WARPS, mf.MIMO_OUT_TOKENS
    for rows in (8, 16):
        th0, _ = chunk_start_phases(xs["dt"], xs["angles"], None, rows)
        for nw in (1, 2, 4):
            mf.MIMO_PREP_WARPS = nw
            res["ms"][f"prep_rows{rows}_warps{nw}"] = do_bench(lambda: mf.mimo_prep(
                xs["q"], xs["k"], xs["v"], xs["dt"], xs["trap"], xs["q_bias"], xs["k_bias"], xs["angles"],
                xs["mimo_x"], xs["D"], th0, rows, torch.bfloat16), return_mode="median")
    mf.MIMO_PREP_WARPS = warps
    for tok in (8, 16, 32):
        mf.MIMO_OUT_TOKENS = tok
        with torch.no_grad():
            res["ms"][f"fwd_out_tokens{tok}"] = do_bench(
                lambda: mamba3_mimo(*(xs[n] for n in gk.MIMO_NAMES), impl="triton"), return_mode="median")
    mf.MIMO_OUT_TOKENS = tokens
    print({k: round(v, 4) for k, v in res["ms"].items()}, flush=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


def sweep_bwd(xs, res):
    import mamba3.ops.mamba3.triton_mimo_bwd as mb
    leaves = {n: x.clone().requires_grad_(True) for n, x in xs.items()}
    dy = torch.randn_like(xs["v"])
    settings = [("MIMO_PREP_BWD_WARPS", (1, 2, 4)), ("MIMO_BWD_TOKENS", (16, 32)), ("MIMO_OUT_BWD_WARPS", (2, 4))]
    for name, values in settings:      # one setting at a time, the others at their defaults
        default = getattr(mb, name)
        for value in values:
            setattr(mb, name, value)
            key = f"fwdbwd_{name.lower()}_{value}"
            res["ms"][key] = do_bench(
                lambda: mamba3_mimo(*(leaves[n] for n in gk.MIMO_NAMES), impl="triton")[0].backward(dy),
                grad_to_none=list(leaves.values()), return_mode="median")
            print(key, round(res["ms"][key], 4), flush=True)
        setattr(mb, name, default)


if __name__ == "__main__":
    main()
