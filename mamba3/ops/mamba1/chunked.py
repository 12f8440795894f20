"""Mamba-1 selective scan, chunked PyTorch form (parallel over time, differentiable by autograd).

The decay is diagonal per (channel, state) pair, so there is no small quadratic form; instead,
inside a chunk the linear recurrence h_t = a_t h_{t-1} + b_t is solved with cumulative log decays:

    l_t = sum_{r<=t} delta_r A            (inclusive, from the chunk start)
    h_t = exp(l_t) * (h_enter + sum_{s<=t} exp(-l_s) b_s)          -- two cumsums, no token loop

and a short scan over chunks passes h_enter. exp(-l_s) grows like exp(chunk * max|delta A|), so
the chunk is shortened when needed to keep that factor below exp(60) (fp32) / exp(500) (fp64):
exact up to rounding whatever the decay rates. Padding time with delta = 0 is exact (no decay,
no input), which also makes packed sequences (cu_seqlens) exact as a right-padded batch.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..utils import compute_dtype, pack_to_padded, padded_to_pack

# Largest |log decay| allowed across one chunk, per compute dtype.
LOG_RANGE = {torch.float32: 60.0, torch.float64: 500.0}


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, *, initial_state: Optional[Tensor] = None,
                           return_final_state: bool = False, cu_seqlens: Optional[Tensor] = None,
                           chunk_size: int = 32):
    """Chunked selective scan (same signature as :func:`mamba3.ops.mamba1.selective_scan`)."""
    if cu_seqlens is not None:
        pad = lambda t: None if t is None else pack_to_padded(t, cu_seqlens)
        y, final = _chunked(pad(u), pad(delta), A, pad(B), pad(C), D, pad(z), initial_state,
                            return_final_state, chunk_size)
        return padded_to_pack(y, cu_seqlens), final
    return _chunked(u, delta, A, B, C, D, z, initial_state, return_final_state, chunk_size)


def safe_chunk(delta: Tensor, A: Tensor, chunk_size: int, cd: torch.dtype) -> int:
    """Longest chunk (<= chunk_size) over which |sum delta A| stays within LOG_RANGE[cd]."""
    with torch.no_grad():
        rate = float((delta.abs().amax() * A.abs().amax()).item()) if delta.numel() else 0.0
    if rate * chunk_size <= LOG_RANGE[cd]:
        return chunk_size
    return max(1, int(LOG_RANGE[cd] // rate))


def _chunked(u, delta, A, B, C, D, z, initial_state, return_final_state, chunk_size):
    Bsz, T, Dm = u.shape
    N = A.shape[-1]
    out_dtype = u.dtype
    cd = compute_dtype(u, delta, B, C)
    u, delta, B, C, A = (t.to(cd) for t in (u, delta, B, C, A))

    L = min(safe_chunk(delta, A, chunk_size, cd), max(T, 1))
    nc = max(1, -(-T // L))
    padT = nc * L - T
    padt = lambda t: F.pad(t, (0, 0) * (t.dim() - 2) + (0, padT)) if padT else t
    dl = padt(delta).view(Bsz, nc, L, Dm, 1)
    du = padt(delta * u).view(Bsz, nc, L, Dm, 1)
    Bc = padt(B).view(Bsz, nc, L, 1, N)
    Cc = padt(C).view(Bsz, nc, L, N)

    ell = torch.cumsum(dl * A, dim=2)                                      # [B, nc, L, D, N]
    cum = torch.cumsum(torch.exp(-ell) * (du * Bc), dim=2)                 # sum_s exp(-l_s) b_s
    grow = torch.exp(ell)
    local = grow[:, :, -1] * cum[:, :, -1]                                 # chunk end state, h_enter = 0

    S = u.new_zeros(Bsz, Dm, N) if initial_state is None else initial_state.to(cd)
    entering = []
    for i in range(nc):
        entering.append(S)
        S = grow[:, i, -1] * S + local[:, i]
    S_enter = torch.stack(entering, dim=1)                                 # [B, nc, D, N]

    h = grow * (cum + S_enter.unsqueeze(2))
    y = torch.einsum("bcldn,bcln->bcld", h, Cc).reshape(Bsz, nc * L, Dm)[:, :T]
    if D is not None:
        y = y + D.to(cd) * u
    if z is not None:
        y = y * F.silu(z.to(cd))
    final = None
    if return_final_state:
        final = S if cd == torch.float64 else S.float()
    return y.to(out_dtype), final
