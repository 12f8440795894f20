"""CPU throughput of the Mamba-1 and Mamba-2 baseline mixers beside Mamba-3 (and, when installed,
transformers' pure-PyTorch Mamba2Mixer / MambaMixer fallbacks at the same shape).

    OMP_NUM_THREADS=1 python benchmarks/cpu_mixers_mamba.py [--threads 1] [--T 1024] [--batch 2]
        [--out benchmarks/results/cpu_mixers_mamba.json]

Per layer (d_model 256, d_state 64, fp32): forward tokens/s at [batch, T] without grad,
forward+backward tokens/s, and decode latency per token (batch rows decoded together) after a
T-token prefill. transformers is only a comparison here, never a dependency of the library; its
layers run their CPU fallbacks (no mamba_ssm / causal_conv1d kernels), eval mode, no cache.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from mamba3.layers import Mamba1, Mamba2, Mamba3


def bench(fn, min_time=1.0, max_reps=10):
    """Median seconds per call as (wall, process CPU); with one thread on a shared machine the
    CPU time is the contention-free cost, the wall time includes waiting for a core."""
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
    for suffix, s in zip(("", "_cpu"), secs):
        row[key + suffix] = scale / s if rate else 1e3 * s / scale


def transformers_layers(d, N, ours2, ours1):
    """transformers' mixers with our layers' weights (same state-dict names), or {} if absent."""
    try:
        import transformers
        from transformers.models.mamba.modeling_mamba import MambaMixer
        from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer
    except Exception as e:  # optional comparison only
        print(f"transformers not available ({e}); skipping its rows")
        return {}, None
    transformers.logging.set_verbosity_error()
    out = {}
    for chunk in (256, 64):
        cfg2 = transformers.Mamba2Config(hidden_size=d, state_size=N, expand=2, head_dim=64, num_heads=2 * d // 64,
                                         n_groups=1, chunk_size=chunk, conv_kernel=4, use_bias=False,
                                         use_conv_bias=True)
        m2 = Mamba2Mixer(cfg2, layer_idx=0)
        m2.load_state_dict(ours2.state_dict())
        out[f"transformers Mamba2Mixer (torch fallback), chunk {chunk}"] = m2
    cfg1 = transformers.MambaConfig(hidden_size=d, state_size=N, expand=2, conv_kernel=4, use_bias=False,
                                    use_conv_bias=True)
    m1 = MambaMixer(cfg1, layer_idx=0)
    m1.load_state_dict(ours1.state_dict())
    out["transformers MambaMixer (torch fallback)"] = m1
    return out, transformers.__version__


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--d_model", type=int, default=256)
    ap.add_argument("--d_state", type=int, default=64)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--decode_steps", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/cpu_mixers_mamba.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, T, d, N = args.batch, args.T, args.d_model, args.d_state
    u = torch.randn(B, T, d)
    m2 = Mamba2(d, d_state=N, headdim=64)
    m1 = Mamba1(d, d_state=N)
    layers = {
        "Mamba-2 SSD chunked, chunk 256 (default)": m2,
        "Mamba-2 SSD chunked, chunk 64": Mamba2(d, d_state=N, headdim=64, chunk_size=64),
        "Mamba-1 selective scan chunked, chunk 32": m1,
        "Mamba-1 token loop (impl='reference')": Mamba1(d, d_state=N, impl="reference"),
        "Mamba-3 SISO (P=64), chunk 64": Mamba3(d, d_state=N, headdim=64),
    }
    theirs, tf_version = transformers_layers(d, N, m2, m1)
    layers.update(theirs)
    rows = []
    for name, layer in layers.items():
        layer.eval()
        row = dict(layer=name, params=sum(p.numel() for p in layer.parameters()), d_model=d, d_state=N, batch=B, T=T)
        ours = not name.startswith("transformers")
        loop = "token loop" in name or "MambaMixer" in name
        with torch.no_grad():
            record(row, "fwd_tok_s", bench(lambda: layer(u), min_time=1.0, max_reps=3 if loop else 10), B * T)
            if ours and not loop:
                cache = layer.allocate_inference_cache(B, T + args.decode_steps + 1)
                layer(u, cache=cache)
                x = torch.randn(B, d)
                snap = cache.clone()

                def decode():
                    cache.copy_(snap)
                    for _ in range(args.decode_steps):
                        layer.step(x, cache)
                record(row, "decode_ms_per_token", bench(decode, min_time=0.5, max_reps=5), args.decode_steps,
                       rate=False)
        if not loop:
            uu = u.clone().requires_grad_()
            record(row, "fwd_bwd_tok_s", bench(lambda: layer(uu).sum().backward(), min_time=1.0, max_reps=3), B * T)
        rows.append(row)
        print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    ref = {r["layer"]: r for r in rows}
    speedups = {}
    for chunk, ours in ((256, "Mamba-2 SSD chunked, chunk 256 (default)"), (64, "Mamba-2 SSD chunked, chunk 64")):
        hf = ref.get(f"transformers Mamba2Mixer (torch fallback), chunk {chunk}")
        if hf is not None:
            speedups[f"chunk {chunk}"] = {k: ref[ours][k] / hf[k] for k in ("fwd_tok_s_cpu", "fwd_bwd_tok_s_cpu")}
            print(f"{ours} vs transformers at chunk {chunk}: " + ", ".join(
                f"{k} x{v:.2f}" for k, v in speedups[f"chunk {chunk}"].items()))
    meta = dict(torch=torch.__version__, transformers=tf_version, threads=args.threads,
                cpu=platform.processor() or platform.machine(), dtype="float32",
                note="median of repeated runs; *_cpu = from process CPU time (contention-free with 1 thread); "
                     "decode = batch rows decoded together per step")
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows, mamba2_speedup_vs_transformers=speedups), f, indent=1)


if __name__ == "__main__":
    main()
