"""Selective copying (Mamba-1, Gu & Dao 2023, section 4.1.1; S4's variable-spacing "copying"),
DATA.md section 4.6. Vectorised.

Alphabet A (16): 0 = blank, A - 1 = marker, data tokens uniform in 1..A-2. M (16) data tokens are
placed in order at sorted random distinct positions of a blank region of length seq_len - M, which
is followed by M markers. At the j-th marker the model must output the j-th data token (labels sit
on the marker positions, as in S4's generator where the targets align with the last M inputs).
Metric: accuracy over the copied tokens (``masked_accuracy``). Chance = 1 / (A - 2).
"""
from __future__ import annotations

from typing import Optional

import torch

from .common import TaskBatch, empty_labels, make_generator


def selective_copy_batch(batch_size: int, seq_len: int = 4096, num_tokens: int = 16, vocab_size: int = 16, *,
                         seed: Optional[int] = None, generator: Optional[torch.Generator] = None) -> TaskBatch:
    """TaskBatch [B, seq_len] with seq_len = region (seq_len - M) + M markers."""
    M, A = num_tokens, vocab_size
    if A < 3:
        raise ValueError(f"vocab_size must be >= 3 (blank, marker, one data token), got {A}")
    region = seq_len - M
    if M < 1 or region < M:
        raise ValueError(f"need 1 <= num_tokens <= seq_len / 2, got num_tokens={M}, seq_len={seq_len}")
    g = make_generator(seed, generator)
    tokens = torch.randint(1, A - 1, (batch_size, M), generator=g)
    pos = torch.rand(batch_size, region, generator=g).argsort(dim=1)[:, :M].sort(dim=1).values
    x = torch.zeros(batch_size, seq_len, dtype=torch.long)
    x.scatter_(1, pos, tokens)
    x[:, region:] = A - 1
    labels = empty_labels(batch_size, seq_len)
    labels[:, region:] = tokens
    return TaskBatch(x, labels, None)
