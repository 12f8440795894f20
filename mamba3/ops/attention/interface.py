"""Entry point for causal attention: validation, then dispatch to the reference or SDPA form."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..utils import check_cu_seqlens, check_impl, check_same_device, check_tensor
from .reference import attention_reference
from .sdpa import attention_sdpa

ATTN_IMPLS = ("auto", "reference", "sdpa")
INT_DTYPES = (torch.int32, torch.int64)


def validate_attention(q, k, v, causal, window, q_offset, kv_lengths, scale, cu_seqlens, kv_start=None) -> None:
    check_tensor("q", q, [("B", None), ("T", None), ("H", None), ("D", None)])
    B, T, H, D = q.shape
    check_tensor("k", k, [("B", B), ("S", None), ("Hkv", None), ("D", D)])
    S, Hkv = k.shape[1], k.shape[2]
    check_tensor("v", v, [("B", B), ("S", S), ("Hkv", Hkv), ("Dv", None)])
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_same_device(q=q, k=k, v=v)
    if Hkv < 1 or H % Hkv != 0:
        raise ValueError(f"the number of query heads H={H} must be a multiple of the number of key/value heads Hkv={Hkv}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
        raise ValueError(f"window must be None or a positive int (number of visible positions), got {window!r}")
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale <= 0):
        raise ValueError(f"scale must be None or a positive float, got {scale!r}")
    if cu_seqlens is not None:
        if q_offset is not None or kv_lengths is not None or kv_start is not None:
            raise ValueError("cu_seqlens (packed self-attention) cannot be combined with q_offset, kv_lengths "
                             "or kv_start")
        if S != T:
            raise ValueError(f"with cu_seqlens q and k must be packed alike: T={T} but S={S}")
        check_cu_seqlens(cu_seqlens, T, B)
    if kv_lengths is not None:
        check_tensor("kv_lengths", kv_lengths, [("B", B)], dtypes=INT_DTYPES)
        if bool(((kv_lengths < 0) | (kv_lengths > S)).any()):
            raise ValueError(f"kv_lengths must lie in [0, S={S}], got {kv_lengths.tolist()}")
    if kv_start is not None:
        check_tensor("kv_start", kv_start, [("B", B)], dtypes=INT_DTYPES)
        if bool(((kv_start < 0) | (kv_start > S)).any()):
            raise ValueError(f"kv_start must lie in [0, S={S}], got {kv_start.tolist()}")
    if q_offset is not None:
        if isinstance(q_offset, int) and not isinstance(q_offset, bool):
            if q_offset < 0:
                raise ValueError(f"q_offset must be >= 0, got {q_offset}")
        else:
            check_tensor("q_offset", q_offset, [("B", B)], dtypes=INT_DTYPES)
            if bool((q_offset < 0).any()):
                raise ValueError(f"q_offset must be >= 0, got {q_offset.tolist()}")


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, window: Optional[int] = None,
              q_offset=None, kv_lengths: Optional[Tensor] = None, kv_start: Optional[Tensor] = None,
              scale: Optional[float] = None, cu_seqlens: Optional[Tensor] = None, impl: str = "auto") -> Tensor:
    """Multi-head / grouped-query softmax attention with causal, sliding-window and cache masks.

    Args:
        q: [B, T, H, D] queries; k: [B, S, Hkv, D]; v: [B, S, Hkv, Dv]; H a multiple of Hkv
            (query head h reads key/value head h // (H // Hkv)).
        causal: mask keys after the query position.
        window: keep only the last ``window`` positions (itself included); None = unbounded.
        q_offset: int or int [B]: absolute position of q[:, 0] (keys sit at 0..S-1); default
            kv_lengths - T (the queries are the last T keys, as in prefill or decode from a cache).
        kv_lengths: int [B] number of valid keys per row (a preallocated KV cache); default S.
        kv_start: int [B] first valid key per row (keys before it are masked; e.g. the unfilled
            slots of a ring-buffer window cache); default 0.
        scale: softmax scale, default D ** -0.5.
        cu_seqlens: [N + 1] offsets of packed sequences (B = 1, S = T): block-diagonal self-attention.
        impl: "auto" (= "sdpa"), "reference" (float64 masked softmax) or "sdpa".

    Returns:
        o [B, T, H, Dv] in q's dtype; queries that see no key give 0.

    Example:
        >>> q = torch.randn(2, 5, 4, 8); kv = torch.randn(2, 5, 2, 8)
        >>> attention(q, kv, kv).shape
        torch.Size([2, 5, 4, 8])
    """
    check_impl(impl, ATTN_IMPLS)
    validate_attention(q, k, v, causal, window, q_offset, kv_lengths, scale, cu_seqlens, kv_start)
    fn = attention_reference if impl == "reference" else attention_sdpa
    return fn(q, k, v, causal=causal, window=window, q_offset=q_offset, kv_lengths=kv_lengths, kv_start=kv_start,
              scale=scale, cu_seqlens=cu_seqlens)
