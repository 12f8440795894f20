"""Where a whole-model prefill spends its time (issue #10): one forward of ``--preset`` at batch
``--batch`` x ``--n`` tokens under torch.profiler, top GPU kernels by total time.

    PYTHONPATH=$PWD python benchmarks/gpu_profile_prefill.py --n 512 --out $OUT/prefill_profile.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mamba3.bench.e2e import prefill  # noqa: E402
from mamba3.models import LanguageModel, ModelConfig  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="mamba3-1.5b")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--n", default="512")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = ModelConfig.from_preset(args.preset)
    model = LanguageModel(cfg, device="cuda", dtype=torch.bfloat16).eval()
    res = {}
    for n in [int(x) for x in args.n.split(",")]:
        prompt = torch.randint(0, cfg.vocab_size, (args.batch, n), device="cuda")
        cache = model.allocate_inference_cache(args.batch, n + 1)
        with torch.no_grad():
            prefill(model, prompt, cache, n)                     # warm-up (compiles / autotunes)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            prefill(model, prompt, cache, n)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                prefill(model, prompt, cache, n)
                torch.cuda.synchronize()
        rows = []
        for e in prof.key_averages():
            t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
            if t > 0:
                rows.append((t / 1e3, e.count, e.key))
        rows.sort(reverse=True)
        total = sum(r[0] for r in rows)
        print(f"n={n}: wall {wall * 1e3:.1f} ms ({args.batch * n / wall:.0f} tok/s), kernel time {total:.1f} ms")
        for ms, cnt, key in rows[:25]:
            print(f"  {ms:8.2f} ms {100 * ms / total:5.1f}% x{cnt:<5d} {key[:100]}")
        res[n] = dict(wall_ms=wall * 1e3, kernel_ms=total, top=[dict(ms=r[0], count=r[1], kernel=r[2]) for r in rows[:25]])
        del cache
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
