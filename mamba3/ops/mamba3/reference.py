"""Mamba-3 SISO, the readable specification: an explicit loop over time.

This is the exponential-trapezoidal recurrence of the paper (SPEC section 2) written directly,
with the data-dependent rotary embedding of section 3. It computes in float64 when given float64
inputs (else float32) and is the oracle for every faster path.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..utils import compute_dtype, seq_lengths
from .common import TWO_PI, Mamba3State, expand_groups, rotate_interleaved


def mamba3_siso_step_reference(q: Tensor, k: Tensor, v: Tensor, dA: Tensor, dt: Tensor, trap: Tensor,
                               q_bias: Tensor, k_bias: Tensor, angles: Tensor, D: Optional[Tensor],
                               z: Optional[Tensor], state: Mamba3State):
    """One token for a batch of sequences.

    q, k: [B, G, N]; v, z: [B, H, P]; dA, dt, trap: [B, H]; angles: [B, S] or [B, H, S];
    state: Mamba3State with angle [B, H, S], ssm [B, H, P, N], k [B, H, N], v [B, H, P].
    Returns (y [B, H, P] in float, new Mamba3State); the input state is not modified.
    """
    H = v.shape[1]
    cd = state.ssm.dtype if state.ssm.dtype == torch.float64 else compute_dtype(v, q)
    f = lambda t: None if t is None else t.to(cd)
    q, k, v, dA, dt, trap, q_bias, k_bias, angles, D, z = map(f, (q, k, v, dA, dt, trap, q_bias, k_bias, angles, D, z))
    lam = torch.sigmoid(trap)                          # [B, H]
    alpha = torch.exp(dA)
    beta = (1.0 - lam) * dt * alpha
    gamma = lam * dt
    rate = math.pi * torch.tanh(angles)
    if rate.dim() == 2:
        rate = rate.unsqueeze(1)                       # shared by heads
    theta = state.angle.to(cd) + dt.unsqueeze(-1) * rate       # [B, H, S]
    k_t = rotate_interleaved(expand_groups(k, H) + k_bias, theta)   # [B, H, N]
    q_t = rotate_interleaved(expand_groups(q, H) + q_bias, theta)
    k_prev, x_prev = state.k.to(cd), state.v.to(cd)
    S = (alpha[..., None, None] * state.ssm.to(cd)
         + beta[..., None, None] * x_prev.unsqueeze(-1) * k_prev.unsqueeze(-2)
         + gamma[..., None, None] * v.unsqueeze(-1) * k_t.unsqueeze(-2))
    y = torch.einsum("bhpn,bhn->bhp", S, q_t)
    if D is not None:
        y = y + D[:, None] * v
    if z is not None:
        y = y * F.silu(z)
    new = Mamba3State(angle=torch.remainder(theta.double(), TWO_PI).to(theta.dtype), ssm=S, k=k_t, v=v)  # see cumulative_angles
    return y, new


def mamba3_siso_reference(q, k, v, dA, dt, trap, q_bias, k_bias, angles, D=None, z=None, *,
                          initial_state: Optional[Mamba3State] = None, return_final_state: bool = False,
                          cu_seqlens: Optional[Tensor] = None, chunk_size: int = 64):
    """Token-by-token Mamba-3 SISO (same signature as :func:`mamba3.ops.mamba3_siso`).

    ``chunk_size`` is accepted for signature parity and ignored. Returns (y [B, T, H, P] in v's
    dtype, final Mamba3State or None).
    """
    if cu_seqlens is not None:
        ys, finals = [], []
        starts = cu_seqlens.tolist()[:-1]
        for i, (s, n) in enumerate(zip(starts, seq_lengths(cu_seqlens))):
            sl = lambda t: t[:, s : s + n]
            init = None if initial_state is None else Mamba3State(*(x[i : i + 1] for x in initial_state))
            y, fin = mamba3_siso_reference(sl(q), sl(k), sl(v), sl(dA), sl(dt), sl(trap), q_bias, k_bias, sl(angles),
                                           D, None if z is None else sl(z), initial_state=init, return_final_state=True)
            ys.append(y)
            finals.append(fin)
        y = torch.cat(ys, dim=1)
        final = Mamba3State(*(torch.cat(parts, dim=0) for parts in zip(*finals)))
        return y, (final if return_final_state else None)

    B, T, H, P = v.shape
    N, S = q.shape[-1], angles.shape[-1]
    cd = compute_dtype(q, k, v, dA, dt)
    if initial_state is None:
        state = Mamba3State(angle=torch.zeros(B, H, S, dtype=cd, device=v.device),
                            ssm=torch.zeros(B, H, P, N, dtype=cd, device=v.device),
                            k=torch.zeros(B, H, N, dtype=cd, device=v.device),
                            v=torch.zeros(B, H, P, dtype=cd, device=v.device))
    else:
        state = Mamba3State(*(x.to(cd) for x in initial_state))
    ys = []
    for t in range(T):
        y_t, state = mamba3_siso_step_reference(
            q[:, t], k[:, t], v[:, t], dA[:, t], dt[:, t], trap[:, t], q_bias, k_bias, angles[:, t], D,
            None if z is None else z[:, t], state)
        ys.append(y_t)
    y = torch.stack(ys, dim=1) if ys else v.new_zeros(B, 0, H, P, dtype=cd)
    final = None
    if return_final_state:
        final = Mamba3State(angle=state.angle.float() if cd != torch.float64 else state.angle,
                            ssm=state.ssm.float() if cd != torch.float64 else state.ssm,
                            k=state.k.to(v.dtype), v=state.v.to(v.dtype))
    return y.to(v.dtype), final
