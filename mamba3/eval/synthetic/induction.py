"""Induction heads (Mamba-1 section 4.1.2; H3/safari generator), DATA.md section 4.7. Vectorised.

Tokens uniform over 0..V-2 (V = 16); the special "copy prefix" token is V - 1. It is written at a
random position p in [0, T - 3]; the token at p + 1 is the one to remember. The last position holds
the special token again, and the model must output the remembered token there (loss and accuracy
only at the last position). Chance = 1 / (V - 1).
"""
from __future__ import annotations

from typing import Optional

import torch

from .common import TaskBatch, empty_labels, make_generator


def induction_batch(batch_size: int, seq_len: int = 256, vocab_size: int = 16, *, seed: Optional[int] = None,
                    generator: Optional[torch.Generator] = None) -> TaskBatch:
    """TaskBatch [B, seq_len]; the label is at position seq_len - 1."""
    if seq_len < 4:
        raise ValueError(f"seq_len must be >= 4, got {seq_len}")
    if vocab_size < 3:
        raise ValueError(f"vocab_size must be >= 3, got {vocab_size}")
    g = make_generator(seed, generator)
    special = vocab_size - 1
    x = torch.randint(0, special, (batch_size, seq_len), generator=g)
    p = torch.randint(0, seq_len - 2, (batch_size,), generator=g)
    rows = torch.arange(batch_size)
    x[rows, p] = special
    x[:, -1] = special
    labels = empty_labels(batch_size, seq_len)
    labels[:, -1] = x[rows, p + 1]
    return TaskBatch(x, labels, None)
