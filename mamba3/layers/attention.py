"""Causal multi-head / grouped-query attention mixer (SPEC section 11) on the layer protocol.

Parameters follow mamba_ssm's ``MHA``: ``in_proj`` (fused q | k | v, q first, then Hkv key heads,
then Hkv value heads) and ``out_proj``. Positions: RoPE (non-interleaved halves, base 10000) or
none (NoPE, as in the paper's hybrids). Optional sliding window. The KV cache is preallocated to
``max_seqlen`` with a per-row length counter; a forward with a cache continues every row from its
own length (chunked prefill), ``step`` appends one token.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from ..ops.attention import apply_rope, attention, attention_reference, attention_sdpa
from ..ops.utils import check_cu_seqlens, check_same_device, check_tensor, pack_to_padded, padded_to_pack, seq_lengths
from .cache import LayerCache, check_cache, check_input_tensor, checked_allocate


@dataclasses.dataclass
class AttentionCache(LayerCache):
    """k, v [B, L, Hkv, D]; seqlen [B] int64 tokens consumed per row.

    ring=False: L = max_seqlen, position p sits in slot p (positions 0..seqlen-1 valid).
    ring=True (sliding window shorter than max_seqlen): L = window, position p sits in slot
    p % window, so only the last ``window`` positions are kept and the length is unbounded.
    """

    k: Tensor
    v: Tensor
    seqlen: Tensor
    ring: bool = False

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    def snapshot(self, rows=None, *, to_cpu: bool = False) -> dict:
        """KV written so far (positions < seqlen; the whole ring for a sliding window), not the
        whole preallocated buffer, so a snapshot costs what the prefix holds."""
        idx = None if rows is None else torch.as_tensor([rows] if isinstance(rows, int) else rows,
                                                        dtype=torch.long, device=self.k.device)
        sel = (lambda t: t) if idx is None else (lambda t: t.index_select(0, idx))
        seqlen = sel(self.seqlen)
        n = self.slots if self.ring else min(int(seqlen.max()) if seqlen.numel() else 0, self.slots)
        out = {"k": sel(self.k[:, :n]).clone(), "v": sel(self.v[:, :n]).clone(), "seqlen": seqlen.clone()}
        return {k: v.cpu() for k, v in out.items()} if to_cpu else out

    def restore(self, snap: dict, rows=None) -> None:
        if set(snap) != {"k", "v", "seqlen"}:
            raise ValueError(f"snapshot holds {sorted(snap)} but an attention cache needs ['k', 'seqlen', 'v']")
        n = snap["k"].shape[1]
        if n > self.slots or (self.ring and n != self.slots):
            raise ValueError(f"snapshot holds {n} KV positions but this cache has {self.slots} slots")
        idx = None if rows is None else torch.as_tensor([rows] if isinstance(rows, int) else rows,
                                                        dtype=torch.long, device=self.k.device)
        for name in ("k", "v"):
            dst, src = getattr(self, name), snap[name].to(self.k.device, self.k.dtype)
            if idx is None:
                dst[:, :n].copy_(src)
            else:
                dst[idx, :n] = src
        if idx is None:
            self.seqlen.copy_(snap["seqlen"].to(self.seqlen.device))
        else:
            self.seqlen[idx] = snap["seqlen"].to(self.seqlen.device)


class Attention(nn.Module):
    """Causal attention layer: forward(x, cache=None, cu_seqlens=None) / step(x, cache).

    Args:
        d_model: model width (first positional, as for every mixer).
        num_heads: query heads; num_kv_heads: key/value heads (default num_heads; GQA when fewer).
        head_dim: per-head dim (default d_model // num_heads).
        rope: rotary position embedding on q and k (False = NoPE); rope_base: its theta.
        window: sliding window (each token sees the last ``window`` positions, itself included).
        qkv_bias, out_bias: biases of in_proj / out_proj.
        impl: attention op impl ("auto" = SDPA, or "reference").
    """

    def __init__(self, d_model: int, num_heads: int = 8, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, rope: bool = True, rope_base: float = 10000.0,
                 window: Optional[int] = None, qkv_bias: bool = False, out_bias: bool = False,
                 layer_idx: Optional[int] = None, device=None, dtype=None, *, impl: str = "auto"):
        super().__init__()
        fk = dict(device=device, dtype=dtype)
        for name, val in (("d_model", d_model), ("num_heads", num_heads)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if not isinstance(num_kv_heads, int) or num_kv_heads < 1 or num_heads % num_kv_heads != 0:
            raise ValueError(f"num_kv_heads={num_kv_heads} must be a positive divisor of num_heads={num_heads}")
        if head_dim is None:
            if d_model % num_heads != 0:
                raise ValueError(f"num_heads={num_heads} must divide d_model={d_model} (or pass head_dim)")
            head_dim = d_model // num_heads
        if rope and head_dim % 2 != 0:
            raise ValueError(f"rope needs an even head_dim, got {head_dim}")
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be None or a positive int, got {window!r}")
        self.d_model, self.num_heads, self.num_kv_heads, self.head_dim = d_model, num_heads, num_kv_heads, head_dim
        self.rope, self.rope_base, self.window, self.layer_idx, self.impl = rope, rope_base, window, layer_idx, impl
        qkv_dim = head_dim * (num_heads + 2 * num_kv_heads)
        self.in_proj = nn.Linear(d_model, qkv_dim, bias=qkv_bias, **fk)
        self.out_proj = nn.Linear(head_dim * num_heads, d_model, bias=out_bias, **fk)

    # ----------------------------------------------------------------------------------------
    @checked_allocate
    def allocate_inference_cache(self, batch_size: int, max_seqlen: Optional[int] = None, *, device=None,
                                 dtype=None) -> AttentionCache:
        """KV cache for ``max_seqlen`` tokens per row (required: attention memory grows with length).
        With a sliding window shorter than ``max_seqlen`` the cache is a ring of ``window`` slots."""
        if max_seqlen is None or not isinstance(max_seqlen, int) or max_seqlen < 1:
            raise ValueError(f"Attention.allocate_inference_cache needs max_seqlen (a positive int: the KV "
                             f"cache is preallocated to that length), got {max_seqlen!r}")
        device = self.in_proj.weight.device if device is None else device
        dtype = self.in_proj.weight.dtype if dtype is None else dtype
        ring = self.window is not None and self.window < max_seqlen
        shape = (batch_size, self.window if ring else max_seqlen, self.num_kv_heads, self.head_dim)
        return AttentionCache(k=torch.zeros(shape, device=device, dtype=dtype),
                              v=torch.zeros(shape, device=device, dtype=dtype),
                              seqlen=torch.zeros(batch_size, device=device, dtype=torch.long), ring=ring)

    # ----------------------------------------------------------------------------------------
    def _qkv(self, x: Tensor):
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        check_same_device(x=x, in_proj_weight=self.in_proj.weight)
        q, k, v = self.in_proj(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        return q.unflatten(-1, (H, D)), k.unflatten(-1, (Hkv, D)), v.unflatten(-1, (Hkv, D))

    def _rope(self, t: Tensor, positions: Tensor) -> Tensor:
        return apply_rope(t, positions, self.rope_base) if self.rope else t

    def forward(self, x: Tensor, cache: Optional[AttentionCache] = None,
                cu_seqlens: Optional[Tensor] = None) -> Tensor:
        """x: [B, T, d_model] -> [B, T, d_model]. With ``cache`` each row continues from its cached
        length and its keys/values are appended. With ``cu_seqlens`` ([S+1], B = 1) packed sequences
        are independent (positions restart at 0, or at each row's cache length)."""
        check_tensor("x", x, [("B", None), ("T", None), ("d_model", self.d_model)])
        check_cu_seqlens(cu_seqlens, x.shape[1], x.shape[0])  # positions are built from it below
        q, k, v = self._qkv(x)
        if cache is None:
            T = x.shape[1]
            if cu_seqlens is None:
                pos = torch.arange(T, device=x.device)
            else:
                lens = torch.tensor(seq_lengths(cu_seqlens), device=x.device)
                pos = torch.arange(T, device=x.device) - torch.repeat_interleave(cu_seqlens[:-1].to(x.device), lens)
            o = attention(self._rope(q, pos), self._rope(k, pos), v, causal=True, window=self.window,
                          cu_seqlens=cu_seqlens, impl=self.impl)
            return self.out_proj(o.flatten(-2))
        nseq = x.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        check_cache(cache, AttentionCache, nseq, "input (number of sequences)")
        if cu_seqlens is None:
            lens = torch.full((nseq,), x.shape[1], device=x.device, dtype=torch.long)
            o = self._attend_cached(q, k, v, lens, cache)
        else:
            lens = torch.tensor(seq_lengths(cu_seqlens), device=x.device, dtype=torch.long)
            pad = lambda t: pack_to_padded(t, cu_seqlens)
            o = padded_to_pack(self._attend_cached(pad(q), pad(k), pad(v), lens, cache), cu_seqlens)
        return self.out_proj(o.flatten(-2))

    def _attend_cached(self, q: Tensor, k: Tensor, v: Tensor, lens: Tensor, cache: AttentionCache) -> Tensor:
        """Right-padded rows q [N, T, H, D], k, v [N, T, Hkv, D] with ``lens`` valid tokens each:
        attend over the cached keys plus the new ones, store the new keys, advance the lengths."""
        N, T = q.shape[:2]
        off = cache.seqlen.to(q.device)
        new_len = off + lens
        ar = torch.arange(T, device=q.device)
        pos = off[:, None] + ar[None, :]                                       # [N, T]
        q, k = self._rope(q, pos), self._rope(k, pos)
        valid = ar[None, :] < lens[:, None]
        rows = torch.arange(N, device=q.device)[:, None].expand(N, T)
        if cache.ring:
            o = self._attend_ring(q, k, v, off, lens, cache)
            keep = valid & (ar[None, :] >= lens[:, None] - cache.slots)         # last `window` new tokens
            slot = torch.remainder(pos, cache.slots)
            cache.k[rows[keep], slot[keep]] = k[keep].to(cache.k.dtype)
            cache.v[rows[keep], slot[keep]] = v[keep].to(cache.v.dtype)
        else:
            if bool((new_len > cache.slots).any()):
                raise ValueError(f"KV cache overflow: rows would reach lengths {new_len.tolist()} but the cache "
                                 f"holds max_seqlen={cache.slots}; allocate a longer cache")
            cache.k[rows[valid], pos[valid]] = k[valid].to(cache.k.dtype)
            cache.v[rows[valid], pos[valid]] = v[valid].to(cache.v.dtype)
            S = int(new_len.max()) if N > 0 else 0
            o = attention(q, cache.k[:, :S].to(q.dtype), cache.v[:, :S].to(q.dtype), causal=True,
                          window=self.window, q_offset=off, kv_lengths=new_len, impl=self.impl)
        cache.seqlen.copy_(new_len)
        return o

    def _attend_ring(self, q: Tensor, k: Tensor, v: Tensor, off: Tensor, lens: Tensor, cache: AttentionCache,
                     validate: bool = True) -> Tensor:
        """Attention over [the W ring slots unrolled in position order | the new keys]. Index j < W
        holds position off - W + j (masked while negative), the new token i sits at index W + i."""
        N, W = q.shape[0], cache.slots
        past = torch.remainder(off[:, None] - W + torch.arange(W, device=q.device)[None, :], W)   # [N, W]
        rows = torch.arange(N, device=q.device)[:, None].expand(N, W)
        keys = torch.cat([cache.k[rows, past].to(q.dtype), k], dim=1)
        vals = torch.cat([cache.v[rows, past].to(q.dtype), v], dim=1)
        kw = dict(causal=True, window=self.window, q_offset=torch.full_like(off, W), kv_lengths=W + lens,
                  kv_start=torch.clamp(W - off, min=0))
        if validate:
            return attention(q, keys, vals, impl=self.impl, **kw)
        return (attention_reference if self.impl == "reference" else attention_sdpa)(q, keys, vals, **kw)

    def step(self, x: Tensor, cache: AttentionCache) -> Tensor:
        """One decode token: x [B, d_model] or [B, 1, d_model] -> same shape; appends to the cache.

        No host synchronisation while a CUDA graph is being captured: the token is scattered at
        its slot and attention runs over the whole preallocated buffer (or ring) under a mask;
        outside capture the full-length cache is attended over its longest valid prefix only and
        checked for overflow.
        """
        check_input_tensor("x", x)
        squeeze = x.dim() == 2
        x3 = x.unsqueeze(1) if squeeze else x
        check_tensor("x", x3, [("B", None), ("T", 1), ("d_model", self.d_model)])
        B = x3.shape[0]
        check_cache(cache, AttentionCache, B)
        q, k, v = self._qkv(x3)
        pos = cache.seqlen
        static = _capturing(x3.device)
        if not cache.ring and not static and bool((pos >= cache.slots).any()):
            raise ValueError(f"KV cache overflow: rows at lengths {pos.tolist()} cannot take another token "
                             f"(max_seqlen={cache.slots}); allocate a longer cache")
        q, k = self._rope(q, pos[:, None]), self._rope(k, pos[:, None])
        fn = attention_reference if self.impl == "reference" else attention_sdpa
        if cache.ring:
            o = self._attend_ring(q, k, v, pos, torch.ones_like(pos), cache, validate=False)
            slot = torch.remainder(pos, cache.slots)
        else:
            slot = pos
        idx = slot.view(B, 1, 1, 1).expand(B, 1, self.num_kv_heads, self.head_dim)
        cache.k.scatter_(1, idx, k.to(cache.k.dtype))
        cache.v.scatter_(1, idx, v.to(cache.v.dtype))
        if not cache.ring:
            S = cache.slots if static else int(pos.max()) + 1
            kv = lambda t: t[:, :S].to(q.dtype)
            o = fn(q, kv(cache.k), kv(cache.v), causal=True, window=self.window, q_offset=pos, kv_lengths=pos + 1)
        cache.seqlen.add_(1)
        out = self.out_proj(o.flatten(-2))
        return out[:, 0] if squeeze else out


def _capturing(device: torch.device) -> bool:
    """True while a CUDA graph is being captured on the current stream (no host syncs allowed)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()
