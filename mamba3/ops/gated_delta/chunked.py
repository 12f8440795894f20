"""Gated delta rule in chunked (WY / UT-transform) form: parallel inside chunks, a short loop
over chunks for the state.

Derivation (one value head, state S [V, K], chunk-local cumulative log decay gamma_t = sum of
g over the chunk up to t, S_0 the state entering the chunk). Rewrite the recurrence as

    S_t = exp(g_t) S_{t-1} + u_t k_t^T,   u_t = beta_t (v_t - exp(g_t) S_{t-1} k_t)

so that S_t = exp(gamma_t) S_0 + sum_{i<=t} exp(gamma_t - gamma_i) u_i k_i^T. Substituting S_{t-1}
into u_t gives a unit-lower-triangular system for the rows of U:

    (I + A) U = diag(beta) V - diag(beta exp(gamma)) K S_0^T,
    A[t, i] = beta_t exp(gamma_t - gamma_i) k_t . k_i   (i < t)

so U = U0 - W S_0^T with U0 = (I+A)^{-1} diag(beta) V and W = (I+A)^{-1} diag(beta exp(gamma)) K,
both independent of S_0 (one batched triangular solve for every chunk). Then

    O       = P U0 + (diag(exp(gamma)) Q - P W) S_0^T,   P = (Q K^T) * exp(gamma_t - gamma_i) [i <= t]
    S_chunk = exp(gamma_C) S_0 + (U * exp(gamma_C - gamma))^T K.

Every exponent used is gamma_t - gamma_i with i <= t (<= 0 for g <= 0): nothing overflows.
Right-padding with g = 0, beta = 0 (and zeros elsewhere) leaves the state unchanged, which makes
ragged ends and packed (varlen) sequences exact.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..utils import compute_dtype, pack_to_padded, padded_to_pack
from .reference import expand_heads


def _pad_time(x: Tensor, T_pad: int) -> Tensor:
    """Zero-pad dim 1 (time) of x [B, T, ...] to length T_pad."""
    extra = T_pad - x.shape[1]
    if extra == 0:
        return x
    pad = [0, 0] * (x.dim() - 2) + [0, extra]
    return F.pad(x, pad)


def gated_delta_rule_chunked(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *,
                             scale: Optional[float] = None, initial_state: Optional[Tensor] = None,
                             return_final_state: bool = False, cu_seqlens: Optional[Tensor] = None,
                             chunk_size: int = 64):
    """Chunked gated delta rule (signature of :func:`mamba3.ops.gated_delta.gated_delta_rule`).

    q, k [B, T, H, K]; v [B, T, HV, V]; g, beta [B, T, HV]; initial_state [B, HV, V, K].
    Returns (o [B, T, HV, V] in v's dtype, final state in the compute dtype or None).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cu_seqlens is not None:
        pad = lambda t: pack_to_padded(t, cu_seqlens)
        o, final = gated_delta_rule_chunked(pad(q), pad(k), pad(v), pad(g), pad(beta), scale=scale,
                                            initial_state=initial_state, return_final_state=return_final_state,
                                            chunk_size=chunk_size)
        return padded_to_pack(o, cu_seqlens), final

    B, T, HV, V = v.shape
    K = q.shape[-1]
    cd = compute_dtype(q, k, v, g, beta, initial_state)
    C = chunk_size
    NC = max(1, -(-T // C))
    Tp = NC * C
    # [B, Tp, HV, ...] -> [B, HV, NC, C, ...]
    prep = lambda t: _pad_time(t.to(cd), Tp).unflatten(1, (NC, C)).movedim(3, 1)
    qc = prep(expand_heads(q, HV)) * scale
    kc = prep(expand_heads(k, HV))
    vc = prep(v)
    gc, bc = prep(g.unsqueeze(-1))[..., 0], prep(beta.unsqueeze(-1))[..., 0]   # [B, HV, NC, C]

    gamma = gc.cumsum(-1)
    idx = torch.arange(C, device=v.device)
    causal = idx[:, None] >= idx[None, :]                                       # i <= t
    diff = gamma[..., :, None] - gamma[..., None, :]
    decay = torch.exp(torch.where(causal, diff, torch.full_like(diff, float("-inf"))))   # [.., C, C]

    strict = causal & ~torch.eye(C, dtype=torch.bool, device=v.device)
    A = (bc[..., :, None] * (kc @ kc.transpose(-1, -2)) * decay) * strict
    L = A + torch.eye(C, dtype=cd, device=v.device)
    rhs = torch.cat([(bc * torch.exp(gamma)).unsqueeze(-1) * kc, bc.unsqueeze(-1) * vc], dim=-1)
    sol = torch.linalg.solve_triangular(L, rhs, upper=False, unitriangular=True)
    W, U0 = sol[..., :K], sol[..., K:]                                          # [.., C, K], [.., C, V]

    P = (qc @ kc.transpose(-1, -2)) * decay
    PU0 = P @ U0
    Qe = torch.exp(gamma).unsqueeze(-1) * qc - P @ W
    to_end = torch.exp(gamma[..., -1:] - gamma)                                 # decay to chunk end

    S = v.new_zeros(B, HV, V, K, dtype=cd) if initial_state is None else initial_state.to(cd)
    outs = []
    for c in range(NC):
        St = S.transpose(-1, -2)                                                # [B, HV, K, V]
        outs.append(PU0[:, :, c] + Qe[:, :, c] @ St)
        U = U0[:, :, c] - W[:, :, c] @ St
        S = (torch.exp(gamma[:, :, c, -1])[..., None, None] * S
             + (U * to_end[:, :, c].unsqueeze(-1)).transpose(-1, -2) @ kc[:, :, c])
    o = torch.stack(outs, dim=2).flatten(2, 3)[:, :, :T].movedim(1, 2)        # [B, T, HV, V]
    return o.to(v.dtype), (S if return_final_state else None)
