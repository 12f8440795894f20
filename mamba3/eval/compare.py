"""Small-scale language-model comparison at about equal parameter counts (Mamba-3 Table 3 in small).

Architectures (``ARCHS``): Mamba-3 SISO, Mamba-3 MIMO (rank 4), Mamba-2, Gated DeltaNet, a
Transformer (RoPE attention) and a 5:1 hybrid (five Mamba-3 layers then one NoPE attention layer,
as the paper's hybrids). Every model is a Llama-style stack of pre-norm mixer + SwiGLU blocks of
the same d_model and depth; the SwiGLU width of each is searched so its parameter count matches the
Mamba-3 SISO reference (as the paper shrinks the MIMO MLP). All train on the same token windows
(one seeded sampler), with the same optimiser, schedule and step count, and are scored on the
same fixed validation windows: validation loss, perplexity, and bits per byte for byte data.

Data: "tiny" (shipped byte-level corpus, vocab 257) or a built data folder (``mamba3 data build``;
vocab from its manifest). Defaults give ~1M-parameter models for a CPU run of a few hundred steps;
on a GPU raise d_model / n_layer / steps / batch (``--device cuda --amp bf16``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

ARCH_NAMES = ("mamba3_siso", "mamba3_mimo", "mamba2", "gdn", "transformer", "hybrid_mamba3")


@dataclasses.dataclass
class CompareConfig:
    data: str = "tiny"
    archs: Sequence[str] = ARCH_NAMES
    d_model: int = 96
    n_layer: int = 6
    d_intermediate: int = 256  # of the Mamba-3 SISO reference; the others are matched to its size
    d_state: int = 32
    headdim: int = 32
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 300
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup: float = 0.1
    val_tokens: int = 32768
    seed: int = 0
    device: str = "cpu"
    amp: str = "none"
    vocab_size: Optional[int] = None


def arch_config(name: str, cfg: CompareConfig, vocab: int, d_intermediate: int):
    from ..models import ModelConfig
    heads = max(1, cfg.d_model // 32)
    m3 = dict(d_state=cfg.d_state, headdim=cfg.headdim, expand=2, chunk_size=64)
    common = dict(d_model=cfg.d_model, n_layer=cfg.n_layer, vocab_size=vocab, d_intermediate=d_intermediate)
    if name == "mamba3_siso":
        return ModelConfig(**common, mixer="mamba3", mixer_cfg={"mamba3": m3})
    if name == "mamba3_mimo":
        return ModelConfig(**common, mixer="mamba3", mixer_cfg={"mamba3": {**m3, "is_mimo": True, "mimo_rank": 4,
                                                                           "chunk_size": 16}})
    if name == "mamba2":
        return ModelConfig(**common, mixer="mamba2", mixer_cfg={"mamba2": dict(m3)})
    if name == "gdn":
        return ModelConfig(**common, mixer="gdn", mixer_cfg={"gdn": dict(num_heads=heads, head_dim=32, expand_v=2,
                                                                         allow_neg_eigval=False)})
    if name == "transformer":
        return ModelConfig(**common, mixer="attention", mixer_cfg={"attention": dict(num_heads=heads, rope=True)})
    if name == "hybrid_mamba3":
        return ModelConfig(**common, mixer="mamba3", layer_pattern="MMMMMA",
                           mixer_cfg={"mamba3": m3, "attention": dict(num_heads=heads, rope=False)})
    raise ValueError(f"unknown architecture {name!r}; known: {ARCH_NAMES}")


def _count(mc) -> int:
    from ..models import LanguageModel
    with torch.device("meta"):
        return LanguageModel(mc, init_weights=False).num_parameters()


def matched_config(name: str, cfg: CompareConfig, vocab: int, target: Optional[int] = None):
    """(ModelConfig, params) with the SwiGLU width (multiple of 8) bringing params nearest target."""
    if target is None or name == "mamba3_siso":
        mc = arch_config(name, cfg, vocab, cfg.d_intermediate)
        return mc, _count(mc)
    lo, hi = 0, 8 * cfg.d_intermediate
    while hi - lo > 8:
        mid = (lo + hi) // 16 * 8
        if _count(arch_config(name, cfg, vocab, mid)) < target:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda d: abs(_count(arch_config(name, cfg, vocab, d)) - target))
    mc = arch_config(name, cfg, vocab, best)
    return mc, _count(mc)


def load_splits(data: str):
    """(train ids, val ids, vocab size, bytes per token or None) as int64 numpy arrays."""
    if data == "tiny":
        from ..data import tiny_tokens
        return np.asarray(tiny_tokens("train")), np.asarray(tiny_tokens("val")), 257, 1.0
    from ..data import TokenShards, read_manifest
    man = read_manifest(Path(data))
    tr, va = TokenShards(Path(data), "train"), TokenShards(Path(data), "val")
    vocab = int(man["tokenizer"]["vocab_size"])
    byte = man["tokenizer"].get("spec") == "byte"
    return (np.asarray(tr.read(0, len(tr)), dtype=np.int64), np.asarray(va.read(0, len(va)), dtype=np.int64), vocab,
            1.0 if byte else None)


def _autocast(cfg):
    if cfg.amp == "bf16" and cfg.device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def val_loss(model, val: torch.Tensor, cfg: CompareConfig) -> float:
    model.eval()
    tot = n = 0.0
    for s in range(0, val.shape[0], cfg.batch_size):
        x = val[s:s + cfg.batch_size].to(cfg.device)
        with _autocast(cfg):
            logits = model(x).logits
        tot += float(F.cross_entropy(logits[:, :-1].float().flatten(0, 1), x[:, 1:].flatten(), reduction="sum"))
        n += x[:, 1:].numel()
    model.train()
    return tot / n


def train_one(name: str, mc, train: np.ndarray, val: torch.Tensor, cfg: CompareConfig, log=print) -> dict:
    from ..models import LanguageModel
    torch.manual_seed(cfg.seed)
    model = LanguageModel(mc).to(cfg.device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    g = np.random.default_rng(cfg.seed)  # same windows for every architecture
    warm = max(1, int(cfg.warmup * cfg.steps))
    t0, losses = time.time(), []
    for step in range(cfg.steps):
        lr = cfg.lr * min(1.0, (step + 1) / warm)
        lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * max(0, step - warm) / max(1, cfg.steps - warm)))
        for grp in opt.param_groups:
            grp["lr"] = lr
        starts = g.integers(0, len(train) - cfg.seq_len - 1, cfg.batch_size)
        x = torch.from_numpy(np.stack([train[s:s + cfg.seq_len + 1] for s in starts])).to(cfg.device)
        with _autocast(cfg):
            out = model(x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(out.loss.detach()))
        if (step + 1) % max(1, cfg.steps // 5) == 0:
            log(f"[{name}] step {step + 1}/{cfg.steps} train loss {np.mean(losses[-20:]):.4f}")
    vl = val_loss(model, val, cfg)
    return dict(arch=name, params=model.num_parameters(), d_model=cfg.d_model, n_layer=cfg.n_layer,
                d_intermediate=mc.d_intermediate, steps=cfg.steps, tokens=cfg.steps * cfg.batch_size * cfg.seq_len,
                train_loss=float(np.mean(losses[-20:])), val_loss=vl, val_ppl=math.exp(vl),
                seconds=round(time.time() - t0, 1), device=cfg.device, data=cfg.data)


def compare(cfg: CompareConfig, out: Optional[str] = None, log=print) -> list:
    train, val_ids, vocab, bytes_per_tok = load_splits(cfg.data)
    vocab = cfg.vocab_size or vocab
    n_val = min(len(val_ids) // (cfg.seq_len + 1), max(1, cfg.val_tokens // cfg.seq_len))
    val = torch.from_numpy(val_ids[: n_val * (cfg.seq_len + 1)].reshape(n_val, cfg.seq_len + 1))
    _, target = matched_config("mamba3_siso", cfg, vocab)
    rows = []
    for name in cfg.archs:
        try:
            mc, n = matched_config(name, cfg, vocab, target)
        except (ImportError, ValueError) as e:
            log(f"[{name}] skipped: {e}")
            continue
        log(f"[{name}] {n:,} parameters (d_intermediate {mc.d_intermediate}; reference {target:,})")
        row = train_one(name, mc, train, val, cfg, log)
        if bytes_per_tok:
            row["bits_per_byte"] = row["val_loss"] / math.log(2) / bytes_per_tok
        rows.append(row)
        if out:
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
    return rows


def markdown(rows: Sequence[dict]) -> str:
    lines = ["| model | params | d_ff | tokens | train loss | val loss | val ppl | bits/byte | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bpb = f"{r['bits_per_byte']:.3f}" if "bits_per_byte" in r else "-"
        lines.append(f"| {r['arch']} | {r['params']:,} | {r['d_intermediate']} | {r['tokens']:,} | "
                     f"{r['train_loss']:.4f} | {r['val_loss']:.4f} | {r['val_ppl']:.3f} | {bpb} | {r['seconds']} |")
    return "\n".join(lines)
