"""Multi-query associative recall (Zoology, Arora et al. 2024; Mamba-2's harder variant),
DATA.md section 4.5. Vectorised over the batch.

Layout (Zoology ``multiquery_ar``): keys come from ids 1..V/2-1 and values from V/2..V-1. The
sequence opens with ``num_kv_pairs`` pairs k1 v1 k2 v2 ... (keys distinct, values distinct within
an example). The remaining T - 2P positions hold the same keys again as queries at even offsets
2*gap, gaps drawn without replacement with p(gap) proportional to gap^(a-1) (a = 0.01: short gaps
favoured) over gap in 1..(T - 2P)//2, so queries come in shuffled order. Filler is 0, or uniform
random ids over the whole vocab with ``random_non_queries`` (Mamba-2's "harder MQAR", which also
uses T/4 pairs: ``mqar_mamba2_batch``). Labels are -100 except at each query key, whose target is
its value (next-token prediction). Metric: accuracy over query positions (``masked_accuracy``).
"""
from __future__ import annotations

from typing import Optional

import torch

from .common import TaskBatch, empty_labels, make_generator


def mqar_batch(batch_size: int, seq_len: int = 256, num_kv_pairs: int = 16, vocab_size: int = 8192, *,
               power_a: float = 0.01, random_non_queries: bool = False, seed: Optional[int] = None,
               generator: Optional[torch.Generator] = None) -> TaskBatch:
    """TaskBatch [B, seq_len]; ``lengths`` is None (all rows have length seq_len)."""
    if vocab_size <= seq_len:
        raise ValueError(f"vocab_size={vocab_size} must exceed seq_len={seq_len}")
    half = vocab_size // 2
    if num_kv_pairs < 1 or num_kv_pairs > half - 1:
        raise ValueError(f"num_kv_pairs must be in [1, {half - 1}], got {num_kv_pairs}")
    space = (seq_len - 2 * num_kv_pairs) // 2
    if space < num_kv_pairs:
        raise ValueError(f"seq_len={seq_len} leaves room for {space} queries < num_kv_pairs={num_kv_pairs}")
    g = make_generator(seed, generator)
    B, P = batch_size, num_kv_pairs
    keys = torch.rand(B, half - 1, generator=g).argsort(dim=1)[:, :P] + 1
    values = torch.rand(B, vocab_size - half, generator=g).argsort(dim=1)[:, :P] + half
    x = torch.zeros(B, seq_len, dtype=torch.long)
    x[:, 0:2 * P:2] = keys
    x[:, 1:2 * P:2] = values
    p = power_a * torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1)
    gaps = torch.multinomial((p / p.sum()).expand(B, space).float(), P, replacement=False, generator=g)
    qpos = 2 * P + 2 * gaps
    if random_non_queries:
        noise = torch.randint(0, vocab_size, (B, seq_len), generator=g)
        filler = torch.arange(seq_len)[None, :] >= 2 * P
        x = torch.where(filler, noise, x)
    x.scatter_(1, qpos, keys)
    labels = empty_labels(B, seq_len).scatter_(1, qpos, values)
    return TaskBatch(x, labels, None)


def mqar_mamba2_batch(batch_size: int, seq_len: int = 256, num_kv_pairs: Optional[int] = None,
                      vocab_size: int = 8192, *, seed: Optional[int] = None,
                      generator: Optional[torch.Generator] = None) -> TaskBatch:
    """Mamba-2 paper's harder MQAR: random filler, T/4 pairs by default (the curriculum also uses
    T/32, T/16, T/8 pairs: pass ``num_kv_pairs``)."""
    P = seq_len // 4 if num_kv_pairs is None else num_kv_pairs
    return mqar_batch(batch_size, seq_len, P, vocab_size, random_non_queries=True, seed=seed, generator=generator)
