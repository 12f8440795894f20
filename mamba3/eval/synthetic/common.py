"""Shared pieces of the synthetic generators: the batch container and length sampling."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from .metrics import IGNORE_INDEX


@dataclasses.dataclass
class TaskBatch:
    """One batch of a synthetic task, aligned for a causal LM.

    input_ids: [B, T] long. labels: [B, T] long, the target for the logits at the same position,
    IGNORE_INDEX (-100) where nothing is scored. lengths: [B] long, the example lengths (counting
    the answer token as the papers do), or None where all rows share the length T.
    """

    input_ids: Tensor
    labels: Tensor
    lengths: Optional[Tensor] = None

    def _map(self, fn) -> "TaskBatch":
        return TaskBatch(fn(self.input_ids), fn(self.labels), None if self.lengths is None else fn(self.lengths))

    def to(self, device, non_blocking: bool = False) -> "TaskBatch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "TaskBatch":
        return self._map(lambda t: t.pin_memory())


def make_generator(seed: Optional[int], generator: Optional[torch.Generator]) -> torch.Generator:
    if generator is not None:
        return generator
    g = torch.Generator()
    g.manual_seed(0 if seed is None else int(seed))
    return g


def sample_lengths(batch_size: int, min_len: int, max_len: int, g: torch.Generator) -> Tensor:
    """[B] lengths uniform in [min_len, max_len] (inclusive)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if min_len > max_len:
        raise ValueError(f"min_len={min_len} > max_len={max_len}")
    return torch.randint(min_len, max_len + 1, (batch_size,), generator=g)


def empty_labels(B: int, T: int) -> Tensor:
    return torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
