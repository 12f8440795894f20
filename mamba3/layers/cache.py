"""Per-layer inference caches. Every mixer allocates one with ``allocate_inference_cache`` and
reads/writes it in ``forward(x, cache=...)`` (prefill/continuation) and ``step(x, cache)``.

A cache is a dataclass whose tensor fields all have the batch as their first dim; fixed shapes,
allocated once, updated in place (so a decode step can be captured in a CUDA graph).
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import torch
from torch import Tensor


@dataclasses.dataclass
class LayerCache:
    """Base class: tensor fields with batch first; ``seqlen`` counts tokens consumed per row."""

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                yield f.name, value

    @property
    def batch_size(self) -> int:
        return next(self.tensors())[1].shape[0]

    def reset(self) -> None:
        """Zero every tensor in place (start new sequences without reallocating)."""
        for _, t in self.tensors():
            t.zero_()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self.tensors())

    def clone(self) -> "LayerCache":
        return dataclasses.replace(self, **{n: t.clone() for n, t in self.tensors()})

    def copy_(self, other: "LayerCache") -> None:
        for (n, t), (_, s) in zip(self.tensors(), other.tensors()):
            t.copy_(s)

    def check_batch(self, batch: int, what: str = "input") -> None:
        if self.batch_size != batch:
            raise ValueError(f"cache holds batch {self.batch_size} but the {what} has batch {batch}")
