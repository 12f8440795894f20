"""One inference cache for a whole stack: a list of per-layer caches plus per-row lengths."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from ..layers.cache import LayerCache


@dataclasses.dataclass
class InferenceCache:
    """Decode state of a ``LanguageModel``.

    layers: one ``LayerCache`` per layer (fixed shapes, batch first, updated in place).
    lengths: [B] int64 tokens consumed by each row (prompts may differ in length).
    max_seqlen: capacity of length-bound caches (attention KV); SSM caches ignore it.
    """

    layers: list
    lengths: Tensor
    max_seqlen: int

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def seqlen_offset(self) -> int:
        """Longest row length (tokens consumed so far)."""
        return int(self.lengths.max()) if self.lengths.numel() else 0

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> LayerCache:
        return self.layers[i]

    def tensors(self):
        for i, c in enumerate(self.layers):
            for n, t in c.tensors():
                yield f"layers.{i}.{n}", t
        yield "lengths", self.lengths

    def reset(self) -> None:
        """Zero every state in place (reuse the buffers for new sequences)."""
        for c in self.layers:
            c.reset()
        self.lengths.zero_()

    def nbytes(self, per_layer: bool = False):
        sizes = [c.nbytes() for c in self.layers]
        return sizes if per_layer else sum(sizes)

    def clone(self) -> "InferenceCache":
        return InferenceCache([c.clone() for c in self.layers], self.lengths.clone(), self.max_seqlen)

    def copy_(self, other: "InferenceCache") -> None:
        for a, b in zip(self.layers, other.layers):
            a.copy_(b)
        self.lengths.copy_(other.lengths)

    def check_batch(self, batch: int, what: str = "input") -> None:
        if self.batch_size != batch:
            raise ValueError(f"cache holds batch {self.batch_size} but the {what} has batch {batch}")

    def rows(self, index: slice | int) -> "InferenceCache":
        """A view of some rows (a slice or one row): writes through to this cache."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise ValueError(f"rows takes an int or a contiguous slice, got {index!r}")
        layers = [dataclasses.replace(c, **{n: t[index] for n, t in c.tensors()}) for c in self.layers]
        return InferenceCache(layers, self.lengths[index], self.max_seqlen)

    def advance(self, n: int | Tensor, rows: Optional[Tensor] = None) -> None:
        """Record that ``n`` more tokens were consumed (by ``rows``, default all)."""
        if rows is None:
            self.lengths.add_(n)
        else:
            self.lengths[rows] += n
