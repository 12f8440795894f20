"""S4D, the readable specification: the complex diagonal recurrence as an explicit token loop.

Computes in float64/complex128 when any input is float64 (else float32/complex64); the oracle
for the convolution mode and the decode step.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..utils import compute_dtype, seq_lengths
from .common import as_complex, discretize, state_as_complex


def s4d_step_reference(u: Tensor, log_dt: Tensor, log_A_real: Tensor, A_imag: Tensor, C: Tensor,
                       D: Optional[Tensor], state: Tensor):
    """One token: u [B, H], state complex [B, H, N] or real [B, H, N, 2].

    Returns (y [B, H] in the compute dtype, new complex state [B, H, N]); ``state`` is not modified.
    """
    rd = torch.float64 if (not state.is_complex() and state.dtype == torch.float64) or \
        state.dtype == torch.complex128 else compute_dtype(u, log_dt, log_A_real, A_imag)
    dtA, dB = discretize(log_dt, log_A_real, A_imag, rd)
    Cc = as_complex(C, rd)
    uc = u.to(rd)
    h = torch.exp(dtA) * state_as_complex(state, rd) + dB * uc[..., None]     # [B, H, N]
    y = 2.0 * (h * Cc).sum(-1).real
    if D is not None:
        y = y + D.to(rd) * uc
    return y, h


def s4d_reference(u: Tensor, log_dt: Tensor, log_A_real: Tensor, A_imag: Tensor, C: Tensor,
                  D: Optional[Tensor] = None, *, initial_state: Optional[Tensor] = None,
                  return_final_state: bool = False, cu_seqlens: Optional[Tensor] = None):
    """Token-by-token S4D (same signature as :func:`mamba3.ops.s4d`).

    u: [B, T, H]; returns (y [B, T, H] in u's dtype, final complex state [B, H, N] or None).
    """
    if cu_seqlens is not None:
        ys, finals = [], []
        for i, (s, n) in enumerate(zip(cu_seqlens.tolist()[:-1], seq_lengths(cu_seqlens))):
            init = None if initial_state is None else initial_state[i : i + 1]
            y, fin = s4d_reference(u[:, s : s + n], log_dt, log_A_real, A_imag, C, D,
                                   initial_state=init, return_final_state=True)
            ys.append(y)
            finals.append(fin)
        y = torch.cat(ys, dim=1)
        return y, (torch.cat(finals, dim=0) if return_final_state else None)

    Bsz, T, H = u.shape
    N = log_A_real.shape[1]
    rd = compute_dtype(u, log_dt, log_A_real, A_imag)
    dtA, dB = discretize(log_dt, log_A_real, A_imag, rd)
    dA, Cc = torch.exp(dtA), as_complex(C, rd)
    if initial_state is None:
        h = torch.zeros(Bsz, H, N, dtype=dtA.dtype, device=u.device)
    else:
        h = state_as_complex(initial_state, rd)
    uc = u.to(rd)
    ys = []
    for t in range(T):
        h = dA * h + dB * uc[:, t, :, None]
        ys.append(2.0 * (h * Cc).sum(-1).real)
    y = torch.stack(ys, dim=1) if T > 0 else uc.new_zeros(Bsz, 0, H)
    if D is not None:
        y = y + D.to(rd) * uc
    return y.to(u.dtype), (h if return_final_state else None)
