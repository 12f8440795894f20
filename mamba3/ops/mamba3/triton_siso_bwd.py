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

from ..launch import fast_launch
from ..utils import cdiv, next_pow2

from .triton_siso_fwd import (_biased_pairs, _interleave, _load_chunk, _load_ell, _row_coeffs, _row_phase,
                              _split_pairs, _cos_sin, _tanh, chunk_warps, dot_precision, group_pipeline_depth, nonempty,
                              prep_rows, scan_block, static_loop)


@fast_launch
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


@fast_launch
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
def _walk_step(Q, dY, dA, DEC, GS, carry, b, h, bh, c, T, nc, N, P, p, sp, pm,
               sqb, sqt, sqh, syb, syt, syh, sdb, sdt, sdh, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
               PREC: tl.constexpr):
    """Chunk c of the reverse walk: store the carry (gradient of the state leaving chunk c), return
    the gradient of the state entering it."""
    t = c * CHUNK + tl.arange(0, CHUNK)
    q = _load_chunk(Q, b, h, c, T, sqb, sqt, sqh, CHUNK, BLOCK_N, N)
    dy = tl.load(dY + b * syb + t[:, None] * syt + h * syh + p[None, :], mask=(t[:, None] < T) & (p[None, :] < P),
                 other=0.0)
    ell = _load_ell(dA, b, h, c, T, sdb, sdt, sdh, CHUNK)
    dyw = (dy.to(tl.float32) * tl.exp(ell)[:, None]).to(q.dtype)
    tl.store(GS + (bh * nc + c) * P * N + sp, carry.to(GS.dtype.element_ty), mask=pm)
    return tl.dot(tl.trans(dyw), q, carry * tl.exp(tl.load(DEC + bh * nc + c)), input_precision=PREC)


@fast_launch
@triton.jit
def _dstate_walk_kernel(Q, dY, dA, DEC, GS, dSF, dS0, T, H, nc, N, P,
                        sqb, sqt, sqh, syb, syt, syh, sdb, sdt, sdh,
                        HAS_DSF: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_P: tl.constexpr, PREC: tl.constexpr, NC_STATIC: tl.constexpr):
    """_chunk_dstate_kernel and _dstate_scan_kernel in one reverse walk over the chunks of one
    (batch, head, block of BLOCK_P rows of P), the state gradient carried in registers: GS[c] = the
    gradient of the state leaving chunk c, then carry = (e^ell dY_c)^T Q_c + e^(dec_c) carry.
    For batch x heads that fill the GPU (no chunk parallelism: a serial chain per program)."""
    bh = tl.program_id(0)
    pb = tl.program_id(1)
    b = bh // H
    h = bh % H
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    pm = (p[:, None] < P) & (n[None, :] < N)
    sp = p[:, None] * N + n[None, :]
    if HAS_DSF:
        carry = tl.load(dSF + bh * P * N + sp, mask=pm, other=0.0)
    else:
        carry = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    if NC_STATIC > 0:  # interpreter: loop bounds must be Python ints
        for r in range(NC_STATIC):
            carry = _walk_step(Q, dY, dA, DEC, GS, carry, b, h, bh, NC_STATIC - 1 - r, T, nc, N, P, p, sp, pm,
                               sqb, sqt, sqh, syb, syt, syh, sdb, sdt, sdh, CHUNK, BLOCK_N, PREC)
    else:
        for r in range(nc):
            carry = _walk_step(Q, dY, dA, DEC, GS, carry, b, h, bh, nc - 1 - r, T, nc, N, P, p, sp, pm,
                               sqb, sqt, sqh, syb, syt, syh, sdb, sdt, sdh, CHUNK, BLOCK_N, PREC)
    tl.store(dS0 + bh * P * N + sp, carry, mask=pm)


WALK_MIN_PROGRAMS = 128   # batch x heads from which the state-gradient pass is one reverse walk per
                          # (batch, head) instead of the chunk-parallel local sums + scan (H100, config A,
                          # benchmarks/gpu_state_grad_walk.py: pass 0.085 vs 0.155 ms at B x H = 128, 0.24
                          # vs 0.23 at 64)
WALK_P_SPLIT = 1          # programs per (batch, head) of the walk, each a block of P rows (H100 fwd+bwd, 8x2048 /
                          # 16x2048: 1.81 / 3.52 ms vs 1.86 / 3.63 at 2, equal at 4x2048: gpu_bwd_sweep_s13c.json)
WALK_NUM_STAGES = 2       # its pipelining depth with 16-bit operands
WALK_SMALL_MIN = 64       # from 64 on (below WALK_MIN_PROGRAMS) the walk with WALK_SMALL_P_SPLIT P blocks
WALK_SMALL_P_SPLIT = 4    # (H100, 2x8192, fwd+bwd 2.10 vs 2.13 ms; at 1x16384, 32 (b, h), 2.30 vs 2.27: not
                          # there; benchmarks/results/gpu_bwd_sweep_s10.json)


def walk_split(BH: int, BP: int) -> int:
    """P blocks per (batch, head) of the reverse state-gradient walk, or 0 for the chunk-parallel
    local sums + scan (too few (batch, head) pairs to fill the GPU with a serial walk)."""
    if BH >= WALK_MIN_PROGRAMS:
        ps = WALK_P_SPLIT
    elif BH >= WALK_SMALL_MIN:
        ps = WALK_SMALL_P_SPLIT
    else:
        return 0
    return max(1, min(ps, BP // 16))


@triton.jit
def _store_chunk(ptr, x, b, h, c, T, stride_b, stride_t, stride_h, CHUNK: tl.constexpr,
                 BLOCK: tl.constexpr, DIM):
    t = c * CHUNK + tl.arange(0, CHUNK)
    d = tl.arange(0, BLOCK)
    mask = (t[:, None] < T) & (d[None, :] < DIM)
    tl.store(ptr + b * stride_b + t[:, None] * stride_t + h * stride_h + d[None, :],
             x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_cols(ptr, b, h, c, T, stride_b, stride_t, stride_h, n0, CHUNK: tl.constexpr, BLOCK: tl.constexpr, DIM):
    """[CHUNK, BLOCK] tile of columns n0 .. n0 + BLOCK of a [B, T, H, DIM] tensor, zero-padded."""
    t = c * CHUNK + tl.arange(0, CHUNK)
    d = n0 + tl.arange(0, BLOCK)
    return tl.load(ptr + b * stride_b + t[:, None] * stride_t + h * stride_h + d[None, :],
                   mask=(t[:, None] < T) & (d[None, :] < DIM), other=0.0)


@triton.jit
def _store_cols(ptr, x, b, h, c, T, stride_b, stride_t, stride_h, n0, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                DIM):
    t = c * CHUNK + tl.arange(0, CHUNK)
    d = n0 + tl.arange(0, BLOCK)
    tl.store(ptr + b * stride_b + t[:, None] * stride_t + h * stride_h + d[None, :], x.to(ptr.dtype.element_ty),
             mask=(t[:, None] < T) & (d[None, :] < DIM))


@triton.jit
def _state_cols(ptr, base, P, N, n0, BLOCK_P: tl.constexpr, BLOCK: tl.constexpr):
    """[BLOCK_P, BLOCK] columns n0 .. n0 + BLOCK of the [P, N] state at ``base``."""
    p = tl.arange(0, BLOCK_P)
    n = n0 + tl.arange(0, BLOCK)
    return tl.load(ptr + base + p[:, None] * N + n[None, :], mask=(p[:, None] < P) & (n[None, :] < N), other=0.0)


@fast_launch
@triton.jit
def _chunk_bwd_kernel(Q, K, V, dA, dY, ST, GS, SKIP, DSKIP, dQ, dK, dV, ddA, T, H, nc, N, P,
                      sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh, syb, syt, syh,
                      HAS_SKIP: tl.constexpr, SKIP_SUM: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_P: tl.constexpr, PREC: tl.constexpr, NSPLIT: tl.constexpr):
    """Chunk c of one (batch, head). The state dimension N is walked in NSPLIT column blocks, twice
    (first the [C, C] scores and the state-building term, then dQ, dK per block), so that no more
    than one block of q, k, S, G is live at once (the whole-N kernel spilled ~1 KB per thread)."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    NB: tl.constexpr = BLOCK_N // NSPLIT
    v = _load_chunk(V, b, h, c, T, svb, svt, svh, CHUNK, BLOCK_P, P)
    dy = _load_chunk(dY, b, h, c, T, syb, syt, syh, CHUNK, BLOCK_P, P)
    ell = _load_ell(dA, b, h, c, T, sdb, sdt, sdh, CHUNK)
    i = tl.arange(0, CHUNK)
    last = tl.sum(tl.where(i == CHUNK - 1, ell, 0.0), axis=0)
    wk = tl.exp(last - ell)
    eq = tl.exp(ell)
    sbase = (bh * nc + c) * P * N
    dt = v.dtype
    # pass 1: scores q k^T, the state-building term u = (w k) G^T, and <G, S>
    qk = tl.zeros([CHUNK, CHUNK], dtype=tl.float32)
    u = tl.zeros([CHUNK, BLOCK_P], dtype=tl.float32)
    gs = 0.0
    for j in range(NSPLIT):
        q = _load_cols(Q, b, h, c, T, sqb, sqt, sqh, j * NB, CHUNK, NB, N)
        k = _load_cols(K, b, h, c, T, skb, skt, skh, j * NB, CHUNK, NB, N)
        g = _state_cols(GS, sbase, P, N, j * NB, BLOCK_P, NB)          # d(state leaving chunk c)
        s = _state_cols(ST, sbase, P, N, j * NB, BLOCK_P, NB)          # state entering chunk c
        qk = tl.dot(q, tl.trans(k), qk, input_precision=PREC)
        u = tl.dot((k.to(tl.float32) * wk[:, None]).to(dt), tl.trans(g.to(dt)), u, input_precision=PREC)
        gs += tl.sum(tl.sum(g.to(tl.float32) * s.to(tl.float32), axis=1), axis=0)
    decay = tl.exp(tl.where(i[:, None] > i[None, :], ell[:, None] - ell[None, :], -float("inf")))
    a = qk * decay                                                     # masked scores [t, s]
    dp = tl.dot(dy, tl.trans(v), input_precision=PREC)                 # dO_t . V_s
    gm = dp * a
    # d ell: intra (rows gain, columns lose), inter (pass 2), state building, chunk decay
    dl = tl.sum(gm, axis=1) - tl.sum(gm, axis=0)
    term = tl.sum(v.to(tl.float32) * u, axis=1)
    dl -= term
    dlast = tl.sum(term, axis=0) + tl.exp(last) * gs
    dv = tl.dot(tl.trans(a.to(dt)), dy, u, input_precision=PREC)
    t = c * CHUNK + i
    if HAS_SKIP:   # y_t += skip_t x_t (skip [B, T, H] fp32, dA's layout)
        skip = tl.load(SKIP + b * sdb + t * sdt + h * sdh, mask=t < T, other=0.0)
        dv += skip[:, None] * dy.to(tl.float32)
    if SKIP_SUM:   # d skip_t = <dY_t, V_t> (dA's layout)
        tl.store(DSKIP + b * sdb + t * sdt + h * sdh, tl.sum(dy.to(tl.float32) * v.to(tl.float32), axis=1),
                 mask=t < T)
    _store_chunk(dV, dv, b, h, c, T, svb, svt, svh, CHUNK, BLOCK_P, P)
    dsc = (dp * decay).to(dt)
    # pass 2: dQ = dsc K + e (dY S), dK = dsc^T Q + w (V G) per column block
    for j in range(NSPLIT):
        q = _load_cols(Q, b, h, c, T, sqb, sqt, sqh, j * NB, CHUNK, NB, N)
        k = _load_cols(K, b, h, c, T, skb, skt, skh, j * NB, CHUNK, NB, N)
        s = _state_cols(ST, sbase, P, N, j * NB, BLOCK_P, NB)
        dys = tl.dot(dy, s.to(dt), input_precision=PREC) * eq[:, None]
        dl += tl.sum(q.to(tl.float32) * dys, axis=1)
        _store_cols(dQ, tl.dot(dsc, k, dys, input_precision=PREC), b, h, c, T, sqb, sqt, sqh, j * NB, CHUNK, NB, N)
        g = _state_cols(GS, sbase, P, N, j * NB, BLOCK_P, NB)
        vg = tl.dot(v, g.to(dt), input_precision=PREC) * wk[:, None]
        _store_cols(dK, tl.dot(tl.trans(dsc), q, vg, input_precision=PREC), b, h, c, T, skb, skt, skh, j * NB,
                    CHUNK, NB, N)
    # ell_t = sum_{r<=t} dA_r  ->  d dA_r = sum_{t>=r} d ell_t ; ell_last depends on every dA_r
    dda = tl.sum(dl, axis=0) - tl.cumsum(dl, axis=0) + dl + dlast
    tl.store(ddA + b * sdb + t * sdt + h * sdh, dda, mask=t < T)


BWD_COLS = 64          # Hopper-class parts, 16-bit operands: state columns per step of the chunk backward
BWD_NUM_STAGES = 2     # and its pipelining depth (H100, fwd+bwd 1.85 / 2.05 / 2.21 ms at 8x2048 / 2x8192 /
                       # 1x16384 vs 1.93 / 2.13 / 2.27 at 32 columns and Triton's default 3 stages; 3 stages at
                       # 64 columns 2.10, 128 columns 1.91, 8 warps 2.22: benchmarks/results/gpu_bwd_sweep_s10.json)
BWD_COLS_SMALL = 32    # other parts (99 KB / 163 KB of shared memory): 32 columns, Triton's default depth
BWD_NUM_WARPS = 4      # with 32 or 64 columns two programs fit an SM (255 registers); None: chunk_warps


def bwd_layout(dtype: torch.dtype, block_n: int, default_warps: int, deep: bool = False):
    """(state-column blocks, warps, pipelining depth or None for Triton's default) of the chunk
    backward. 16-bit operands: BWD_COLS / BWD_NUM_STAGES on a Hopper-class part (``deep``), else
    BWD_COLS_SMALL; fp32 operands keep one block of up to 128 columns at ``chunk_warps`` (at 4
    warps full-precision dots spilled badly, see BENCHMARKS.md)."""
    if dtype == torch.float32:
        return max(1, block_n // 128), default_warps, None
    cols, stages = (BWD_COLS, BWD_NUM_STAGES) if deep else (BWD_COLS_SMALL, None)
    return max(1, block_n // max(16, cols)), (BWD_NUM_WARPS or default_warps), stages


def ssd_core_bwd(Q, K, V, dA, dY, states, dec, dSF, chunk_size: int, skip=None, dv_dtype=torch.float32,
                 dqk_dtype=torch.float32, dskip_out=None):
    """Gradients of :func:`ssd_core_fwd`: (dQ, dK in ``dqk_dtype``, dV in ``dv_dtype``, in the inputs'
    layouts, d dA fp32, d initial state fp32 [B, H, P, N]). ``states`` are the forward's entering
    states; Q, K, V, dA, dY must be contiguous (dY in Q's dtype). ``skip`` [B, T, H] fp32 (dA's
    layout): the output also had skip_t V_t, so dV gets skip_t dY_t; ``dskip_out`` [B, T, H] fp32
    (dA's layout) or None: filled with d skip_t = <dY_t, V_t>."""
    B, T, H, N = Q.shape
    P = V.shape[-1]
    C = chunk_size
    nc = states.shape[2]
    gs = torch.empty_like(states)
    dS0 = torch.empty(B, H, P, N, device=Q.device, dtype=torch.float32)
    dQ = torch.empty(Q.shape, device=Q.device, dtype=dqk_dtype)
    dK = torch.empty(K.shape, device=Q.device, dtype=dqk_dtype)
    dV = torch.empty(V.shape, device=Q.device, dtype=dv_dtype)
    ddA = torch.empty(dA.shape, device=Q.device, dtype=torch.float32)
    BN, BP = max(16, next_pow2(N)), max(16, next_pow2(P))
    prec = dot_precision(Q.dtype)
    nw = chunk_warps(C, BN, BP, prec)
    dsf = dSF if dSF is not None else dS0
    ps = walk_split(B * H, BP)
    if ps:
        _dstate_walk_kernel[(B * H, ps)](Q, dY, dA, dec, gs, dsf, dS0, T, H, nc, N, P, *Q.stride()[:3],
                                         *dY.stride()[:3], *dA.stride(), HAS_DSF=dSF is not None, CHUNK=C,
                                         BLOCK_N=BN, BLOCK_P=BP // ps, PREC=prec, NC_STATIC=static_loop(nc),
                                         num_warps=nw, num_stages=1 if Q.dtype == torch.float32 else WALK_NUM_STAGES)
    else:
        _chunk_dstate_kernel[(nc, B * H)](Q, dY, dA, gs, T, H, nc, N, P, *Q.stride()[:3], *dY.stride()[:3],
                                          *dA.stride(), CHUNK=C, BLOCK_N=BN, BLOCK_P=BP, PREC=prec,
                                          num_warps=nw)
        PN = P * N
        BLOCK = scan_block(PN, B * H)
        _dstate_scan_kernel[(cdiv(PN, BLOCK), B * H)](gs, dec, dsf, dS0, nc, PN,
                                                      HAS_DSF=dSF is not None, BLOCK=BLOCK,
                                                      NC_STATIC=static_loop(nc), num_warps=4)
    nsplit, bwd_nw, stages = bwd_layout(Q.dtype, BN, nw, deep=group_pipeline_depth(Q.dtype, Q.device) > 1)
    # dQ/dK/dV/ddA are fresh contiguous tensors with Q/K/V/dA's shapes, so the same strides apply
    _chunk_bwd_kernel[(nc, B * H)](Q, K, V, dA, dY, states, gs, ddA if skip is None else skip,
                                   ddA if dskip_out is None else dskip_out, dQ, dK, dV, ddA,
                                   T, H, nc, N, P, *Q.stride()[:3], *K.stride()[:3], *V.stride()[:3],
                                   *dA.stride(), *dY.stride()[:3], HAS_SKIP=skip is not None,
                                   SKIP_SUM=dskip_out is not None, CHUNK=C,
                                   BLOCK_N=BN, BLOCK_P=BP, PREC=prec, NSPLIT=nsplit, num_warps=bwd_nw,
                                   **({} if stages is None else dict(num_stages=stages)))
    return dQ, dK, dV, ddA, dS0


@fast_launch
@triton.jit
def _gate_bwd_kernel(DY, Z, YPRE, V, DO, DZ, DSKIP, M, P,
                     HAS_Z: tl.constexpr, SKIP_SUM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr):
    """Rows m of [M, P] (M = B T H, all contiguous): y = ypre * silu(z) backward (and with SKIP_SUM
    the skip sum) in one pass. dO = dy z sigmoid(z) (dy without z), dz = dy ypre sg (1 + z (1 - sg)),
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
    if SKIP_SUM:
        v = tl.load(V + off, mask=mask, other=0.0).to(tl.float32)
        tl.store(DSKIP + m, tl.sum(do * v, axis=1), mask=m < M)


def gate_bwd(dy, z, ypre, v, do_dtype, skip_sum=True):
    """Launch :func:`_gate_bwd_kernel`: (dO [B, T, H, P] in ``do_dtype``, dz in z's dtype or None,
    dskip [B, T, H] fp32, or None without ``skip_sum``: then the chunk backward sums it, from the
    dO it loads anyway, which saves this pass reading v). v, z, ypre contiguous [B, T, H, P]; dy
    any layout of that shape."""
    B, T, H, P = v.shape
    M = B * T * H
    dy = dy.contiguous()
    do = torch.empty(v.shape, device=v.device, dtype=do_dtype)
    dz = None if z is None else torch.empty_like(z)
    dskip = torch.empty(B, T, H, device=v.device, dtype=torch.float32) if skip_sum else None
    BP = next_pow2(P)
    BM = max(1, 4096 // BP)
    if M:
        _gate_bwd_kernel[(cdiv(M, BM),)](dy, dy if z is None else z, dy if z is None else ypre, v, do,
                                         do if dz is None else dz, do if dskip is None else dskip, M, P,
                                         HAS_Z=z is not None, SKIP_SUM=skip_sum, BLOCK_M=BM, BLOCK_P=BP,
                                         num_warps=8)
    return do, dz, dskip


@fast_launch
@triton.jit
def _phase_dt_bwd_kernel(RC, DDTL, DANGL, ANG, DGAM, DCS, TRAP, DT, DU0, DDT, DTRAP, DANG, T, nblk, S,
                         sab, sat, sah, H: tl.constexpr, ANG_PER_HEAD: tl.constexpr, HAS_DU0: tl.constexpr,
                         ROWS: tl.constexpr, NB: tl.constexpr, BLOCK_S: tl.constexpr):
    """The tail of the SISO (and MIMO) backward for NB blocks of ROWS tokens of one batch row, all heads.

    Phase chain (see _prep_bwd_kernel): with R_c the sum of the block sums of d theta over blocks
    >= c (RC [B, H, S, nblk] holds the inclusive cumsum over *reversed* blocks, so R_c is at
    index nblk - 1 - c), d(increment_t) = R_c - P_t; the increment is dt_t pi tanh(a_t), so
      d dt (phase)  = DDTL + sum_s pi tanh(a) R_c,
      d a           = (DANGL + sum_h dt R_c) pi (1 - tanh^2 a)   (DANGL [B, T, S]; per-head
                      angles: DANGL [B, T, H, S] and no sum over heads).
    Trapezoid rule: with lam = sigmoid(trap), gamma_t = lam_t dt_t, c_t = gamma_t + u_{t+1},
    u_t = (1 - lam_t) dt_t, the gradients d gamma (DGAM) and d c (DCS) give du_t = d c_{t-1}
    (DU0[b, h] at t = 0: the initial state's term, or 0), so
      d dt = d gamma lam + du (1 - lam) + d dt (phase),  d trap = (d gamma - du) dt lam (1 - lam).
    [B, T, H] tensors contiguous; DDT, DTRAP in dt's / trap's dtype; DANG fp32 in DANGL's layout."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    TOK: tl.constexpr = NB * ROWS
    t = pid * TOK + tl.arange(0, TOK)
    tm = t < T
    s = tl.arange(0, BLOCK_S)
    sm = s < S
    ts = tm[:, None] & sm[None, :]
    jb = nblk - 1 - (pid * NB + tl.arange(0, NB))                  # reversed block index of each block
    jm = jb >= 0
    bt = b * T + t                                                  # row of [B, T, .]
    if not ANG_PER_HEAD:
        a = tl.load(ANG + b * sab + t[:, None] * sat + s[None, :], mask=ts, other=0.0).to(tl.float32)
        th = _tanh(a)
        dinc = tl.load(DANGL + bt[:, None] * S + s[None, :], mask=ts, other=0.0)
    for h in range(H):
        rc = tl.load(RC + ((b * H + h) * S + s[None, :]) * nblk + jb[:, None], mask=jm[:, None] & sm[None, :],
                     other=0.0)                                     # [NB, BLOCK_S]
        rc = tl.reshape(tl.broadcast_to(rc[:, None, :], [NB, ROWS, BLOCK_S]), [TOK, BLOCK_S])
        m = bt * H + h
        dt = tl.load(DT + m, mask=tm, other=0.0).to(tl.float32)
        if ANG_PER_HEAD:
            a = tl.load(ANG + b * sab + h * sah + t[:, None] * sat + s[None, :], mask=ts, other=0.0).to(tl.float32)
            th = _tanh(a)
            dinc_h = tl.load(DANGL + m[:, None] * S + s[None, :], mask=ts, other=0.0) + dt[:, None] * rc
            tl.store(DANG + m[:, None] * S + s[None, :], dinc_h * 3.141592653589793 * (1.0 - th * th), mask=ts)
        else:
            dinc += dt[:, None] * rc
        ddtp = tl.load(DDTL + m, mask=tm, other=0.0) + tl.sum(3.141592653589793 * th * rc, axis=1)
        lam = tl.sigmoid(tl.load(TRAP + m, mask=tm, other=0.0).to(tl.float32))
        dgam = tl.load(DGAM + m, mask=tm, other=0.0)
        du = tl.load(DCS + m - H, mask=tm & (t > 0), other=0.0)
        if HAS_DU0:
            du += tl.load(DU0 + b * H + h + t * 0, mask=tm & (t == 0), other=0.0)
        tl.store(DDT + m, (dgam * lam + du * (1.0 - lam) + ddtp).to(DDT.dtype.element_ty), mask=tm)
        tl.store(DTRAP + m, ((dgam - du) * dt * lam * (1.0 - lam)).to(DTRAP.dtype.element_ty), mask=tm)
    if not ANG_PER_HEAD:
        tl.store(DANG + bt[:, None] * S + s[None, :], dinc * 3.141592653589793 * (1.0 - th * th), mask=ts)


PHASE_DT_TOKENS = 64   # tokens per program of _phase_dt_bwd_kernel (a loop over all heads each)


@fast_launch
@triton.jit
def _row_cumsum_kernel(X, Y, R, L, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr):
    """Y = inclusive cumsum of X [R, L] (fp32, contiguous) along L, BLOCK_R whole rows per program
    (torch's innermost-dim scan took 0.04 ms on the H100 for the 2048 x 1024 block sums of the
    2x8192 backward)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_L)
    m = (r[:, None] < R) & (c[None, :] < L)
    x = tl.load(X + r[:, None] * L + c[None, :], mask=m, other=0.0)
    tl.store(Y + r[:, None] * L + c[None, :], tl.cumsum(x, axis=1), mask=m)


ROW_CUMSUM_MAX = 8192   # longest row of the one-tile scan kernel; longer rows take torch.cumsum


def row_cumsum(x: torch.Tensor) -> torch.Tensor:
    """Inclusive cumsum along the last dim of a contiguous fp32 tensor (one Triton launch for rows
    up to ROW_CUMSUM_MAX long)."""
    L = x.shape[-1]
    if L > ROW_CUMSUM_MAX:
        return torch.cumsum(x, -1)
    y = torch.empty_like(x)
    if y.numel() == 0:
        return y
    R = x.numel() // L
    BL = max(16, next_pow2(L))
    BR = max(1, 4096 // BL)
    _row_cumsum_kernel[(cdiv(R, BR),)](x, y, R, L, BLOCK_R=BR, BLOCK_L=BL, num_warps=4)
    return y


def phase_dt_bwd(dtot, ddt_loc, dang_loc, angles, dgamma, dcs, trap, dt, rows, du0=None):
    """Launch :func:`_phase_dt_bwd_kernel` after prep_bwd (dtot [B, H, S, nblk] holding the block
    sums of d theta in reversed block order; ddt_loc, dgamma, dcs [B, T, H] fp32 contiguous;
    dang_loc [B, T, S], or [B, T, H, S] with per-head angles; rows the tokens per block; du0 [B, H]
    fp32 or None). Returns (d dt in dt's dtype, d trap in trap's dtype, d angles fp32 in angles'
    shape, d initial phase [B, H, S] fp32)."""
    B, T, H = dt.shape
    S, nblk = dtot.shape[2], dtot.shape[3]
    per_head = angles.dim() == 4
    ddt, dtrap = torch.empty_like(dt), torch.empty_like(trap)
    dang = torch.empty(angles.shape, device=dt.device, dtype=torch.float32)
    if S == 0 or T == 0:
        rc = torch.zeros(B, H, S, 1, device=dt.device, dtype=torch.float32)
    else:
        rc = row_cumsum(dtot)                             # innermost scan; R_c at index nblk - 1 - c
    if B * T * H:
        nb = next_pow2(max(1, PHASE_DT_TOKENS // rows + 1)) // 2   # a power of two
        sa = (angles.stride(0), angles.stride(1), angles.stride(2) if per_head else 0)
        BS = max(16, next_pow2(S))
        _phase_dt_bwd_kernel[(cdiv(T, nb * rows), B)](
            nonempty(rc, dgamma), ddt_loc, nonempty(dang_loc, dgamma), nonempty(angles, dt), dgamma, dcs, trap, dt,
            du0 if du0 is not None else dgamma, ddt, dtrap, nonempty(dang, dgamma), T, nblk, S, *sa,
            H=H, ANG_PER_HEAD=per_head, HAS_DU0=du0 is not None, ROWS=rows, NB=nb, BLOCK_S=BS, num_warps=4)
    return ddt, dtrap, dang, rc[..., -1]


@triton.jit
def _shared_rate(ANG, b, t, T, S, sab, sat, BLOCK_N2: tl.constexpr):
    """pi tanh(angles) [ROWS, BLOCK_N2] at rows t for angles shared by the heads (0 past S and T)."""
    i = tl.arange(0, BLOCK_N2)
    raw = tl.load(ANG + b * sab + t[:, None] * sat + i[None, :], mask=(t[:, None] < T) & (i[None, :] < S), other=0.0)
    return 3.141592653589793 * _tanh(raw.to(tl.float32))


@triton.jit
def _head_rotation(ANG, TH0, dt, rate, b, h, t, T, S, H, nblk, blk, sab, sat, sah,
                   ANG_PER_HEAD: tl.constexpr, BLOCK_N2: tl.constexpr, start_off=0.0):
    """cos, sin [ROWS, BLOCK_N2] of head h's phase at rows t, which follow the phase entering block
    blk (TH0 [B, H, nblk, S]) plus ``start_off`` [BLOCK_N2], and the rate: loaded here for per-head
    angles, else ``rate``."""
    i = tl.arange(0, BLOCK_N2)
    rot = i < S
    start = tl.load(TH0 + ((b * H + h) * nblk + blk) * S + i, mask=rot, other=0.0) + start_off
    if ANG_PER_HEAD:
        cos, sin, rate = _row_phase(ANG, dt, b, h, t, T, S, sab, sat, sah, start, BLOCK_N2)
    else:
        cos, sin = _cos_sin(start[None, :] + tl.cumsum(dt[:, None] * rate, axis=0))
        cos = tl.where(rot[None, :], cos, 1.0)
        sin = tl.where(rot[None, :], sin, 0.0)
    return cos, sin, rate


@fast_launch
@triton.jit
def _prep_bwd_kernel(Q, K, QB, KB, DT, TRAP, ANG, TH0, dQ, dK, DSKIP, DQ, DK, DTOT, DDTL, DANGL, DCS, DGAM, DQB,
                     DKB, B, T, H, G, nblk, nblk_th, N, S, sqb, sqt, sqg, sdb, sdt, sdh, sab, sat, sah,
                     ANG_PER_HEAD: tl.constexpr, HG: tl.constexpr, HSPLIT: tl.constexpr, ROWS: tl.constexpr,
                     BLOCK_N2: tl.constexpr, TH_SUB: tl.constexpr):
    """Back through the per-token preparation (bias, rotation, trapezoid scale, skip) of ROWS tokens
    of one (batch, q/k group), looping over HG / HSPLIT of the group's HG heads (program split sp).

    In: dQ (rotated q) and dK (rotated, scaled k) [B, T, H, N], d(skip) [B, T, H], TH0 [B, H, nblk_th,
    S] the phases entering each block of the forward's TH_SUB * ROWS tokens (the rows of this block
    that precede ours in it add their increments). Out:
      DQ, DK [HSPLIT, B, T, G, N] (DQ's dtype): the gradients of q, k, summed over the split's heads;
      DTOT [B, H, S, nblk]: the block's sum of d theta (d theta_t = the gradient of the phase at t),
      stored at block index nblk - 1 - blk (so a forward cumsum gives the sums over later blocks);
      with P_t = sum of d theta over the block's tokens before t, the phase at t feeds every later
      phase, so d(increment_t) = (sum of DTOT over blocks >= this one) - P_t. The -P_t parts:
      DDTL [B, T, H] = -sum_s P_t rate_t (for d dt) and DANGL = -sum_h dt_t P_t ([HSPLIT, B, T, G, S]; per
      head, [B, T, H, S], with per-head angles) for d angles; the block-level part is added outside;
      DCS = d c_t, DGAM = d gamma_t [B, T, H]; DQB, DKB [B, nblk, H, N]: bias-gradient partials.
    """
    blk = tl.program_id(0)
    bgs = tl.program_id(1)
    sp = bgs % HSPLIT
    b = bgs // (G * HSPLIT)
    g = (bgs // HSPLIT) % G
    HPS: tl.constexpr = HG // HSPLIT
    i = tl.arange(0, BLOCK_N2)
    n = tl.arange(0, 2 * BLOCK_N2)
    rot = i < S
    t = blk * ROWS + tl.arange(0, ROWS)
    tm = t < T
    m = tm[:, None] & (n[None, :] < N)
    acc_qe = tl.zeros([ROWS, BLOCK_N2], dtype=tl.float32)
    acc_qo = tl.zeros([ROWS, BLOCK_N2], dtype=tl.float32)
    acc_ke = tl.zeros([ROWS, BLOCK_N2], dtype=tl.float32)
    acc_ko = tl.zeros([ROWS, BLOCK_N2], dtype=tl.float32)
    acc_ang = tl.zeros([ROWS, BLOCK_N2], dtype=tl.float32)
    shared = acc_ang
    if not ANG_PER_HEAD:   # shared by the heads: the rate once per program
        shared = _shared_rate(ANG, b, t, T, S, sab, sat, BLOCK_N2)
    # the rows of the forward's phase block before ours (ROWS of them for the odd half when TH_SUB = 2)
    tp = t - ROWS
    before = (tp >= 0) & (tp < T) & ((t * 0 + blk % TH_SUB) != 0)
    shared_before = acc_ang
    if TH_SUB > 1 and not ANG_PER_HEAD:
        shared_before = _shared_rate(ANG, b, tl.where(before, tp, T), T, S, sab, sat, BLOCK_N2)
    for hl in range(HPS):
        h = g * HG + sp * HPS + hl
        dt, gamma, cs = _row_coeffs(DT, TRAP, b, h, t, T, sdb, sdt, sdh)
        off = tl.zeros([BLOCK_N2], dtype=tl.float32)
        if TH_SUB > 1:
            dtb = tl.load(DT + b * sdb + tp * sdt + h * sdh, mask=before, other=0.0).to(tl.float32)
            if ANG_PER_HEAD:
                rb = tl.load(ANG + b * sab + h * sah + tp[:, None] * sat + i[None, :],
                             mask=before[:, None] & rot[None, :], other=0.0).to(tl.float32)
                off = tl.sum(dtb[:, None] * (3.141592653589793 * _tanh(rb)), axis=0)
            else:
                off = tl.sum(dtb[:, None] * shared_before, axis=0)
        cos, sin, rate = _head_rotation(ANG, TH0, dt, shared, b, h, t, T, S, H, nblk_th, blk // TH_SUB, sab, sat,
                                        sah, ANG_PER_HEAD, BLOCK_N2, off)
        qe, qo = _biased_pairs(Q, QB, b, g, h, t, T, N, sqb, sqt, sqg, BLOCK_N2)
        ke, ko = _biased_pairs(K, KB, b, g, h, t, T, N, sqb, sqt, sqg, BLOCK_N2)
        row = ((b * T + t) * H + h) * N
        # rotated back: u = R^T dQ, w = R^T dK (contiguous tiles split in registers; stride-2 access
        # is several times slower). With R' = R J, d theta = <dQ, R J q> = <u, J q>, J (e, o) = (-o, e),
        # so the rotated q, k are never formed; d c = <dK, R k> = <w, k>.
        dqe, dqo = _split_pairs(tl.load(dQ + row[:, None] + n[None, :], mask=m, other=0.0).to(tl.float32),
                                ROWS, BLOCK_N2)
        ue = dqe * cos + dqo * sin
        uo = dqo * cos - dqe * sin
        dke, dko = _split_pairs(tl.load(dK + row[:, None] + n[None, :], mask=m, other=0.0).to(tl.float32),
                                ROWS, BLOCK_N2)
        we = dke * cos + dko * sin
        wo = dko * cos - dke * sin
        dcs = tl.sum(we * ke + wo * ko, axis=1)
        we = we * cs[:, None]
        wo = wo * cs[:, None]
        dth = tl.where(rot[None, :], qe * uo - qo * ue + ke * wo - ko * we, 0.0)
        prior = tl.cumsum(dth, axis=0) - dth                               # P_t: block rows before t
        tl.store(DTOT + ((b * H + h) * S + i) * nblk + nblk - 1 - blk, tl.sum(dth, axis=0), mask=rot)
        ht = (b * T + t) * H + h
        tl.store(DDTL + ht, -tl.sum(prior * rate, axis=1), mask=tm)
        if ANG_PER_HEAD:
            tl.store(DANGL + ht[:, None] * S + i[None, :], -dt[:, None] * prior, mask=tm[:, None] & rot[None, :])
        else:
            acc_ang -= dt[:, None] * prior
        dsk = tl.load(DSKIP + ht, mask=tm, other=0.0)
        gd = (dsk * gamma)[:, None]
        dqe_u = ue + gd * ke
        dqo_u = uo + gd * ko
        dke_u = we + gd * qe
        dko_u = wo + gd * qo
        acc_qe += dqe_u
        acc_qo += dqo_u
        acc_ke += dke_u
        acc_ko += dko_u
        tl.store(DCS + ht, dcs, mask=tm)
        tl.store(DGAM + ht, dcs + dsk * tl.sum(qe * ke + qo * ko, axis=1), mask=tm)
        # bias gradients: this block's sum over tokens (masked rows are zero), interleaved back to N
        pb = ((b * nblk + blk) * H + h) * N + n
        tl.store(DQB + pb, tl.reshape(_interleave(tl.sum(dqe_u, axis=0)[None, :], tl.sum(dqo_u, axis=0)[None, :], 1,
                                                  2 * BLOCK_N2), [2 * BLOCK_N2]), mask=n < N)
        tl.store(DKB + pb, tl.reshape(_interleave(tl.sum(dke_u, axis=0)[None, :], tl.sum(dko_u, axis=0)[None, :], 1,
                                                  2 * BLOCK_N2), [2 * BLOCK_N2]), mask=n < N)
    split = sp.to(tl.int64) * B * T * G
    go = split * N + ((b * T + t[:, None]) * G + g) * N + n[None, :]
    tl.store(DQ + go, _interleave(acc_qe, acc_qo, ROWS, 2 * BLOCK_N2).to(DQ.dtype.element_ty), mask=m)
    tl.store(DK + go, _interleave(acc_ke, acc_ko, ROWS, 2 * BLOCK_N2).to(DK.dtype.element_ty), mask=m)
    if not ANG_PER_HEAD:
        tl.store(DANGL + split * S + ((b * T + t[:, None]) * G + g) * S + i[None, :], acc_ang,
                 mask=tm[:, None] & rot[None, :])


@fast_launch
@triton.jit
def _middle_sum_kernel(X, Y, M, K, MS, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, NM_STATIC: tl.constexpr):
    """Y[s, a, k] = sum over m in split s (MS rows each) of X[a, m, k] (fp32 [A, M, K] contiguous), grid
    (K blocks, A, splits): the partial sums stay an elementwise [BLOCK_M, BLOCK_K] tile through the
    loop and are reduced once at the end."""
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    a = tl.program_id(1)
    s = tl.program_id(2)
    A = tl.num_programs(1)
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for j in range(NM_STATIC if NM_STATIC > 0 else tl.cdiv(MS, BLOCK_M)):
        m = s * MS + j * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = (a * M + m[:, None]).to(tl.int64) * K
        acc += tl.load(X + rows + k[None, :], mask=(m[:, None] < M) & (m[:, None] < (s + 1) * MS) & (k[None, :] < K),
                       other=0.0)
    tl.store(Y + (s * A + a) * K + k, tl.sum(acc, axis=0), mask=k < K)


MIDDLE_SUM_ROWS = 32     # rows of the middle sum's tile,
MIDDLE_SUM_COLS = 128    # its columns,
MIDDLE_SUM_WARPS = 4     # warps
MIDDLE_SUM_SPLITS = 16   # and programs along M (their partials added by torch). H100 fwd+bwd, 2x8192 / 8x2048:
                         # 1.98-1.99 / 1.776 ms vs 2.03-2.05 / 1.82-1.84 at one split of 128 x 32 (a serial
                         # loop over 4096 rows per program); 4 splits of 64 x 64 or 8 of 64 x 128 alike
                         # (gpu_fwd_ab_middle_sum_s14.json)


def middle_sum(x: torch.Tensor) -> torch.Tensor:
    """[A, M, K] fp32 contiguous -> [A, K]: the sum over M (the preparation backward's per-block bias
    partials; torch's reduction read them at about half the H100's bandwidth)."""
    A, M, K = x.shape
    sp = max(1, min(MIDDLE_SUM_SPLITS, M))
    y = torch.empty(sp, A, K, device=x.device, dtype=torch.float32)
    if y.numel() == 0:
        return y[0]
    if M == 0:
        return y[0].zero_()
    BM, BK = MIDDLE_SUM_ROWS, MIDDLE_SUM_COLS
    ms = cdiv(M, sp)
    _middle_sum_kernel[(cdiv(K, BK), A, sp)](x, y, M, K, ms, BLOCK_M=BM, BLOCK_K=BK,
                                             NM_STATIC=static_loop(cdiv(ms, BM)), num_warps=MIDDLE_SUM_WARPS)
    return y[0] if sp == 1 else y.sum(0)


PREP_BWD_ROWS = 4        # tokens per program of the backward preparation: 4 rows hold half the registers of 8
                         # (255 + 328 B of spills at 8); H100 fwd+bwd 8x2048 / 2x8192 1.78 / 1.99 ms vs 1.81 /
                         # 2.02 at 8 rows, 2 rows 1.99 / 2.20 (gpu_fwd_ab_prep_rows_s14.json, measured with
                         # the forward's phase blocks at the same rows)
PREP_BWD_NUM_WARPS = 1   # H100, 8x2048: 8 rows in one warp 0.45 ms, 16 rows at 4 warps 0.62 (35 barriers per head)
PREP_BWD_PROGRAMS = 1     # target programs for splitting a group's heads (H100, 8x2048: no split 0.62 ms,
                          # 2048: 0.66, 4096: 0.68, 8192: 0.73)


def head_splits(HG: int, programs: int, target: int = None) -> int:
    """Power-of-two split of a group's HG heads over programs, up to ``target`` programs in all."""
    target = PREP_BWD_PROGRAMS if target is None else target
    sp = 1
    while HG % (2 * sp) == 0 and programs * sp < target:
        sp *= 2
    return sp


def prep_bwd_rows(chunk_size: int) -> int:
    """Tokens per program of the backward preparation (and of its phase-gradient blocks): PREP_BWD_ROWS,
    at most the forward's phase block (:func:`prep_rows`), which it divides."""
    return min(PREP_BWD_ROWS, prep_rows(chunk_size))


def prep_bwd(q, k, q_bias, k_bias, dt, trap, angles, th0, th_rows, rows, dQ, dK, dskip):
    """Launch :func:`_prep_bwd_kernel` (raw inputs contiguous as in the forward; th0 [B, H, nblk_th, S]
    the phases entering each block of ``th_rows`` tokens; blocks of ``rows`` (dividing th_rows) tokens,
    grid (blocks, B*G*splits)). Returns (dq, dk
    [B, T, G, N] in q's dtype; dtot [B, H, S, nblk] (blocks in reversed order), ddt_local [B, T, H],
    dang_local ([B, T, S], summed over the groups, or, with per-head angles, [B, T, H, S]), dc, dgamma
    [B, T, H], all fp32; the bias gradients
    dq_bias, dk_bias [H, N] fp32); see the kernel for the phase terms."""
    B, T, H = dt.shape
    G, N = q.shape[2], q.shape[3]
    S = angles.shape[-1]
    nblk = max(1, cdiv(T, rows))
    assert th_rows % rows == 0 and th0.shape[2] == max(1, cdiv(T, th_rows)), "th0 blocks must be whole bwd blocks"
    per_head = angles.dim() == 4
    sp = head_splits(H // G, nblk * B * G)
    f32 = dict(device=dt.device, dtype=torch.float32)
    gdt = (q.dtype, k.dtype) if sp == 1 else (torch.float32, torch.float32)
    dq = torch.empty(sp, B, T, G, N, device=q.device, dtype=gdt[0])
    dk = torch.empty(sp, B, T, G, N, device=q.device, dtype=gdt[1])
    dtot = torch.empty(B, H, S, nblk, **f32)
    ddtl, dcs, dgam = torch.empty(B, T, H, **f32), torch.empty(B, T, H, **f32), torch.empty(B, T, H, **f32)
    dangl = torch.empty(B, T, H, S, **f32) if per_head else torch.empty(sp, B, T, G, S, **f32)
    dqkb = torch.empty(2, B, nblk, H, N, **f32)          # q and k bias partials: one sum after
    sa = (angles.stride(0), angles.stride(1), angles.stride(2) if per_head else 0)
    BN2 = max(32, next_pow2(N)) // 2
    angles, th0, dtot_, dangl_ = nonempty(angles, dt), nonempty(th0, dt), nonempty(dtot, dcs), nonempty(dangl, dcs)
    _prep_bwd_kernel[(nblk, B * G * sp)](q, k, q_bias.float().contiguous(), k_bias.float().contiguous(), dt, trap,
                                         angles, th0, dQ, dK, dskip, dq, dk, dtot_, ddtl, dangl_, dcs, dgam,
                                         dqkb[0], dqkb[1],
                                         B, T, H, G, nblk, th0.shape[2], N, S, *q.stride()[:3], *dt.stride(), *sa,
                                         ANG_PER_HEAD=per_head, HG=H // G, HSPLIT=sp, ROWS=rows, BLOCK_N2=BN2,
                                         TH_SUB=th_rows // rows, num_warps=PREP_BWD_NUM_WARPS)
    if sp > 1:
        dq, dk = dq.sum(0).to(q.dtype), dk.sum(0).to(k.dtype)
    else:
        dq, dk = dq[0], dk[0]
    if not per_head:
        dangl = dangl.sum((0, 3)) if sp * G > 1 else dangl[0, :, :, 0]
    dqb, dkb = middle_sum(dqkb.view(2, B * nblk, H * N)).view(2, H, N).unbind(0)
    return dq, dk, dtot, ddtl, dangl, dcs, dgam, dqb, dkb
