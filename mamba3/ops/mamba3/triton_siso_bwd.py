"""Triton backward kernels of the chunked SSD core (see triton_siso_fwd.py for the forward).

Given dY [B, T, H, P] and the gradient of the final state, mirrors the forward's three launches:
    1. _chunk_dstate_kernel grid (chunks, B*H): dS_c^out = sum_t exp(ell_t) dY_t Q_t^T, the
       gradient that chunk c's outputs send to the state entering it
    2. _dstate_scan_kernel  grid (P*N blocks, B*H): reverse pass; overwrites slot c with G_c, the
       gradient w.r.t. the state leaving chunk c; the gradient of the initial state in fp32
    3. _chunk_bwd_kernel    grid (chunks, B*H): dQ, dK, dV and d(dA) of every chunk from the
       saved entering states S_c and G_c (intra-chunk, inter-chunk and state-building terms)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_siso_fwd import (_chunk_coeffs, _chunk_phase, _interleave, _load_chunk, _load_ell, _rotated_pairs,
                              _split_pairs, chunk_warps, dot_precision, nonempty, static_loop)


@triton.jit
def _chunk_dstate_kernel(Q, dY, dA, GS, T, H, nc, N, P,
                         sqb, sqt, sqh, syb, syt, syh, sdb, sdt, sdh,
                         CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
                         PREC: tl.constexpr):
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    q = _load_chunk(Q, b, h, c, T, sqb, sqt, sqh, CHUNK, BLOCK_N, N)
    dy = _load_chunk(dY, b, h, c, T, syb, syt, syh, CHUNK, BLOCK_P, P)
    ell = _load_ell(dA, b, h, c, T, sdb, sdt, sdh, CHUNK)
    dyw = (dy.to(tl.float32) * tl.exp(ell)[:, None]).to(q.dtype)
    ds = tl.dot(tl.trans(dyw), q, input_precision=PREC)                 # [P, N]
    p = tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    tl.store(GS + (bh * nc + c) * P * N + p[:, None] * N + n[None, :], ds.to(GS.dtype.element_ty),
             mask=(p[:, None] < P) & (n[None, :] < N))


@triton.jit
def _dscan_step(GS, DEC, carry, bh, c, nc, PN, offs, mask):
    """Chunks c, c-1, c-2, c-3 (those >= 0): all loads first (see the forward's _scan_step)."""
    base = GS + bh * nc * PN + offs
    cv = offs * 0 + c  # vector chunk index: `vector mask & scalar bool` is rejected by newer interpreters
    m0, m1, m2, m3 = mask & (cv >= 0), mask & (cv >= 1), mask & (cv >= 2), mask & (cv >= 3)
    l0 = tl.load(base + c * PN, mask=m0, other=0.0).to(tl.float32)
    l1 = tl.load(base + (c - 1) * PN, mask=m1, other=0.0).to(tl.float32)
    l2 = tl.load(base + (c - 2) * PN, mask=m2, other=0.0).to(tl.float32)
    l3 = tl.load(base + (c - 3) * PN, mask=m3, other=0.0).to(tl.float32)
    d0 = tl.exp(tl.load(DEC + bh * nc + c, mask=c >= 0, other=0.0))
    d1 = tl.exp(tl.load(DEC + bh * nc + c - 1, mask=c >= 1, other=0.0))
    d2 = tl.exp(tl.load(DEC + bh * nc + c - 2, mask=c >= 2, other=0.0))
    d3 = tl.exp(tl.load(DEC + bh * nc + c - 3, mask=c >= 3, other=0.0))
    dt_ = GS.dtype.element_ty
    tl.store(base + c * PN, carry.to(dt_), mask=m0)
    carry = l0 + d0 * carry
    tl.store(base + (c - 1) * PN, carry.to(dt_), mask=m1)
    carry = l1 + d1 * carry
    tl.store(base + (c - 2) * PN, carry.to(dt_), mask=m2)
    carry = l2 + d2 * carry
    tl.store(base + (c - 3) * PN, carry.to(dt_), mask=m3)
    return l3 + d3 * carry


@triton.jit
def _dstate_scan_kernel(GS, DEC, dSF, dS0, nc, PN, HAS_DSF: tl.constexpr, BLOCK: tl.constexpr,
                        NC_STATIC: tl.constexpr):
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < PN
    if HAS_DSF:
        carry = tl.load(dSF + bh * PN + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros([BLOCK], dtype=tl.float32)
    if NC_STATIC > 0:
        for i in range((NC_STATIC + 3) // 4):
            carry = _dscan_step(GS, DEC, carry, bh, NC_STATIC - 1 - 4 * i, nc, PN, offs, mask)
    else:
        for i in range(0, tl.cdiv(nc, 4)):
            carry = _dscan_step(GS, DEC, carry, bh, nc - 1 - 4 * i, nc, PN, offs, mask)
    tl.store(dS0 + bh * PN + offs, carry, mask=mask)


@triton.jit
def _store_chunk(ptr, x, b, h, c, T, stride_b, stride_t, stride_h, CHUNK: tl.constexpr,
                 BLOCK: tl.constexpr, DIM):
    t = c * CHUNK + tl.arange(0, CHUNK)
    d = tl.arange(0, BLOCK)
    mask = (t[:, None] < T) & (d[None, :] < DIM)
    tl.store(ptr + b * stride_b + t[:, None] * stride_t + h * stride_h + d[None, :],
             x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _chunk_bwd_kernel(Q, K, V, dA, dY, ST, GS, SKIP, dQ, dK, dV, ddA, T, H, nc, N, P,
                      sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh, syb, syt, syh,
                      HAS_SKIP: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_P: tl.constexpr, PREC: tl.constexpr):
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    q = _load_chunk(Q, b, h, c, T, sqb, sqt, sqh, CHUNK, BLOCK_N, N)
    k = _load_chunk(K, b, h, c, T, skb, skt, skh, CHUNK, BLOCK_N, N)
    v = _load_chunk(V, b, h, c, T, svb, svt, svh, CHUNK, BLOCK_P, P)
    dy = _load_chunk(dY, b, h, c, T, syb, syt, syh, CHUNK, BLOCK_P, P)
    ell = _load_ell(dA, b, h, c, T, sdb, sdt, sdh, CHUNK)
    i = tl.arange(0, CHUNK)
    last = tl.sum(tl.where(i == CHUNK - 1, ell, 0.0), axis=0)
    p = tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    pn = (bh * nc + c) * P * N + p[:, None] * N + n[None, :]
    pn_mask = (p[:, None] < P) & (n[None, :] < N)
    s = tl.load(ST + pn, mask=pn_mask, other=0.0)                       # state entering chunk c
    g = tl.load(GS + pn, mask=pn_mask, other=0.0).to(tl.float32)        # d(state leaving chunk c)
    dt = q.dtype

    strict = i[:, None] > i[None, :]
    decay = tl.exp(tl.where(strict, ell[:, None] - ell[None, :], -float("inf")))
    a = tl.dot(q, tl.trans(k), input_precision=PREC) * decay           # masked scores [t, s]
    dp = tl.dot(dy, tl.trans(v), input_precision=PREC)                 # dO_t . V_s
    dsc = dp * decay
    wk = tl.exp(last - ell)
    kw = (k.to(tl.float32) * wk[:, None]).to(dt)
    u = tl.dot(kw, tl.trans(g.to(dt)), input_precision=PREC)           # [C, P] state-building
    dv = tl.dot(tl.trans(a.to(dt)), dy, input_precision=PREC) + u
    eq = tl.exp(ell)
    dq = tl.dot(dsc.to(dt), k, input_precision=PREC) \
        + eq[:, None] * tl.dot(dy, s.to(dt), input_precision=PREC)
    dk = tl.dot(tl.trans(dsc.to(dt)), q, input_precision=PREC) \
        + wk[:, None] * tl.dot(v, g.to(dt), input_precision=PREC)

    # d ell: intra (rows gain, columns lose), inter, state building, chunk decay
    gm = dp * a
    dl = tl.sum(gm, axis=1) - tl.sum(gm, axis=0)
    inter = tl.dot(q, tl.trans(s.to(dt)), input_precision=PREC) * eq[:, None]
    dl += tl.sum(dy.to(tl.float32) * inter, axis=1)
    term = tl.sum(v.to(tl.float32) * u, axis=1)
    dl -= term
    dlast = tl.sum(term, axis=0) + tl.exp(last) * tl.sum(tl.sum(g * s.to(tl.float32), axis=1), axis=0)
    # ell_t = sum_{r<=t} dA_r  ->  d dA_r = sum_{t>=r} d ell_t ; ell_last depends on every dA_r
    dda = tl.sum(dl, axis=0) - tl.cumsum(dl, axis=0) + dl + dlast

    _store_chunk(dQ, dq, b, h, c, T, sqb, sqt, sqh, CHUNK, BLOCK_N, N)
    _store_chunk(dK, dk, b, h, c, T, skb, skt, skh, CHUNK, BLOCK_N, N)
    t = c * CHUNK + i
    if HAS_SKIP:   # y_t += skip_t x_t (skip [B, T, H] fp32, dA's layout)
        skip = tl.load(SKIP + b * sdb + t * sdt + h * sdh, mask=t < T, other=0.0)
        dv += skip[:, None] * dy.to(tl.float32)
    _store_chunk(dV, dv, b, h, c, T, svb, svt, svh, CHUNK, BLOCK_P, P)
    tl.store(ddA + b * sdb + t * sdt + h * sdh, dda, mask=t < T)


def ssd_core_bwd(Q, K, V, dA, dY, states, dec, dSF, chunk_size: int, skip=None, dv_dtype=torch.float32):
    """Gradients of :func:`ssd_core_fwd`: (dQ, dK fp32, dV in ``dv_dtype``, in the inputs' layouts,
    d dA fp32, d initial state fp32 [B, H, P, N]). ``states`` are the forward's entering states; Q,
    K, V, dA, dY must be contiguous (dY in Q's dtype). ``skip`` [B, T, H] fp32 (dA's layout): the
    output also had skip_t V_t, so dV gets skip_t dY_t."""
    B, T, H, N = Q.shape
    P = V.shape[-1]
    C = chunk_size
    nc = states.shape[2]
    gs = torch.empty_like(states)
    dS0 = torch.empty(B, H, P, N, device=Q.device, dtype=torch.float32)
    dQ = torch.empty(Q.shape, device=Q.device, dtype=torch.float32)
    dK = torch.empty(K.shape, device=Q.device, dtype=torch.float32)
    dV = torch.empty(V.shape, device=Q.device, dtype=dv_dtype)
    ddA = torch.empty(dA.shape, device=Q.device, dtype=torch.float32)
    BN, BP = max(16, triton.next_power_of_2(N)), max(16, triton.next_power_of_2(P))
    prec = dot_precision(Q.dtype)
    nw = chunk_warps(C, BN, BP, prec)
    _chunk_dstate_kernel[(nc, B * H)](Q, dY, dA, gs, T, H, nc, N, P, *Q.stride()[:3], *dY.stride()[:3],
                                      *dA.stride(), CHUNK=C, BLOCK_N=BN, BLOCK_P=BP, PREC=prec,
                                      num_warps=nw)
    PN = P * N
    BLOCK = min(512, triton.next_power_of_2(PN))
    dsf = dSF if dSF is not None else dS0
    _dstate_scan_kernel[(triton.cdiv(PN, BLOCK), B * H)](gs, dec, dsf, dS0, nc, PN,
                                                        HAS_DSF=dSF is not None, BLOCK=BLOCK,
                                                        NC_STATIC=static_loop(nc), num_warps=4)
    # dQ/dK/dV/ddA are fresh contiguous tensors with Q/K/V/dA's shapes, so the same strides apply
    _chunk_bwd_kernel[(nc, B * H)](Q, K, V, dA, dY, states, gs, ddA if skip is None else skip, dQ, dK, dV, ddA,
                                   T, H, nc, N, P, *Q.stride()[:3], *K.stride()[:3], *V.stride()[:3],
                                   *dA.stride(), *dY.stride()[:3], HAS_SKIP=skip is not None, CHUNK=C,
                                   BLOCK_N=BN, BLOCK_P=BP, PREC=prec, num_warps=nw)
    return dQ, dK, dV, ddA, dS0


@triton.jit
def _gate_bwd_kernel(DY, Z, YPRE, V, DO, DZ, DSKIP, M, P,
                     HAS_Z: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr):
    """Rows m of [M, P] (M = B T H, all contiguous): y = ypre * silu(z) backward and the skip
    sum, in one pass. dO = dy z sigmoid(z) (dy without z), dz = dy ypre sg (1 + z (1 - sg)),
    dskip[m] = sum_p dO v (fp32, from the unrounded dO)."""
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    p = tl.arange(0, BLOCK_P)
    mask = (m[:, None] < M) & (p[None, :] < P)
    off = m.to(tl.int64)[:, None] * P + p[None, :]
    dy = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(Z + off, mask=mask, other=0.0).to(tl.float32)
        sg = tl.sigmoid(z)
        do = dy * z * sg
        ypre = tl.load(YPRE + off, mask=mask, other=0.0).to(tl.float32)
        tl.store(DZ + off, (dy * ypre * sg * (1.0 + z * (1.0 - sg))).to(DZ.dtype.element_ty), mask=mask)
    else:
        do = dy
    tl.store(DO + off, do.to(DO.dtype.element_ty), mask=mask)
    v = tl.load(V + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(DSKIP + m, tl.sum(do * v, axis=1), mask=m < M)


def gate_bwd(dy, z, ypre, v, do_dtype):
    """Launch :func:`_gate_bwd_kernel`: (dO [B, T, H, P] in ``do_dtype``, dz in z's dtype or None,
    dskip [B, T, H] fp32). v, z, ypre contiguous [B, T, H, P]; dy any layout of that shape."""
    B, T, H, P = v.shape
    M = B * T * H
    dy = dy.contiguous()
    do = torch.empty(v.shape, device=v.device, dtype=do_dtype)
    dz = None if z is None else torch.empty_like(z)
    dskip = torch.empty(B, T, H, device=v.device, dtype=torch.float32)
    BP = triton.next_power_of_2(P)
    BM = max(1, 4096 // BP)
    if M:
        _gate_bwd_kernel[(triton.cdiv(M, BM),)](dy, dy if z is None else z, dy if z is None else ypre, v, do,
                                               do if dz is None else dz, dskip, M, P, HAS_Z=z is not None,
                                               BLOCK_M=BM, BLOCK_P=BP, num_warps=8)
    return do, dz, dskip


@triton.jit
def _prep_bwd_kernel(Q, K, QB, KB, DT, TRAP, ANG, TH0, dQ, dK, DSKIP, DQH, DKH, DTH, DCS, DGAM, DQB, DKB,
                     T, H, G, nc, N, S, sqb, sqt, sqg, sdb, sdt, sdh, sab, sat, sah,
                     CHUNK: tl.constexpr, BLOCK_N2: tl.constexpr):
    """Back through the per-token preparation of one chunk: from dQ (rotated q) and dK (rotated,
    scaled k) [B, T, H, N] fp32 and d(skip) [B, T, H] to the per-head gradients of the biased,
    un-rotated q and k (DQH, DKH [B, T, H, N]) and their sums over the chunk's tokens (the bias
    gradients' partials DQB, DKB [B, nc, H, N]), of the phase (DTH [B, T, H, S]), of the scale c
    (DCS) and of gamma through the skip (DGAM = DCS + dskip <q + q_bias, k + k_bias>) [B, T, H]."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    g = h // (H // G)
    t = c * CHUNK + tl.arange(0, CHUNK)
    tm = t < T
    dt, gamma, cs = _chunk_coeffs(DT, TRAP, b, h, c, T, sdb, sdt, sdh, CHUNK)
    cos, sin = _chunk_phase(ANG, TH0, dt, b, bh, c, T, nc, S, sab, sat, sah, h, CHUNK, BLOCK_N2)
    qe, qo, qre, qro = _rotated_pairs(Q, QB, b, g, h, t, T, N, sqb, sqt, sqg, cos, sin, BLOCK_N2)
    ke, ko, kre, kro = _rotated_pairs(K, KB, b, g, h, t, T, N, sqb, sqt, sqg, cos, sin, BLOCK_N2)
    i = tl.arange(0, BLOCK_N2)
    n = tl.arange(0, 2 * BLOCK_N2)
    row = ((b * T + t) * H + h) * N
    m = tm[:, None] & (n[None, :] < N)
    # contiguous tiles split / interleaved in registers (stride-2 access is several times slower)
    dqe, dqo = _split_pairs(tl.load(dQ + row[:, None] + n[None, :], mask=m, other=0.0), CHUNK, BLOCK_N2)
    dke, dko = _split_pairs(tl.load(dK + row[:, None] + n[None, :], mask=m, other=0.0), CHUNK, BLOCK_N2)
    dcs = tl.sum(dke * kre + dko * kro, axis=1)
    dke = dke * cs[:, None]
    dko = dko * cs[:, None]
    # rotation (e, o) -> (e c - o s, e s + o c): d theta = -de' ro + do' re for q and k
    dth = qre * dqo - qro * dqe + kre * dko - kro * dke
    tl.store(DTH + ((b * T + t[:, None]) * H + h) * S + i[None, :], dth, mask=tm[:, None] & (i[None, :] < S))
    dsk = tl.load(DSKIP + (b * T + t) * H + h, mask=tm, other=0.0)
    gd = (dsk * gamma)[:, None]
    dqe_u = dqe * cos + dqo * sin + gd * ke
    dqo_u = dqo * cos - dqe * sin + gd * ko
    dke_u = dke * cos + dko * sin + gd * qe
    dko_u = dko * cos - dke * sin + gd * qo
    tl.store(DQH + row[:, None] + n[None, :], _interleave(dqe_u, dqo_u, CHUNK, 2 * BLOCK_N2), mask=m)
    tl.store(DKH + row[:, None] + n[None, :], _interleave(dke_u, dko_u, CHUNK, 2 * BLOCK_N2), mask=m)
    tl.store(DCS + (b * T + t) * H + h, dcs, mask=tm)
    qk = tl.sum(qe * ke + qo * ko, axis=1)
    tl.store(DGAM + (b * T + t) * H + h, dcs + dsk * qk, mask=tm)
    # bias gradients: this chunk's sum over tokens (masked rows are zero), interleaved back to N
    pb = ((b * nc + c) * H + h) * N + 2 * i
    tl.store(DQB + pb, tl.sum(dqe_u, axis=0), mask=2 * i < N)
    tl.store(DQB + pb + 1, tl.sum(dqo_u, axis=0), mask=2 * i + 1 < N)
    tl.store(DKB + pb, tl.sum(dke_u, axis=0), mask=2 * i < N)
    tl.store(DKB + pb + 1, tl.sum(dko_u, axis=0), mask=2 * i + 1 < N)


def prep_bwd(q, k, q_bias, k_bias, dt, trap, angles, th0, dQ, dK, dskip, chunk_size):
    """Launch :func:`_prep_bwd_kernel` (raw inputs contiguous as in the forward). Returns (dqh, dkh
    [B, T, H, N], dtheta [B, T, H, S], dc, dgamma [B, T, H], all fp32; bias gradients dq_bias,
    dk_bias [H, N] fp32)."""
    B, T, H = dt.shape
    G, N = q.shape[2], q.shape[3]
    S = angles.shape[-1]
    nc = th0.shape[2]
    f32 = dict(device=dt.device, dtype=torch.float32)
    dqh, dkh = torch.empty(B, T, H, N, **f32), torch.empty(B, T, H, N, **f32)
    dth = torch.empty(B, T, H, S, **f32)
    dcs, dgam = torch.empty(B, T, H, **f32), torch.empty(B, T, H, **f32)
    dqb, dkb = torch.empty(B, nc, H, N, **f32), torch.empty(B, nc, H, N, **f32)
    sa = (angles.stride(0), angles.stride(1), 0 if angles.dim() == 3 else angles.stride(2))
    BN2 = max(32, triton.next_power_of_2(N)) // 2
    angles, th0, dth_arg = nonempty(angles, dt), nonempty(th0, dt), nonempty(dth, dcs)
    _prep_bwd_kernel[(nc, B * H)](q, k, q_bias.float().contiguous(), k_bias.float().contiguous(), dt, trap, angles,
                                  th0, dQ, dK, dskip, dqh, dkh, dth_arg, dcs, dgam, dqb, dkb, T, H, G, nc, N, S,
                                  *q.stride()[:3], *dt.stride(), *sa, CHUNK=chunk_size, BLOCK_N2=BN2,
                                  num_warps=8)  # ptxas: 4 warps spill ~1.2 KB per thread, 8 warps ~32 B
    return dqh, dkh, dth, dcs, dgam, dqb.sum((0, 1)), dkb.sum((0, 1))
