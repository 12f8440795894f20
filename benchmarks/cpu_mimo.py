"""CPU cost of Mamba-3 MIMO: chunked layer forward for R = 1, 2, 4 vs the SISO layer.

    python benchmarks/cpu_mimo.py [--threads 2] [--T 1024] [--batch 2] [--out benchmarks/results/cpu_mimo.json]

Layer forward (projections included, no grad, fp32) in tokens/s at d_model 256 (d_state 128,
headdim 64, 8 heads). MIMO runs with the recommended chunk 64 // R (C*R = 64 rows per tile), SISO
with chunk 64. Also reports the parameter count of each layer (MIMO adds B/C projection columns and
3*H*R*P vectors). Median of a few repetitions after a warm-up; wall time and process CPU time
(all threads) are both recorded, since on a shared machine wall time depends on the load.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from mamba3 import Mamba3


def bench(fn, min_time=2.0, max_reps=10):
    """Median wall seconds and median process CPU seconds (all threads) per call."""
    fn()  # warm-up
    walls, cpus = [], []
    start = time.perf_counter()
    while (time.perf_counter() - start < min_time or len(walls) < 3) and len(walls) < max_reps:
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return sorted(walls)[len(walls) // 2], sorted(cpus)[len(cpus) // 2]


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
            sec, cpu = bench(lambda: layer(u))
        rows.append(dict(layer=name, rank=R, chunk_size=chunk, params=sum(p.numel() for p in layer.parameters()),
                         fwd_ms=round(sec * 1e3, 2), fwd_tok_s=round(args.batch * args.T / sec),
                         fwd_cpu_ms=round(cpu * 1e3, 2)))
        print(rows[-1], flush=True)
    base = rows[0]["fwd_tok_s"]
    for r in rows:
        r["slowdown_vs_siso"] = round(base / r["fwd_tok_s"], 2)
        r["cpu_time_vs_siso"] = round(r["fwd_cpu_ms"] / rows[0]["fwd_cpu_ms"], 2)
    meta = dict(torch=torch.__version__, threads=args.threads, cpu=platform.processor() or platform.machine(),
                d_model=args.d_model, T=args.T, batch=args.batch,
                layer="Mamba3(d_model, d_state=128, headdim=64, expand=2), fp32, impl='chunked', no grad",
                command="python benchmarks/cpu_mimo.py", loadavg_1m=round(os.getloadavg()[0], 2))
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
