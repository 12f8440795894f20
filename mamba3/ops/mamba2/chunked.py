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
    xc = padt(xdt).view(Bsz, nc, L, G, hpg, P)
    Bc = padt(B).view(Bsz, nc, L, G, N)
    Cc = padt(C).view(Bsz, nc, L, G, N)
    ell = torch.cumsum(padt(a).view(Bsz, nc, L, H), dim=2)               # inclusive, [B, nc, L, H]
    ellh = ell.permute(0, 1, 3, 2)                                         # [B, nc, H, L]

    # Intra-chunk: lower-triangular (diagonal included) decay mask times group scores.
    seg = ellh.unsqueeze(-1) - ellh.unsqueeze(-2)                          # [B, nc, H, t, s]
    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp(seg.masked_fill(~causal, -torch.inf)).view(Bsz, nc, G, hpg, L, L)
    scores = torch.einsum("bctgn,bcsgn->bcgts", Cc, Bc).unsqueeze(3) * decay
    y = torch.einsum("bcghts,bcsghp->bctghp", scores, xc)

    # Chunk-local end states, then the scan over chunks.                    [B, nc, H, P, N]
    last = ell[:, :, -1]                                                   # [B, nc, H]
    w = torch.exp(last.unsqueeze(2) - ell).view(Bsz, nc, L, G, hpg, 1)
    local = torch.einsum("bcsghp,bcsgn->bcghpn", xc * w, Bc).reshape(Bsz, nc, H, P, N)
    chunk_decay = torch.exp(last)
    S = x.new_zeros(Bsz, H, P, N) if initial_state is None else initial_state.to(cd)
    entering = []
    for i in range(nc):
        entering.append(S)
        S = chunk_decay[:, i, :, None, None] * S + local[:, i]
    S_enter = torch.stack(entering, dim=1).view(Bsz, nc, G, hpg, P, N)
    inter = torch.einsum("bctgn,bcghpn->bctghp", Cc, S_enter)
    y = y + inter * torch.exp(ell).view(Bsz, nc, L, G, hpg, 1)

    y = y.reshape(Bsz, nc * L, H, P)[:, :T] + skip_term(D, x)
    if z is not None:
        y = y * F.silu(z.to(cd))
    final = None
    if return_final_state:
        final = S if cd == torch.float64 else S.float()
    return y.to(out_dtype), final
