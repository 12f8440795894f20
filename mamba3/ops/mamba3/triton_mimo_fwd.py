"""Fused Triton forward of Mamba-3 MIMO (rank R) for inference: prepare, SSD core, epilogue.

A MIMO head is the SISO scalar-decay SSD over T*R rows (row t*R + r; triton_mimo.py gives the
math). Three stages, none of them with a [B, T, R, H, N] fp32 intermediate:
  1. ``_mimo_prep_kernel`` (grid (token blocks, B*H)): per rank r, QS = rot(q_r + q_bias_r),
     KS = c_t rot(k_r + k_bias_r) in the split-half rotary layout, at the phase of token t,
     X = psi_r x (the core's values), and the
     same-time R x R block W[r, j] = gamma_t M[r, j] - c_t [j < r] M[r, j] + D [r = j] with
     M[r, j] = <q_r + q_bias_r, k_j + k_bias_j> (the core's strictly-lower row mask already adds
     c_t M[r, j] for j < r: an equal-angle rotation keeps dot products);
  2. the SISO group-forward core (``ssd_group_fwd``) on (QS, KS, X = psi * x, dA on rank 0);
  3. ``_mimo_out_kernel`` (grid (token blocks, B*H)): Y[r] = core[r] + sum_j W[r, j] X[j], then the
     optional RMS norm, the gate silu(zeta_r z) and the rank sum with phi_r.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..launch import fast_launch
from ..utils import cdiv, next_pow2

from .triton_siso_fwd import _row_coeffs, _row_phase, chunk_start_phases, infer_out_chunk, nonempty, ssd_group_fwd

MIMO_PREP_ROWS = 16   # tokens per program of the preparation (and the phase block size); H100, 8x2048,
MIMO_PREP_WARPS = 4   # R=4 (gpu_mimo_fwd_sweep.py): 16 rows at 4 warps 0.90 ms, 8 rows at 1 warp 1.05
MIMO_OUT_TOKENS = 16  # tokens per program of the epilogue


@triton.jit
def _biased_halves(X, XB, b, t, r, g, h, T, half, sxb, sxt, sxr, sxg, R: tl.constexpr, BLOCK_N2: tl.constexpr):
    """Low and high halves [ROWS, BLOCK_N2] of rank r of x + bias (fp32; bias [H, R, N])."""
    i = tl.arange(0, BLOCK_N2)
    m = (t[:, None] < T) & (i[None, :] < half)
    base = X + b * sxb + t[:, None] * sxt + r * sxr + g * sxg + i[None, :]
    bb = XB + (h * R + r) * 2 * half + i
    lo = tl.load(base, mask=m, other=0.0).to(tl.float32) + tl.load(bb, mask=i < half, other=0.0)[None, :]
    hi = tl.load(base + half, mask=m, other=0.0).to(tl.float32) + tl.load(bb + half, mask=i < half, other=0.0)[None, :]
    return tl.where(m, lo, 0.0), tl.where(m, hi, 0.0)


@fast_launch
@triton.jit
def _mimo_prep_kernel(Q, K, QB, KB, DT, TRAP, ANG, TH0, Dp, V, PSI, QS, KS, X, W, T, H, G, nblk, N, S, P,
                      sqb, sqt, sqr, sqg, sdb, sdt, sdh, sab, sat, sah,
                      HAS_D: tl.constexpr, R: tl.constexpr, ROWS: tl.constexpr, BLOCK_N2: tl.constexpr,
                      BLOCK_P: tl.constexpr):
    """ROWS tokens of one (batch, head), from the phase entering them (TH0 [B, H, nblk, S]).
    q, k [B, T, R, G, N]; V [B, T, H, P] and PSI (mimo_x) [H, R, P] contiguous; QS, KS [B, T*R, H, N]
    and X = psi_r x [B, T*R, H, P] (QS's dtype); W [B, T, H, R, R] fp32."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    g = h // (H // G)
    half = N // 2
    i = tl.arange(0, BLOCK_N2)
    t = blk * ROWS + tl.arange(0, ROWS)
    tm = t < T
    phase = tl.load(TH0 + (bh * nblk + blk) * S + i, mask=i < S, other=0.0)
    dt, gamma, cs = _row_coeffs(DT, TRAP, b, h, t, T, sdb, sdt, sdh)
    cos, sin, _ = _row_phase(ANG, dt, b, h, t, T, S, sab, sat, sah, phase, BLOCK_N2)
    d = 0.0
    if HAS_D:
        d = tl.load(Dp + h).to(tl.float32)
    m = tm[:, None] & (i[None, :] < half)
    p = tl.arange(0, BLOCK_P)
    mp = tm[:, None] & (p[None, :] < P)
    bt = (b * T + t).to(tl.int64)                          # token row (int64: T*R*H*P may pass 2^31)
    x = tl.load(V + (bt[:, None] * H + h) * P + p[None, :], mask=mp, other=0.0).to(tl.float32)
    for r in tl.static_range(R):
        psi = tl.load(PSI + (h * R + r) * P + p, mask=p < P, other=0.0).to(tl.float32)
        tl.store(X + ((bt[:, None] * R + r) * H + h) * P + p[None, :], (psi[None, :] * x).to(X.dtype.element_ty),
                 mask=mp)
        qlo, qhi = _biased_halves(Q, QB, b, t, r, g, h, T, half, sqb, sqt, sqr, sqg, R, BLOCK_N2)
        klo, khi = _biased_halves(K, KB, b, t, r, g, h, T, half, sqb, sqt, sqr, sqg, R, BLOCK_N2)
        off = ((bt[:, None] * R + r) * H + h) * N + i[None, :]
        tl.store(QS + off, (qlo * cos - qhi * sin).to(QS.dtype.element_ty), mask=m)
        tl.store(QS + off + half, (qlo * sin + qhi * cos).to(QS.dtype.element_ty), mask=m)
        tl.store(KS + off, ((klo * cos - khi * sin) * cs[:, None]).to(KS.dtype.element_ty), mask=m)
        tl.store(KS + off + half, ((klo * sin + khi * cos) * cs[:, None]).to(KS.dtype.element_ty), mask=m)
        wrow = W + ((bt * H + h) * R + r) * R
        for j in tl.static_range(R):
            if j == r:
                mj = tl.sum(qlo * klo + qhi * khi, axis=1)
                tl.store(wrow + j, gamma * mj + d, mask=tm)
            else:
                kjlo, kjhi = _biased_halves(K, KB, b, t, j, g, h, T, half, sqb, sqt, sqr, sqg, R, BLOCK_N2)
                mj = tl.sum(qlo * kjlo + qhi * kjhi, axis=1)
                if j < r:
                    tl.store(wrow + j, (gamma - cs) * mj, mask=tm)
                else:
                    tl.store(wrow + j, gamma * mj, mask=tm)


@triton.jit
def _token_block(T, H, P, TOK: tl.constexpr, BLOCK_P: tl.constexpr):
    """Program (token block, batch*head) of the [B, T, H, P] kernels: (b, h, t, token mask, p, p
    mask, tile mask, row index (b T + t) H + h as int64)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    t = pid * TOK + tl.arange(0, TOK)
    tm = t < T
    p = tl.arange(0, BLOCK_P)
    pm = p < P
    return b, h, t, tm, p, pm, tm[:, None] & pm[None, :], ((b * T + t) * H + h).to(tl.int64)


@triton.jit
def _rank_rows(b, t, r, h, T, H, R: tl.constexpr):
    """int64 row of (token t, rank r) in the [B, T*R, H, .] tensors."""
    return (((b * T + t) * R + r) * H + h).to(tl.int64)


@triton.jit
def _rank_output(YC, W, PSI, x, b, t, r, h, T, H, P, row, p, tm, pm, m, R: tl.constexpr):
    """Y[r] = core[r] + sum_j W[r, j] psi_j x, [TOK, BLOCK_P] fp32."""
    y = tl.load(YC + _rank_rows(b, t, r, h, T, H, R)[:, None] * P + p[None, :], mask=m, other=0.0).to(tl.float32)
    for j in tl.static_range(R):
        w = tl.load(W + row * R * R + r * R + j, mask=tm, other=0.0)
        psi = tl.load(PSI + (h * R + j) * P + p, mask=pm, other=0.0).to(tl.float32)
        y += w[:, None] * psi[None, :] * x
    return y


@fast_launch
@triton.jit
def _mimo_out_kernel(YC, V, PSI, W, Z, MZ, MO, NW, OUT, T, H, P, eps,
                     HAS_Z: tl.constexpr, HAS_NORM: tl.constexpr, R: tl.constexpr, TOK: tl.constexpr,
                     BLOCK_P: tl.constexpr):
    """TOK tokens of one (batch, head): out = sum_r phi_r gate_r(norm(core_r + sum_j W[r, j] psi_j x)).
    YC [B, T*R, H, P] (the core, in the operands' dtype); V, Z, OUT [B, T, H, P]; W [B, T, H, R, R] fp32; PSI, MZ, MO
    [H, R, P] (mimo_x, mimo_z, mimo_o); NW [H, P]; all contiguous."""
    b, h, t, tm, p, pm, m, row = _token_block(T, H, P, TOK, BLOCK_P)
    x = tl.load(V + row[:, None] * P + p[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(Z + row[:, None] * P + p[None, :], mask=m, other=0.0).to(tl.float32)
    acc = tl.zeros([TOK, BLOCK_P], dtype=tl.float32)
    for r in tl.static_range(R):
        y = _rank_output(YC, W, PSI, x, b, t, r, h, T, H, P, row, p, tm, pm, m, R)
        if HAS_NORM:
            ms = tl.sum(y * y, axis=1) / P
            y = y * (1.0 / tl.sqrt(ms + eps))[:, None] * tl.load(NW + h * P + p, mask=pm, other=0.0).to(
                tl.float32)[None, :]
        if HAS_Z:
            zz = tl.load(MZ + (h * R + r) * P + p, mask=pm, other=0.0).to(tl.float32)[None, :] * z
            y = y * zz * tl.sigmoid(zz)
        acc += tl.load(MO + (h * R + r) * P + p, mask=pm, other=0.0).to(tl.float32)[None, :] * y
    tl.store(OUT + row[:, None] * P + p[None, :], acc.to(OUT.dtype.element_ty), mask=m)


def mimo_prep(q, k, v, dt, trap, q_bias, k_bias, angles, mimo_x, D, th0, rows, dtype):
    """Launch :func:`_mimo_prep_kernel`: q, k [B, T, R, G, N] (last dim contiguous); v [B, T, H, P]
    contiguous; dt, trap [B, T, H] with equal strides; th0 [B, H, nblk, S] the phases entering each
    block of ``rows`` tokens. Returns (QS, KS [B, T*R, H, N], X [B, T*R, H, P] in ``dtype``,
    W [B, T, H, R, R] fp32)."""
    B, T, R, G, N = q.shape
    H, P = v.shape[2], v.shape[3]
    S = angles.shape[-1]
    nblk = th0.shape[2]
    QS = torch.empty(B, T * R, H, N, device=q.device, dtype=dtype)
    KS = torch.empty_like(QS)
    X = torch.empty(B, T * R, H, P, device=q.device, dtype=dtype)
    W = torch.empty(B, T, H, R, R, device=q.device, dtype=torch.float32)
    if B * T * H == 0:
        return QS, KS, X, W
    sa = (angles.stride(0), angles.stride(1), 0 if angles.dim() == 3 else angles.stride(2))
    qb, kb = q_bias.float().contiguous(), k_bias.float().contiguous()
    BN2 = max(16, next_pow2(N // 2))
    _mimo_prep_kernel[(nblk, B * H)](q, k, qb, kb, dt, trap, nonempty(angles, dt), nonempty(th0, dt),
                                     D if D is not None else W, v, mimo_x.contiguous(), QS, KS, X, W, T, H, G, nblk,
                                     N, S, P, *q.stride()[:4], *dt.stride(), *sa, HAS_D=D is not None, R=R,
                                     ROWS=rows, BLOCK_N2=BN2, BLOCK_P=max(16, next_pow2(P)),
                                     num_warps=MIMO_PREP_WARPS)
    return QS, KS, X, W


def mimo_out(yc, v, mimo_x, W, z, mimo_z, mimo_o, norm_weight, eps):
    """Launch :func:`_mimo_out_kernel`; returns out [B, T, H, P] in v's dtype."""
    B, T, H, P = v.shape
    R = mimo_x.shape[1]
    out = torch.empty_like(v)
    if B * T * H == 0:
        return out
    c = lambda t: t.contiguous()
    _mimo_out_kernel[(cdiv(T, MIMO_OUT_TOKENS), B * H)](
        yc, v, c(mimo_x), W, c(z) if z is not None else v, c(mimo_z), c(mimo_o),
        c(norm_weight) if norm_weight is not None else v, out, T, H, P, float(eps),
        HAS_Z=z is not None, HAS_NORM=norm_weight is not None, R=R, TOK=MIMO_OUT_TOKENS,
        BLOCK_P=max(16, next_pow2(P)), num_warps=4)
    return out


def mamba3_mimo_fused_fwd(q, k, v, dA, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z, a0, S0,
                          chunk_size, norm_weight, eps, dot_dtype, save=False):
    """The phases and the three stages on contiguous inputs (a0 the initial phase [B, H, S] or None;
    S0 the entering state [B, H, P, N] fp32 or None). Returns (out [B, T, H, P] in v's dtype, final
    state [B, H, P, N] fp32, final phase [B, H, S] fp32, saved): saved = (th0, QS, KS, X, W, core
    rows, entering chunk states, chunk decays) for the backward when ``save``, else None."""
    B, T, H, P = v.shape
    R = q.shape[2]
    th0, final_angle = chunk_start_phases(dt, angles, a0, MIMO_PREP_ROWS)
    QS, KS, X, W = mimo_prep(q, k, v, dt, trap, q_bias, k_bias, angles, mimo_x, D, th0, MIMO_PREP_ROWS, dot_dtype)
    dAx = F.pad(dA.float().unsqueeze(2), (0, 0, 0, R - 1)).reshape(B, T * R, H)
    yc, _, states, dec, final = ssd_group_fwd(QS, KS, X, dAx, None, None, S0, chunk_size * R, out_dtype=dot_dtype,
                                              save=save, out_chunk=infer_out_chunk(chunk_size * R, save))
    out = mimo_out(yc, v, mimo_x, W, z, mimo_z, mimo_o, norm_weight, eps)
    return out, final, final_angle, ((th0, QS, KS, X, W, yc, states, dec) if save else None)
