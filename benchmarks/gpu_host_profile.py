"""Where the host time of one SISO fwd+bwd goes (config A): device syncs, Python profile, per-op
CPU time, and the GPU-only time under a CUDA graph.

    python benchmarks/gpu_host_profile.py --out $OUT/host_profile.json
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time
import warnings

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import benchmarks.gpu_kernels as gk  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8x2048")
    ap.add_argument("--out", default="host_profile.json")
    a = ap.parse_args()
    out = {}
    for shape in a.shapes.split(","):
        B, T = (int(v) for v in shape.split("x"))
        out[shape] = one_shape(B, T)
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


def one_shape(B, T):
    xs, leaves, step = gk.siso_step(B, T, seed=1)

    def fwd():
        with torch.no_grad():
            gk.mamba3_siso_triton(*(xs[n] for n in gk.NAMES), chunk_size=gk.CHUNK)
    for _ in range(3):
        step()
        fwd()
    torch.cuda.synchronize()
    res = {}
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        step()
        fwd()
    torch.cuda.set_sync_debug_mode(0)
    res["sync_warnings"] = [str(x.message)[:300] for x in w]
    print("syncs:", res["sync_warnings"], flush=True)
    for name, fn in (("fwdbwd", step), ("fwd", fwd)):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            fn()
        host = (time.perf_counter() - t0) / 10 * 1e3
        torch.cuda.synchronize()
        res[f"host_{name}_ms"] = host
        res[f"wall_{name}_ms"] = do_bench(fn, return_mode="median")
        print(name, "host per call", host, "do_bench", res[f"wall_{name}_ms"], flush=True)
    for name, fn in (("fwdbwd", step), ("fwd", fwd)):
        pr = cProfile.Profile()
        torch.cuda.synchronize()
        pr.enable()
        for _ in range(10):
            fn()
        pr.disable()
        torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
        res[f"cprofile_{name}"] = s.getvalue()
        print(s.getvalue()[:3500], flush=True)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    tab = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=45)
    res["torch_profile_cpu"] = tab
    print(tab[:6000], flush=True)
    # GPU-only time: fwd+bwd captured in a CUDA graph
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        for t in leaves.values():
            t.grad = None
        with torch.cuda.graph(g):
            step()
        res["graph_fwdbwd_ms"] = do_bench(g.replay, return_mode="median")
        print("graph fwdbwd", res["graph_fwdbwd_ms"], flush=True)
    except Exception as e:
        res["graph_error"] = repr(e)[:500]
        print("graph failed", repr(e)[:500], flush=True)
    return res


if __name__ == "__main__":
    main()
