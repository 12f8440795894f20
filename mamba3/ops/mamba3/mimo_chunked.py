"""Mamba-3 MIMO (rank R), chunked PyTorch path (training form, differentiable by autograd).

The single-SSD fold of SISO (SPEC sections 2, 4) with rows that are (time, rank) pairs: per head

    Y_t[r] = sum_{s<t} sum_j (q_t[r] . k_s[j]) exp(sum_{u=s+1..t} dA_u) c_s X_s[j]
             + gamma_t sum_j <qh_t[r], kh_t[j]> X_t[j] + D X_t[r]
    c_s = gamma_s + (1 - lambda_{s+1}) dt_{s+1}          (second term 0 after the last token)

where qh, kh are the biased, un-rotated vectors (equal-angle rotation preserves the dot product).
A chunk of C tokens is a tile of C*R rows; the intra mask is strictly lower across *time*, so the
same-time R x R block is left to the gamma diagonal term above. Across chunks the [P, N] state is
passed with a short scan, as in SISO. R x cheaper than R^2 when C = C_SISO / R (the default).

Memory: every per-head intermediate is [B, H, T, R, max(N, P, C*R)] in fp32, H / G times the
size of the q/k inputs. Without autograd, :func:`run_mimo` therefore runs the forms over blocks
of heads (and of batch rows) whose intermediates stay under ``NO_GRAD_BLOCK_BYTES``; heads are
independent, so the blocks give the same result as one pass.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..utils import compute_dtype, pack_to_padded, padded_to_pack, seq_lengths
from .common import Mamba3State, angle_increments, cumulative_angles, rotate_halves, trapezoid_coeffs
from .mimo_reference import mimo_output

# Bytes of one fp32 [b, T, R, h, max(N, P, C*R)] intermediate of a no-grad block (the forms peak
# at about ten of these, measured): 512 MiB is one head at B=128, T=2048, R=4, N=128.
NO_GRAD_BLOCK_BYTES = 1 << 29


def mamba3_mimo_chunked(q, k, v, dA, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D=None, z=None, *,
                        initial_state: Optional[Mamba3State] = None, return_final_state: bool = False,
                        cu_seqlens: Optional[Tensor] = None, chunk_size: Optional[int] = None,
                        outproj_norm_weight: Optional[Tensor] = None, outproj_norm_eps: float = 1e-5):
    """Chunked Mamba-3 MIMO (same signature as :func:`mamba3.ops.mamba3_mimo`)."""
    R = q.shape[2]
    C = max(1, 64 // R) if chunk_size is None else chunk_size
    return run_mimo(_chunked, q, k, v, dA, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z,
                    initial_state, return_final_state, C, outproj_norm_weight, outproj_norm_eps, cu_seqlens)


def run_mimo(forward, q, k, v, dA, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z, initial_state,
             return_final_state, C, norm_weight, eps, cu_seqlens, no_grad_slabs: int = 1):
    """Packed sequences -> right-padded batch, then ``forward`` (one pass, or head/batch blocks when
    no gradient is needed: ``no_grad_slabs`` x NO_GRAD_BLOCK_BYTES per fp32 slab; a form with smaller
    intermediates than this chunked one takes more). ``forward(q, ..., z, initial_state,
    return_final_state, C, norm_weight, eps, lengths)`` returns (out [B, T, H, P], Mamba3State or
    None) for a padded batch."""
    lengths = None
    if cu_seqlens is not None:
        # Padding has dt = dA = 0: state, phase and the shifted trapezoid scale stay untouched,
        # so outputs and final states are exact.
        pad = lambda t: None if t is None else pack_to_padded(t, cu_seqlens)
        q, k, v, dA, dt, trap, angles, z = (pad(t) for t in (q, k, v, dA, dt, trap, angles, z))
        lengths = torch.tensor(seq_lengths(cu_seqlens), device=v.device)
    args = [q, k, v, dA, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z, initial_state]
    tensors = args[:14] + ([] if initial_state is None else list(initial_state)) + [norm_weight]
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    rest = (return_final_state, C, norm_weight, eps)
    if grad:
        y, final = forward(*args, *rest, lengths)
    else:
        y, final = _in_blocks(forward, args, rest, lengths, no_grad_slabs * NO_GRAD_BLOCK_BYTES)
    return (y if cu_seqlens is None else padded_to_pack(y, cu_seqlens)), final


# Head axis of each per-head argument (q, k: the group axis, 3; angles: 2 when per head).
_HEAD_AXIS = dict(v=2, dA=2, dt=2, trap=2, z=2, q_bias=0, k_bias=0, mimo_x=0, mimo_z=0, mimo_o=0, D=0)
_STATE_HEAD_AXIS = (1, 1, 2, 1)                         # Mamba3State(angle, ssm, k [B, R, H, N], v)
_NAMES = ("q", "k", "v", "dA", "dt", "trap", "q_bias", "k_bias", "angles", "mimo_x", "mimo_z", "mimo_o", "D", "z")


def _block_sizes(B, T, H, G, R, N, P, C, budget):
    """(heads, batch rows) per block so that one fp32 [b, T, R, h, max(N, P, C*R)] slab fits
    ``budget`` bytes; a head block holds whole groups or part of one group."""
    slab = T * R * max(N, P, C * R) * 4                 # one batch row, one head
    hpg = H // G
    sizes = [h for h in range(1, H + 1) if H % h == 0 and (h % hpg == 0 or hpg % h == 0)]
    fit = [h for h in sizes if B * h * slab <= budget]
    if fit:
        return max(fit), B
    return 1, max(1, budget // slab)


def _in_blocks(forward, args, rest, lengths, budget):
    """Run ``forward`` over blocks of heads x batch rows, writing into preallocated outputs."""
    x = dict(zip(_NAMES, args[:14]))
    initial_state = args[14]
    return_final_state, C, norm_weight, eps = rest
    B, T, H, P = x["v"].shape
    R, G, N = x["q"].shape[2:]
    hb, bb = _block_sizes(B, T, H, G, R, N, P, C, budget)
    if T == 0 or (hb, bb) == (H, B):
        return forward(*args, *rest, lengths)
    hpg = H // G
    out = final = None
    for h0 in range(0, H, hb):
        groups = slice(h0 // hpg, -(-(h0 + hb) // hpg))
        hx = dict(x, q=x["q"][:, :, :, groups], k=x["k"][:, :, :, groups])
        for n, axis in _HEAD_AXIS.items():
            if hx[n] is not None:
                hx[n] = hx[n].narrow(axis, h0, hb)
        if hx["angles"].dim() == 4:
            hx["angles"] = hx["angles"][:, :, h0 : h0 + hb]
        w = None if norm_weight is None else norm_weight[h0 : h0 + hb]
        for b0 in range(0, B, bb):
            rows = slice(b0, b0 + bb)
            blk = [t if t is None or _HEAD_AXIS.get(n) == 0 else t[rows] for n, t in hx.items()]
            init = None if initial_state is None else Mamba3State(
                *(t[rows].narrow(a, h0, hb) for t, a in zip(initial_state, _STATE_HEAD_AXIS)))
            y, fin = forward(*blk, init, return_final_state, C, w, eps, None if lengths is None else lengths[rows])
            if out is None:
                out = y.new_empty(B, T, H, P)
            out[rows, :, h0 : h0 + hb] = y
            if fin is not None:
                if final is None:
                    final = Mamba3State(*(f.new_empty((B,) + f.shape[1:a] + (H,) + f.shape[a + 1 :])
                                          for f, a in zip(fin, _STATE_HEAD_AXIS)))
                for dst, src, a in zip(final, fin, _STATE_HEAD_AXIS):
                    dst[rows].narrow(a, h0, hb).copy_(src)
            del y, fin                                  # free the block before the next one
    return out, final


def _chunked(q, k, v, dA, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z, initial_state,
             return_final_state, C, norm_weight, eps, lengths):
    B, T, H, P = v.shape
    R, G, N = q.shape[2:]
    out_dtype = v.dtype
    cd = compute_dtype(q, k, v, dA, dt)
    dA, dt, trap, angles = (t.to(cd) for t in (dA, dt, trap, angles))
    psi = mimo_x.to(cd)                                                       # [H, R, P]

    # Everything below is head-major, [B, H, T, R, *]: biased per-head q/k (pre-rotation),
    # phases, rotated q/k, up-scaled X. Each is built by one broadcast op from the (possibly
    # half-precision) inputs, so no full-size copy of q, k or v in the compute dtype is made.
    def heads(x, bias):                                                       # [B, T, R, G, N] -> [B, H, T, R, N]
        x = x.permute(0, 3, 1, 2, 4).unsqueeze(2)                             # [B, G, 1, T, R, N]
        return (x + bias.to(cd).reshape(G, H // G, 1, R, N)).view(B, H, T, R, N)
    qh, kh = heads(q, q_bias), heads(k, k_bias)
    X = psi[:, None] * v.transpose(1, 2).unsqueeze(3)                         # [B, H, T, R, P]
    dt_ = dt.transpose(1, 2)                                                  # [B, H, T]
    lam, gamma, c = (x.transpose(1, 2) for x in trapezoid_coeffs(dt, trap, lengths))

    # Same-time R x R block: gamma_t <qh_t[r], kh_t[j]> X_t[j], plus the D skip.
    Y_diag = ((qh @ kh.transpose(-1, -2)) * gamma[..., None, None]) @ X       # [B, H, T, R, P]
    if D is not None:
        Y_diag = Y_diag + D.to(cd)[:, None, None, None] * X

    init_angle = None if initial_state is None else initial_state.angle.to(cd)
    theta = cumulative_angles(angle_increments(dt, angles), init_angle)      # [B, T, H, S]
    th = theta.transpose(1, 2).unsqueeze(3)                                   # [B, H, T, 1, S]
    qr = rotate_halves(qh, th)
    del qh
    kr = rotate_halves(kh, th)
    del kh
    k_last = _last_token(kr.permute(0, 2, 3, 1, 4), lengths) if return_final_state and T > 0 else None

    # State entering the first chunk: h_prev plus the beta term of the cache's last token.
    if initial_state is None or T == 0:
        S0 = X.new_zeros(B, H, P, N)
    else:
        X_prev = psi * initial_state.v.to(cd).unsqueeze(2)                    # [B, H, R, P]
        S0 = initial_state.ssm.to(cd) + ((1.0 - lam[..., 0]) * dt_[..., 0])[..., None, None] * (
            X_prev.transpose(-1, -2) @ initial_state.k.to(cd).transpose(1, 2))

    # Tiles: pad time to a multiple of C (padding: dA = c = 0) and flatten (time, rank) into
    # L = C*R rows, row l being token l // R. Decays stay per token ([.., C]) and broadcast over
    # the ranks through [C, R] views of the rows.                            [B, H, nc, L, *]
    nc = max(1, -(-T // C))
    padT = nc * C - T
    L = C * R
    tiles = lambda t: (F.pad(t, (0, 0, 0, 0, 0, padT)) if padT else t).reshape(B, H, nc, L, t.shape[-1])
    per_rank = lambda t: t.view(B, H, nc, C, R, t.shape[-1])
    qc, Xc = tiles(qr), tiles(X)
    del qr
    kc = tiles(kr * c[..., None, None])
    del kr
    ell = torch.cumsum(F.pad(dA.transpose(1, 2), (0, padT)).view(B, H, nc, C), dim=-1)  # inclusive

    # Intra-chunk: mask strictly lower across time (the same-time block is Y_diag).
    strict = torch.ones(C, C, dtype=torch.bool, device=v.device).tril(-1)
    decay = (ell.unsqueeze(-1) - ell.unsqueeze(-2)).masked_fill(~strict, -torch.inf).exp()  # [B, H, nc, C, C]
    scores = (qc @ kc.transpose(-1, -2)).view(B, H, nc, C, R, C, R) * decay[:, :, :, :, None, :, None]
    Y = scores.view(B, H, nc, L, L) @ Xc                                      # [B, H, nc, L, P]
    del scores, decay

    # Chunk-local states, their scan, and the inter-chunk term.                 [B, H, nc, P, N]
    last = ell[..., -1]                                                       # [B, H, nc]
    w = torch.exp(last.unsqueeze(-1) - ell)[..., None, None]                  # decay to chunk end
    local = (per_rank(Xc) * w).view(B, H, nc, L, P).transpose(-1, -2) @ kc
    del Xc, kc, w
    chunk_decay = torch.exp(last)
    entering = []
    S = S0
    for i in range(nc):
        entering.append(S)
        S = chunk_decay[:, :, i, None, None] * S + local[:, :, i]
    del local
    inter = qc @ torch.stack(entering, dim=2).transpose(-1, -2)              # [B, H, nc, L, P]
    del entering, qc
    Y = Y + (per_rank(inter) * torch.exp(ell)[..., None, None]).view(B, H, nc, L, P)
    del inter

    Y = Y.view(B, H, nc * C, R, P)[:, :, :T] + Y_diag                         # [B, H, T, R, P]
    del Y_diag
    out = mimo_output(Y.permute(0, 2, 3, 1, 4), None if z is None else z.to(cd), mimo_z.to(cd), mimo_o.to(cd),
                      None if norm_weight is None else norm_weight.to(cd), eps)

    final = None
    if return_final_state:
        final = _final_state(S, theta, k_last, v, lengths, cd, out_dtype, initial_state, R)
    return out.to(out_dtype), final


def _last_token(x: Tensor, lengths: Optional[Tensor]) -> Tensor:
    """x [B, T, ...] -> [B, ...] at each row's last token (T - 1, or lengths - 1 clamped at 0)."""
    B, T = x.shape[:2]
    idx = torch.full((B,), T - 1, device=x.device, dtype=torch.long) if lengths is None else (lengths - 1).clamp(min=0)
    return x[torch.arange(B, device=x.device), idx]


def _final_state(S, theta, k_last, v, lengths, cd, out_dtype, initial_state, R):
    """The true h_T (the shifted scale is 0 after the last token), last phase, k [B, R, H, N]
    (k_last: the rotated, biased k of each row's last token; None when T = 0), raw x."""
    B, T, H, P = v.shape
    wide = torch.float64 if cd == torch.float64 else torch.float32
    if T == 0:  # nothing consumed: the state passes through
        if initial_state is not None:
            return Mamba3State(*initial_state)
        N = S.shape[-1]
        return Mamba3State(theta.new_zeros(B, H, theta.shape[-1], dtype=wide), S.to(wide),
                           v.new_zeros(B, R, H, N, dtype=out_dtype), v.new_zeros(B, H, P, dtype=out_dtype))
    angle, v_last = _last_token(theta, lengths), _last_token(v, lengths)
    if lengths is not None and bool((lengths == 0).any()):  # empty sequences keep their state
        empty = lengths == 0
        def keep(cur, init):
            e = empty.view(-1, *([1] * (cur.dim() - 1)))
            return torch.where(e, torch.zeros_like(cur) if init is None else init.to(cur.dtype), cur)
        angle = keep(angle, None if initial_state is None else initial_state.angle)
        k_last = keep(k_last, None if initial_state is None else initial_state.k)
        v_last = keep(v_last, None if initial_state is None else initial_state.v)
    return Mamba3State(angle=angle.to(wide), ssm=S.to(wide), k=k_last.to(out_dtype), v=v_last.to(out_dtype))
