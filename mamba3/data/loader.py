"""Deterministic, resumable batches of fixed-length windows from a token stream.

The stream is cut into ``num_windows = len // seq_len`` non-overlapping windows. Sample ``g``
(a global counter over the whole run) is window ``perm_e[g % num_windows]`` of epoch
``e = g // num_windows``, where ``perm_e`` is a permutation drawn from ``(seed, e)``. The data
position of a run is therefore one integer (samples consumed), and resuming, or splitting a
global batch across ranks, reproduces exactly the same windows.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch

from .shards import TokenShards


class ArrayStream:
    """An in-memory token array with the ``TokenShards`` interface (len, read)."""

    def __init__(self, tokens: np.ndarray):
        self.tokens = np.asarray(tokens, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.tokens)

    def read(self, start: int, length: int) -> np.ndarray:
        return self.tokens[start: start + length]


Stream = Union[ArrayStream, TokenShards]


class WindowSampler:
    """Windows of ``seq_len`` tokens addressed by a global sample index.

    Args:
        stream: ``ArrayStream`` or ``TokenShards``.
        seq_len: tokens per window.
        seed: data-order seed; ``shuffle=False`` keeps stream order (validation).
    """

    def __init__(self, stream: Stream, seq_len: int, seed: int = 0, shuffle: bool = True):
        self.stream, self.seq_len, self.seed, self.shuffle = stream, seq_len, seed, shuffle
        self.num_windows = len(stream) // seq_len
        if self.num_windows < 1:
            raise ValueError(f"stream of {len(stream)} tokens is shorter than seq_len = {seq_len}")
        self._epoch, self._perm = -1, None

    def window(self, g: int) -> int:
        epoch, i = divmod(int(g), self.num_windows)
        if not self.shuffle:
            return i
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._epoch = epoch
        return int(self._perm[i])

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        """LongTensor [len(indices), seq_len]."""
        rows = [self.stream.read(self.window(g) * self.seq_len, self.seq_len) for g in indices]
        return torch.from_numpy(np.stack(rows).astype(np.int64))


def rank_indices(start: int, micro_batch: int, micro_step: int, rank: int, world: int) -> range:
    """Global sample indices of one rank's micro-batch inside the global batch starting at ``start``.
    A global batch is ``micro_batch * grad_accum * world`` consecutive samples; micro-step ``k`` of
    rank ``r`` takes the ``(k * world + r)``-th block of ``micro_batch``."""
    first = start + (micro_step * world + rank) * micro_batch
    return range(first, first + micro_batch)
