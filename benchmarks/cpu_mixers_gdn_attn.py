"""CPU throughput of the Gated DeltaNet and attention mixers (Mamba-3 SISO alongside for scale).

    OMP_NUM_THREADS=1 python benchmarks/cpu_mixers_gdn_attn.py [--threads 1] [--T 1024] [--batch 2]
        [--out benchmarks/results/cpu_mixers_gdn_attn.json]

Per layer (d_model 256, fp32, no grad): forward tokens/s at [batch, T], forward+backward tokens/s,
and decode latency per token (batch rows decoded together) after a T-token prefill; the
attention layer decodes against a KV cache holding T tokens.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from mamba3.layers import Attention, GatedDeltaNet, Mamba3


def bench(fn, min_time=1.0, max_reps=10):
    """Median seconds per call: (wall, process CPU). On a shared machine the CPU time (with one
    thread) is the contention-free cost; wall time includes waiting for a core."""
    fn()  # warm-up
    wall, cpu = [], []
    start = time.perf_counter()
    while (time.perf_counter() - start < min_time or len(wall) < 3) and len(wall) < max_reps:
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return sorted(wall)[len(wall) // 2], sorted(cpu)[len(cpu) // 2]


def record(row, key, secs, scale, rate=True):
    """Store wall and CPU-time versions of a measurement (tokens/s if rate, else ms per unit)."""
    for suffix, s in zip(("", "_cpu"), secs):
        row[key + suffix] = scale / s if rate else 1e3 * s / scale


def layers(d: int):
    return {
        "GDN chunked (H=3, K=64, V=128)": GatedDeltaNet(d, head_dim=64, num_heads=3, expand_v=2),
        "GDN token loop (same layer)": GatedDeltaNet(d, head_dim=64, num_heads=3, expand_v=2, mode="fused_recurrent"),
        "Attention RoPE (H=4, D=64), SDPA": Attention(d, num_heads=4),
        "Attention GQA Hkv=1 window=256": Attention(d, num_heads=4, num_kv_heads=1, window=256),
        "Mamba-3 SISO (N=128, P=64)": Mamba3(d, d_state=128, headdim=64),
    }


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--d_model", type=int, default=256)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--decode_steps", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/cpu_mixers_gdn_attn.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, T, d = args.batch, args.T, args.d_model
    u = torch.randn(B, T, d)
    rows = []
    for name, layer in layers(d).items():
        layer.eval()
        params = sum(p.numel() for p in layer.parameters())
        row = dict(layer=name, params=params, d_model=d, batch=B, T=T)
        with torch.no_grad():
            loop = "token loop" in name
            record(row, "fwd_tok_s", bench(lambda: layer(u), min_time=0.5 if loop else 1.0, max_reps=2 if loop else 10), B * T)
            if not loop:
                cache = layer.allocate_inference_cache(B, T + args.decode_steps + 1)
                layer(u, cache=cache)
                x = torch.randn(B, d)
                snap = cache.clone()

                def decode():
                    cache.copy_(snap)
                    for _ in range(args.decode_steps):
                        layer.step(x, cache)
                record(row, "decode_ms_per_token", bench(decode, min_time=0.5, max_reps=5), args.decode_steps, rate=False)
        if "token loop" not in name:
            uu = u.clone().requires_grad_()
            record(row, "fwd_bwd_tok_s", bench(lambda: layer(uu).sum().backward(), min_time=1.0, max_reps=3), B * T)
        rows.append(row)
        print(row, flush=True)
    meta = dict(torch=torch.__version__, threads=args.threads, cpu=platform.processor() or platform.machine(),
                dtype="float32", note="median of repeated runs; *_cpu = from process CPU time (contention-free with 1 thread); decode = batch rows decoded together per step")
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
