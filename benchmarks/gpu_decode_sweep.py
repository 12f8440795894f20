"""Decode step launch settings (warps x rows per loop step) beside the official step, one run.

    python benchmarks/gpu_decode_sweep.py --official .official --out $OUT/gpu_decode_sweep.json

Config A (H=32, P=64, N=128), B = 1 / 16 / 64 / 256, fp32 and bf16 state; CUDA-graph medians
(do_bench_cudagraph), ms. Floor = state read + write at 3.0 TB/s.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
from triton.testing import do_bench_cudagraph

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gpu_kernels import BW, DECODE_B, NAMES, H, N, P, S, check_decode, decode_inputs, import_official  # noqa: E402
from mamba3.ops.mamba3.triton_step import mamba3_siso_step_triton  # noqa: E402

SETTINGS = [(nw, pb, 1) for nw in (1, 2, 4) for pb in (None, 32, 16, 8)] + [
    (nw, pb, sp) for nw in (1, 2, 4) for pb, sp in ((32, 2), (16, 4), (8, 8), (8, 4))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--official", default=".official")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    off = import_official(args.official)
    res = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, check={},
               decode={})
    if not check_decode(res):
        raise SystemExit("decode check failed")
    for B in DECODE_B:
        row = {}
        for sd in (torch.float32, torch.bfloat16):
            name = str(sd)[6:]
            xs, st = decode_inputs(B, sd)
            row[f"{name}_default"] = do_bench_cudagraph(lambda: mamba3_siso_step_triton(*(xs[n] for n in NAMES), st),
                                                        return_mode="median")
            for nw, pb, sp in SETTINGS:
                if sp > 1 and B > 16:
                    continue
                row[f"{name}_w{nw}_pb{pb or P}_sp{sp}"] = do_bench_cudagraph(
                    lambda: mamba3_siso_step_triton(*(xs[n] for n in NAMES), st, num_warps=nw, p_block=pb, split=sp),
                    return_mode="median")
            row[f"floor_{name}_ms"] = (8 if sd == torch.float32 else 4) * B * H * P * N / BW * 1e3
        if off is not None:
            xs, st = decode_inputs(B, torch.float32)
            ang = xs["angles"].unsqueeze(1).expand(B, H, S).contiguous()
            a = (xs["q"], xs["k"], xs["v"], xs["dA"], xs["dt"], xs["trap"], xs["q_bias"], xs["k_bias"], ang, xs["D"],
                 xs["z"])
            row["official_float32"] = do_bench_cudagraph(lambda: off.step(*a, Input_States=tuple(st)),
                                                         return_mode="median")
        res["decode"][f"B{B}"] = row
        print(f"B={B}: " + " ".join(f"{k}={v:.4f}" for k, v in row.items()), flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
