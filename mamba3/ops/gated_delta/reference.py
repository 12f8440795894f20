"""Gated delta rule, the readable specification: an explicit loop over time.

Per value head h (state S [V, K], keys K-dim, values V-dim):

    S_t = exp(g_t) * S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T
    o_t = S_t (scale * q_t)

With grouped values (HV value heads over H query/key heads) value head j reads query/key head
j // (HV // H). The loop computes in float64 for float64 inputs (else float32) and is the oracle
for the chunked form.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..utils import compute_dtype, seq_lengths


def expand_heads(x: Tensor, hv: int) -> Tensor:
    """[..., H, K] -> [..., HV, K]: value head j reads query/key head j // (HV // H)."""
    h = x.shape[-2]
    return x if h == hv else x.repeat_interleave(hv // h, dim=-2)


def gated_delta_step_reference(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor,
                               scale: float) -> tuple[Tensor, Tensor]:
    """One token: q, k [B, H, K]; v [B, HV, V]; g, beta [B, HV]; state [B, HV, V, K].

    Returns (o [B, HV, V], new state) in the compute dtype; ``state`` is not modified.
    """
    HV = v.shape[1]
    cd = torch.float64 if state.dtype == torch.float64 else compute_dtype(q, k, v, g, beta)
    q, k = expand_heads(q.to(cd), HV), expand_heads(k.to(cd), HV)
    v, g, beta, S = v.to(cd), g.to(cd), beta.to(cd), state.to(cd)
    S = torch.exp(g)[..., None, None] * S                                   # decay
    pred = torch.einsum("bhvk,bhk->bhv", S, k)                              # S k: what the state recalls
    S = S + (beta[..., None] * (v - pred)).unsqueeze(-1) * k.unsqueeze(-2)  # delta-rule correction
    o = torch.einsum("bhvk,bhk->bhv", S, q * scale)
    return o, S


def gated_delta_rule_reference(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *,
                               scale: Optional[float] = None, initial_state: Optional[Tensor] = None,
                               return_final_state: bool = False, cu_seqlens: Optional[Tensor] = None,
                               chunk_size: int = 64):
    """Token loop with the signature of :func:`mamba3.ops.gated_delta.gated_delta_rule`.

    ``chunk_size`` is accepted for parity and ignored. Returns (o [B, T, HV, V] in v's dtype,
    final state [B or num_seqs, HV, V, K] in the compute dtype, or None).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cu_seqlens is not None:
        outs, finals = [], []
        starts = cu_seqlens.tolist()[:-1]
        for i, (s, n) in enumerate(zip(starts, seq_lengths(cu_seqlens))):
            sl = lambda t: t[:, s : s + n]
            init = None if initial_state is None else initial_state[i : i + 1]
            o, fin = gated_delta_rule_reference(sl(q), sl(k), sl(v), sl(g), sl(beta), scale=scale,
                                                initial_state=init, return_final_state=True)
            outs.append(o)
            finals.append(fin)
        return torch.cat(outs, dim=1), (torch.cat(finals, dim=0) if return_final_state else None)

    B, T, HV, V = v.shape
    K = q.shape[-1]
    cd = compute_dtype(q, k, v, g, beta, initial_state)
    S = q.new_zeros(B, HV, V, K, dtype=cd) if initial_state is None else initial_state.to(cd)
    outs = []
    for t in range(T):
        o, S = gated_delta_step_reference(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], S, scale)
        outs.append(o)
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(B, 0, HV, V, dtype=cd)
    return o.to(v.dtype), (S if return_final_state else None)
