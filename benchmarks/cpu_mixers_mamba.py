"""CPU throughput of the Mamba-1 and Mamba-2 baseline mixers beside Mamba-3 (and, when installed,
transformers' pure-PyTorch Mamba2Mixer / MambaMixer fallbacks at the same shape).

    OMP_NUM_THREADS=1 python benchmarks/cpu_mixers_mamba.py [--threads 1] [--T 1024] [--batch 2]
        [--out benchmarks/results/cpu_mixers_mamba.json]

Per layer (d_model 256, d_state 64, fp32): forward tokens/s at [batch, T] without grad,
forward+backward tokens/s, and decode latency per token (batch rows decoded together) after a
T-token prefill. Then the Mamba-2 comparison at the published Mamba-2 configuration (d_state 128,
headdim 64, expand 2, ngroups 1, chunk 256; same d_model, batch and T). transformers is only a
comparison here, never a dependency of the library; its layers run their CPU fallbacks (no
mamba_ssm / causal_conv1d kernels), eval mode, no cache, with our layer's weights loaded.

Each Mamba-2 pair (ours, transformers' at the same shape and chunk) is timed interleaved, one
repetition of each in turn, so that a change in the machine's load hits both alike.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from mamba3.layers import Mamba1, Mamba2, Mamba3


def timed(fn):
    """(wall, process CPU) seconds of one call."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def median(xs):
    return sorted(xs)[len(xs) // 2]


def bench(fn, min_time=1.0, max_reps=10):
    """Median seconds per call as (wall, process CPU); with one thread on a shared machine the
    CPU time is the contention-free cost, the wall time includes waiting for a core."""
    fn()  # warm-up
    wall, cpu = [], []
    start = time.perf_counter()
    while (time.perf_counter() - start < min_time or len(wall) < 3) and len(wall) < max_reps:
        w, c = timed(fn)
        wall.append(w)
        cpu.append(c)
    return median(wall), median(cpu)


def bench_interleaved(fns, reps):
    """fns: {name: fn}; one warm-up each, then ``reps`` rounds calling each once in turn.
    Returns {name: (median wall, median CPU, min CPU)} seconds per call."""
    for fn in fns.values():
        fn()
    runs = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            runs[name].append(timed(fn))
    return {name: (median([w for w, _ in r]), median([c for _, c in r]), min(c for _, c in r))
            for name, r in runs.items()}


def record(row, key, secs, scale, rate=True):
    for suffix, s in zip(("", "_cpu"), secs):
        row[key + suffix] = scale / s if rate else 1e3 * s / scale


def transformers_mamba2(ours: Mamba2, chunk: int):
    """transformers' Mamba2Mixer with ``ours``' shape and weights (same state-dict names)."""
    import transformers
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    transformers.logging.set_verbosity_error()
    cfg = transformers.Mamba2Config(hidden_size=ours.d_model, state_size=ours.d_state, expand=ours.expand,
                                    head_dim=ours.headdim, num_heads=ours.nheads, n_groups=ours.ngroups,
                                    chunk_size=chunk, conv_kernel=ours.d_conv, use_bias=False, use_conv_bias=True)
    theirs = Mamba2Mixer(cfg, layer_idx=0)
    theirs.load_state_dict(ours.state_dict())
    return theirs


def transformers_mamba1(ours: Mamba1, d: int, N: int):
    import transformers
    from transformers.models.mamba.modeling_mamba import MambaMixer

    cfg = transformers.MambaConfig(hidden_size=d, state_size=N, expand=2, conv_kernel=4, use_bias=False,
                                   use_conv_bias=True)
    theirs = MambaMixer(cfg, layer_idx=0)
    theirs.load_state_dict(ours.state_dict())
    return theirs


def transformers_version():
    try:
        import transformers
        from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer  # noqa: F401
    except Exception as e:  # optional comparison only
        print(f"transformers not available ({e}); skipping its rows")
        return None
    return transformers.__version__


def compare_mamba2(rows, speedups, u, d, N, chunk, reps, label):
    """Ours vs transformers' Mamba2Mixer at one shape and chunk, interleaved; appends both rows."""
    B, T = u.shape[:2]
    torch.manual_seed(0)
    ours = Mamba2(d, d_state=N, headdim=64, chunk_size=chunk).eval()
    theirs = transformers_mamba2(ours, chunk).eval()
    uu = u.clone().requires_grad_()
    names = {"ours": f"Mamba-2 SSD chunked, chunk {chunk}", "theirs": f"transformers Mamba2Mixer (torch fallback), chunk {chunk}"}
    layers = {"ours": ours, "theirs": theirs}

    def fwd(m):
        def f():
            with torch.no_grad():
                m(u)
        return f

    def fwd_bwd(m):
        return lambda: m(uu).sum().backward()

    with torch.no_grad():
        diff = (ours(u) - theirs(u)).abs().max().item()
    f = bench_interleaved({k: fwd(m) for k, m in layers.items()}, reps)
    fb = bench_interleaved({k: fwd_bwd(m) for k, m in layers.items()}, reps)
    for k, m in layers.items():
        row = dict(layer=names[k], shape=label, params=sum(p.numel() for p in m.parameters()), d_model=d, d_state=N,
                   headdim=64, chunk=chunk, batch=B, T=T)
        record(row, "fwd_tok_s", f[k][:2], B * T)
        record(row, "fwd_bwd_tok_s", fb[k][:2], B * T)
        row["fwd_tok_s_cpu_best"] = B * T / f[k][2]
        row["fwd_bwd_tok_s_cpu_best"] = B * T / fb[k][2]
        rows.append(row)
        print({k2: (round(v, 2) if isinstance(v, float) else v) for k2, v in row.items()}, flush=True)
    ratio = {key: f["theirs"][i] / f["ours"][i] if key.startswith("fwd_tok") else fb["theirs"][i] / fb["ours"][i]
             for key, i in (("fwd_tok_s_cpu", 1), ("fwd_bwd_tok_s_cpu", 1), ("fwd_tok_s_cpu_best", 2),
                            ("fwd_bwd_tok_s_cpu_best", 2))}
    ratio["max_abs_output_diff"] = diff
    speedups[f"{label}, chunk {chunk}"] = ratio
    print(f"Mamba-2 ours vs transformers, {label}, chunk {chunk}: "
          + ", ".join(f"{k} x{v:.2f}" for k, v in ratio.items() if k != "max_abs_output_diff")
          + f" (max |diff| {diff:.1e})", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--d_model", type=int, default=256)
    ap.add_argument("--d_state", type=int, default=64)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--decode_steps", type=int, default=32)
    ap.add_argument("--reps", type=int, default=10, help="interleaved rounds of each Mamba-2 comparison")
    ap.add_argument("--out", default="benchmarks/results/cpu_mixers_mamba.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, T, d, N = args.batch, args.T, args.d_model, args.d_state
    u = torch.randn(B, T, d)
    tf_version = transformers_version()
    rows, speedups = [], {}

    # Ours at the d_state 64 shape: throughput and decode.
    m1 = Mamba1(d, d_state=N)
    layers = {
        "Mamba-2 SSD chunked, chunk 256 (default)": Mamba2(d, d_state=N, headdim=64),
        "Mamba-2 SSD chunked, chunk 64": Mamba2(d, d_state=N, headdim=64, chunk_size=64),
        "Mamba-1 selective scan chunked, chunk 32": m1,
        "Mamba-1 token loop (impl='reference')": Mamba1(d, d_state=N, impl="reference"),
        "Mamba-3 SISO (P=64), chunk 64": Mamba3(d, d_state=N, headdim=64),
    }
    if tf_version is not None:
        layers["transformers MambaMixer (torch fallback)"] = transformers_mamba1(m1, d, N)
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

    # Mamba-2 vs transformers, interleaved: this shape at chunks 256 and 64, and the published
    # Mamba-2 configuration (d_state 128, headdim 64, expand 2, chunk 256).
    if tf_version is not None:
        for label, n_state, chunk in ((f"d_state {N}", N, 256), (f"d_state {N}", N, 64),
                                      ("official Mamba-2 default (d_state 128)", 128, 256)):
            compare_mamba2(rows, speedups, u, d, n_state, chunk, args.reps, label)
    meta = dict(torch=torch.__version__, transformers=tf_version, threads=args.threads,
                cpu=platform.processor() or platform.machine(), dtype="float32",
                note="median of repeated runs; *_cpu = from process CPU time (contention-free with 1 thread); "
                     "*_cpu_best = from the fastest run; Mamba-2 pairs timed interleaved with the same weights; "
                     "decode = batch rows decoded together per step")
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows, mamba2_speedup_vs_transformers=speedups), f, indent=1)


if __name__ == "__main__":
    main()
