"""Per-layer inference caches. Every mixer allocates one with ``allocate_inference_cache`` and
reads/writes it in ``forward(x, cache=...)`` (prefill/continuation) and ``step(x, cache)``.

A cache is a dataclass whose tensor fields all have the batch as their first dim; fixed shapes,
allocated once, updated in place (so a decode step can be captured in a CUDA graph).
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

Rows = Union[None, int, Sequence[int], Tensor]


def _rows_index(rows: Rows, device) -> Optional[Tensor]:
    if rows is None:
        return None
    if isinstance(rows, int):
        rows = [rows]
    return torch.as_tensor(rows, dtype=torch.long, device=device)


@dataclasses.dataclass
class LayerCache:
    """Base class: tensor fields with batch first."""

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

    # ---------------------------------------------------------------- snapshots
    def snapshot(self, rows: Rows = None, *, to_cpu: bool = False) -> dict[str, Tensor]:
        """Copy of the state of ``rows`` (all rows by default): a dict of tensors, batch first.

        Stays on the cache's device unless ``to_cpu`` (no host copy on GPU by default). Restoring
        it later resumes exactly where the snapshot was taken. Caches whose size grows with the
        position (attention KV) override this to copy only what has been written.
        """
        out = {}
        for name, t in self.tensors():
            idx = _rows_index(rows, t.device)
            s = t.detach().clone() if idx is None else t.detach().index_select(0, idx)
            out[name] = s.cpu() if to_cpu else s
        return out

    def restore(self, snap: dict[str, Tensor], rows: Rows = None) -> None:
        """Write a snapshot back (into ``rows``, or all rows), in place."""
        names = {n for n, _ in self.tensors()}
        if set(snap) != names:
            raise ValueError(f"snapshot holds {sorted(snap)} but this cache has {sorted(names)}")
        for name, t in self.tensors():
            src = snap[name].to(t.device, t.dtype)
            idx = _rows_index(rows, t.device)
            if idx is None:
                if src.shape != t.shape:
                    raise ValueError(f"snapshot.{name} has shape {tuple(src.shape)}, cache needs {tuple(t.shape)}")
                t.copy_(src)
            else:
                if src.shape[1:] != t.shape[1:] or src.shape[0] != idx.numel():
                    raise ValueError(f"snapshot.{name} has shape {tuple(src.shape)}, cache rows need "
                                     f"{(idx.numel(),) + tuple(t.shape[1:])}")
                t.index_copy_(0, idx, src)


def check_cache(cache, cls: type, batch: int, what: str = "input") -> None:
    """``cache`` must be this layer's cache type (from its ``allocate_inference_cache``) with
    ``batch`` rows: a named TypeError / ValueError instead of an AttributeError deep inside."""
    if not isinstance(cache, cls):
        raise TypeError(f"cache must be a {cls.__name__} (from this layer's allocate_inference_cache), "
                        f"got {type(cache).__name__}")
    cache.check_batch(batch, what)


def check_input_tensor(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def checked_allocate(fn):
    """Decorator for ``allocate_inference_cache``: ``batch_size`` must be an int >= 0."""
    import functools

    @functools.wraps(fn)
    def wrapper(self, batch_size, *args, **kwargs):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 0:
            raise ValueError(f"batch_size must be an int >= 0, got {batch_size!r}")
        return fn(self, batch_size, *args, **kwargs)
    return wrapper
