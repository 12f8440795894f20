"""Mamba-3 SISO, chunked PyTorch path (training form, differentiable by autograd).

Single-SSD fold (SPEC section 2): the trapezoid's previous-token term is folded into a per-token
scale, so the whole layer is one scalar-decay SSD with a corrected diagonal:

    y_t = sum_{s<t} (q_t . k_s) exp(sum_{r=s+1..t} dA_r) c_s x_s + (D + gamma_t <q_t, k_t>) x_t
    c_s = gamma_s + (1 - lambda_{s+1}) dt_{s+1}          (second term 0 after the last token)

Inside a chunk this is a masked quadratic form; across chunks the state is passed with a short
scan. The carried chunk states include the beta part of the chunk's last token (it belongs to the
next token), so the state after the last token of a sequence is the true h_T.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..utils import compute_dtype
from .common import (Mamba3State, angle_increments, cumulative_angles, expand_groups, rotate_interleaved,
                     siso_varlen, trapezoid_coeffs)


def mamba3_siso_chunked(q, k, v, dA, dt, trap, q_bias, k_bias, angles, D=None, z=None, *,
                        initial_state: Optional[Mamba3State] = None, return_final_state: bool = False,
                        cu_seqlens: Optional[Tensor] = None, chunk_size: int = 64):
    """Chunked Mamba-3 SISO (same signature as :func:`mamba3.ops.mamba3_siso`)."""
    return siso_varlen(_chunked, q, k, v, dA, dt, trap, q_bias, k_bias, angles, D, z, initial_state,
                       return_final_state, chunk_size, cu_seqlens)


def _chunked(q, k, v, dA, dt, trap, q_bias, k_bias, angles, D, z, initial_state, return_final_state,
             chunk_size, lengths):
    B, T, H, P = v.shape
    N = q.shape[-1]
    out_dtype = v.dtype
    cd = compute_dtype(q, k, v, dA, dt)
    if T == 0:  # nothing to consume: empty output, the state passes through unchanged
        final = None
        if return_final_state:
            final = initial_state if initial_state is not None else Mamba3State(
                v.new_zeros(B, H, angles.shape[-1], dtype=torch.float32), v.new_zeros(B, H, P, N, dtype=torch.float32),
                v.new_zeros(B, H, N), v.new_zeros(B, H, P))
        return v.new_zeros(B, 0, H, P), final
    q, k, v, dA, dt, trap, angles = (t.to(cd) for t in (q, k, v, dA, dt, trap, angles))
    q_bias, k_bias = q_bias.to(cd), k_bias.to(cd)

    # Pre-rotation biased q/k per head, phases, trapezoid coefficients.      [B, T, H, N]
    qh = expand_groups(q, H) + q_bias
    kh = expand_groups(k, H) + k_bias
    init_angle = None if initial_state is None else initial_state.angle.to(cd)
    theta = cumulative_angles(angle_increments(dt, angles), init_angle)     # [B, T, H, S]
    qr, kr = rotate_interleaved(qh, theta), rotate_interleaved(kh, theta)
    lam, gamma, c = trapezoid_coeffs(dt, trap, lengths)                       # [B, T, H]
    diag = gamma * (qh * kh).sum(-1)                                          # un-rotated <q, k>

    # State entering the first chunk: the cache's h plus the beta term of its last token
    # (which multiplies alpha_0 through the decay below).
    if initial_state is None:
        S0 = v.new_zeros(B, H, P, N)
    else:
        S0 = initial_state.ssm.to(cd) + (((1.0 - lam[:, 0]) * dt[:, 0])[..., None, None]
                                         * initial_state.v.to(cd).unsqueeze(-1) * initial_state.k.to(cd).unsqueeze(-2))

    # Head-major tiles [B, H, nc, C, .] so every contraction below is a batched matmul.
    # Time is padded to a multiple of the chunk; padding has dA = c = 0 so it changes nothing.
    C = chunk_size
    nc = max(1, -(-T // C))
    padT = nc * C - T
    tiles = lambda t: F.pad(t.transpose(1, 2), (0, 0, 0, padT)).reshape(B, H, nc, C, t.shape[-1])
    qc = tiles(qr)                                                            # [B, H, nc, C, N]
    kc = tiles(kr * c.unsqueeze(-1))
    vc = tiles(v)                                                             # [B, H, nc, C, P]
    ell = torch.cumsum(tiles(dA.unsqueeze(-1))[..., 0], dim=-1)               # inclusive, [B, H, nc, C]

    # Intra-chunk: strictly-lower masked scores with decay exp(ell_t - ell_s).
    seg = ell.unsqueeze(-1) - ell.unsqueeze(-2)                               # [.., t, s]
    strict = torch.ones(C, C, dtype=torch.bool, device=v.device).tril(-1)
    decay = torch.exp(torch.where(strict, seg, torch.full_like(seg, -torch.inf)))
    y = ((qc @ kc.transpose(-1, -2)) * decay) @ vc                            # [B, H, nc, C, P]

    # Chunk-local states and their scan.                                       [B, H, nc, P, N]
    last = ell[..., -1:]                                                      # [B, H, nc, 1]
    local = (vc * torch.exp(last - ell).unsqueeze(-1)).transpose(-1, -2) @ kc
    chunk_decay = torch.exp(last[..., 0])                                     # [B, H, nc]
    entering = []
    S = S0
    for i in range(nc):
        entering.append(S)
        S = chunk_decay[:, :, i, None, None] * S + local[:, :, i]
    S_enter = torch.stack(entering, dim=2)                                    # [B, H, nc, P, N]
    y = y + (qc @ S_enter.transpose(-1, -2)) * torch.exp(ell).unsqueeze(-1)

    y = y.reshape(B, H, nc * C, P)[:, :, :T].transpose(1, 2)                  # [B, T, H, P]
    skip = diag if D is None else diag + D.to(cd)
    y = y + skip.unsqueeze(-1) * v
    if z is not None:
        y = y * F.silu(z.to(cd))

    final = None
    if return_final_state:
        final = _final_state(S, theta, kr, v, lengths, cd, out_dtype, initial_state)
    return y.to(out_dtype), final


def _final_state(S, theta, kr, v, lengths, cd, out_dtype, initial_state):
    B, T = v.shape[:2]
    state_dtype = torch.float64 if cd == torch.float64 else torch.float32
    if lengths is None:
        idx = torch.full((B,), T - 1, device=v.device, dtype=torch.long)
    else:
        idx = (lengths - 1).clamp(min=0)
    rows = torch.arange(B, device=v.device)
    angle, k_last, v_last = theta[rows, idx], kr[rows, idx], v[rows, idx]
    if lengths is not None and bool((lengths == 0).any()):  # empty sequences keep their state
        empty = (lengths == 0)[:, None, None]
        keep = lambda cur, init: torch.where(empty, torch.zeros_like(cur) if init is None else init.to(cd), cur)
        angle = keep(angle, None if initial_state is None else initial_state.angle)
        k_last = keep(k_last, None if initial_state is None else initial_state.k)
        v_last = keep(v_last, None if initial_state is None else initial_state.v)
    return Mamba3State(angle=angle.to(state_dtype), ssm=S.to(state_dtype),
                       k=k_last.to(out_dtype), v=v_last.to(out_dtype))
