"""Mamba-1 selective scan, chunked PyTorch form (parallel over time, differentiable by autograd).

The decay is diagonal per (channel, state) pair, so there is no small quadratic form; instead,
inside a chunk the linear recurrence h_t = a_t h_{t-1} + b_t is solved with cumulative log decays:

    l_t = sum_{r<=t} delta_r A            (inclusive, from the chunk start)
    h_t = exp(l_t) * (h_enter + sum_{s<=t} exp(-l_s) b_s)          -- cumsums, no token loop

and a short scan over chunks passes h_enter (chunk by chunk, so that the [B, D, N, L] temporaries
stay small; without autograd the updates are done in place). exp(-l_s) grows like exp(chunk * max|delta A|), so
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
    if rate * chunk_size <= LOG_RANGE[cd] or rate != rate:  # NaN input: it propagates whatever the chunk
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
    # Layout [B, nc, channels, L]: time last, so the within-chunk cumsums run over contiguous memory.
    chunks = lambda t: (F.pad(t, (0, 0, 0, padT)) if padT else t).view(Bsz, nc, L, -1).transpose(2, 3)
    neg_cum = -torch.cumsum(chunks(delta), dim=-1)                          # -sum_{r<=t} delta_r, [B, nc, D, L]
    du, Bc, Cc = chunks(delta * u), chunks(B), chunks(C)                   # [B, nc, D|N, L]
    S = u.new_zeros(Bsz, Dm, N) if initial_state is None else initial_state.to(cd)
    A_ = A.unsqueeze(-1)                                                   # [D, N, 1]

    # The scan over chunks: each chunk is solved in parallel over its L tokens from the entering
    # state; working chunk by chunk keeps the [B, D, N, L] temporaries small (cache-friendly).
    train = torch.is_grad_enabled() and any(t.requires_grad for t in (u, delta, A, B, C, S))
    ys = []
    for i in range(nc):
        ncum, dui = neg_cum[:, i].unsqueeze(-2), du[:, i].unsqueeze(-2)          # [B, D, 1, L]
        Bi, Ci = Bc[:, i].unsqueeze(1), Cc[:, i].unsqueeze(1)                    # [B, 1, N, L]
        if train:
            shrink, grow = torch.exp(A_ * ncum), torch.exp(-A_ * ncum)        # exp(-l_t) >= 1, exp(l_t) <= 1
            h = grow * (torch.cumsum(dui * Bi * shrink, dim=-1) + S.unsqueeze(-1))
            S = h[..., -1]
            ys.append((h * Ci).sum(-2))
        else:  # same math with in-place updates
            e = torch.mul(A_, ncum).exp_()
            h = torch.mul(dui, Bi).mul_(e).cumsum_(-1).add_(S.unsqueeze(-1)).mul_(e.reciprocal_())
            S = h[..., -1].clone()
            ys.append(h.mul_(Ci).sum(-2))
    y = torch.stack(ys, dim=1)                                             # [B, nc, D, L]
    y = y.transpose(2, 3).reshape(Bsz, nc * L, Dm)[:, :T]
    if D is not None:
        y = y + D.to(cd) * u
    if z is not None:
        y = y * F.silu(z.to(cd))
    final = None
    if return_final_state:
        final = S if cd == torch.float64 else S.float()
    return y.to(out_dtype), final
