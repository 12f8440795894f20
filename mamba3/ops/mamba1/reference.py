"""Mamba-1 selective scan (S6), the readable specification: an explicit loop over time.

Per token t, channel d and state index n:

    h_t[d, n] = exp(delta_t[d] A[d, n]) h_{t-1}[d, n] + delta_t[d] B_t[n] u_t[d]
    y_t[d]    = sum_n C_t[n] h_t[d, n] + D[d] u_t[d]          (then * silu(z_t[d]))

Computes in float64 when given float64 inputs (else float32); the oracle for the chunked form.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..utils import compute_dtype, seq_lengths


def selective_scan_step_reference(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                                  D: Optional[Tensor], z: Optional[Tensor], state: Tensor):
    """One token. u, delta, z: [B, D]; A: [D, N]; B, C: [B, N]; state: [B, D, N].

    Returns (y [B, D] in the compute dtype, new state); the input state is not modified.
    """
    cd = torch.float64 if state.dtype == torch.float64 else compute_dtype(u, delta, B, C)
    u, delta, A, B, C = (t.to(cd) for t in (u, delta, A, B, C))
    h = torch.exp(delta.unsqueeze(-1) * A) * state.to(cd) + (delta * u).unsqueeze(-1) * B.unsqueeze(1)
    y = torch.einsum("bdn,bn->bd", h, C)
    if D is not None:
        y = y + D.to(cd) * u
    if z is not None:
        y = y * F.silu(z.to(cd))
    return y, h


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, *, initial_state: Optional[Tensor] = None,
                             return_final_state: bool = False, cu_seqlens: Optional[Tensor] = None,
                             chunk_size: int = 32):
    """Token-by-token selective scan (same signature as :func:`mamba3.ops.mamba1.selective_scan`;
    chunk_size ignored). Returns (y [B, T, D] in u's dtype, final state [., D, N] or None)."""
    if cu_seqlens is not None:
        ys, finals = [], []
        for i, (s, n) in enumerate(zip(cu_seqlens.tolist()[:-1], seq_lengths(cu_seqlens))):
            sl = lambda t: t[:, s : s + n]
            init = None if initial_state is None else initial_state[i : i + 1]
            y, fin = selective_scan_reference(sl(u), sl(delta), A, sl(B), sl(C), D, None if z is None else sl(z),
                                              initial_state=init, return_final_state=True)
            ys.append(y)
            finals.append(fin)
        return torch.cat(ys, dim=1), (torch.cat(finals, dim=0) if return_final_state else None)

    Bsz, T, Dm = u.shape
    N = A.shape[-1]
    cd = compute_dtype(u, delta, B, C)
    state = u.new_zeros(Bsz, Dm, N, dtype=cd) if initial_state is None else initial_state.to(cd)
    ys = []
    for t in range(T):
        y_t, state = selective_scan_step_reference(u[:, t], delta[:, t], A, B[:, t], C[:, t], D,
                                                   None if z is None else z[:, t], state)
        ys.append(y_t)
    y = torch.stack(ys, dim=1) if ys else u.new_zeros(Bsz, 0, Dm, dtype=cd)
    final = None
    if return_final_state:
        final = state if cd == torch.float64 else state.float()
    return y.to(u.dtype), final
