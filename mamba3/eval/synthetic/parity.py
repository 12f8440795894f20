"""Parity (Grazzi et al. 2025; Mamba-3 Table 5b), DATA.md section 4.1.

Vocab 3: 0 = pad, 1 = bit 0, 2 = bit 1. An example of length n holds n - 1 random bits followed by
the answer token 1 + (number of 1-bits mod 2). In the model input the answer is replaced by pad, so
the model predicts the answer from the logits at the last bit (position n - 2); only that position
is scored. Rows are right-padded with 0 to the longest example (or to ``context``). Chance = 1/2.
"""
from __future__ import annotations

from typing import Optional

import torch

from .common import TaskBatch, empty_labels, make_generator, sample_lengths

VOCAB_SIZE = 3
PAD = 0
CHANCE = 0.5


def parity_batch(batch_size: int, min_len: int = 3, max_len: int = 40, *, context: Optional[int] = None,
                 seed: Optional[int] = None, generator: Optional[torch.Generator] = None) -> TaskBatch:
    """Returns a TaskBatch [B, T] with T = context or the longest length - 1 (the answer slot is pad
    and never read by a causal model, so it is dropped unless ``context`` asks for it)."""
    if min_len < 2:
        raise ValueError(f"min_len must be >= 2 (at least one bit), got {min_len}")
    g = make_generator(seed, generator)
    n = sample_lengths(batch_size, min_len, max_len, g)
    T = int(n.max()) - 1 if context is None else int(context)
    if T < int(n.max()) - 1:
        raise ValueError(f"context={context} shorter than max_len - 1 = {int(n.max()) - 1}")
    pos = torch.arange(T)[None, :]
    bits = torch.randint(0, 2, (batch_size, T), generator=g)
    valid = pos < (n[:, None] - 1)
    bits = bits * valid
    x = torch.where(valid, bits + 1, torch.zeros_like(bits))
    answer = 1 + bits.sum(1) % 2
    labels = empty_labels(batch_size, T)
    labels[torch.arange(batch_size), n - 2] = answer
    return TaskBatch(x, labels, n)
