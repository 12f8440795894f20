"""Prefix reuse for generation: an LRU of decode states saved at block boundaries.

A state-space model cannot "look up" a prefix inside a longer cached sequence the way a paged KV
cache can: its state exists only at positions where a forward stopped. So on a miss, prefill stops
at the last block boundary of the prompt, the state of every layer is snapshotted there (SSM /
conv / k / v / phase states, attention KV up to that position), and the rest of the prompt
continues from it. A later prompt that shares that block-aligned prefix restores the snapshot
and prefills only its own suffix. Restoring is exact: the continuation equals recomputing.

Keys chain a hash over blocks (hash_i = sha256(hash_{i-1} || tokens of block i)), so finding the
longest cached prefix is one pass over the prompt.
"""
from __future__ import annotations

import collections
import hashlib
from typing import Optional

import torch
from torch import Tensor

from .cache import InferenceCache


def _nbytes(snap) -> int:
    return sum(t.numel() * t.element_size() for layer in snap["layers"] for t in layer.values())


class PrefixCache:
    """LRU over block-aligned token prefixes with a byte budget (snapshots stay on the device)."""

    def __init__(self, block_size: int = 64, max_bytes: int = 2**30):
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.block_size, self.max_bytes = block_size, max_bytes
        self._entries: "collections.OrderedDict[bytes, dict]" = collections.OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0
        self.tokens_reused = 0

    def _block_keys(self, tokens: Tensor) -> list[bytes]:
        """keys[i] identifies tokens[: (i + 1) * block_size]."""
        data = tokens.detach().to("cpu", torch.int64).numpy().tobytes()
        step = 8 * self.block_size
        keys, h = [], b""
        for i in range(len(data) // step):
            h = hashlib.sha256(h + data[i * step : (i + 1) * step]).digest()
            keys.append(h)
        return keys

    def lookup(self, tokens: Tensor, max_len: Optional[int] = None) -> tuple[int, Optional[dict]]:
        """Longest cached prefix of ``tokens`` (at most ``max_len`` tokens): (length, snapshot)."""
        keys = self._block_keys(tokens)
        for i in range(len(keys) - 1, -1, -1):
            n = (i + 1) * self.block_size
            if max_len is not None and n > max_len:
                continue
            snap = self._entries.get(keys[i])
            if snap is not None:
                self._entries.move_to_end(keys[i])
                self.hits += 1
                self.tokens_reused += n
                return n, snap
        self.misses += 1
        return 0, None

    def insert(self, tokens: Tensor, snap: dict) -> None:
        """Save ``snap`` (from :func:`snapshot_row`) as the state after ``tokens`` (block-aligned)."""
        n = tokens.numel()
        if n == 0 or n % self.block_size:
            raise ValueError(f"prefix length must be a positive multiple of block_size={self.block_size}, got {n}")
        key = self._block_keys(tokens)[-1]
        size = _nbytes(snap)
        if size > self.max_bytes:
            return
        if key in self._entries:
            self.bytes -= _nbytes(self._entries.pop(key))
        self._entries[key] = snap
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= _nbytes(old)

    def __len__(self) -> int:
        return len(self._entries)


def snapshot_row(cache: InferenceCache, row: int) -> dict:
    return {"layers": [c.snapshot(rows=[row]) for c in cache.layers], "length": cache.lengths[row : row + 1].clone()}


def restore_row(cache: InferenceCache, row: int, snap: dict) -> None:
    for c, s in zip(cache.layers, snap["layers"]):
        c.restore(s, rows=[row])
    cache.lengths[row : row + 1].copy_(snap["length"])


@torch.no_grad()
def prefill_with_prefix_cache(model, prompts: list[Tensor], cache: InferenceCache, prefix_cache: PrefixCache) -> Tensor:
    """Prefill each prompt into its (fresh) cache row, reusing and filling ``prefix_cache``.

    Returns the last-position logits [B, V]. At least one token of each prompt is always run so
    that its logits exist.
    """
    dev, bs = model.device, prefix_cache.block_size
    logits = []
    for i, p in enumerate(prompts):
        p = p.to(dev)
        row = cache.rows(i)
        start, snap = prefix_cache.lookup(p, max_len=p.numel() - 1)
        if snap is not None:
            restore_row(cache, i, snap)
        boundary = ((p.numel() - 1) // bs) * bs          # last block boundary before the final token
        if boundary > start:
            model.hidden_states(p[start:boundary][None], cache=row)
            prefix_cache.insert(p[:boundary], snapshot_row(cache, i))
            start = boundary
        h = model.hidden_states(p[start:][None], cache=row)
        logits.append(model.logits_from_hidden(h[:, -1]))
    return torch.cat(logits)
