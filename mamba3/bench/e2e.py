"""End-to-end inference: the paper's latency protocol (Table 7 / PERF.md section 2.1).

Batch B, n prompt tokens then n generated tokens, wall clock. The fast path:
  * prefill through the mixers' parallel kernels, in slices of ``prefill_chunk`` tokens that
    continue from the cache (bounded activation memory at 16K x 128; the paper used two halves),
    computing logits only for the last position; with ``compile`` (``--compile``) each slice is
    one torch.compile'd whole-model forward (static shapes: one compilation per slice length),
    Inductor fusing the elementwise work between the GEMMs and the SSM op;
  * decode: the whole-model step captured once in a CUDA graph and replayed, greedy sampling on
    the GPU, no host synchronisation per token; with ``compile`` the step is torch.compile'd
    first, so the graph replays Inductor's fused kernels.
Long decodes may be measured over ``decode_steps`` < n and extrapolated linearly (per-step cost
is flat in n for SSMs); the result says so.
"""
from __future__ import annotations

import json
import time
from typing import Optional

import torch

from ..models import LanguageModel, ModelConfig


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def prefill_slice(model: LanguageModel, ids: torch.Tensor, cache) -> torch.Tensor:
    """Consume ids [B, t] continuing from ``cache`` (updated in place); returns the residual stream
    at the last position [B, D]."""
    return model.hidden_states(ids, cache=cache)[:, -1]


@torch.no_grad()
def prefill(model: LanguageModel, prompt: torch.Tensor, cache, chunk: int, compile=False) -> torch.Tensor:
    """Consume prompt [B, n] in slices continuing from ``cache``; returns last-token logits [B, V].
    compile: run each slice through :func:`compiled_prefill_slice` (True = Inductor, or a backend)."""
    fn = _compiled_fn(prefill_slice, compile) if compile else prefill_slice
    h = None
    for start in range(0, prompt.shape[1], chunk):
        h = fn(model, prompt[:, start : start + chunk], cache)
    return model.logits_from_hidden(h)


def greedy_step(model: LanguageModel, tok: torch.Tensor, cache) -> tuple[torch.Tensor, torch.Tensor]:
    """One whole-model decode step and the greedy pick: tok [B] -> (next tok [B], logits [B, V]);
    the cache is updated in place."""
    logits = model.step(tok, cache)
    return logits.argmax(-1), logits


_compiled: dict = {}


def _compiled_fn(fn, backend):
    """``fn`` under torch.compile (fullgraph, static shapes), one wrapper per (fn, backend) for the
    process; dynamo specialises it per model and shapes. backend True = "inductor"."""
    backend = "inductor" if backend is True else backend
    if (fn, backend) not in _compiled:
        _compiled[fn, backend] = torch.compile(fn, fullgraph=True, dynamic=False, backend=backend)
    return _compiled[fn, backend]


def compiled_greedy_step(backend: str = "inductor"):
    """``greedy_step`` under torch.compile. With Inductor the elementwise work between the GEMMs
    and the SSM step op (a registered custom op, opaque to Inductor, its state updates done in
    place) is fused into a few kernels per layer."""
    return _compiled_fn(greedy_step, backend)


def compiled_prefill_slice(backend: str = "inductor"):
    """:func:`prefill_slice` under torch.compile: the whole-model forward of one slice. The SSM
    is the ``mamba3::siso_fused`` custom op (the fused Triton forward, opaque to Inductor); the
    norms, residual adds, casts, dt / decay math and the MLP gate fuse around the GEMMs, and the
    cache writes become the graph's input mutations."""
    return _compiled_fn(prefill_slice, backend)


class GraphDecoder:
    """Greedy decode step (model.step + argmax) captured in a CUDA graph (eager on CPU).

    compile: run the step through :func:`compiled_greedy_step` (True = Inductor, or a backend
    name); it compiles on the first (warm-up) call and the compiled step is what the CUDA graph
    captures. ``logits`` holds the last step's logits [B, V]."""

    def __init__(self, model: LanguageModel, cache, first_token: torch.Tensor, use_cuda_graph: bool,
                 compile=False):
        self.model, self.cache = model, cache
        self.step_fn = greedy_step
        if compile:
            self.step_fn = _compiled_fn(greedy_step, compile)
        self.logits = None
        self.tok = first_token.clone()
        self.graph = None
        if use_cuda_graph:
            backup = cache.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # autotune / allocator warm-up outside the capture
                    self._eager()
            torch.cuda.current_stream().wait_stream(side)
            cache.copy_(backup)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.next_tok, self.logits = self.step_fn(self.model, self.tok, cache)
            cache.copy_(backup)
            del backup

    def _eager(self) -> torch.Tensor:
        nxt, self.logits = self.step_fn(self.model, self.tok, self.cache)
        return nxt

    def __call__(self) -> torch.Tensor:
        if self.graph is None:
            nxt = self._eager()
        else:
            self.graph.replay()
            nxt = self.next_tok
        self.tok.copy_(nxt)
        return self.tok


def _prefill_compile(compile, compile_prefill: Optional[bool]):
    """What the prefill slices are compiled with: ``compile``, unless compile_prefill is False."""
    return False if compile_prefill is False else compile


@torch.no_grad()
def fast_generate(model: LanguageModel, prompt: torch.Tensor, new_tokens: int, *, prefill_chunk: int = 512,
                  use_cuda_graph: Optional[bool] = None, state_dtype=None, compile: bool = False,
                  compile_prefill: Optional[bool] = None) -> dict:
    """Greedy generation on the fast path; returns tokens [B, new_tokens] and phase timings.
    compile: torch.compile the prefill slices and the decode step (True = Inductor, or a backend;
    see :func:`prefill`, :class:`GraphDecoder`); on a model's first call at a prompt length
    prefill_s includes the prefill compilation and capture_s the step's. compile_prefill=False
    compiles the decode step only (None: as ``compile``)."""
    compile_prefill = _prefill_compile(compile, compile_prefill)
    device = prompt.device
    use_cuda_graph = device.type == "cuda" if use_cuda_graph is None else use_cuda_graph
    B, n = prompt.shape
    cache = model.allocate_inference_cache(B, n + new_tokens + 1, state_dtype=state_dtype)
    _sync(device)
    t0 = time.perf_counter()
    first = prefill(model, prompt, cache, prefill_chunk, compile=compile_prefill).argmax(-1)
    _sync(device)
    t1 = time.perf_counter()
    out = torch.empty(B, new_tokens, dtype=torch.long, device=device)
    out[:, 0] = first
    dec = GraphDecoder(model, cache, first, use_cuda_graph, compile=compile)
    _sync(device)
    t2 = time.perf_counter()
    for i in range(1, new_tokens):
        out[:, i] = dec()
    _sync(device)
    t3 = time.perf_counter()
    return dict(tokens=out, prefill_s=t1 - t0, capture_s=t2 - t1, decode_s=t3 - t2,
                decode_ms_per_step=(t3 - t2) / max(new_tokens - 1, 1) * 1e3, cache_bytes=cache.nbytes())


def run_config(preset: str, n: int, *, batch: int = 128, decode_steps: Optional[int] = None, reps: int = 3,
               device: str = "cuda", dtype=torch.bfloat16, state_dtype=None, prefill_chunk: int = 512,
               config: Optional[ModelConfig] = None, compile: bool = False,
               compile_prefill: Optional[bool] = None) -> dict:
    """Mean of ``reps`` timed runs after one warm-up for one model and length."""
    cfg = config or ModelConfig.from_preset(preset)
    torch.manual_seed(0)
    model = LanguageModel(cfg, device=device, dtype=dtype).eval()
    steps = n if decode_steps is None else min(n, decode_steps)
    prompt = torch.randint(0, cfg.vocab_size, (batch, n), device=device)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    kw = dict(prefill_chunk=prefill_chunk, state_dtype=state_dtype, compile=compile, compile_prefill=compile_prefill)
    # warm-up (and compilation: prefill compiles per slice length, hence the whole prompt)
    compiles_prefill = bool(_prefill_compile(compile, compile_prefill))
    fast_generate(model, prompt if compiles_prefill else prompt[:, : min(n, 256)], 4, **kw)
    runs = [fast_generate(model, prompt, steps, **kw) for _ in range(reps)]
    mean = lambda k: sum(r[k] for r in runs) / len(runs)
    ms = mean("decode_ms_per_step")
    row = dict(preset=preset, n=n, batch=batch, params=sum(p.numel() for p in model.parameters()),
               prefill_s=mean("prefill_s"), prefill_tok_s=batch * n / mean("prefill_s"),
               decode_ms_per_step=ms, decode_steps_measured=steps,
               prefill_plus_decode_s=mean("prefill_s") + ms * 1e-3 * n,
               extrapolated=steps < n, cache_bytes=runs[0]["cache_bytes"],
               state_dtype=str(state_dtype or torch.float32), compile=compile,
               compile_prefill=compiles_prefill, prefill_chunk=prefill_chunk)
    if torch.device(device).type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del model
    if compile:  # drop this model's compiled code (dynamo caps the compiled variants of one function)
        torch._dynamo.reset()
    return row


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for preset in sorted({r["preset"] for r in rows}):
        rs = sorted((r for r in rows if r["preset"] == preset and "prefill_plus_decode_s" in r), key=lambda r: r["n"])
        ax.plot([r["n"] for r in rs], [r["prefill_plus_decode_s"] for r in rs], marker="o", label=preset)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("n (prompt tokens = generated tokens)")
    ax.set_ylabel("prefill + decode (s)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(args) -> int:
    dtype = getattr(torch, args.dtype)
    state_dtype = None if args.state_dtype is None else getattr(torch, args.state_dtype)
    rows = []
    for preset in args.presets.split(","):
        for n in [int(x) for x in args.lengths.split(",")]:
            try:
                row = run_config(preset, n, batch=args.batch, decode_steps=args.decode_steps, reps=args.reps,
                                 device=args.device, dtype=dtype, state_dtype=state_dtype,
                                 prefill_chunk=args.prefill_chunk, compile=args.compile,
                                 compile_prefill=False if args.no_compile_prefill else None)
            except torch.cuda.OutOfMemoryError as e:
                row = dict(preset=preset, n=n, batch=args.batch, error=f"out of memory: {str(e)[:120]}")
                torch.cuda.empty_cache()
            except Exception as e:  # --compile: a mixer whose step does not trace fails its rows only
                if not args.compile:
                    raise
                row = dict(preset=preset, n=n, batch=args.batch, compile=True,
                           error=f"compile: {type(e).__name__}: {str(e)[:300]}")
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        meta = dict(torch=torch.__version__, device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    if args.png:
        plot(rows, args.png)
    return 0


def add_arguments(p) -> None:
    p.add_argument("--presets", default="mamba3-1.5b,mamba3-mimo-1.5b,mamba2-1.5b,gdn-1.5b,transformer-1.5b")
    p.add_argument("--lengths", default="512,1024,2048,4096,16384")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--decode-steps", type=int, default=None, help="measure fewer steps and extrapolate")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--state-dtype", default=None, help="float32 (default) or bfloat16 SSM state")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="prefill slice length (H100, batch 128: slices of 512 ran at 171k tok/s, of 2048 at 73k)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the whole-model prefill slices and decode step (Inductor fuses the "
                        "elementwise ops; the step before the CUDA-graph capture)")
    p.add_argument("--no-compile-prefill", action="store_true",
                   help="with --compile: compile the decode step only, run the prefill slices eagerly")
    p.add_argument("--out", default=None)
    p.add_argument("--png", default=None)
