"""Perplexity against evaluation context length (length extrapolation, Mamba-3 Fig. 4).

For each length L the validation token stream is cut into consecutive non-overlapping windows of L
tokens (the same first ``max_tokens`` tokens for every L where possible); each window is scored
from an empty state. Reported per L: perplexity over all predicted tokens of the windows
(``ppl``) and over the last quarter of each window only (``ppl_tail``, the positions beyond
3L/4, where a model that fails to extrapolate degrades first). Long windows can be run in pieces
of ``chunk`` tokens through the inference cache (``LanguageModel.forward(cache=...)``), which
bounds activation memory; the result equals one full forward.

Data: "tiny" (the shipped byte-level validation text), a built data folder (``TokenShards``,
split "val"), or a text file tokenised with the model's tokenizer.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def load_tokens(data: str, tokenizer=None) -> np.ndarray:
    """int64 token ids from "tiny", a data folder with manifest.json, or a UTF-8 text file."""
    if data == "tiny":
        from ..data import tiny_tokens
        return np.asarray(tiny_tokens("val"), dtype=np.int64)
    p = Path(data)
    if p.is_dir():
        from ..data import TokenShards
        sh = TokenShards(p, "val")
        return np.asarray(sh.read(0, len(sh)), dtype=np.int64)
    if tokenizer is None:
        raise ValueError("a text file needs a tokenizer")
    return np.asarray(tokenizer.encode(p.read_text(encoding="utf-8")), dtype=np.int64)


@torch.no_grad()
def window_nll(model, x: torch.Tensor, chunk: Optional[int] = None) -> torch.Tensor:
    """x [B, L] -> per-token NLL [B, L - 1] (fp32) of tokens 1..L-1 given their prefixes."""
    B, L = x.shape
    if chunk is None or chunk >= L:
        logits = model(x).logits.float()
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="none").view(B, L - 1)
    cache = model.allocate_inference_cache(B, L)
    parts = []
    for s in range(0, L, chunk):
        logits = model(x[:, s:s + chunk], cache=cache).logits.float()
        tgt = x[:, s + 1:s + chunk + 1]  # the piece's last logit predicts the next piece's first token
        lg = logits[:, : tgt.shape[1]]
        parts.append(F.cross_entropy(lg.flatten(0, 1), tgt.flatten(), reduction="none").view(B, -1))
    return torch.cat(parts, dim=1)


def ppl_vs_length(model, tokens: np.ndarray, lengths: Sequence[int], *, max_tokens: int = 1 << 17,
                  batch_size: int = 1, chunk: Optional[int] = None, device: str = "cpu", log=print) -> list:
    """Rows {length, windows, tokens, nll, ppl, ppl_tail} per length (skipped if the data is shorter)."""
    model = model.to(device).eval()
    rows = []
    for L in lengths:
        n_win = min(len(tokens), max(max_tokens, L)) // L
        if n_win == 0:
            log(f"length {L}: skipped, only {len(tokens)} tokens of data")
            continue
        data = torch.from_numpy(tokens[: n_win * L].reshape(n_win, L))
        nll_sum = tail_sum = 0.0
        n_tok = n_tail = 0
        t0 = 3 * L // 4
        for s in range(0, n_win, batch_size):
            nll = window_nll(model, data[s:s + batch_size].to(device), chunk)
            nll_sum += float(nll.sum())
            n_tok += nll.numel()
            tail = nll[:, max(t0 - 1, 0):]
            tail_sum += float(tail.sum())
            n_tail += tail.numel()
        row = dict(length=L, windows=n_win, tokens=n_tok, nll=nll_sum / n_tok, ppl=math.exp(nll_sum / n_tok),
                   ppl_tail=math.exp(tail_sum / n_tail))
        log(f"length {L}: {n_win} windows, ppl {row['ppl']:.3f}, last-quarter ppl {row['ppl_tail']:.3f}")
        rows.append(row)
    return rows


def markdown(rows: Sequence[dict], name: str = "model") -> str:
    lines = ["| model | context length | windows | ppl | last-quarter ppl |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {name} | {r['length']} | {r['windows']} | {r['ppl']:.3f} | {r['ppl_tail']:.3f} |")
    return "\n".join(lines)


def plot(results: dict, path: str, train_len: Optional[int] = None) -> None:
    """results: {model name: rows}. Writes a log-x PNG of ppl against context length."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in results.items():
        ax.plot([r["length"] for r in rows], [r["ppl"] for r in rows], marker="o", label=name)
    if train_len:
        ax.axvline(train_len, color="grey", ls="--", lw=1, label="training length")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("evaluation context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(model_dir: str, data: str, lengths: Optional[Sequence[int]] = None, train_len: Optional[int] = None,
        tokenizer: Optional[str] = None, out: Optional[str] = None, png: Optional[str] = None, **kw) -> list:
    from ..models import LanguageModel
    from ..models.tokenizer import load_tokenizer
    model = LanguageModel.from_pretrained(model_dir)
    spec = tokenizer
    if spec is None and (Path(model_dir) / "tokenizer.json").exists():
        spec = str(Path(model_dir) / "tokenizer.json")
    tok = load_tokenizer(None if spec in (None, "byte", "bytes") else spec)
    if lengths is None:
        if train_len is None:
            raise ValueError("give --lengths or --train-len (lengths default to train_len x 1, 2, 4, 8, 16)")
        lengths = [train_len * m for m in (1, 2, 4, 8, 16)]
    rows = ppl_vs_length(model, load_tokens(data, tok), lengths, **kw)
    print(markdown(rows, Path(model_dir).name))
    if out:
        with open(out, "a") as f:
            for r in rows:
                f.write(json.dumps({"model": str(model_dir), **r}) + "\n")
    if png:
        plot({Path(model_dir).name: rows}, png, train_len)
    return rows
