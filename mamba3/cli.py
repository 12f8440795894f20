"""The ``mamba3`` command line: ``generate``, ``info``, ``demo`` and application subcommands.

Adding a subcommand: an application module defines ``add_parser(subparsers)``, which calls
``subparsers.add_parser(name, help=...)``, adds its arguments and ``set_defaults(func=run)`` where
``run(args) -> int | None``; then list the module in ``APP_MODULES``. Modules that are not
installed are skipped; one that fails to import is reported on stderr and skipped.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from typing import Optional

APP_MODULES = [
    "mamba3.train.cli",
    "mamba3.eval.cli",
    "mamba3.bench.cli",
    "mamba3.data.cli",
    "mamba3.doctor",
]

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16", "float64": "float64"}


def _dtype(name: Optional[str]):
    import torch
    return None if name is None else getattr(torch, _DTYPES[name])


def _add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--model", help="directory written by save_pretrained (config.json + model.safetensors)")
    g.add_argument("--preset", help="a named preset (randomly initialised weights)")


def _config(args):
    from .models import ModelConfig
    if args.model:
        from .models.checkpoint import read_config
        return read_config(args.model)
    return ModelConfig.from_preset(args.preset)


# ---------------------------------------------------------------------------------------------
def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a saved model, streaming tokens to stdout")
    _add_model_args(p)
    p.add_argument("--prompt", default="", help="prompt text (default: empty = start from eos/0)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--tokenizer", default=None,
                   help="'bytes' or a tokenizer.json (default: MODEL/tokenizer.json if present, else bytes)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None)
    p.add_argument("--cuda-graph", action="store_true", help="capture the decode step in a CUDA graph")
    p.add_argument("--ids", action="store_true", help="print token ids instead of text")
    p.set_defaults(func=_run_generate)


def _run_generate(args) -> int:
    import os

    import torch

    from .models import LanguageModel
    from .models.tokenizer import load_tokenizer
    tok_path = args.tokenizer
    if tok_path is None and args.model and os.path.exists(os.path.join(args.model, "tokenizer.json")):
        tok_path = os.path.join(args.model, "tokenizer.json")
    tok = load_tokenizer(tok_path)
    if args.model:
        model = LanguageModel.from_pretrained(args.model, device=args.device, dtype=_dtype(args.dtype))
    else:
        if args.seed is not None:
            torch.manual_seed(args.seed)
        model = LanguageModel(_config(args), device=args.device, dtype=_dtype(args.dtype)).eval()
    if tok.vocab_size > model.config.vocab_size:
        print(f"warning: tokenizer vocab {tok.vocab_size} > model vocab {model.config.vocab_size}", file=sys.stderr)
    ids = tok.encode(args.prompt)
    if not ids:
        ids = [tok.eos_token_id if tok.eos_token_id is not None else 0]
    stream = tok.decode_stream()
    out = sys.stdout
    if not args.ids:
        out.write(args.prompt)
        out.flush()

    def on_token(step, toks):
        t = int(toks[0])
        out.write(f"{t} " if args.ids else stream.step(t))
        out.flush()

    t0 = time.perf_counter()
    res = model.generate([ids], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                         eos_token_id=tok.eos_token_id, callback=on_token, seed=args.seed,
                         use_cuda_graph=args.cuda_graph)
    dt = time.perf_counter() - t0
    n = int(res.num_generated[0])
    out.write("\n")
    print(f"[{n} tokens in {dt:.2f}s, {n / max(dt, 1e-9):.1f} tok/s]", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------
def _add_info(sub) -> None:
    p = sub.add_parser("info", help="parameter counts and inference memory of a model or preset")
    _add_model_args(p)
    p.add_argument("--context", type=int, default=2048, help="context length for the KV-cache comparison")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16", help="model / KV-cache dtype")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_run_info)


def model_info(config, context: int = 2048, dtype=None) -> dict:
    """Parameter counts by component and per-sequence inference memory (built on the meta device:
    nothing is allocated). KV caches grow with ``context``; SSM states do not."""
    import torch

    from .models import LanguageModel
    dtype = torch.bfloat16 if dtype is None else dtype
    model = LanguageModel(config, device="meta", dtype=dtype, init_weights=False)
    params = model.num_parameters(by_component=True)
    cache = model.allocate_inference_cache(1, context, device="meta")
    per_layer = cache.nbytes(per_layer=True)
    mixers = config.layer_mixers()
    kv = sum(b for b, m in zip(per_layer, mixers) if m == "attention")
    state = sum(b for b, m in zip(per_layer, mixers) if m != "attention")
    elt = torch.empty((), dtype=dtype).element_size()
    # A same-width Transformer (MHA, all layers attention): K and V of d_model each per token per layer.
    full_kv = 2 * config.n_layer * config.d_model * context * elt
    return {"params": params, "non_embedding_params": model.num_parameters(exclude_embeddings=True),
            "layers": {m: mixers.count(m) for m in sorted(set(mixers))}, "context": context,
            "dtype": str(dtype).replace("torch.", ""), "state_bytes_per_sequence": state,
            "kv_bytes_per_sequence_at_context": kv, "cache_bytes_per_sequence_at_context": kv + state,
            "all_attention_kv_bytes_at_context": full_kv}


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _run_info(args) -> int:
    cfg = _config(args)
    info = model_info(cfg, args.context, _dtype(args.dtype))
    if args.json:
        print(json.dumps({"config": cfg.to_dict(), **info}, indent=2))
        return 0
    print(f"layers: {cfg.n_layer} x d_model {cfg.d_model} ({', '.join(f'{v} {k}' for k, v in info['layers'].items())}),"
          f" MLP {cfg.d_intermediate}, vocab {cfg.vocab_size} (padded {cfg.padded_vocab_size})")
    print("parameters:")
    for k, v in info["params"].items():
        print(f"  {k:<20s} {v:>15,d}")
    print(f"  {'non-embedding':<20s} {info['non_embedding_params']:>15,d}")
    print(f"inference memory per sequence ({info['dtype']} model, fp32 SSM state):")
    print(f"  recurrent state (constant)      {_fmt_bytes(info['state_bytes_per_sequence'])}")
    print(f"  KV cache at context {args.context:<11d} {_fmt_bytes(info['kv_bytes_per_sequence_at_context'])}")
    print(f"  all-attention KV at {args.context:<11d} {_fmt_bytes(info['all_attention_kv_bytes_at_context'])}"
          f"  (same-width Transformer, for comparison)")
    return 0


# ---------------------------------------------------------------------------------------------
def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="CPU demo: a small Mamba-3 stack, forward and decode timings")
    p.set_defaults(func=lambda args: importlib.import_module("mamba3.demo").main())


def _load_app_modules(sub) -> None:
    for name in APP_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
                continue  # that application is not part of this installation
            print(f"mamba3: subcommands of {name} unavailable ({e})", file=sys.stderr)
            continue
        except Exception as e:  # a broken application must not take the whole CLI down
            print(f"mamba3: subcommands of {name} unavailable ({type(e).__name__}: {e})", file=sys.stderr)
            continue
        if hasattr(mod, "add_parser"):
            mod.add_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mamba3", description="Mamba-3 state space models: tools.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_generate(sub)
    _add_info(sub)
    _add_demo(sub)
    _load_app_modules(sub)
    return p


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:  # bad input: a message, not a traceback
        print(f"mamba3 {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0 if rc is None else int(rc)


if __name__ == "__main__":
    sys.exit(main())
