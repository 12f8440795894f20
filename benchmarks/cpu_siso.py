"""CPU throughput of the Mamba-3 SISO layer: chunked path vs the token-loop reference.

    python benchmarks/cpu_siso.py [--quick] [--threads 2] [--cpu-time] [--out benchmarks/results/cpu_siso.json]

Layer forward (projections included, no grad) in tokens/s, plus forward+backward for the chunked
path. The reference is timed at the shortest length only (its cost per token is flat in T).
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from mamba3 import Mamba3


CLOCK = time.perf_counter


def bench(fn, min_time=1.0, max_reps=20):
    """Median seconds per call of ``fn`` on CLOCK (wall, or process CPU time with --cpu-time)."""
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    while (time.perf_counter() - start < min_time or len(times) < 3) and len(times) < max_reps:
        t0 = CLOCK()
        fn()
        times.append(CLOCK() - t0)
    times.sort()
    return times[len(times) // 2]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small grid (smoke run)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with process CPU time (cost without contention from other jobs; use --threads 1)")
    ap.add_argument("--out", default="benchmarks/results/cpu_siso.json")
    args = ap.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if args.cpu_time else time.perf_counter
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d_models = [256] if args.quick else [256, 512]
    lengths = [512] if args.quick else [512, 1024, 2048, 4096]
    batches = [1] if args.quick else [1, 8]
    rows = []
    for d in d_models:
        layer = Mamba3(d, d_state=128, headdim=64).eval()
        for B in batches:
            for T in lengths:
                u = torch.randn(B, T, d)
                row = dict(d_model=d, batch=B, T=T)
                with torch.no_grad():
                    layer.impl = "chunked"
                    row["chunked_fwd_tok_s"] = B * T / bench(lambda: layer(u))
                    if T == lengths[0]:
                        layer.impl = "reference"
                        row["reference_fwd_tok_s"] = B * T / bench(lambda: layer(u), min_time=0.5, max_reps=3)
                layer.impl = "chunked"
                uu = u.clone().requires_grad_()
                row["chunked_fwd_bwd_tok_s"] = B * T / bench(lambda: layer(uu).sum().backward(), max_reps=5)
                rows.append(row)
                print(row, flush=True)
    meta = dict(torch=torch.__version__, threads=args.threads, clock="process CPU time" if args.cpu_time else "wall", cpu=platform.processor() or platform.machine(),
                layer="Mamba3(d_model, d_state=128, headdim=64, expand=2), fp32")
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
