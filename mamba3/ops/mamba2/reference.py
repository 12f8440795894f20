"""Mamba-2 SSD, the readable specification: an explicit loop over time.

Per token t and head h (state S in R^{P x N}, x_t in R^P, B_t, C_t in R^N of the head's group):

    S_t = exp(dt_t * A) * S_{t-1} + dt_t * x_t B_t^T,     y_t = S_t C_t + D * x_t   (* silu(z_t))

Computes in float64 when given float64 inputs (else float32); the oracle for every faster form.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..utils import compute_dtype, seq_lengths


def expand_groups(x: Tensor, nheads: int) -> Tensor:
    """[..., G, N] -> [..., H, N]: head h reads group h // (H // G)."""
    G = x.shape[-2]
    return x if G == nheads else x.repeat_interleave(nheads // G, dim=-2)


def skip_term(D: Optional[Tensor], x: Tensor) -> Tensor:
    """D x for D of shape [H] or [H, P]; x [..., H, P]."""
    if D is None:
        return torch.zeros_like(x)
    return (D[:, None] if D.dim() == 1 else D).to(x.dtype) * x


def ssd_step_reference(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                       z: Optional[Tensor], state: Tensor):
    """One token. x, z: [B, H, P]; dt: [B, H]; A: [H]; B, C: [B, G, N]; state: [B, H, P, N].

    Returns (y [B, H, P] in the compute dtype, new state); the input state is not modified.
    """
    H = x.shape[1]
    cd = torch.float64 if state.dtype == torch.float64 else compute_dtype(x, dt, B, C)
    x, dt, A, B, C = (t.to(cd) for t in (x, dt, A, B, C))
    Bh, Ch = expand_groups(B, H), expand_groups(C, H)                    # [B, H, N]
    decay = torch.exp(dt * A)                                            # [B, H]
    S = decay[..., None, None] * state.to(cd) + (dt[..., None] * x).unsqueeze(-1) * Bh.unsqueeze(-2)
    y = torch.einsum("bhpn,bhn->bhp", S, Ch) + skip_term(D, x)
    if z is not None:
        y = y * F.silu(z.to(cd))
    return y, S


def ssd_reference(x, dt, A, B, C, D=None, z=None, *, initial_state: Optional[Tensor] = None,
                  return_final_state: bool = False, cu_seqlens: Optional[Tensor] = None, chunk_size: int = 64):
    """Token-by-token SSD (same signature as :func:`mamba3.ops.mamba2.ssd`; chunk_size ignored).

    Returns (y [B, T, H, P] in x's dtype, final state [B or num_seqs, H, P, N] or None).
    """
    if cu_seqlens is not None:
        ys, finals = [], []
        for i, (s, n) in enumerate(zip(cu_seqlens.tolist()[:-1], seq_lengths(cu_seqlens))):
            sl = lambda t: t[:, s : s + n]
            init = None if initial_state is None else initial_state[i : i + 1]
            y, fin = ssd_reference(sl(x), sl(dt), A, sl(B), sl(C), D, None if z is None else sl(z),
                                   initial_state=init, return_final_state=True)
            ys.append(y)
            finals.append(fin)
        return torch.cat(ys, dim=1), (torch.cat(finals, dim=0) if return_final_state else None)

    Bsz, T, H, P = x.shape
    N = B.shape[-1]
    cd = compute_dtype(x, dt, B, C)
    state = x.new_zeros(Bsz, H, P, N, dtype=cd) if initial_state is None else initial_state.to(cd)
    ys = []
    for t in range(T):
        y_t, state = ssd_step_reference(x[:, t], dt[:, t], A, B[:, t], C[:, t], D,
                                        None if z is None else z[:, t], state)
        ys.append(y_t)
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(Bsz, 0, H, P, dtype=cd)
    final = None
    if return_final_state:
        final = state if cd == torch.float64 else state.float()
    return y.to(x.dtype), final
