"""Fast attention through torch.nn.functional.scaled_dot_product_attention (fused kernels on GPU,
flash/math kernels on CPU)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import default_offsets, run_packed, visible_mask


def attention_sdpa(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, window: Optional[int] = None,
                   q_offset=None, kv_lengths: Optional[Tensor] = None, kv_start: Optional[Tensor] = None,
                   scale: Optional[float] = None, cu_seqlens: Optional[Tensor] = None) -> Tensor:
    """SDPA form of :func:`mamba3.ops.attention.attention`; o [B, T, H, Dv] in q's dtype."""
    kw = dict(causal=causal, window=window, scale=scale)
    if cu_seqlens is not None:
        return run_packed(attention_sdpa, q, k, v, cu_seqlens, **kw)
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))                        # [B, heads, len, D]
    gqa = dict(enable_gqa=True) if Hkv != H else {}
    plain = (q_offset is None and kv_lengths is None and kv_start is None and window is None
             and (not causal or T == S))
    if plain:  # no explicit mask: lets SDPA pick its fused causal kernel
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, scale=scale, **gqa)
        return o.transpose(1, 2)
    q_offset, kv_lengths = default_offsets(B, T, S, q_offset, kv_lengths, q.device)
    mask = visible_mask(T, S, q_offset, kv_lengths, causal, window, kv_start)[:, None]     # [B, 1, T, S]
    o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, **gqa)
    # rows that see no key (padding) come back as NaN from some kernels: define them as 0
    o = torch.where(mask.any(-1, keepdim=True), o, torch.zeros_like(o))
    return o.transpose(1, 2)
