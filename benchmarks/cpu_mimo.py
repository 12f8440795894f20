"""CPU cost of Mamba-3 MIMO: chunked layer forward for R = 1, 2, 4 vs the SISO layer.

    python benchmarks/cpu_mimo.py [--threads 2] [--T 1024] [--batch 2] [--out benchmarks/results/cpu_mimo.json]

Layer forward (projections included, no grad, fp32) in tokens/s at d_model 256 (d_state 128,
headdim 64, 8 heads). MIMO runs with the recommended chunk 64 // R (C*R = 64 rows per tile), SISO
with chunk 64. Also reports the parameter count of each layer (MIMO adds B/C projection columns and
3*H*R*P vectors). Median of a few repetitions after a warm-up.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from mamba3 import Mamba3


def bench(fn, min_time=2.0, max_reps=10):
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    while (time.perf_counter() - start < min_time or len(times) < 3) and len(times) < max_reps:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--d_model", type=int, default=256)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/cpu_mimo.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    u = torch.randn(args.batch, args.T, args.d_model)
    configs = [("siso", 1, 64)] + [(f"mimo R={R}", R, max(1, 64 // R)) for R in (1, 2, 4)]
    rows = []
    for name, R, chunk in configs:
        layer = Mamba3(args.d_model, d_state=128, headdim=64, is_mimo=name != "siso", mimo_rank=R,
                       chunk_size=chunk, impl="chunked").eval()
        with torch.no_grad():
            sec = bench(lambda: layer(u))
        rows.append(dict(layer=name, rank=R, chunk_size=chunk, params=sum(p.numel() for p in layer.parameters()),
                         fwd_ms=round(sec * 1e3, 2), fwd_tok_s=round(args.batch * args.T / sec)))
        print(rows[-1], flush=True)
    base = rows[0]["fwd_tok_s"]
    for r in rows:
        r["slowdown_vs_siso"] = round(base / r["fwd_tok_s"], 2)
    meta = dict(torch=torch.__version__, threads=args.threads, cpu=platform.processor() or platform.machine(),
                d_model=args.d_model, T=args.T, batch=args.batch,
                layer="Mamba3(d_model, d_state=128, headdim=64, expand=2), fp32, impl='chunked', no grad",
                command="python benchmarks/cpu_mimo.py")
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
