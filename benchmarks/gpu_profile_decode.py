"""Where the whole-model decode step spends its time (issue #10): kernels per step, then the
CUDA-graph step time of the eager and the torch.compile'd step.

    PYTHONPATH=$PWD python benchmarks/gpu_profile_decode.py --out $OUT/decode_profile.json

Builds ``--preset`` (default mamba3-1.5b, random weights in ``--dtype``) with a decode cache of
``--batch`` rows for each ``--state-dtypes`` entry, then per state dtype:
  1. torch.profiler over ``--steps`` eager whole-model steps (``model.step`` + argmax): the top-25
     GPU kernels by total time, GPU kernels (incl. memcpy/memset) per step, kernel time per step;
  2. the same for the compiled step (``mamba3.bench.e2e.compiled_greedy_step``, Inductor);
  3. the step captured in a CUDA graph (``mamba3.bench.e2e.GraphDecoder``, as ``mamba3 bench
     e2e``) for the eager and the compiled step: ``--replays`` back-to-back replays timed with CUDA
     events between them, median ms per step.
A phase that fails is reported in the JSON (``errors``) and the others still run.
``--device cpu --preset tiny`` runs the same code paths on CPU (profiler CPU ops stand in for
kernels: leaf aten ops, views excluded; no CUDA graph: eager calls timed).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mamba3.bench.e2e import GraphDecoder, compiled_greedy_step, greedy_step  # noqa: E402
from mamba3.models import LanguageModel, ModelConfig  # noqa: E402

# CPU mode: profiler ops that only make views / metadata (no kernel on a GPU).
_NO_KERNEL = {"aten::view", "aten::_unsafe_view", "aten::split", "aten::split_with_sizes", "aten::slice",
              "aten::select", "aten::unsqueeze", "aten::squeeze", "aten::t", "aten::transpose", "aten::expand",
              "aten::as_strided", "aten::detach", "aten::alias", "aten::permute", "aten::unbind", "aten::empty",
              "aten::empty_like", "aten::empty_strided", "aten::reshape", "aten::lift_fresh", "aten::chunk",
              "aten::resize_", "aten::promote_types", "aten::result_type", "aten::view_as", "aten::flatten",
              "aten::contiguous", "aten::to", "aten::item", "aten::_local_scalar_dense", "aten::resolve_conj",
              "aten::resolve_neg"}


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def gpu_kernels(prof, device: str) -> list[tuple[str, float]]:
    """(name, microseconds) of every kernel-like event the profiler recorded."""
    from torch.autograd import DeviceType
    out = []
    for e in prof.events():
        if device == "cuda":
            if e.device_type == DeviceType.CUDA:
                out.append((e.name, e.time_range.elapsed_us()))
        elif e.name.startswith("aten::") and e.name not in _NO_KERNEL and not any(
                c.name.startswith("aten::") for c in e.cpu_children):
            out.append((e.name, e.time_range.elapsed_us()))
    return out


def profile_steps(fn, model, cache, tok, steps: int, device: str, top: int = 25) -> dict:
    """torch.profiler over ``steps`` calls of fn(model, tok, cache) (after one untimed call)."""
    from torch.profiler import ProfilerActivity, profile
    fn(model, tok, cache)
    sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn(model, tok, cache)
        sync(device)
    ks = gpu_kernels(prof, device)
    agg = defaultdict(lambda: [0, 0.0])
    for name, us in ks:
        agg[name][0] += 1
        agg[name][1] += us
    rows = sorted(agg.items(), key=lambda kv: -kv[1][1])
    total_us = sum(us for _, us in ks)
    return dict(kernels_per_step=len(ks) / steps, kernel_ms_per_step=total_us / steps / 1e3,
                distinct_kernels=len(agg),
                top=[dict(name=n[:160], calls_per_step=c / steps, ms_per_step=us / steps / 1e3,
                          share=us / max(total_us, 1e-9)) for n, (c, us) in rows[:top]])


def print_profile(title: str, p: dict) -> None:
    print(f"\n== {title}: {p['kernels_per_step']:.1f} kernels/step, {p['kernel_ms_per_step']:.3f} ms kernel "
          f"time/step, {p['distinct_kernels']} distinct")
    print(f"{'ms/step':>9} {'share':>6} {'calls':>7}  kernel")
    for r in p["top"]:
        print(f"{r['ms_per_step']:9.4f} {r['share']:6.1%} {r['calls_per_step']:7.1f}  {r['name'][:110]}")


def time_graph(model, cache, tok, compile, replays: int, device: str) -> dict:
    """Median ms per step of GraphDecoder (CUDA graph on GPU) over ``replays`` back-to-back calls."""
    t0 = time.perf_counter()
    dec = GraphDecoder(model, cache, tok, use_cuda_graph=device == "cuda", compile=compile)
    sync(device)
    setup_s = time.perf_counter() - t0
    for _ in range(3):
        dec()
    sync(device)
    if device == "cuda":
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(replays + 1)]
        ev[0].record()
        for i in range(replays):
            dec()
            ev[i + 1].record()
        torch.cuda.synchronize()
        ms = [a.elapsed_time(b) for a, b in zip(ev[:-1], ev[1:])]
    else:
        ms = []
        for _ in range(replays):
            t = time.perf_counter()
            dec()
            ms.append((time.perf_counter() - t) * 1e3)
    del dec
    return dict(ms_per_step_median=statistics.median(ms), ms_per_step_min=min(ms), replays=replays,
                setup_s=setup_s)


def run(args) -> dict:
    device, dtype = args.device, getattr(torch, args.dtype)
    cfg = ModelConfig.from_preset(args.preset)
    torch.manual_seed(0)
    model = LanguageModel(cfg, device=device, dtype=dtype).eval()
    meta = dict(torch=torch.__version__, preset=args.preset, batch=args.batch, dtype=args.dtype,
                device=torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                params=sum(p.numel() for p in model.parameters()), n_layer=cfg.n_layer)
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        pass
    print(json.dumps(meta), flush=True)
    out = dict(meta=meta, runs=[])
    for sd in args.state_dtypes.split(","):
        res = dict(state_dtype=sd, errors={})
        out["runs"].append(res)
        cache = model.allocate_inference_cache(args.batch, 1, state_dtype=getattr(torch, sd))
        res["cache_gib"] = cache.nbytes() / 2**30
        g = torch.Generator(device=device).manual_seed(1)
        for c in cache.layers:  # a non-trivial state (timing does not depend on it)
            c.ssm.copy_(0.1 * torch.randn(c.ssm.shape, generator=g, device=device))
        tok = torch.randint(0, cfg.vocab_size, (args.batch,), device=device, generator=g)
        phases = [("profile_eager", lambda: profile_steps(greedy_step, model, cache, tok, args.steps, device)),
                  ("graph_eager", lambda: time_graph(model, cache, tok, False, args.replays, device))]
        if not args.no_compile:
            def compiled_profile():
                t = time.perf_counter()
                fn = compiled_greedy_step(args.compile_backend)
                fn(model, tok, cache)  # compiles
                sync(device)
                res["compile_s"] = time.perf_counter() - t
                return profile_steps(fn, model, cache, tok, args.steps, device)
            phases += [("profile_compiled", compiled_profile),
                       ("graph_compiled", lambda: time_graph(model, cache, tok, args.compile_backend, args.replays,
                                                             device))]
        for name, fn in phases:
            if name == "graph_compiled" and "profile_compiled" in res["errors"]:
                res["errors"][name] = "skipped: the step did not compile (see profile_compiled)"
                continue
            t = time.perf_counter()
            try:
                with torch.no_grad():
                    res[name] = fn()
            except Exception as e:  # report and go on with the other phases
                res["errors"][name] = f"{type(e).__name__}: {e}"[:2000]
                traceback.print_exc()
            if device == "cuda":
                torch.cuda.empty_cache()
            print(f"[{sd}] {name}: {time.perf_counter() - t:.1f}s", flush=True)
            if name.startswith("profile") and name in res:
                print_profile(f"{sd} state, {name}", res[name])
            elif name in res:
                print(json.dumps({name: res[name]}), flush=True)
        for kind in ("eager", "compiled"):
            p, gr = res.get(f"profile_{kind}"), res.get(f"graph_{kind}")
            if p and gr and p["kernels_per_step"]:
                # graph time not covered by kernel time, per kernel: launch gaps / tails
                gr["us_per_kernel_overhead"] = ((gr["ms_per_step_median"] - p["kernel_ms_per_step"]) * 1e3
                                                / p["kernels_per_step"])
        summary = {k: res[k]["ms_per_step_median"] for k in ("graph_eager", "graph_compiled") if k in res}
        print(f"\n[{sd}] CUDA-graph ms/step: {json.dumps(summary)}", flush=True)
        del cache
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mamba3-1.5b")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--state-dtypes", default="bfloat16", help="comma list, e.g. bfloat16,float32")
    p.add_argument("--steps", type=int, default=3, help="profiled eager / compiled steps")
    p.add_argument("--replays", type=int, default=50)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled step")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    t = time.perf_counter()
    out = run(args)
    out["meta"]["wall_s"] = time.perf_counter() - t
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
        print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
