"""Causal (grouped-query) softmax attention, the readable specification, and the shared mask.

Keys are indexed 0..S-1 by absolute position; query i of row b sits at position q_offset[b] + i.
Key j is visible to that query when

    kv_start[b] <= j < kv_lengths[b]  and  (not causal or j <= pos)  and  (window is None or j > pos - window)

(a window of W keeps the last W positions, itself included). A query that sees no key returns 0.
Query head h reads key/value head h // (H // Hkv).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..utils import pack_to_padded, padded_to_pack, seq_lengths


def visible_mask(T: int, S: int, q_offset: Tensor, kv_lengths: Tensor, causal: bool,
                 window: Optional[int], kv_start: Optional[Tensor] = None) -> Tensor:
    """Boolean [B, T, S], True where query i (row b) may attend to key j."""
    dev = q_offset.device
    pos = q_offset[:, None] + torch.arange(T, device=dev)[None, :]            # [B, T]
    j = torch.arange(S, device=dev)[None, None, :]
    m = j < kv_lengths[:, None, None]
    if kv_start is not None:
        m = m & (j >= kv_start.to(dev)[:, None, None])
    if causal:
        m = m & (j <= pos[..., None])
    if window is not None:
        m = m & (j > pos[..., None] - window)
    return m


def default_offsets(B: int, T: int, S: int, q_offset, kv_lengths, device) -> tuple[Tensor, Tensor]:
    """Resolve the optional arguments to int64 [B] tensors; queries default to the last T positions."""
    if kv_lengths is None:
        kv_lengths = torch.full((B,), S, dtype=torch.long, device=device)
    kv_lengths = kv_lengths.to(device=device, dtype=torch.long)
    if q_offset is None:
        q_offset = kv_lengths - T
    elif isinstance(q_offset, int):
        q_offset = torch.full((B,), q_offset, dtype=torch.long, device=device)
    return q_offset.to(device=device, dtype=torch.long), kv_lengths


def run_packed(fn, q, k, v, cu_seqlens, **kw) -> Tensor:
    """Packed self-attention: [1, total, ...] -> padded rows with their own lengths -> packed."""
    lengths = torch.tensor(seq_lengths(cu_seqlens), device=q.device)
    pad = lambda t: pack_to_padded(t, cu_seqlens)
    o = fn(pad(q), pad(k), pad(v), q_offset=torch.zeros_like(lengths), kv_lengths=lengths, **kw)
    return padded_to_pack(o, cu_seqlens)


def attention_reference(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, window: Optional[int] = None,
                        q_offset=None, kv_lengths: Optional[Tensor] = None, kv_start: Optional[Tensor] = None,
                        scale: Optional[float] = None, cu_seqlens: Optional[Tensor] = None) -> Tensor:
    """Explicit float64 masked softmax (signature of :func:`mamba3.ops.attention.attention`).

    q [B, T, H, D], k [B, S, Hkv, D], v [B, S, Hkv, Dv] -> o [B, T, H, Dv] in v's dtype.
    """
    kw = dict(causal=causal, window=window, scale=scale)
    if cu_seqlens is not None:
        return run_packed(attention_reference, q, k, v, cu_seqlens, **kw)
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    q_offset, kv_lengths = default_offsets(B, T, S, q_offset, kv_lengths, q.device)
    qd, kd, vd = (t.to(torch.float64) for t in (q, k, v))
    kd, vd = kd.repeat_interleave(H // Hkv, dim=2), vd.repeat_interleave(H // Hkv, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", qd, kd) * scale
    mask = visible_mask(T, S, q_offset, kv_lengths, causal, window, kv_start)[:, None]    # [B, 1, T, S]
    scores = scores.masked_fill(~mask, float("-inf"))
    any_visible = mask.any(-1, keepdim=True)
    probs = torch.softmax(torch.where(any_visible, scores, torch.zeros_like(scores)), dim=-1)
    probs = torch.where(mask, probs, torch.zeros_like(probs))
    o = torch.einsum("bhts,bshd->bthd", probs, vd)
    return o.to(v.dtype)
