"""Mamba-2 SSD, chunked PyTorch form (training path, differentiable by autograd).

Inside a chunk of C tokens the recurrence is a masked quadratic ("attention-like") form,
    y_t = sum_{s<=t} (C_t . B_s) exp(l_t - l_s) dt_s x_s,     l = inclusive cumsum of dt*A,
where exp(l_t - l_s) is the 1-semiseparable decay mask built from segment sums. Across chunks a
short scan passes the state: S_c = exp(l_last) S_{c-1} + sum_s exp(l_last - l_s) dt_s x_s B_s^T,
and every token reads the entering state through C_t exp(l_t).

Time is padded to a multiple of the chunk with dt = 0 (no decay, no input), which is exact; the
same trick makes packed sequences (cu_seqlens) exact when unpacked into a right-padded batch.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..utils import compute_dtype, pack_to_padded, padded_to_pack
from .reference import skip_term

# Smallest log decay kept inside the intra-chunk mask (exp(-80) ~ 2e-35, exp(-700) ~ 1e-304).
EXP_FLOOR = {torch.float32: 80.0, torch.float64: 700.0}


def ssd_chunked(x, dt, A, B, C, D=None, z=None, *, initial_state: Optional[Tensor] = None,
                return_final_state: bool = False, cu_seqlens: Optional[Tensor] = None, chunk_size: int = 64):
    """Chunked SSD (same signature as :func:`mamba3.ops.mamba2.ssd`)."""
    if cu_seqlens is not None:
        pad = lambda t: None if t is None else pack_to_padded(t, cu_seqlens)
        y, final = _chunked(pad(x), pad(dt), A, pad(B), pad(C), D, pad(z), initial_state,
                            return_final_state, chunk_size)
        return padded_to_pack(y, cu_seqlens), final
    return _chunked(x, dt, A, B, C, D, z, initial_state, return_final_state, chunk_size)


def _chunked(x, dt, A, B, C, D, z, initial_state, return_final_state, chunk_size):
    Bsz, T, H, P = x.shape
    G, N = B.shape[-2:]
    hpg = H // G
    out_dtype = x.dtype
    cd = compute_dtype(x, dt, B, C)
    x, dt, B, C = (t.to(cd) for t in (x, dt, B, C))
    a = dt * A.to(cd)                                                      # [B, T, H] log decay
    xdt = x * dt.unsqueeze(-1)

    L = min(chunk_size, max(T, 1))
    nc = max(1, -(-T // L))
    padT = nc * L - T
    padt = lambda t: F.pad(t, (0, 0) * (t.dim() - 2) + (0, padT)) if padT else t
    # Layout: heads before time inside a chunk so that every contraction is a batched matmul.
    xh = padt(xdt).view(Bsz, nc, L, G, hpg, P).permute(0, 1, 3, 4, 2, 5)   # [B, nc, G, hpg, L, P]
    Bg = padt(B).view(Bsz, nc, L, G, N).transpose(2, 3)                     # [B, nc, G, L, N]
    Cg = padt(C).view(Bsz, nc, L, G, N).transpose(2, 3)
    ell = torch.cumsum(padt(a).view(Bsz, nc, L, G, hpg).permute(0, 1, 3, 4, 2), dim=-1)  # [B, nc, G, hpg, L]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, dt, A, B, C, initial_state)
                                           if t is not None)

    # Intra-chunk: lower-triangular (diagonal included) decay mask times the group's C_t . B_s.
    # The exponent is clamped to [-floor, 0]: the upper triangle (positive) is zeroed by tril after
    # the exp, and decays below exp(-floor) (far under the dtype's resolution) are not worth the
    # slow underflow path of exp.
    seg = ell.unsqueeze(-1) - ell.unsqueeze(-2)                             # [B, nc, G, hpg, t, s]
    floor = EXP_FLOOR[cd]
    CB = (Cg @ Bg.transpose(-1, -2)).unsqueeze(3)                           # [B, nc, G, 1, t, s]
    if grad:
        scores = torch.exp(seg.clamp(-floor, 0.0)).tril() * CB
    else:  # same, in place
        scores = seg.clamp_(-floor, 0.0).exp_().tril_().mul_(CB)
    y = scores @ xh                                                         # [B, nc, G, hpg, L, P]

    # Chunk-local end states, then the scan over chunks.                    [B, nc, G, hpg, P, N]
    last = ell[..., -1]                                                     # [B, nc, G, hpg]
    w = torch.exp(last.unsqueeze(-1) - ell).unsqueeze(-1)                   # decay to the chunk end
    local = (xh * w).transpose(-1, -2) @ Bg.unsqueeze(3)
    chunk_decay = torch.exp(last)[..., None, None]
    S = x.new_zeros(Bsz, G, hpg, P, N) if initial_state is None else initial_state.to(cd).view(Bsz, G, hpg, P, N)
    entering = []
    for i in range(nc):
        entering.append(S)
        S = chunk_decay[:, i] * S + local[:, i]
    S_enter = torch.stack(entering, dim=1)
    inter = (Cg.unsqueeze(3) @ S_enter.transpose(-1, -2)) * torch.exp(ell).unsqueeze(-1)
    y = y + inter if grad else y.add_(inter)
    S = S.reshape(Bsz, H, P, N)
    y = y.permute(0, 1, 4, 2, 3, 5)                                         # [B, nc, L, G, hpg, P]
    y = y.reshape(Bsz, nc * L, H, P)[:, :T] + skip_term(D, x)
    if z is not None:
        y = y * F.silu(z.to(cd))
    final = None
    if return_final_state:
        final = S if cd == torch.float64 else S.float()
    return y.to(out_dtype), final
