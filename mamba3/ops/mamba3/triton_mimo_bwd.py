"""Triton backward of the fused Mamba-3 MIMO forward (triton_mimo_fwd.py), stage by stage in reverse.

  1. ``_mimo_out_bwd_kernel``: back through the rank sum, gate and norm of the epilogue (the per-rank
     outputs Y[r] = core[r] + sum_j W[r, j] X[j] are recomputed): d core rows, dW [B, T, H, R, R],
     dz, and per-program partial sums for mimo_o, mimo_z and the norm weight;
  2. the SISO core backward (``ssd_core_bwd``) on the T*R rows: d QS, d KS, d X, d dA rows;
  3. ``_mimo_x_bwd_kernel``: d X[j] = d X_core[j] + sum_r W[r, j] d Y[r], then dx = sum_j psi_j dX[j]
     and partial sums for psi (mimo_x);
  4. ``_mimo_prep_bwd_kernel``: back through the rotation, biases, the trapezoid scale and the
     same-time block, one program per (block of tokens, batch, q/k group, rank) looping over the
     group's heads (dq, dk summed there); the phase terms (as _prep_bwd_kernel) are per-rank partials
     summed after, then ``phase_dt_bwd`` finishes d dt, d trap and d angles.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch import fast_launch

from .triton_mimo_fwd import _biased_halves, _rank_output, _rank_rows, _token_block
from .triton_siso_bwd import _head_rotation, _shared_rate, phase_dt_bwd, ssd_core_bwd
from .triton_siso_fwd import _row_coeffs, nonempty

MIMO_BWD_TOKENS = 16      # tokens per program of the epilogue and X backward kernels
MIMO_PREP_BWD_WARPS = 4   # H100, 8x2048, R=4 fwd+bwd (gpu_mimo_fwd_sweep.py --bwd): 1: 24.4 ms, 2: 13.4, 4: 11.7,
                          # 8: 13.9


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
def _mimo_prep_bwd_kernel(Q, K, QB, KB, DT, TRAP, ANG, TH0, dQS, dKS, DW, DQ, DK, DTOT, DDTL, DANGL, DCS, DGAM,
                          DQB, DKB, B, T, H, G, nblk, N, S, sqb, sqt, sqr, sqg, sdb, sdt, sdh, sab, sat, sah,
                          ANG_PER_HEAD: tl.constexpr, HG: tl.constexpr, R: tl.constexpr, ROWS: tl.constexpr,
                          BLOCK_N2: tl.constexpr):
    """Rank r of ROWS tokens of one (batch, q/k group), looping over the group's HG heads.
    In: dQS, dKS rows [B, T*R, H, N]; DW [B, T, H, R, R] fp32. Out (fp32 unless noted):
      DQ, DK [B, T, R, G, N] (q's dtype): the gradients of q_r, k_r summed over the heads;
      per-rank partials (leading axis R) of: DTOT [R, B, H, S, nblk] (block sums of d theta, reversed
      block order as in _prep_bwd_kernel), DDTL [R, B, T, H], DANGL ([R, B, T, G, S]; per-head
      angles [R, B, T, H, S]), DCS = d c and DGAM = d gamma (with d c) [R, B, T, H];
      DQB, DKB [nblk, B, H, R, N]: the bias gradients' sums over the block's tokens."""
    blk = tl.program_id(0)
    pid = tl.program_id(1)
    r = pid % R
    bg = pid // R
    b = bg // G
    g = bg % G
    half = N // 2
    i = tl.arange(0, BLOCK_N2)
    rot = i < S
    t = blk * ROWS + tl.arange(0, ROWS)
    tm = t < T
    m = tm[:, None] & (i[None, :] < half)
    bt = (b * T + t).to(tl.int64)
    acc_ql = tl.zeros([ROWS, BLOCK_N2], dtype=tl.float32)
    acc_qh = tl.zeros([ROWS, BLOCK_N2], dtype=tl.float32)
    acc_kl = tl.zeros([ROWS, BLOCK_N2], dtype=tl.float32)
    acc_kh = tl.zeros([ROWS, BLOCK_N2], dtype=tl.float32)
    acc_ang = tl.zeros([ROWS, BLOCK_N2], dtype=tl.float32)
    shared = acc_ang
    if not ANG_PER_HEAD:   # shared by the heads: the rate once per program
        shared = _shared_rate(ANG, b, t, T, S, sab, sat, BLOCK_N2)
    for hl in range(HG):
        h = g * HG + hl
        dt, gamma, cs = _row_coeffs(DT, TRAP, b, h, t, T, sdb, sdt, sdh)
        cos, sin, rate = _head_rotation(ANG, TH0, dt, shared, b, h, t, T, S, H, nblk, blk, sab, sat, sah,
                                        ANG_PER_HEAD, BLOCK_N2)
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
        dth = tl.where(rot[None, :], qlo * uhi - qhi * ulo + klo * whi - khi * wlo, 0.0)
        # same-time block W[r, j] = (gamma - c [j < r]) M[r, j] + D [r = j], M[r, j] = <q_r, k_j>:
        # this program owns row r (d gamma, d c) and both row r and column r for d q_r, d k_r
        dgam = tl.zeros([ROWS], dtype=tl.float32)
        wrow = DW + (bt * H + h) * R * R
        for j in tl.static_range(R):
            dw_rj = tl.load(wrow + r * R + j, mask=tm, other=0.0)
            dw_jr = tl.load(wrow + j * R + r, mask=tm, other=0.0)
            kjlo, kjhi = _biased_halves(K, KB, b, t, j, g, h, T, half, sqb, sqt, sqr, sqg, R, BLOCK_N2)
            qjlo, qjhi = _biased_halves(Q, QB, b, t, j, g, h, T, half, sqb, sqt, sqr, sqg, R, BLOCK_N2)
            m_rj = tl.sum(qlo * kjlo + qhi * kjhi, axis=1)
            dgam += dw_rj * m_rj
            if j < r:                                # W[r, j] = (gamma - c) M[r, j]; W[j, r] = gamma M[j, r]
                dc -= dw_rj * m_rj
                a_rj = (dw_rj * (gamma - cs))[:, None]
                a_jr = (dw_jr * gamma)[:, None]
            elif j > r:
                a_rj = (dw_rj * gamma)[:, None]
                a_jr = (dw_jr * (gamma - cs))[:, None]
            else:
                a_rj = (dw_rj * gamma)[:, None]
                a_jr = a_rj
            ulo += a_rj * kjlo
            uhi += a_rj * kjhi
            wlo += a_jr * qjlo
            whi += a_jr * qjhi
        acc_ql += ulo
        acc_qh += uhi
        acc_kl += wlo
        acc_kh += whi
        prior = tl.cumsum(dth, axis=0) - dth
        tl.store(DTOT + (((r * B + b) * H + h) * S + i) * nblk + nblk - 1 - blk, tl.sum(dth, axis=0), mask=rot)
        ht = (r * B * T + bt) * H + h
        tl.store(DDTL + ht, -tl.sum(prior * rate, axis=1), mask=tm)
        if ANG_PER_HEAD:
            tl.store(DANGL + ht[:, None] * S + i[None, :], -dt[:, None] * prior, mask=tm[:, None] & rot[None, :])
        else:
            acc_ang -= dt[:, None] * prior
        tl.store(DCS + ht, dc, mask=tm)
        tl.store(DGAM + ht, dc + dgam, mask=tm)
        pb = (((blk * B + b) * H + h) * R + r) * N + i
        tl.store(DQB + pb, tl.sum(ulo, axis=0), mask=i < half)
        tl.store(DQB + pb + half, tl.sum(uhi, axis=0), mask=i < half)
        tl.store(DKB + pb, tl.sum(wlo, axis=0), mask=i < half)
        tl.store(DKB + pb + half, tl.sum(whi, axis=0), mask=i < half)
    go = ((bt[:, None] * R + r) * G + g) * N + i[None, :]
    tl.store(DQ + go, acc_ql.to(DQ.dtype.element_ty), mask=m)
    tl.store(DQ + go + half, acc_qh.to(DQ.dtype.element_ty), mask=m)
    tl.store(DK + go, acc_kl.to(DK.dtype.element_ty), mask=m)
    tl.store(DK + go + half, acc_kh.to(DK.dtype.element_ty), mask=m)
    if not ANG_PER_HEAD:
        tl.store(DANGL + ((r * B * T + bt[:, None]) * G + g) * S + i[None, :], acc_ang,
                 mask=tm[:, None] & rot[None, :])


def mimo_out_bwd(dout, yc, v, mimo_x, W, z, mimo_z, mimo_o, norm_weight, eps):
    """Launch :func:`_mimo_out_bwd_kernel`. Returns (d core rows [B, T*R, H, P] in yc's dtype, dW
    fp32, dz or None, d mimo_o, d mimo_z or None [H, R, P] fp32, d norm weight [H, P] fp32 or None)."""
    B, T, H, P = v.shape
    R = mimo_x.shape[1]
    npt = triton.cdiv(T, MIMO_BWD_TOKENS)
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
                                           TOK=MIMO_BWD_TOKENS, BLOCK_P=max(16, triton.next_power_of_2(P)),
                                           num_warps=4)
    return (dyc, dW, dz, dmo.sum(0), None if z is None else dmz.sum(0),
            None if norm_weight is None else dnw.sum(0))


def mimo_x_bwd(dxc, dyc, W, v, mimo_x):
    """Launch :func:`_mimo_x_bwd_kernel`. Returns (dx in v's dtype, d mimo_x [H, R, P] fp32)."""
    B, T, H, P = v.shape
    R = mimo_x.shape[1]
    npt = triton.cdiv(T, MIMO_BWD_TOKENS)
    dx = torch.empty_like(v)
    dpsi = torch.zeros(B * npt, H, R, P, device=v.device, dtype=torch.float32)
    if B * T * H:
        _mimo_x_bwd_kernel[(npt, B * H)](dxc, dyc, W, v, mimo_x.contiguous(), dx, dpsi, T, H, P, npt, R=R,
                                         TOK=MIMO_BWD_TOKENS, BLOCK_P=max(16, triton.next_power_of_2(P)),
                                         num_warps=4)
    return dx, dpsi.sum(0)


def mimo_prep_bwd(q, k, q_bias, k_bias, dt, trap, angles, th0, rows, dQS, dK_S, dW):
    """Launch :func:`_mimo_prep_bwd_kernel` (raw inputs contiguous as in the forward; grid (blocks,
    B*G*R)) and sum its per-rank partials. Returns (dq, dk [B, T, R, G, N] in q's dtype; dtot
    [B, H, S, nblk] (reversed blocks), ddt_local [B, T, H], dang_local ([B, T, S] or per head
    [B, T, H, S]), dc, dgamma [B, T, H], all fp32; d q_bias, d k_bias [H, R, N] fp32)."""
    B, T, R, G, N = q.shape
    H = dt.shape[2]
    S = angles.shape[-1]
    nblk = th0.shape[2]
    per_head = angles.dim() == 4
    f32 = dict(device=dt.device, dtype=torch.float32)
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dtot = torch.zeros(R, B, H, S, nblk, **f32)
    ddtl, dcs, dgam = (torch.empty(R, B, T, H, **f32) for _ in range(3))
    dangl = torch.zeros(R, B, T, H, S, **f32) if per_head else torch.zeros(R, B, T, G, S, **f32)
    dqb, dkb = torch.zeros(nblk, B, H, R, N, **f32), torch.zeros(nblk, B, H, R, N, **f32)
    sa = (angles.stride(0), angles.stride(1), angles.stride(2) if per_head else 0)
    BN2 = max(16, triton.next_power_of_2(N // 2))
    if B * T * H:
        _mimo_prep_bwd_kernel[(nblk, B * G * R)](
            q, k, q_bias.float().contiguous(), k_bias.float().contiguous(), dt, trap, nonempty(angles, dt),
            nonempty(th0, dt), dQS, dK_S, dW, dq, dk, nonempty(dtot, dcs), ddtl, nonempty(dangl, dcs), dcs, dgam,
            dqb, dkb, B, T, H, G, nblk, N, S, *q.stride()[:4], *dt.stride(), *sa, ANG_PER_HEAD=per_head,
            HG=H // G, R=R, ROWS=rows, BLOCK_N2=BN2, num_warps=MIMO_PREP_BWD_WARPS)
    dangl = dangl.sum(0) if per_head else dangl.sum((0, 3))
    return (dq, dk, dtot.sum(0), ddtl.sum(0), dangl, dcs.sum(0), dgam.sum(0), dqb.sum((0, 1)),
            dkb.sum((0, 1)))


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
    dq, dk, dtot, ddt_loc, dang_loc, dcs, dgam, dqb, dkb = mimo_prep_bwd(q, k, q_bias, k_bias, dt, trap, angles,
                                                                         th0, rows, dQS, dKS, dW)
    ddt, dtrap, dang, dtheta0 = phase_dt_bwd(dtot, ddt_loc, dang_loc, angles, dgam, dcs, trap, dt, rows)
    dD = torch.diagonal(dW, dim1=-2, dim2=-1).sum((0, 1, 3))
    return dict(q=dq, k=dk, v=dx, dA=ddAx.view(B, T, R, H)[:, :, 0], dt=ddt, trap=dtrap, q_bias=dqb, k_bias=dkb,
                angles=dang, mimo_x=dpsi, mimo_z=dmz, mimo_o=dmo, D=dD, z=dz, norm_weight=dnw, S0=dS0,
                a0=dtheta0)
