"""Mamba-3 MIMO (rank R), chunked PyTorch path (training form, differentiable by autograd).

The single-SSD fold of SISO (SPEC sections 2, 4) with rows that are (time, rank) pairs: per head

    Y_t[r] = sum_{s<t} sum_j (q_t[r] . k_s[j]) exp(sum_{u=s+1..t} dA_u) c_s X_s[j]
             + gamma_t sum_j <qh_t[r], kh_t[j]> X_t[j] + D X_t[r]
    c_s = gamma_s + (1 - lambda_{s+1}) dt_{s+1}          (second term 0 after the last token)

where qh, kh are the biased, un-rotated vectors (equal-angle rotation preserves the dot product).
A chunk of C tokens is a tile of C*R rows; the intra mask is strictly lower across *time*, so the
same-time R x R block is left to the gamma diagonal term above. Across chunks the [P, N] state is
passed with a short scan, as in SISO. R x cheaper than R^2 when C = C_SISO / R (the default).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..utils import compute_dtype, pack_to_padded, padded_to_pack, seq_lengths
from .common import Mamba3State, angle_increments, cumulative_angles, rotate_halves
from .mimo_reference import mimo_output


def mamba3_mimo_chunked(q, k, v, dA, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D=None, z=None, *,
                        initial_state: Optional[Mamba3State] = None, return_final_state: bool = False,
                        cu_seqlens: Optional[Tensor] = None, chunk_size: Optional[int] = None,
                        outproj_norm_weight: Optional[Tensor] = None, outproj_norm_eps: float = 1e-5):
    """Chunked Mamba-3 MIMO (same signature as :func:`mamba3.ops.mamba3_mimo`)."""
    R = q.shape[2]
    C = max(1, 64 // R) if chunk_size is None else chunk_size
    args = (q, k, v, dA, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z, initial_state,
            return_final_state, C, outproj_norm_weight, outproj_norm_eps)
    if cu_seqlens is None:
        return _chunked(*args, lengths=None)
    # Packed -> right-padded batch. Padding has dt = dA = 0: state, phase and the shifted
    # trapezoid scale stay untouched, so outputs and final states are exact.
    pad = lambda t: None if t is None else pack_to_padded(t, cu_seqlens)
    lengths = torch.tensor(seq_lengths(cu_seqlens), device=v.device)
    padded = [pad(t) for t in (q, k, v, dA, dt, trap)] + [q_bias, k_bias, pad(angles), mimo_x, mimo_z, mimo_o, D, pad(z)]
    y, final = _chunked(*padded, *args[14:], lengths=lengths)
    return padded_to_pack(y, cu_seqlens), final


def _chunked(q, k, v, dA, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z, initial_state,
             return_final_state, C, norm_weight, eps, lengths):
    B, T, H, P = v.shape
    R, G, N = q.shape[2:]
    out_dtype = v.dtype
    cd = compute_dtype(q, k, v, dA, dt)
    q, k, v, dA, dt, trap, angles = (t.to(cd) for t in (q, k, v, dA, dt, trap, angles))
    psi = mimo_x.to(cd)                                                       # [H, R, P]

    # Everything below is head-major, [B, H, T, R, *]: biased per-head q/k (pre-rotation),
    # phases, rotated q/k, up-scaled X.
    def heads(x, bias):                                                       # [B, T, R, G, N] -> [B, H, T, R, N]
        x = x.permute(0, 3, 1, 2, 4)
        return (x if G == H else x.repeat_interleave(H // G, dim=1)) + bias.to(cd)[:, None]
    qh, kh = heads(q, q_bias), heads(k, k_bias)
    init_angle = None if initial_state is None else initial_state.angle.to(cd)
    theta = cumulative_angles(angle_increments(dt, angles), init_angle)      # [B, T, H, S]
    th = theta.transpose(1, 2).unsqueeze(3)                                   # [B, H, T, 1, S]
    qr, kr = rotate_halves(qh, th), rotate_halves(kh, th)
    X = psi[:, None] * v.transpose(1, 2).unsqueeze(3)                         # [B, H, T, R, P]
    dt_, lam = dt.transpose(1, 2), torch.sigmoid(trap).transpose(1, 2)        # [B, H, T]
    gamma = lam * dt_
    shifted = F.pad(((1.0 - lam) * dt_)[..., 1:], (0, 1))                     # (1-lam_{t+1}) dt_{t+1}
    if lengths is not None:  # padded varlen: no next token after each sequence's last one
        valid = torch.arange(T, device=v.device)[None, :] < (lengths[:, None] - 1)
        shifted = shifted * valid[:, None, :]
    c = gamma + shifted

    # Same-time R x R block: gamma_t <qh_t[r], kh_t[j]> X_t[j], plus the D skip.
    Y_diag = ((qh @ kh.transpose(-1, -2)) * gamma[..., None, None]) @ X       # [B, H, T, R, P]
    if D is not None:
        Y_diag = Y_diag + D.to(cd)[:, None, None, None] * X

    # State entering the first chunk: h_prev plus the beta term of the cache's last token.
    if initial_state is None or T == 0:
        S0 = v.new_zeros(B, H, P, N)
    else:
        X_prev = psi * initial_state.v.to(cd).unsqueeze(2)                    # [B, H, R, P]
        S0 = initial_state.ssm.to(cd) + ((1.0 - lam[..., 0]) * dt_[..., 0])[..., None, None] * (
            X_prev.transpose(-1, -2) @ initial_state.k.to(cd).transpose(1, 2))

    # Tiles: pad time to a multiple of C (padding: dA = c = 0) and flatten (time, rank) into
    # L = C*R rows, row l being token l // R.                                  [B, H, nc, L, *]
    nc = max(1, -(-T // C))
    padT = nc * C - T
    L = C * R
    tiles = lambda t: (F.pad(t, (0, 0, 0, 0, 0, padT)) if padT else t).reshape(B, H, nc, L, t.shape[-1])
    qc, kc, Xc = tiles(qr), tiles(kr * c[..., None, None]), tiles(X)
    ell = torch.cumsum(F.pad(dA.transpose(1, 2), (0, padT)).view(B, H, nc, C), dim=-1)  # inclusive
    ell_rows = ell.repeat_interleave(R, dim=-1)                               # [B, H, nc, L]

    # Intra-chunk: mask strictly lower across time (the same-time block is Y_diag).
    seg = ell_rows.unsqueeze(-1) - ell_rows.unsqueeze(-2)
    tok = torch.arange(L, device=v.device) // R
    strict = tok[:, None] > tok[None, :]
    decay = torch.exp(torch.where(strict, seg, torch.full_like(seg, -torch.inf)))
    Y = ((qc @ kc.transpose(-1, -2)) * decay) @ Xc                            # [B, H, nc, L, P]

    # Chunk-local states, their scan, and the inter-chunk term.                 [B, H, nc, P, N]
    last = ell[..., -1]                                                       # [B, H, nc]
    w = torch.exp(last.unsqueeze(-1) - ell_rows)                             # decay to chunk end
    local = (Xc * w.unsqueeze(-1)).transpose(-1, -2) @ kc
    chunk_decay = torch.exp(last)
    entering = []
    S = S0
    for i in range(nc):
        entering.append(S)
        S = chunk_decay[:, :, i, None, None] * S + local[:, :, i]
    S_enter = torch.stack(entering, dim=2)
    Y = Y + (qc @ S_enter.transpose(-1, -2)) * torch.exp(ell_rows).unsqueeze(-1)

    Y = Y.reshape(B, H, nc * C, R, P)[:, :, :T] + Y_diag                      # [B, H, T, R, P]
    out = mimo_output(Y.permute(0, 2, 3, 1, 4), None if z is None else z.to(cd), mimo_z.to(cd), mimo_o.to(cd),
                      None if norm_weight is None else norm_weight.to(cd), eps)

    final = None
    if return_final_state:
        final = _final_state(S, theta, kr.permute(0, 2, 3, 1, 4), v, lengths, cd, out_dtype, initial_state)
    return out.to(out_dtype), final


def _final_state(S, theta, kr, v, lengths, cd, out_dtype, initial_state):
    """The true h_T (the shifted scale is 0 after the last token), last phase, k [B, R, H, N], raw x."""
    B, T, H, P = v.shape
    wide = torch.float64 if cd == torch.float64 else torch.float32
    if T == 0:  # nothing consumed: the state passes through
        if initial_state is not None:
            return Mamba3State(*initial_state)
        R, N = kr.shape[2], kr.shape[-1]
        return Mamba3State(theta.new_zeros(B, H, theta.shape[-1], dtype=wide), S.to(wide),
                           kr.new_zeros(B, R, H, N, dtype=out_dtype), v.new_zeros(B, H, P, dtype=out_dtype))
    idx = torch.full((B,), T - 1, device=v.device, dtype=torch.long) if lengths is None else (lengths - 1).clamp(min=0)
    rows = torch.arange(B, device=v.device)
    angle, k_last, v_last = theta[rows, idx], kr[rows, idx], v[rows, idx]
    if lengths is not None and bool((lengths == 0).any()):  # empty sequences keep their state
        empty = lengths == 0
        def keep(cur, init):
            e = empty.view(-1, *([1] * (cur.dim() - 1)))
            return torch.where(e, torch.zeros_like(cur) if init is None else init.to(cd), cur)
        angle = keep(angle, None if initial_state is None else initial_state.angle)
        k_last = keep(k_last, None if initial_state is None else initial_state.k)
        v_last = keep(v_last, None if initial_state is None else initial_state.v)
    return Mamba3State(angle=angle.to(wide), ssm=S.to(wide), k=k_last.to(out_dtype), v=v_last.to(out_dtype))
