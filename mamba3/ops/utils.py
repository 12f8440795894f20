"""Shared input guards and helpers for all ops.

Every public op validates its arguments here *before* any kernel runs, so bad input raises a
ValueError/TypeError naming the argument and the expected layout instead of crashing deep inside
a kernel or returning a silently wrong answer.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t, shape: Sequence, dtypes=FLOAT_DTYPES, device=None) -> None:
    """Check that ``t`` is a tensor of the given shape (``None`` entries are free) and dtype.

    ``shape`` entries may be ints or ``(label, int)`` pairs; the label appears in the error.
    """
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    labels = [s[0] if isinstance(s, tuple) else str(s) for s in shape]
    sizes = [s[1] if isinstance(s, tuple) else s for s in shape]
    layout = "[" + ", ".join(labels) + "]"
    if t.dim() != len(sizes):
        raise ValueError(f"{name} must have {len(sizes)} dims {layout}, got shape {tuple(t.shape)}")
    for i, (want, got) in enumerate(zip(sizes, t.shape)):
        if want is not None and want != got:
            raise ValueError(
                f"{name} must have shape {layout} = {tuple(s if s is not None else '?' for s in sizes)}, "
                f"got {tuple(t.shape)} (dim {i}: expected {want}, got {got})"
            )
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on device {device}, got {t.device}")


def check_cu_seqlens(cu_seqlens, total: int, batch: int) -> None:
    """Validate packed-sequence offsets: int32/int64 [S+1], 0 first, non-decreasing, ``total`` last."""
    if cu_seqlens is None:
        return
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D [num_seqs + 1] with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if batch != 1:
        raise ValueError(f"with cu_seqlens the batch dimension must be 1 (sequences packed along time), got batch={batch}")
    c = cu_seqlens.detach().cpu()
    if int(c[0]) != 0 or int(c[-1]) != total:
        raise ValueError(f"cu_seqlens must start at 0 and end at the packed length {total}, got {c[0].item()}..{c[-1].item()}")
    if bool((c[1:] < c[:-1]).any()):
        raise ValueError("cu_seqlens must be non-decreasing")


def seq_lengths(cu_seqlens: Tensor) -> list[int]:
    c = cu_seqlens.detach().cpu().tolist()
    return [b - a for a, b in zip(c[:-1], c[1:])]


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: ops accumulate in at least fp32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def check_impl(impl: str, choices: Sequence[str]) -> None:
    if impl not in choices:
        raise ValueError(f"impl must be one of {list(choices)}, got {impl!r}")


def pack_to_padded(x: Tensor, cu_seqlens: Tensor, pad_value: float = 0.0) -> Tensor:
    """[1, total, ...] packed -> [S, Tmax, ...] right-padded with ``pad_value``."""
    lengths = seq_lengths(cu_seqlens)
    tmax = max(lengths) if lengths else 0
    out = x.new_full((len(lengths), tmax) + tuple(x.shape[2:]), pad_value)
    starts = cu_seqlens.tolist()[:-1]
    for i, (s, n) in enumerate(zip(starts, lengths)):
        out[i, :n] = x[0, s : s + n]
    return out


def padded_to_pack(y: Tensor, cu_seqlens: Tensor) -> Tensor:
    """[S, Tmax, ...] -> [1, total, ...] (inverse of :func:`pack_to_padded`)."""
    lengths = seq_lengths(cu_seqlens)
    return torch.cat([y[i, :n] for i, n in enumerate(lengths)], dim=0).unsqueeze(0)


def check_same_device(**tensors) -> None:
    """All given tensors (None skipped; tuples such as ``Mamba3State`` looked into) share one
    device; raises ValueError naming the first argument on a different device than the first one."""
    first = None
    for name, t in tensors.items():
        items = [(name, t)]
        if isinstance(t, tuple):
            fields = getattr(t, "_fields", None) or [str(i) for i in range(len(t))]
            items = [(f"{name}.{f}", x) for f, x in zip(fields, t)]
        for label, x in items:
            if not isinstance(x, Tensor):
                continue
            if first is None:
                first = (label, x.device)
            elif x.device != first[1]:
                raise ValueError(f"{label} is on device {x.device} but {first[0]} is on {first[1]}: "
                                 f"all tensors must be on one device")


def check_writable(name: str, t) -> None:
    """A tensor updated in place (a decode state) must not alias itself (expand / stride 0)."""
    tensors = zip(getattr(t, "_fields", range(len(t))), t) if isinstance(t, tuple) else [(None, t)]
    for field, x in tensors:
        if isinstance(x, Tensor) and any(s == 0 and n > 1 for s, n in zip(x.stride(), x.shape)):
            label = name if field is None else f"{name}.{field}"
            raise ValueError(f"{label} is updated in place but has overlapping memory (stride 0, e.g. from "
                             f"expand); pass a materialised tensor (.clone())")


def cdiv(a: int, b: int) -> int:
    """Ceiling division for launch grids on the host (``triton.cdiv`` is a constexpr function: ~2 us
    a call, and one SISO forward + backward made dozens)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1); the host-side ``triton.next_power_of_2``."""
    return 1 << max(0, int(n) - 1).bit_length()
