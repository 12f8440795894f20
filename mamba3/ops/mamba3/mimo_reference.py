"""Mamba-3 MIMO (rank R), the readable specification: an explicit loop over time.

SPEC section 4. Per head, with x_t in R^P and R projected pairs (B_t[r], C_t[r]) per group:
    X_t[r] = psi[h, r] * x_t                                   (element-wise up-scaling)
    k_t[r] = Rot_halves(theta_t) (B_t[r, g(h)] + k_bias[h, r]),  q_t[r] likewise from C
    S_t = alpha_t S_{t-1} + beta_t sum_r X_{t-1}[r] k_{t-1}[r]^T + gamma_t sum_r X_t[r] k_t[r]^T
    Y_t[r] = S_t q_t[r] + D X_t[r]          (optionally RMS-normed over P, times a weight [H, P])
    out_t = sum_r phi[h, r] * Y_t[r] * silu(zeta[h, r] * z_t)      (no gate when z is None)
alpha, beta, gamma, lambda, dt and the phase are shared by the ranks exactly as in SISO; the state
keeps the SISO size [P, N]. Rotary pairs use the split-half layout (i, i + N/2), i < S.
Computes in float64 when given float64 inputs (else float32): the oracle for every faster path.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..utils import compute_dtype, seq_lengths
from .common import TWO_PI, Mamba3State, rotate_halves


def mimo_output(Y: Tensor, z: Optional[Tensor], mimo_z: Tensor, mimo_o: Tensor,
                norm_weight: Optional[Tensor], eps: float) -> Tensor:
    """Per-rank outputs -> head output. Y: [..., R, H, P]; z: [..., H, P] or None;
    mimo_z, mimo_o: [H, R, P]; norm_weight: [H, P] or None. Returns [..., H, P].

    Y[r] <- RMSNorm_P(Y[r]) * weight (norm before gate), then sum_r phi[r] * Y[r] * silu(zeta[r] * z).
    """
    if norm_weight is not None:
        Y = Y * torch.rsqrt(Y.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.to(Y.dtype)
    phi = mimo_o.transpose(0, 1).to(Y.dtype)                                  # [R, H, P]
    if z is not None:
        Y = Y * F.silu(mimo_z.transpose(0, 1).to(Y.dtype) * z.to(Y.dtype).unsqueeze(-3))
    return (phi * Y).sum(-3)


def heads_from_groups(x: Tensor, bias: Tensor, nheads: int) -> Tensor:
    """x: [..., R, G, N] + bias [H, R, N] -> [..., R, H, N] (head h reads group h // (H // G)).

    One broadcast add in the promoted dtype (bf16 x + fp32 bias -> fp32), so the group expansion
    and the upcast make no extra full-size copies."""
    R, G, N = x.shape[-3:]
    return (x.unsqueeze(-2) + bias.transpose(0, 1).reshape(R, G, nheads // G, N)).flatten(-3, -2)


def mamba3_mimo_step_reference(q: Tensor, k: Tensor, v: Tensor, dA: Tensor, dt: Tensor, trap: Tensor,
                               q_bias: Tensor, k_bias: Tensor, angles: Tensor, mimo_x: Tensor,
                               mimo_z: Tensor, mimo_o: Tensor, D: Optional[Tensor], z: Optional[Tensor],
                               state: Mamba3State, outproj_norm_weight: Optional[Tensor] = None,
                               outproj_norm_eps: float = 1e-5):
    """One token for a batch of sequences.

    q, k: [B, R, G, N]; v, z: [B, H, P]; dA, dt, trap: [B, H]; q_bias, k_bias: [H, R, N];
    angles: [B, S] or [B, H, S]; mimo_x/z/o: [H, R, P]; D: [H];
    state: Mamba3State with angle [B, H, S], ssm [B, H, P, N], k [B, R, H, N], v [B, H, P].
    Returns (out [B, H, P] in the compute dtype, new Mamba3State); the input state is untouched.
    """
    H = v.shape[1]
    cd = state.ssm.dtype if state.ssm.dtype == torch.float64 else compute_dtype(v, q)
    f = lambda t: None if t is None else t.to(cd)
    q, k, v, dA, dt, trap, q_bias, k_bias, angles, D, z = map(f, (q, k, v, dA, dt, trap, q_bias, k_bias, angles, D, z))
    psi = mimo_x.transpose(0, 1).to(cd)                                       # [R, H, P]
    lam = torch.sigmoid(trap)                                                 # [B, H]
    alpha = torch.exp(dA)
    beta = (1.0 - lam) * dt * alpha
    gamma = lam * dt
    rate = math.pi * torch.tanh(angles)
    if rate.dim() == 2:
        rate = rate.unsqueeze(1)                                              # shared by heads
    theta = state.angle.to(cd) + dt.unsqueeze(-1) * rate                      # [B, H, S]
    k_t = rotate_halves(heads_from_groups(k, k_bias, H), theta.unsqueeze(1))  # [B, R, H, N]
    q_t = rotate_halves(heads_from_groups(q, q_bias, H), theta.unsqueeze(1))
    X_t = psi * v.unsqueeze(1)                                                # [B, R, H, P]
    X_prev = psi * state.v.to(cd).unsqueeze(1)
    k_prev = state.k.to(cd)
    outer = lambda X, K: torch.einsum("brhp,brhn->bhpn", X, K)                # sum over ranks
    S = (alpha[..., None, None] * state.ssm.to(cd)
         + beta[..., None, None] * outer(X_prev, k_prev)
         + gamma[..., None, None] * outer(X_t, k_t))
    Y = torch.einsum("bhpn,brhn->brhp", S, q_t)                               # [B, R, H, P]
    if D is not None:
        Y = Y + D[:, None] * X_t
    out = mimo_output(Y, z, mimo_z, mimo_o, outproj_norm_weight, outproj_norm_eps)
    new = Mamba3State(angle=torch.remainder(theta.double(), TWO_PI).to(theta.dtype), ssm=S, k=k_t, v=v)  # see cumulative_angles
    return out, new


def mamba3_mimo_reference(q, k, v, dA, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D=None, z=None, *,
                          initial_state: Optional[Mamba3State] = None, return_final_state: bool = False,
                          cu_seqlens: Optional[Tensor] = None, chunk_size: Optional[int] = None,
                          outproj_norm_weight: Optional[Tensor] = None, outproj_norm_eps: float = 1e-5):
    """Token-by-token Mamba-3 MIMO (same signature as :func:`mamba3.ops.mamba3_mimo`).

    ``chunk_size`` is accepted for signature parity and ignored. Returns (out [B, T, H, P] in v's
    dtype, final Mamba3State or None).
    """
    opt = dict(outproj_norm_weight=outproj_norm_weight, outproj_norm_eps=outproj_norm_eps)
    if cu_seqlens is not None:
        ys, finals = [], []
        starts = cu_seqlens.tolist()[:-1]
        for i, (s, n) in enumerate(zip(starts, seq_lengths(cu_seqlens))):
            sl = lambda t: t[:, s : s + n]
            init = None if initial_state is None else Mamba3State(*(x[i : i + 1] for x in initial_state))
            y, fin = mamba3_mimo_reference(sl(q), sl(k), sl(v), sl(dA), sl(dt), sl(trap), q_bias, k_bias, sl(angles),
                                           mimo_x, mimo_z, mimo_o, D, None if z is None else sl(z),
                                           initial_state=init, return_final_state=True, **opt)
            ys.append(y)
            finals.append(fin)
        y = torch.cat(ys, dim=1)
        final = Mamba3State(*(torch.cat(parts, dim=0) for parts in zip(*finals)))
        return y, (final if return_final_state else None)

    B, T, H, P = v.shape
    R, N, S = q.shape[2], q.shape[-1], angles.shape[-1]
    cd = compute_dtype(q, k, v, dA, dt)
    if initial_state is None:
        zeros = lambda *shape: torch.zeros(*shape, dtype=cd, device=v.device)
        state = Mamba3State(angle=zeros(B, H, S), ssm=zeros(B, H, P, N), k=zeros(B, R, H, N), v=zeros(B, H, P))
    else:
        state = Mamba3State(*(x.to(cd) for x in initial_state))
    ys = []
    for t in range(T):
        y_t, state = mamba3_mimo_step_reference(
            q[:, t], k[:, t], v[:, t], dA[:, t], dt[:, t], trap[:, t], q_bias, k_bias, angles[:, t],
            mimo_x, mimo_z, mimo_o, D, None if z is None else z[:, t], state, **opt)
        ys.append(y_t)
    y = torch.stack(ys, dim=1) if ys else v.new_zeros(B, 0, H, P, dtype=cd)
    final = None
    if return_final_state:
        wide = torch.float64 if cd == torch.float64 else torch.float32
        final = Mamba3State(angle=state.angle.to(wide), ssm=state.ssm.to(wide),
                            k=state.k.to(v.dtype), v=state.v.to(v.dtype))
    return y.to(v.dtype), final
