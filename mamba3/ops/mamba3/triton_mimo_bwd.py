"""Triton backward of the fused Mamba-3 MIMO forward (triton_mimo_fwd.py), stage by stage in reverse.

  1. ``_mimo_out_bwd_kernel``: back through the rank sum, gate and norm of the epilogue (the per-rank
     outputs Y[r] = core[r] + sum_j W[r, j] X[j] are recomputed): d core rows, dW [B, T, H, R, R],
     dz, and per-program partial sums for mimo_o, mimo_z and the norm weight;
  2. the SISO core backward (``ssd_core_bwd``) on the T*R rows: d QS, d KS, d X, d dA rows;
  3. ``_mimo_x_bwd_kernel``: d X[j] = d X_core[j] + sum_r W[r, j] d Y[r], then dx = sum_j psi_j dX[j]
     and partial sums for psi (mimo_x);
  4. ``_mimo_prep_bwd_kernel``: back through the rotation, biases and the trapezoid scale, one
     program per (block of tokens, batch, head) for all ranks, writing each head's d q_r, d k_r over
     the core's dQS, dKS (summed over the group's heads after);
  5. ``same_time_block_bwd`` (PyTorch on [B, T, H, R, R] tensors and small products): the same-time
     block's share of d q, d k, the biases, d gamma and d c; then ``phase_dt_bwd`` finishes d dt,
     d trap and d angles.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch import fast_launch
from ..utils import cdiv, next_pow2

from .common import trapezoid_coeffs
from .triton_mimo_fwd import _biased_halves, _rank_output, _rank_rows, _token_block
from .triton_siso_bwd import _head_rotation, _shared_rate, phase_dt_bwd, ssd_core_bwd
from .triton_siso_fwd import _row_coeffs, nonempty

# H100, 8x2048, R=4, fwd+bwd ms (gpu_mimo_fwd_sweep.py --bwd, gpu_mimo_bwd_sweep_s11.json): tokens per
# program of the epilogue and X backward 16: 9.89, 32: 9.86; epilogue backward warps 2: 9.84, 4: 10.15;
# preparation backward warps 1: 11.13, 2: 9.90, 4: 10.47 (variants dropped: BENCHMARKS.md, eleventh session)
MIMO_BWD_TOKENS = 32
MIMO_OUT_BWD_WARPS = 2
MIMO_PREP_BWD_WARPS = 2


@fast_launch
@triton.jit
def _mimo_out_bwd_kernel(DOUT, YC, V, PSI, W, Z, MZ, MO, NW, DYC, DW, DZ, DMO, DMZ, DNW, T, H, P, eps, npt,
                         HAS_Z: tl.constexpr, HAS_NORM: tl.constexpr, R: tl.constexpr, TOK: tl.constexpr,
                         BLOCK_P: tl.constexpr):
    """TOK tokens of one (batch, head). Partials DMO, DMZ [B*npt, H, R, P] and DNW [B*npt, H, P]
    (fp32, one row per program: summed over tokens); DYC rows [B, T*R, H, P]; DW fp32."""
    b, h, t, tm, p, pm, m, row = _token_block(T, H, P, TOK, BLOCK_P)
    part = (b * npt + tl.program_id(0)) * H + h
    x = tl.load(V + row[:, None] * P + p[None, :], mask=m, other=0.0).to(tl.float32)
    dout = tl.load(DOUT + row[:, None] * P + p[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(Z + row[:, None] * P + p[None, :], mask=m, other=0.0).to(tl.float32)
        dz = tl.zeros([TOK, BLOCK_P], dtype=tl.float32)
    if HAS_NORM:
        nw = tl.load(NW + h * P + p, mask=pm, other=0.0).to(tl.float32)[None, :]
        dnw = tl.zeros([BLOCK_P], dtype=tl.float32)
    for r in tl.static_range(R):
        yrow = _rank_rows(b, t, r, h, T, H, R)
        y = _rank_output(YC, W, PSI, x, b, t, r, h, T, H, P, row, p, tm, pm, m, R)
        yn = y
        if HAS_NORM:
            rs = 1.0 / tl.sqrt(tl.sum(y * y, axis=1) / P + eps)
            yn = y * rs[:, None] * nw
        mo = tl.load(MO + (h * R + r) * P + p, mask=pm, other=0.0).to(tl.float32)[None, :]
        if HAS_Z:
            mz = tl.load(MZ + (h * R + r) * P + p, mask=pm, other=0.0).to(tl.float32)[None, :]
            u = mz * z
            sg = tl.sigmoid(u)
            g = u * sg
            dgate = dout * mo * yn
            du = dgate * sg * (1.0 + u * (1.0 - sg))
            dz += du * mz
            tl.store(DMZ + (part * R + r) * P + p, tl.sum(du * z, axis=0), mask=pm)
            tl.store(DMO + (part * R + r) * P + p, tl.sum(dout * yn * g, axis=0), mask=pm)
            dyn = dout * mo * g
        else:
            tl.store(DMO + (part * R + r) * P + p, tl.sum(dout * yn, axis=0), mask=pm)
            dyn = dout * mo
        if HAS_NORM:
            a = dyn * nw
            dnw += tl.sum(dyn * y * rs[:, None], axis=0)
            dy = rs[:, None] * a - y * (rs * rs * rs * tl.sum(y * a, axis=1) / P)[:, None]
        else:
            dy = dyn
        dy = tl.where(m, dy, 0.0)
        tl.store(DYC + yrow[:, None] * P + p[None, :], dy.to(DYC.dtype.element_ty), mask=m)
        for j in tl.static_range(R):
            psi = tl.load(PSI + (h * R + j) * P + p, mask=pm, other=0.0).to(tl.float32)
            tl.store(DW + row * R * R + r * R + j, tl.sum(dy * psi[None, :] * x, axis=1), mask=tm)
    if HAS_Z:
        tl.store(DZ + row[:, None] * P + p[None, :], dz.to(DZ.dtype.element_ty), mask=m)
    if HAS_NORM:
        tl.store(DNW + part * P + p, dnw, mask=pm)


@fast_launch
@triton.jit
def _mimo_x_bwd_kernel(DXC, DYC, W, V, PSI, DX, DPSI, T, H, P, npt,
                       R: tl.constexpr, TOK: tl.constexpr, BLOCK_P: tl.constexpr):
    """dX[j] = DXC[j] + sum_r W[r, j] DYC[r] (rows [B, T*R, H, P]); DX [B, T, H, P] = sum_j psi_j
    dX[j]; DPSI [B*npt, H, R, P] fp32 partials of sum_t dX[j] x."""
    b, h, t, tm, p, pm, m, row = _token_block(T, H, P, TOK, BLOCK_P)
    part = (b * npt + tl.program_id(0)) * H + h
    x = tl.load(V + row[:, None] * P + p[None, :], mask=m, other=0.0).to(tl.float32)
    dx = tl.zeros([TOK, BLOCK_P], dtype=tl.float32)
    for j in tl.static_range(R):
        jrow = _rank_rows(b, t, j, h, T, H, R)
        dxj = tl.load(DXC + jrow[:, None] * P + p[None, :], mask=m, other=0.0).to(tl.float32)
        for r in tl.static_range(R):
            rrow = _rank_rows(b, t, r, h, T, H, R)
            w = tl.load(W + row * R * R + r * R + j, mask=tm, other=0.0)
            dxj += w[:, None] * tl.load(DYC + rrow[:, None] * P + p[None, :], mask=m, other=0.0).to(tl.float32)
        psi = tl.load(PSI + (h * R + j) * P + p, mask=pm, other=0.0).to(tl.float32)
        dx += psi[None, :] * dxj
        tl.store(DPSI + (part * R + j) * P + p, tl.sum(dxj * x, axis=0), mask=pm)
    tl.store(DX + row[:, None] * P + p[None, :], dx.to(DX.dtype.element_ty), mask=m)


@fast_launch
@triton.jit
def _mimo_prep_bwd_kernel(Q, K, QB, KB, DT, TRAP, ANG, TH0, dQS, dKS, DTOT, DDTL, DANGL, DCS, DQB, DKB,
                          B, T, H, G, nblk, N, S, sqb, sqt, sqr, sqg, sdb, sdt, sdh, sab, sat, sah,
                          ANG_PER_HEAD: tl.constexpr, R: tl.constexpr, ROWS: tl.constexpr,
                          BLOCK_N2: tl.constexpr):
    """Back through the rotation, biases and trapezoid scale of all R ranks of ROWS tokens of one
    (batch, head); the same-time block's terms are added by the caller (same_time_block_bwd). The
    programs are independent: a loop over the group's heads inside one program left the GPU waiting
    on its serial chain.
    In: dQS, dKS rows [B, T*R, H, N]. Out (fp32 unless noted):
      dQS, dKS overwritten in place with this head's gradients of q_r + q_bias_r, k_r + k_bias_r
      (the caller sums the group's heads);
      DTOT [B, H, S, nblk] (block sums of d theta, reversed block order as in _prep_bwd_kernel),
      DDTL [B, T, H], DANGL [B, T, H, S] (per head also for shared angles: summed by the caller),
      DCS = d c [B, T, H]; DQB, DKB [nblk, B, H, R, N]: the bias gradients' sums over the block's
      tokens."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    g = h // (H // G)
    half = N // 2
    i = tl.arange(0, BLOCK_N2)
    rot = i < S
    t = blk * ROWS + tl.arange(0, ROWS)
    tm = t < T
    m = tm[:, None] & (i[None, :] < half)
    bt = (b * T + t).to(tl.int64)
    shared = tl.zeros([ROWS, BLOCK_N2], dtype=tl.float32)
    if not ANG_PER_HEAD:
        shared = _shared_rate(ANG, b, t, T, S, sab, sat, BLOCK_N2)
    dt, gamma, cs = _row_coeffs(DT, TRAP, b, h, t, T, sdb, sdt, sdh)
    cos, sin, rate = _head_rotation(ANG, TH0, dt, shared, b, h, t, T, S, H, nblk, blk, sab, sat, sah,
                                    ANG_PER_HEAD, BLOCK_N2)
    dth = tl.zeros([ROWS, BLOCK_N2], dtype=tl.float32)
    dc_all = tl.zeros([ROWS], dtype=tl.float32)
    for r in range(R):                               # a runtime loop: unrolled, the loads crowd the registers
        qlo, qhi = _biased_halves(Q, QB, b, t, r, g, h, T, half, sqb, sqt, sqr, sqg, R, BLOCK_N2)
        klo, khi = _biased_halves(K, KB, b, t, r, g, h, T, half, sqb, sqt, sqr, sqg, R, BLOCK_N2)
        off = ((bt[:, None] * R + r) * H + h) * N + i[None, :]
        dlo = tl.load(dQS + off, mask=m, other=0.0).to(tl.float32)
        dhi = tl.load(dQS + off + half, mask=m, other=0.0).to(tl.float32)
        ulo = dlo * cos + dhi * sin                  # R^T dQS (see _prep_bwd_kernel)
        uhi = dhi * cos - dlo * sin
        dlo = tl.load(dKS + off, mask=m, other=0.0).to(tl.float32)
        dhi = tl.load(dKS + off + half, mask=m, other=0.0).to(tl.float32)
        wlo = dlo * cos + dhi * sin
        whi = dhi * cos - dlo * sin
        dc = tl.sum(wlo * klo + whi * khi, axis=1)
        wlo = wlo * cs[:, None]
        whi = whi * cs[:, None]
        dth += tl.where(rot[None, :], qlo * uhi - qhi * ulo + klo * whi - khi * wlo, 0.0)
        dc_all += dc
        tl.store(dQS + off, ulo.to(dQS.dtype.element_ty), mask=m)
        tl.store(dQS + off + half, uhi.to(dQS.dtype.element_ty), mask=m)
        tl.store(dKS + off, wlo.to(dKS.dtype.element_ty), mask=m)
        tl.store(dKS + off + half, whi.to(dKS.dtype.element_ty), mask=m)
        pb = (((blk * B + b) * H + h) * R + r) * N + i
        tl.store(DQB + pb, tl.sum(ulo, axis=0), mask=i < half)
        tl.store(DQB + pb + half, tl.sum(uhi, axis=0), mask=i < half)
        tl.store(DKB + pb, tl.sum(wlo, axis=0), mask=i < half)
        tl.store(DKB + pb + half, tl.sum(whi, axis=0), mask=i < half)
    prior = tl.cumsum(dth, axis=0) - dth
    tl.store(DTOT + ((b * H + h) * S + i) * nblk + nblk - 1 - blk, tl.sum(dth, axis=0), mask=rot)
    ht = bt * H + h
    tl.store(DDTL + ht, -tl.sum(prior * rate, axis=1), mask=tm)
    tl.store(DANGL + ht[:, None] * S + i[None, :], -dt[:, None] * prior, mask=tm[:, None] & rot[None, :])
    tl.store(DCS + ht, dc_all, mask=tm)


def mimo_out_bwd(dout, yc, v, mimo_x, W, z, mimo_z, mimo_o, norm_weight, eps):
    """Launch :func:`_mimo_out_bwd_kernel`. Returns (d core rows [B, T*R, H, P] in yc's dtype, dW
    fp32, dz or None, d mimo_o, d mimo_z or None [H, R, P] fp32, d norm weight [H, P] fp32 or None)."""
    B, T, H, P = v.shape
    R = mimo_x.shape[1]
    npt = cdiv(T, MIMO_BWD_TOKENS)
    f32 = dict(device=v.device, dtype=torch.float32)
    dyc = torch.empty_like(yc)
    dW = torch.empty_like(W)
    dz = None if z is None else torch.empty_like(z)
    dmo, dmz = torch.zeros(B * npt, H, R, P, **f32), torch.zeros(B * npt, H, R, P, **f32)
    dnw = torch.zeros(B * npt, H, P, **f32)
    if B * T * H:
        _mimo_out_bwd_kernel[(npt, B * H)](dout.contiguous(), yc, v, mimo_x.contiguous(), W,
                                           z if z is not None else v, mimo_z.contiguous(), mimo_o.contiguous(),
                                           norm_weight.contiguous() if norm_weight is not None else v, dyc, dW,
                                           dz if dz is not None else dyc, dmo, dmz, dnw, T, H, P, float(eps), npt,
                                           HAS_Z=z is not None, HAS_NORM=norm_weight is not None, R=R,
                                           TOK=MIMO_BWD_TOKENS, BLOCK_P=max(16, next_pow2(P)),
                                           num_warps=MIMO_OUT_BWD_WARPS)
    return (dyc, dW, dz, dmo.sum(0), None if z is None else dmz.sum(0),
            None if norm_weight is None else dnw.sum(0))


def mimo_x_bwd(dxc, dyc, W, v, mimo_x):
    """Launch :func:`_mimo_x_bwd_kernel`. Returns (dx in v's dtype, d mimo_x [H, R, P] fp32)."""
    B, T, H, P = v.shape
    R = mimo_x.shape[1]
    npt = cdiv(T, MIMO_BWD_TOKENS)
    dx = torch.empty_like(v)
    dpsi = torch.zeros(B * npt, H, R, P, device=v.device, dtype=torch.float32)
    if B * T * H:
        _mimo_x_bwd_kernel[(npt, B * H)](dxc, dyc, W, v, mimo_x.contiguous(), dx, dpsi, T, H, P, npt, R=R,
                                         TOK=MIMO_BWD_TOKENS, BLOCK_P=max(16, next_pow2(P)),
                                         num_warps=4)
    return dx, dpsi.sum(0)


def mimo_prep_bwd(q, k, q_bias, k_bias, dt, trap, angles, th0, rows, dQS, dK_S):
    """Launch :func:`_mimo_prep_bwd_kernel` (raw inputs contiguous as in the forward; grid (blocks,
    B*H); dQS, dK_S are overwritten) and sum its per-head parts. Returns (dq, dk [B, T, R, G, N]
    fp32; dtot [B, H, S, nblk] (reversed blocks), ddt_local [B, T, H], dang_local ([B, T, S] or per
    head [B, T, H, S]), dc [B, T, H], all fp32; d q_bias, d k_bias [H, R, N] fp32), the same-time
    block's terms not included."""
    B, T, R, G, N = q.shape
    H = dt.shape[2]
    S = angles.shape[-1]
    nblk = th0.shape[2]
    per_head = angles.dim() == 4
    f32 = dict(device=dt.device, dtype=torch.float32)
    dtot = torch.zeros(B, H, S, nblk, **f32)
    ddtl, dcs = torch.empty(B, T, H, **f32), torch.empty(B, T, H, **f32)
    dangl = torch.zeros(B, T, H, S, **f32)
    dqb, dkb = torch.zeros(nblk, B, H, R, N, **f32), torch.zeros(nblk, B, H, R, N, **f32)
    sa = (angles.stride(0), angles.stride(1), angles.stride(2) if per_head else 0)
    BN2 = max(16, next_pow2(N // 2))
    if B * T * H:
        _mimo_prep_bwd_kernel[(nblk, B * H)](
            q, k, q_bias.float().contiguous(), k_bias.float().contiguous(), dt, trap, nonempty(angles, dt),
            nonempty(th0, dt), dQS, dK_S, nonempty(dtot, dcs), ddtl, nonempty(dangl, dcs), dcs, dqb, dkb,
            B, T, H, G, nblk, N, S, *q.stride()[:4], *dt.stride(), *sa, ANG_PER_HEAD=per_head, R=R, ROWS=rows,
            BLOCK_N2=BN2, num_warps=MIMO_PREP_BWD_WARPS)
    heads = lambda d: d.view(B, T, R, G, H // G, N).sum(4, dtype=torch.float32)
    if not per_head:
        dangl = dangl.view(B, T, G, H // G, S).sum((2, 3))
    return heads(dQS), heads(dK_S), dtot, ddtl, dangl, dcs, dqb.sum((0, 1)), dkb.sum((0, 1))


def same_time_block_bwd(dW, q, k, q_bias, k_bias, dt, trap):
    """Back through the same-time block W[r, j] = (gamma - c [j < r]) M[r, j] + D [r = j] (gamma, c
    per (token, head) as in _row_coeffs; M[r, j] = <q_r + q_bias_r, k_j + k_bias_j>), in PyTorch on
    the [B, T, H, R, R] tensors (M from four products that keep the bias terms apart, so no
    [B, T, R, H, N] tensor is formed): with A = dW (gamma - c [j < r]),
    d q_r = sum_j A[r, j] (k_j + k_bias_j) and d k_r = sum_j A[j, r] (q_j + q_bias_j), summed over
    each group's heads. Returns (dq, dk [B, T, R, G, N], d q_bias, d k_bias [H, R, N], d gamma,
    d c [B, T, H]), all fp32."""
    B, T, R, G, N = q.shape
    H = dt.shape[2]
    _, gamma, cs = trapezoid_coeffs(dt.float(), trap.float())
    lower = torch.ones(R, R, device=dW.device, dtype=torch.bool).tril(-1)         # [r, j]: j < r
    ty = q.dtype                   # half precision: tensor-core products with fp32 accumulation
    qb32, kb32 = q_bias.float().view(G, H // G, R, N), k_bias.float().view(G, H // G, R, N)
    qb, kb = qb32.to(ty), kb32.to(ty)
    qf, kf = q.to(ty), k.to(ty)
    ein = lambda eq, a, b: torch.einsum(eq, a, b).float()
    M = (ein("btrgn,btjgn->btgrj", qf, kf).unsqueeze(3) + ein("btrgn,gxjn->btgxrj", qf, kb)
         + ein("gxrn,btjgn->btgxrj", qb, kf) + ein("gxrn,gxjn->gxrj", qb32, kb32))
    dwm = dW * M.reshape(B, T, H, R, R)
    dgam = dwm.sum((-2, -1))
    dc = -(dwm * lower).sum((-2, -1))
    A = (dW * (gamma[..., None, None] - cs[..., None, None] * lower)).view(B, T, G, H // G, R, R)
    A_heads = A.sum(3)                                                              # [B, T, G, R, R]
    A_tokens = A.sum((0, 1)).float()                                                # [G, H/G, R, R]
    A, A_heads = A.to(ty), A_heads.to(ty)
    dq = ein("btgrj,btjgn->btrgn", A_heads, kf) + ein("btgxrj,gxjn->btrgn", A, kb)
    dk = ein("btgjr,btjgn->btrgn", A_heads, qf) + ein("btgxjr,gxjn->btrgn", A, qb)
    dqb = ein("btgxrj,btjgn->gxrn", A, kf) + torch.einsum("gxrj,gxjn->gxrn", A_tokens, kb32)
    dkb = ein("btgxjr,btjgn->gxrn", A, qf) + torch.einsum("gxjr,gxjn->gxrn", A_tokens, qb32)
    return dq, dk, dqb.reshape(H, R, N), dkb.reshape(H, R, N), dgam, dc


def mimo_core_and_prep_bwd(saved, dout, dS_final, chunk_size, eps):
    """The whole backward from the saved forward tensors (see MimoFn in triton_mimo.py). Returns a
    dict of gradients (None where an input had none)."""
    (q, k, v, dA, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, z, norm_weight, th0,
     QS, KS, X, W, yc, states, dec, rows) = saved
    B, T, H, P = v.shape
    R = q.shape[2]
    dyc, dW, dz, dmo, dmz, dnw = mimo_out_bwd(dout, yc, v, mimo_x, W, z, mimo_z, mimo_o, norm_weight, eps)
    dAx = torch.nn.functional.pad(dA.float().unsqueeze(2), (0, 0, 0, R - 1)).reshape(B, T * R, H)
    dQS, dKS, dxc, ddAx, dS0 = ssd_core_bwd(QS, KS, X, dAx, dyc, states, dec, dS_final,
                                            chunk_size * R, dv_dtype=torch.float32, dqk_dtype=QS.dtype)
    dx, dpsi = mimo_x_bwd(dxc, dyc, W, v, mimo_x)
    dq, dk, dtot, ddt_loc, dang_loc, dcs, dqb, dkb = mimo_prep_bwd(q, k, q_bias, k_bias, dt, trap, angles, th0,
                                                                   rows, dQS, dKS)
    dq_w, dk_w, dqb_w, dkb_w, dgam_w, dc_w = same_time_block_bwd(dW, q, k, q_bias, k_bias, dt, trap)
    dq, dk, dqb, dkb = (dq + dq_w).to(q.dtype), (dk + dk_w).to(k.dtype), dqb + dqb_w, dkb + dkb_w
    dcs = dcs + dc_w
    dgam = dcs + dgam_w
    ddt, dtrap, dang, dtheta0 = phase_dt_bwd(dtot, ddt_loc, dang_loc, angles, dgam, dcs, trap, dt, rows)
    dD = torch.diagonal(dW, dim1=-2, dim2=-1).sum((0, 1, 3))
    return dict(q=dq, k=dk, v=dx, dA=ddAx.view(B, T, R, H)[:, :, 0], dt=ddt, trap=dtrap, q_bias=dqb, k_bias=dkb,
                angles=dang, mimo_x=dpsi, mimo_z=dmz, mimo_o=dmo, D=dD, z=dz, norm_weight=dnw, S0=dS0,
                a0=dtheta0)
