"""Triton forward kernels of the chunked scalar-decay SSD core used by Mamba-3 SISO, MIMO and Mamba-2.

The core, per (batch b, head h), on prepared per-head tensors (rotation, biases and the
trapezoid scale already applied):

    y_t = sum_{s<t, same chunk} (Q_t . K_s) exp(ell_t - ell_s) V_s + exp(ell_t) S_c Q_t
    S_{c+1} = exp(ell_last) S_c + sum_s exp(ell_last - ell_s) V_s K_s^T        (S_0 = initial)

with ell the inclusive within-chunk cumsum of dA. Two layouts:
  * chunk groups (``ssd_group_fwd``; the Mamba-3 SISO forward ``mamba3_fused_fwd`` and so Mamba-2,
    and the MIMO forward on T*R rows):
    the state is carried in registers through the chunks of a group; when batch x heads is too
    small to fill the GPU, a pre-pass builds each group's local end state and a scan over groups
    gives the entering states. Before it, ``chunk_start_phases`` (two launches) and
    ``_prep_qk_kernel`` (grid (chunks, B*H)) prepare the per-head rotated q, k and the skip term.
  * chunk-parallel, three launches (``ssd_core_fwd``; the ``mamba3::siso_fwd`` custom op):
    1. _chunk_state_kernel  grid (chunks, B*H):   chunk-local state of every chunk
    2. _state_scan_kernel   grid (P*N blocks, B*H): short sequential pass over chunk states,
       overwriting each local state with the state entering its chunk; final state in fp32
    3. _chunk_out_kernel    grid (chunks, B*H):   intra-chunk quadratic form + inter-chunk term
Layouts: Q, K [B, T, H, N]; V [B, T, H, P]; dA [B, T, H] fp32; states [B, H, nc, P, N].
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ..launch import fast_launch
from ..utils import cdiv, next_pow2

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _load_chunk(ptr, b, h, c, T, stride_b, stride_t, stride_h, CHUNK: tl.constexpr, BLOCK: tl.constexpr, DIM):
    """[CHUNK, BLOCK] tile of a [B, T, H, DIM] tensor (last dim contiguous), zero-padded."""
    t = c * CHUNK + tl.arange(0, CHUNK)
    d = tl.arange(0, BLOCK)
    mask = (t[:, None] < T) & (d[None, :] < DIM)
    ptrs = ptr + b * stride_b + t[:, None] * stride_t + h * stride_h + d[None, :]
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _load_ell(dA_ptr, b, h, c, T, sdb, sdt, sdh, CHUNK: tl.constexpr):
    """Inclusive within-chunk cumsum of dA (fp32), zero past the end."""
    t = c * CHUNK + tl.arange(0, CHUNK)
    a = tl.load(dA_ptr + b * sdb + t * sdt + h * sdh, mask=t < T, other=0.0).to(tl.float32)
    return tl.cumsum(a, axis=0)


@fast_launch
@triton.jit
def _chunk_state_kernel(K, V, dA, ST, DEC, T, H, nc, N, P,
                        skb, skt, skh, svb, svt, svh, sdb, sdt, sdh,
                        CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
                        PREC: tl.constexpr):
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    k = _load_chunk(K, b, h, c, T, skb, skt, skh, CHUNK, BLOCK_N, N)
    v = _load_chunk(V, b, h, c, T, svb, svt, svh, CHUNK, BLOCK_P, P)
    ell = _load_ell(dA, b, h, c, T, sdb, sdt, sdh, CHUNK)
    last = tl.sum(tl.where(tl.arange(0, CHUNK) == CHUNK - 1, ell, 0.0), axis=0)
    w = tl.exp(last - ell)
    vw = (v.to(tl.float32) * w[:, None]).to(k.dtype)
    local = tl.dot(tl.trans(vw), k, input_precision=PREC)              # [P, N] fp32
    p = tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    base = ST + (bh * nc + c) * P * N
    tl.store(base + p[:, None] * N + n[None, :], local.to(ST.dtype.element_ty),
             mask=(p[:, None] < P) & (n[None, :] < N))
    tl.store(DEC + bh * nc + c, last)


@triton.jit
def _scan_step(ST, DEC, carry, bh, c, nc, PN, offs, mask):
    """UNROLL=4 chunks per call: all loads first, so the serial chain pays one memory latency
    per four chunks (the chunk states of one (batch, head) are walked in order)."""
    base = ST + bh * nc * PN + offs
    cv = offs * 0 + c  # vector chunk index: `vector mask & scalar bool` is rejected by newer interpreters
    m0, m1, m2, m3 = mask & (cv < nc), mask & (cv + 1 < nc), mask & (cv + 2 < nc), mask & (cv + 3 < nc)
    l0 = tl.load(base + c * PN, mask=m0, other=0.0).to(tl.float32)
    l1 = tl.load(base + (c + 1) * PN, mask=m1, other=0.0).to(tl.float32)
    l2 = tl.load(base + (c + 2) * PN, mask=m2, other=0.0).to(tl.float32)
    l3 = tl.load(base + (c + 3) * PN, mask=m3, other=0.0).to(tl.float32)
    d0 = tl.exp(tl.load(DEC + bh * nc + c, mask=c < nc, other=0.0))
    d1 = tl.exp(tl.load(DEC + bh * nc + c + 1, mask=c + 1 < nc, other=0.0))
    d2 = tl.exp(tl.load(DEC + bh * nc + c + 2, mask=c + 2 < nc, other=0.0))
    d3 = tl.exp(tl.load(DEC + bh * nc + c + 3, mask=c + 3 < nc, other=0.0))
    dt_ = ST.dtype.element_ty
    tl.store(base + c * PN, carry.to(dt_), mask=m0)
    carry = d0 * carry + l0
    tl.store(base + (c + 1) * PN, carry.to(dt_), mask=m1)
    carry = d1 * carry + l1
    tl.store(base + (c + 2) * PN, carry.to(dt_), mask=m2)
    carry = d2 * carry + l2
    tl.store(base + (c + 3) * PN, carry.to(dt_), mask=m3)
    return d3 * carry + l3


@fast_launch
@triton.jit
def _state_scan_kernel(ST, DEC, S0, SF, nc, PN, HAS_S0: tl.constexpr, BLOCK: tl.constexpr,
                       NC_STATIC: tl.constexpr):
    """In place: ST[c] <- state entering chunk c; SF <- state after the last chunk (fp32)."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < PN
    if HAS_S0:
        carry = tl.load(S0 + bh * PN + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros([BLOCK], dtype=tl.float32)
    if NC_STATIC > 0:  # interpreter: loop bounds must be Python ints
        for c4 in range((NC_STATIC + 3) // 4):
            carry = _scan_step(ST, DEC, carry, bh, c4 * 4, nc, PN, offs, mask)
    else:
        for c4 in range(0, tl.cdiv(nc, 4)):
            carry = _scan_step(ST, DEC, carry, bh, c4 * 4, nc, PN, offs, mask)
    tl.store(SF + bh * PN + offs, carry, mask=mask)


@fast_launch
@triton.jit
def _chunk_out_kernel(Q, K, V, dA, ST, Y, T, H, nc, N, P,
                      sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh, syb, syt, syh,
                      CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
                      PREC: tl.constexpr):
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    q = _load_chunk(Q, b, h, c, T, sqb, sqt, sqh, CHUNK, BLOCK_N, N)
    k = _load_chunk(K, b, h, c, T, skb, skt, skh, CHUNK, BLOCK_N, N)
    v = _load_chunk(V, b, h, c, T, svb, svt, svh, CHUNK, BLOCK_P, P)
    ell = _load_ell(dA, b, h, c, T, sdb, sdt, sdh, CHUNK)
    i = tl.arange(0, CHUNK)
    strict = i[:, None] > i[None, :]
    seg = tl.where(strict, ell[:, None] - ell[None, :], -float("inf"))
    scores = tl.dot(q, tl.trans(k), input_precision=PREC) * tl.exp(seg)
    y = tl.dot(scores.to(v.dtype), v, input_precision=PREC)             # [C, P]
    p = tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    s = tl.load(ST + (bh * nc + c) * P * N + p[:, None] * N + n[None, :],
                mask=(p[:, None] < P) & (n[None, :] < N), other=0.0)
    y += tl.dot(q, tl.trans(s.to(q.dtype)), input_precision=PREC) * tl.exp(ell)[:, None]
    t = c * CHUNK + i
    ptrs = Y + b * syb + t[:, None] * syt + h * syh + p[None, :]
    tl.store(ptrs, y.to(Y.dtype.element_ty), mask=(t[:, None] < T) & (p[None, :] < P))




def static_loop(n: int) -> int:
    """Under TRITON_INTERPRET runtime loop bounds break (numpy 2 scalars); pass them as constexpr."""
    return n if INTERPRET else 0


def nonempty(t, fallback):
    """An empty tensor (S = 0 rotary angles) may have a null data pointer, which a launch refuses;
    the kernels never touch it (all masks are off), so any valid tensor can stand in."""
    return t if t.numel() > 0 else fallback


def dot_precision(dtype: torch.dtype) -> str:
    """bf16/fp16 operands use the tensor cores. fp32 operands follow torch's fp32 matmul setting:
    full precision ("ieee", CUDA-core FMAs) by default, tf32 tensor cores after
    ``torch.set_float32_matmul_precision("high")`` (about 5x faster in the backward kernel)."""
    if dtype != torch.float32:
        return "tf32"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def chunk_warps(chunk: int, block_n: int, block_p: int, prec: str) -> int:
    """Warps of the per-chunk kernels. Full-precision fp32 dots run on the CUDA cores and hold their
    operands in registers: at 4 warps they spill (H100, C=64, N=64, P=16: 14.8 ms vs 1.8 ms at 8)."""
    if prec == "ieee":
        return 8
    return 4 if chunk * max(block_n, block_p) <= 4096 else 8


def group_warps(prec: str) -> int:
    """Warps of the group kernels: GROUP_NUM_WARPS, 8 for full-precision fp32 dots (the register
    reasoning of chunk_warps; measured there, not timed on the group kernels alone)."""
    return 8 if prec == "ieee" else GROUP_NUM_WARPS


def scan_block(PN: int, BH: int, target: int = 2048) -> int:
    """State elements per program of the serial scans over chunks: up to 512, fewer when batch x
    heads is small, so that about ``target`` programs keep loads in flight along the serial chain."""
    block = min(512, next_pow2(PN))
    while block > 64 and cdiv(PN, block) * BH < target:
        block //= 2
    return block


def ssd_core_fwd(Q, K, V, dA, S0, chunk_size: int, state_dtype=None):
    """Run the three forward launches.

    Q, K [B, T, H, N] and V [B, T, H, P] share one dtype; dA [B, T, H] fp32; S0 [B, H, P, N]
    fp32 or None. Returns (y [B, T, H, P] fp32, entering states [B, H, nc, P, N], final fp32 state).
    """
    B, T, H, N = Q.shape
    P = V.shape[-1]
    C = chunk_size
    nc = max(1, cdiv(T, C))
    st_dtype = state_dtype or (torch.float32 if Q.dtype == torch.float32 else Q.dtype)
    states = torch.empty(B, H, nc, P, N, device=Q.device, dtype=st_dtype)
    dec = torch.empty(B, H, nc, device=Q.device, dtype=torch.float32)
    final = torch.empty(B, H, P, N, device=Q.device, dtype=torch.float32)
    y = torch.empty(B, T, H, P, device=Q.device, dtype=torch.float32)
    BN, BP = max(16, next_pow2(N)), max(16, next_pow2(P))
    prec = dot_precision(Q.dtype)
    nw = chunk_warps(C, BN, BP, prec)
    _chunk_state_kernel[(nc, B * H)](K, V, dA, states, dec, T, H, nc, N, P,
                                     *K.stride()[:3], *V.stride()[:3], *dA.stride(),
                                     CHUNK=C, BLOCK_N=BN, BLOCK_P=BP, PREC=prec, num_warps=nw)
    PN = P * N
    BLOCK = min(512, next_pow2(PN))
    s0 = S0 if S0 is not None else final
    _state_scan_kernel[(cdiv(PN, BLOCK), B * H)](states, dec, s0, final, nc, PN,
                                                 HAS_S0=S0 is not None, BLOCK=BLOCK,
                                                 NC_STATIC=static_loop(nc), num_warps=4)
    _chunk_out_kernel[(nc, B * H)](Q, K, V, dA, states, y, T, H, nc, N, P,
                                   *Q.stride()[:3], *K.stride()[:3], *V.stride()[:3], *dA.stride(),
                                   *y.stride()[:3],
                                   CHUNK=C, BLOCK_N=BN, BLOCK_P=BP, PREC=prec, num_warps=nw)
    return y, states, dec, final


# --------------------------------------------------------------------------------------------
# Fused Mamba-3 forward: the same three launches, but the chunk kernels prepare q/k themselves
# from the raw inputs (bias, cumulative phase, interleaved rotation, trapezoid scale), and the
# output kernel adds the skip/diagonal term and the gate. Only the per-chunk starting phases
# TH0 [B, H, nc, S] come from a small PyTorch pass.
# --------------------------------------------------------------------------------------------

# The GPU uses the approximate sin/cos instructions on the phase reduced to [-pi, pi] (absolute
# error ~1e-6 there): the precise libdevice versions keep a slow-path reduction whose registers
# made the per-chunk preparation spill and run ~20x slower. The interpreter has no inline PTX.
_FAST_TRIG = tl.constexpr(not INTERPRET)


@triton.jit
def _cos_sin(theta):
    if _FAST_TRIG:
        r = theta - 6.283185307179586 * tl.floor(theta * 0.15915494309189535 + 0.5)
        c = tl.inline_asm_elementwise("cos.approx.f32 $0, $1;", "=r,r", [r], dtype=tl.float32, is_pure=True, pack=1)
        s = tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=r,r", [r], dtype=tl.float32, is_pure=True, pack=1)
    else:
        c = tl.cos(theta)
        s = tl.sin(theta)
    return c, s


@triton.jit
def _tanh(x):
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _row_coeffs(DT, TRAP, b, h, t, T, sb, st, sh):
    """dt, gamma = lam dt and the single-SSD scale c_t = gamma_t + (1 - lam_{t+1}) dt_{t+1} of rows t."""
    base = b * sb + h * sh
    dt = tl.load(DT + base + t * st, mask=t < T, other=0.0).to(tl.float32)
    lam = tl.sigmoid(tl.load(TRAP + base + t * st, mask=t < T, other=0.0).to(tl.float32))
    nxt = (t + 1) < T
    dt_n = tl.load(DT + base + (t + 1) * st, mask=nxt, other=0.0).to(tl.float32)
    lam_n = tl.sigmoid(tl.load(TRAP + base + (t + 1) * st, mask=nxt, other=0.0).to(tl.float32))
    gamma = lam * dt
    return dt, gamma, gamma + (1.0 - lam_n) * dt_n


@triton.jit
def _row_phase(ANG, dt, b, h, t, T, S, sab, sat, sah, start, BLOCK_N2: tl.constexpr):
    """Rows t of a block whose phase entering them is ``start`` [BLOCK_N2]: cos, sin [ROWS, BLOCK_N2]
    of the cumulative phase (1, 0 for unrotated pairs) and the rate pi tanh(angles) [ROWS, BLOCK_N2]
    (fp32 within the block: the block start is reduced mod 2 pi)."""
    i = tl.arange(0, BLOCK_N2)
    rot = i < S
    raw = tl.load(ANG + b * sab + h * sah + t[:, None] * sat + i[None, :],
                  mask=(t[:, None] < T) & rot[None, :], other=0.0).to(tl.float32)
    rate = 3.141592653589793 * _tanh(raw)
    cos, sin = _cos_sin(start[None, :] + tl.cumsum(dt[:, None] * rate, axis=0))
    return tl.where(rot[None, :], cos, 1.0), tl.where(rot[None, :], sin, 0.0), rate


@triton.jit
def _split_pairs(x, CHUNK: tl.constexpr, BLOCK_N2: tl.constexpr):
    """[CHUNK, 2 BLOCK_N2] -> even and odd columns, each [CHUNK, BLOCK_N2] (no strided access)."""
    return tl.split(tl.reshape(x, [CHUNK, BLOCK_N2, 2]))


@triton.jit
def _biased_pairs(X, XB, b, g, h, t, T, N, sxb, sxt, sxg, BLOCK_N2: tl.constexpr):
    """Even/odd halves (e, o) of rows t of x + bias, each [ROWS, BLOCK_N2] fp32. The tile is loaded
    contiguously and split in registers (stride-2 access was ~3x slower)."""
    n = tl.arange(0, 2 * BLOCK_N2)
    x = tl.load(X + b * sxb + g * sxg + t[:, None] * sxt + n[None, :], mask=(t[:, None] < T) & (n[None, :] < N),
                other=0.0).to(tl.float32)
    x += tl.load(XB + h * N + n, mask=n < N, other=0.0)[None, :]
    return _split_pairs(x, t.shape[0], BLOCK_N2)


@triton.jit
def _rotated_pairs(X, XB, b, g, h, t, T, N, sxb, sxt, sxg, cos, sin, BLOCK_N2: tl.constexpr):
    """Biased halves (e, o) and their rotation (re, ro), each [ROWS, BLOCK_N2] fp32."""
    e, o = _biased_pairs(X, XB, b, g, h, t, T, N, sxb, sxt, sxg, BLOCK_N2)
    return e, o, e * cos - o * sin, e * sin + o * cos


@triton.jit
def _interleave(e, o, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr):
    return tl.reshape(tl.join(e, o), [CHUNK, BLOCK_N])


@fast_launch
@triton.jit
def _phase_sums_kernel(DT, ANG, SUMS, T, H, nc, S, sdb, sdt, sdh, sab, sat, sah,
                       CHUNK: tl.constexpr, BPP: tl.constexpr, BLOCK_S: tl.constexpr, HPP: tl.constexpr):
    """SUMS[b, h, c, s] = sum over block c (CHUNK rows) of dt_t pi tanh(angles_t[s]) (fp32), for
    BPP consecutive blocks and HPP heads per program (one-block programs were launch-bound at 8-row
    blocks; HPP > 1 only for angles shared by the heads, loaded and mapped through tanh once)."""
    c0 = tl.program_id(0) * BPP
    b = tl.program_id(1) // (H // HPP)
    h0 = (tl.program_id(1) % (H // HPP)) * HPP
    t = c0 * CHUNK + tl.arange(0, BPP * CHUNK)
    i = tl.arange(0, BLOCK_S)
    c = c0 + tl.arange(0, BPP)
    m = (t[:, None] < T) & (i[None, :] < S)
    rate = 3.141592653589793 * _tanh(tl.load(ANG + b * sab + h0 * sah + t[:, None] * sat + i[None, :], mask=m,
                                             other=0.0).to(tl.float32))
    for hh in tl.static_range(HPP):
        h = h0 + hh
        dt = tl.load(DT + b * sdb + t * sdt + h * sdh, mask=t < T, other=0.0).to(tl.float32)
        inc = tl.reshape(dt[:, None] * rate, [BPP, CHUNK, BLOCK_S])
        tl.store(SUMS + ((b * H + h) * nc + c[:, None]) * S + i[None, :], tl.sum(inc, axis=1),
                 mask=(c[:, None] < nc) & (i[None, :] < S))


@triton.jit
def _phase_scan_block(SUMS, TH0, carry, bh, c0, nc, S, i, NCB: tl.constexpr):
    """Chunks c0 .. c0 + NCB - 1: store their entering phases (mod 2 pi), return the carry (fp64)."""
    r = c0 + tl.arange(0, NCB)
    m = (r[:, None] < nc) & (i[None, :] < S)
    off = (bh * nc + r[:, None]) * S + i[None, :]
    x = tl.load(SUMS + off, mask=m, other=0.0).to(tl.float64)
    start = carry[None, :] + tl.cumsum(x, axis=0) - x
    tl.store(TH0 + off, _wrap64(start).to(tl.float32), mask=m)
    return _wrap64(carry + tl.sum(x, axis=0))


@triton.jit
def _wrap64(x):
    """x mod 2 pi in fp64 by a multiply (an fp64 division is a long software sequence on the GPU;
    a floor one ulp off leaves x one period away, the same angle)."""
    return x - 6.283185307179586 * tl.floor(x * 0.15915494309189535)


@fast_launch
@triton.jit
def _phase_scan_kernel(SUMS, INIT, TH0, FIN, nc, S, HAS_INIT: tl.constexpr, NCB: tl.constexpr,
                       BLOCK_S: tl.constexpr, NB_STATIC: tl.constexpr):
    """Exclusive running sum over chunks of SUMS [B*H, nc, S] plus INIT, in fp64, reduced mod 2 pi:
    TH0 [B*H, nc, S] (entering phases) and FIN [B*H, S] (final phase), both fp32; grid (B*H,
    S / BLOCK_S): pairs split over programs when batch x heads is small (a serial scan per program)."""
    bh = tl.program_id(0)
    i = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    if HAS_INIT:
        carry = tl.load(INIT + bh * S + i, mask=i < S, other=0.0).to(tl.float64)
    else:
        carry = tl.zeros([BLOCK_S], dtype=tl.float64)
    if NB_STATIC > 0:  # interpreter: loop bounds must be Python ints
        for j in range(NB_STATIC):
            carry = _phase_scan_block(SUMS, TH0, carry, bh, j * NCB, nc, S, i, NCB)
    else:
        for c0 in range(0, nc, NCB):
            carry = _phase_scan_block(SUMS, TH0, carry, bh, c0, nc, S, i, NCB)
    tl.store(FIN + bh * S + i, carry.to(tl.float32), mask=i < S)


PHASE_SCAN_TILE = 256   # most blocks per serial step of the phase scan
PHASE_SUM_HEADS = 8     # heads per program of the phase sums (one tanh of shared angles for all of them)


def chunk_start_phases(dt, angles, init_angle, chunk_size):
    """Phase entering each chunk, [B, H, nc, S] fp32 in [0, 2pi), and the final phase [B, H, S].

    dt [B, T, H]; angles [B, T, S] or [B, T, H, S]; init_angle [B, H, S] or None. Chunk sums in
    fp32, the running sum across chunks in fp64 reduced mod 2*pi (two Triton launches)."""
    B, T, H = dt.shape
    S = angles.shape[-1]
    nc = max(1, cdiv(T, chunk_size))
    if S == 0:
        return (torch.zeros(B, H, nc, S, device=dt.device, dtype=torch.float32),
                torch.zeros(B, H, S, device=dt.device, dtype=torch.float32))
    # every entry is written by the two launches (no fill kernels: this pre-pass is launch-bound)
    th0 = torch.empty(B, H, nc, S, device=dt.device, dtype=torch.float32)
    final = torch.empty(B, H, S, device=dt.device, dtype=torch.float32)
    sums = (torch.empty if T > 0 else torch.zeros)(B, H, nc, S, device=dt.device, dtype=torch.float32)
    BS = max(16, next_pow2(S))
    if T > 0:
        sa = (angles.stride(0), angles.stride(1), 0 if angles.dim() == 3 else angles.stride(2))
        bpp = max(1, min(64 // chunk_size, next_pow2(nc)))   # ~64 rows per program
        hpp = PHASE_SUM_HEADS if H % PHASE_SUM_HEADS == 0 and angles.dim() == 3 else 1
        _phase_sums_kernel[(cdiv(nc, bpp), B * H // hpp)](dt, angles, sums, T, H, nc, S, *dt.stride(), *sa,
                                                          CHUNK=chunk_size, BPP=bpp, BLOCK_S=BS, HPP=hpp, num_warps=4)
    init = init_angle.float().contiguous() if init_angle is not None else final
    NCB = min(PHASE_SCAN_TILE, max(16, next_pow2(nc)))  # blocks per serial step (fp64 tiles)
    BSS = BS                                             # pairs per scan program: split S to fill the GPU
    while BSS > 16 and B * H * cdiv(S, BSS) < GROUP_TARGET_PROGRAMS:
        BSS //= 2
    _phase_scan_kernel[(B * H, cdiv(S, BSS))](sums, init, th0, final, nc, S, HAS_INIT=init_angle is not None,
                                                     NCB=NCB, BLOCK_S=BSS, NB_STATIC=static_loop(cdiv(nc, NCB)),
                                                     num_warps=4 if NCB * BSS <= 64 * 64 else 8)
    return th0, final


# --------------------------------------------------------------------------------------------
# Forward in chunk groups. A parallel pre-pass (_prep_qk_kernel, grid (chunks, B*H)) builds the
# prepared per-head QS = rot(q + q_bias), KS = c_t rot(k + k_bias) and the skip coefficient
# D + gamma_t <q_t, k_t>; the SSD core then carries the state in registers through the chunks
# of a group (as the official kernel does through the whole sequence), so per-chunk states never
# touch memory in inference. When batch x heads is too small to fill the GPU the sequence is
# split into groups whose entering states come from a cheap pre-pass (local group end states,
# then a scan over groups). Keeping the rotation out of the core loop keeps its registers low.
# --------------------------------------------------------------------------------------------

@fast_launch
@triton.jit
def _prep_qk_kernel(Q, K, QB, KB, DT, TRAP, ANG, TH0, Dp, QS, KS, SKIP, T, H, G, nblk, N, S,
                    sqb, sqt, sqg, sdb, sdt, sdh, sab, sat, sah,
                    HAS_D: tl.constexpr, ROWS: tl.constexpr, BLOCK_N2: tl.constexpr):
    """ROWS tokens of one (batch, head), from the phase entering them (TH0 [B, H, nblk, S]): QS =
    rot(q + q_bias), KS = c_t rot(k + k_bias) [B, T, H, N] in QS's dtype and SKIP = D + gamma_t
    <q_t + q_bias, k_t + k_bias> [B, T, H] fp32. Small row blocks keep the tiles from spilling."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    g = h // (H // G)
    i = tl.arange(0, BLOCK_N2)
    n = tl.arange(0, 2 * BLOCK_N2)
    t = blk * ROWS + tl.arange(0, ROWS)
    phase = tl.load(TH0 + (bh * nblk + blk) * S + i, mask=i < S, other=0.0)
    dt, gamma, cs = _row_coeffs(DT, TRAP, b, h, t, T, sdb, sdt, sdh)
    cos, sin, _ = _row_phase(ANG, dt, b, h, t, T, S, sab, sat, sah, phase, BLOCK_N2)
    qe, qo, qre, qro = _rotated_pairs(Q, QB, b, g, h, t, T, N, sqb, sqt, sqg, cos, sin, BLOCK_N2)
    ke, ko, kre, kro = _rotated_pairs(K, KB, b, g, h, t, T, N, sqb, sqt, sqg, cos, sin, BLOCK_N2)
    skip = gamma * tl.sum(qe * ke + qo * ko, axis=1)
    if HAS_D:
        skip += tl.load(Dp + h).to(tl.float32)
    tl.store(SKIP + (b * T + t) * H + h, skip, mask=t < T)
    off = ((b * T + t[:, None]) * H + h) * N + n[None, :]
    m = (t[:, None] < T) & (n[None, :] < N)
    tl.store(QS + off, _interleave(qre, qro, ROWS, 2 * BLOCK_N2).to(QS.dtype.element_ty), mask=m)
    tl.store(KS + off, _interleave(kre * cs[:, None], kro * cs[:, None], ROWS, 2 * BLOCK_N2).to(KS.dtype.element_ty),
             mask=m)


@fast_launch
@triton.jit
def _core_group_state_kernel(K, V, dA, SG, DECG, T, H, nc, N, P, CPG,
                             skb, skt, skh, svb, svt, svh, sdb, sdt, sdh,
                             CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
                             PREC: tl.constexpr, CPG_STATIC: tl.constexpr):
    """Local end state of chunk group g (zero entering state) -> SG[b, h, g] fp32 [P, N]; the
    group's total log decay -> DECG[b, h, g]. Chunks past the end load zeros: no change."""
    grp = tl.program_id(0)
    bh = tl.program_id(1)
    ng = tl.num_programs(0)
    b = bh // H
    h = bh % H
    st = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    total = 0.0
    if CPG_STATIC > 0:  # interpreter: loop bounds must be Python ints
        for j in range(CPG_STATIC):
            st, last = _core_state_step(K, V, dA, st, b, h, grp * CPG + j, T, N, P, skb, skt, skh, svb, svt, svh,
                                        sdb, sdt, sdh, CHUNK, BLOCK_N, BLOCK_P, PREC)
            total += last
    else:
        for j in range(0, CPG):
            st, last = _core_state_step(K, V, dA, st, b, h, grp * CPG + j, T, N, P, skb, skt, skh, svb, svt, svh,
                                        sdb, sdt, sdh, CHUNK, BLOCK_N, BLOCK_P, PREC)
            total += last
    p = tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    tl.store(SG + (bh * ng + grp) * P * N + p[:, None] * N + n[None, :], st,
             mask=(p[:, None] < P) & (n[None, :] < N))
    tl.store(DECG + bh * ng + grp, total)


@triton.jit
def _core_state_step(K, V, dA, st, b, h, c, T, N, P, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh,
                     CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, PREC: tl.constexpr):
    """S <- exp(ell_last) S + sum_s exp(ell_last - ell_s) V_s K_s^T over chunk c; returns (S, ell_last)."""
    k = _load_chunk(K, b, h, c, T, skb, skt, skh, CHUNK, BLOCK_N, N)
    v = _load_chunk(V, b, h, c, T, svb, svt, svh, CHUNK, BLOCK_P, P)
    ell = _load_ell(dA, b, h, c, T, sdb, sdt, sdh, CHUNK)
    last = tl.sum(tl.where(tl.arange(0, CHUNK) == CHUNK - 1, ell, 0.0), axis=0)
    vw = (v.to(tl.float32) * tl.exp(last - ell)[:, None]).to(k.dtype)
    st = st * tl.exp(last) + tl.dot(tl.trans(vw), k, input_precision=PREC)
    return st, last


@triton.jit
def _core_chunk(q, k, v, ell, skip, z, st, ST, DEC, Y, YPRE, b, h, c, T, H, nc, N, P, svb, svt, svh,
                HAS_Z: tl.constexpr, SAVE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_P: tl.constexpr, PREC: tl.constexpr):
    """Outputs of chunk c (tiles q, k [C, N], v and the gate z [C, P], cumulative log decay ell
    [C], skip coefficient [C]) from its entering state ``st`` [P, N] fp32; returns the leaving state."""
    i = tl.arange(0, CHUNK)
    p = tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    t = c * CHUNK + i
    last = tl.sum(tl.where(i == CHUNK - 1, ell, 0.0), axis=0)
    seg = tl.where(i[:, None] > i[None, :], ell[:, None] - ell[None, :], -float("inf"))
    scores = tl.dot(q, tl.trans(k), input_precision=PREC) * tl.exp(seg)
    y = tl.dot(q, tl.trans(st.to(q.dtype)), input_precision=PREC) * tl.exp(ell)[:, None]
    y = tl.dot(scores.to(v.dtype), v, y, input_precision=PREC)
    y += skip[:, None] * v.to(tl.float32)
    mask = (t[:, None] < T) & (p[None, :] < P)
    off = b * svb + t[:, None] * svt + h * svh + p[None, :]
    bh = b * H + h
    if SAVE:
        tl.store(YPRE + off, y.to(YPRE.dtype.element_ty), mask=mask)
        ms = (p[:, None] < P) & (n[None, :] < N) & ((p[:, None] * 0 + c) < nc)
        tl.store(ST + (bh * nc + c) * P * N + p[:, None] * N + n[None, :], st.to(ST.dtype.element_ty), mask=ms)
        tl.store(DEC + bh * nc + c, last, mask=c < nc)
    if HAS_Z:
        zf = z.to(tl.float32)
        y = y * zf * tl.sigmoid(zf)
    tl.store(Y + off, y.to(Y.dtype.element_ty), mask=mask)
    vw = (v.to(tl.float32) * tl.exp(last - ell)[:, None]).to(k.dtype)
    return st * tl.exp(last) + tl.dot(tl.trans(vw), k, input_precision=PREC)


@triton.jit
def _side_loads(V, SKIP, Z, b, h, c, T, H, P, svb, svt, svh, HAS_SKIP: tl.constexpr, HAS_Z: tl.constexpr,
                CHUNK: tl.constexpr, BLOCK_P: tl.constexpr):
    """v [C, P], the skip coefficient [C] and the gate z [C, P] of chunk c (zeros past the end; z
    stands in as v without a gate)."""
    t = c * CHUNK + tl.arange(0, CHUNK)
    v = _load_chunk(V, b, h, c, T, svb, svt, svh, CHUNK, BLOCK_P, P)
    if HAS_SKIP:
        skip = tl.load(SKIP + (b * T + t) * H + h, mask=t < T, other=0.0)
    else:
        skip = tl.zeros([CHUNK], dtype=tl.float32)
    z = v
    if HAS_Z:
        z = _load_chunk(Z, b, h, c, T, svb, svt, svh, CHUNK, BLOCK_P, P)
    return v, skip, z


@triton.jit
def _core_out_step(Q, K, V, dA, SKIP, Z, ST, DEC, Y, YPRE, st, v, skip, z, b, h, c, T, H, nc, N, P,
                   sqb, sqt, sqh, svb, svt, svh, sdb, sdt, sdh,
                   HAS_SKIP: tl.constexpr, HAS_Z: tl.constexpr, SAVE: tl.constexpr, CHUNK: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, PREC: tl.constexpr, PREFETCH: tl.constexpr):
    """Chunk c on prepared Q, K: loads, then :func:`_core_chunk`; returns the leaving state and the
    (v, skip, z) of the next step. Triton's pipeliner prefetches only q, k and dA (the loads that
    feed dots alone); with PREFETCH the v, skip, z of chunk c came from the previous step and this
    one issues chunk c + 1's before its dots, so their latency overlaps the chunk's work."""
    if PREFETCH:
        v_next, skip_next, z_next = _side_loads(V, SKIP, Z, b, h, c + 1, T, H, P, svb, svt, svh, HAS_SKIP, HAS_Z,
                                                CHUNK, BLOCK_P)
    else:
        v, skip, z = _side_loads(V, SKIP, Z, b, h, c, T, H, P, svb, svt, svh, HAS_SKIP, HAS_Z, CHUNK, BLOCK_P)
        v_next = v
        skip_next = skip
        z_next = z
    q = _load_chunk(Q, b, h, c, T, sqb, sqt, sqh, CHUNK, BLOCK_N, N)
    k = _load_chunk(K, b, h, c, T, sqb, sqt, sqh, CHUNK, BLOCK_N, N)
    ell = _load_ell(dA, b, h, c, T, sdb, sdt, sdh, CHUNK)
    st = _core_chunk(q, k, v, ell, skip, z, st, ST, DEC, Y, YPRE, b, h, c, T, H, nc, N, P, svb, svt, svh,
                     HAS_Z, SAVE, CHUNK, BLOCK_N, BLOCK_P, PREC)
    return st, v_next, skip_next, z_next


@fast_launch
@triton.jit
def _core_group_out_kernel(Q, K, V, dA, SKIP, Z, SIN, ST, DEC, SF, Y, YPRE, T, H, nc, N, P, CPG,
                           sqb, sqt, sqh, svb, svt, svh, sdb, sdt, sdh,
                           HAS_SIN: tl.constexpr, WRITE_FINAL: tl.constexpr, HAS_SKIP: tl.constexpr,
                           HAS_Z: tl.constexpr, SAVE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_P: tl.constexpr, PREC: tl.constexpr, CPG_STATIC: tl.constexpr,
                           PREFETCH: tl.constexpr):
    """Chunk group g of one (batch, head): SIN [B, H, ng, P, N] fp32 entering states. With SAVE
    also stores the pre-gate output, every chunk's entering state ST [B, H, nc, P, N] and the
    chunk decays DEC [B, H, nc] (for the backward). WRITE_FINAL (one group): final state -> SF.
    PREFETCH: v, skip, z loaded one chunk ahead (:func:`_core_out_step`)."""
    grp = tl.program_id(0)
    bh = tl.program_id(1)
    ng = tl.num_programs(0)
    b = bh // H
    h = bh % H
    p = tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    ms = (p[:, None] < P) & (n[None, :] < N)
    so = p[:, None] * N + n[None, :]
    if HAS_SIN:
        st = tl.load(SIN + (bh * ng + grp) * P * N + so, mask=ms, other=0.0)
    else:
        st = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    # the first chunk's side loads; without PREFETCH each step loads its own (T = 0 masks these off)
    v, skip, z = _side_loads(V, SKIP, Z, b, h, grp * CPG, T if PREFETCH else 0, H, P, svb, svt, svh, HAS_SKIP, HAS_Z,
                             CHUNK, BLOCK_P)
    if CPG_STATIC > 0:  # interpreter: loop bounds must be Python ints
        for j in range(CPG_STATIC):
            st, v, skip, z = _core_out_step(Q, K, V, dA, SKIP, Z, ST, DEC, Y, YPRE, st, v, skip, z, b, h,
                                            grp * CPG + j, T, H, nc, N, P, sqb, sqt, sqh, svb, svt, svh, sdb, sdt,
                                            sdh, HAS_SKIP, HAS_Z, SAVE, CHUNK, BLOCK_N, BLOCK_P, PREC, PREFETCH)
    else:
        for j in range(0, CPG):
            st, v, skip, z = _core_out_step(Q, K, V, dA, SKIP, Z, ST, DEC, Y, YPRE, st, v, skip, z, b, h,
                                            grp * CPG + j, T, H, nc, N, P, sqb, sqt, sqh, svb, svt, svh, sdb, sdt,
                                            sdh, HAS_SKIP, HAS_Z, SAVE, CHUNK, BLOCK_N, BLOCK_P, PREC, PREFETCH)
    if WRITE_FINAL:
        tl.store(SF + bh * P * N + so, st, mask=ms)


GROUP_TARGET_PROGRAMS = 132   # ~1 program per H100 SM; the group pre-pass runs only below this
PREP_ROWS = 8                 # tokens per program of the preparation kernels (and of their phase blocks)
PREP_NUM_WARPS = 1            # H100: 8 rows in one warp (no barriers in the row sums and scans) beat 16 rows at 4
                              # warps in the backward preparation (0.45 vs 0.62 ms at 8x2048), equal here
GROUP_NUM_STAGES = 2          # pipelining depth in bf16/fp16 (H100: 2 beat 1 and 3; 3 needs 123 KB smem)
GROUP_NUM_STAGES_INFER = 3    # the same for the inference kernels (output kernel at chunk 32: 49 KB; H100 fwd 8x2048 /
                              # 2x8192 / 1x16384 0.414 / 0.494 / 0.518 vs 0.442 / 0.514 / 0.537 ms at 2:
                              # gpu_fwd_ab_s13a.json, where 3 stages in training made fwd+bwd 9 % slower)
GROUP_PREFETCH = True         # inference: v, skip, z one chunk ahead (H100 bf16 fwd, 8x2048 / 2x8192 / 1x16384:
                              # 0.473 / 0.554 / 0.591 vs 0.504 / 0.586 / 0.622 ms); the training forward (SAVE) was
                              # slower with it
GROUP_NUM_WARPS = 4           # H100: 4 warps beat 8 at every measured shape
INFER_CORE_CHUNK = 32         # inference: chunk of the group output kernel (H100 fwd, 8x2048 / 2x8192 / 1x16384:
                              # 0.442 / 0.513 / 0.538 vs 0.468 / 0.543 / 0.567 ms at 64; 16 slower:
                              # gpu_infer_chunk_s13b.json, gpu_infer_chunk16_s13.json)


def group_pipeline_depth(dtype: torch.dtype, device, inference: bool = False, chunk: int = 64) -> int:
    """GROUP_NUM_STAGES (GROUP_NUM_STAGES_INFER for the inference group kernels at chunks up to 64,
    where the measured depth fits) for 16-bit operands on a Hopper-class part (227 KB of shared
    memory per block), else 1: fp32 at two stages needs 131 KB, and smaller parts gain little."""
    device = torch.device(device)
    if dtype == torch.float32 or INTERPRET or device.type != "cuda":
        return 1
    if _smem_optin(device.index or 0) < 200 * 1024:
        return 1
    return GROUP_NUM_STAGES_INFER if inference and chunk <= 64 else GROUP_NUM_STAGES


@functools.lru_cache(maxsize=None)
def _smem_optin(index: int) -> int:
    return int(getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", 0) or 0)


def choose_groups(nc: int, BH: int, target: int = None) -> int:
    """Number of chunk groups: one when batch x heads fills the GPU, else split so that groups x
    batch x heads reaches ``target`` programs (at least one chunk per group)."""
    target = GROUP_TARGET_PROGRAMS if target is None else target
    ng = 1
    while BH * ng < target and ng < nc:
        ng *= 2
    return cdiv(nc, cdiv(nc, ng))


class _GroupRun:
    """Buffers and launch settings shared by the group forwards (core and fused)."""

    def __init__(self, B, T, H, N, P, chunk_size, dev, out_dtype, dot_dtype, has_z, save, groups):
        self.nc = nc = max(1, cdiv(T, chunk_size))
        ng = groups or choose_groups(nc, B * H)
        self.cpg = cdiv(nc, ng)
        self.ng = cdiv(nc, self.cpg)
        self.final = torch.empty(B, H, P, N, device=dev, dtype=torch.float32)
        self.y = torch.empty(B, T, H, P, device=dev, dtype=out_dtype)
        self.ypre = torch.empty_like(self.y) if save and has_z else self.y
        st_dtype = torch.float32 if dot_dtype == torch.float32 else dot_dtype
        self.states = torch.empty(B, H, nc, P, N, device=dev, dtype=st_dtype) if save else self.final
        self.dec = torch.empty(B, H, nc, device=dev, dtype=torch.float32) if save else self.final
        self.meta = dict(CHUNK=chunk_size, BLOCK_N=max(16, next_pow2(N)),
                         BLOCK_P=max(16, next_pow2(P)), PREC=dot_precision(dot_dtype),
                         CPG_STATIC=static_loop(self.cpg))
        self.meta["num_warps"] = group_warps(self.meta["PREC"])
        self.meta["num_stages"] = group_pipeline_depth(dot_dtype, dev, inference=not save, chunk=chunk_size)
        self.shape = (B, H, P, N)
        self.save = save

    def entering(self, S0, launch_state):
        """(SIN, HAS_SIN, WRITE_FINAL) for the output kernel; with several groups runs
        ``launch_state(sg, decg)`` (local group end states) and the scan over groups."""
        B, H, P, N = self.shape
        if self.ng == 1:
            return (S0 if S0 is not None else self.final), S0 is not None, True
        sg = torch.empty(B, H, self.ng, P, N, device=self.y.device, dtype=torch.float32)
        decg = torch.empty(B, H, self.ng, device=self.y.device, dtype=torch.float32)
        launch_state(sg, decg)
        PN = P * N
        BLOCK = min(512, next_pow2(PN))
        _state_scan_kernel[(cdiv(PN, BLOCK), B * H)](sg, decg, S0 if S0 is not None else self.final, self.final,
                                                     self.ng, PN, HAS_S0=S0 is not None, BLOCK=BLOCK,
                                                     NC_STATIC=static_loop(self.ng), num_warps=4)
        return sg, True, False

    def result(self):
        keep = lambda t: t if self.save else None
        return self.y, keep(self.ypre), keep(self.states), keep(self.dec), self.final


def ssd_group_fwd(Q, K, V, dA, skip, z, S0, chunk_size, *, out_dtype, save=False, groups=None, out_chunk=None):
    """SSD core in chunk groups. Q, K [B, T, H, N] and V [B, T, H, P] share one dtype (contiguous);
    dA [B, T, H] fp32; skip [B, T, H] fp32 or None (y += skip * V); z gate or None; S0 fp32 or None.
    ``out_chunk`` (inference, dividing chunk_size): the output kernel walks each group in chunks of
    that size (the groups and their state pre-pass keep chunk_size).

    Returns (y [B, T, H, P] in out_dtype, y before the gate or None, entering chunk states, chunk
    decays, final fp32 state); the pre-gate output, states and decays only when ``save``."""
    B, T, H, N = Q.shape
    P = V.shape[-1]
    r = _GroupRun(B, T, H, N, P, chunk_size, V.device, out_dtype, Q.dtype, z is not None, save, groups)
    grid = (r.ng, B * H)
    sin, has_sin, write_final = r.entering(S0, lambda sg, decg: _core_group_state_kernel[grid](
        K, V, dA, sg, decg, T, H, r.nc, N, P, r.cpg, *K.stride()[:3], *V.stride()[:3], *dA.stride(), **r.meta))
    sub = 1 if save or not out_chunk else chunk_size // out_chunk    # output-kernel chunks per chunk
    meta = dict(r.meta, CHUNK=chunk_size // sub, CPG_STATIC=static_loop(r.cpg * sub))
    _core_group_out_kernel[grid](Q, K, V, dA, skip if skip is not None else r.final, z if z is not None else r.y,
                                 sin, r.states, r.dec, r.final, r.y, r.ypre, T, H, r.nc * sub, N, P, r.cpg * sub,
                                 *Q.stride()[:3], *V.stride()[:3], *dA.stride(), HAS_SIN=has_sin,
                                 WRITE_FINAL=write_final, HAS_SKIP=skip is not None, HAS_Z=z is not None, SAVE=save,
                                 PREFETCH=GROUP_PREFETCH and not save, **meta)
    return r.result()


def prep_rows(chunk_size: int) -> int:
    """Tokens per program of the preparation kernels, and so the block size of their phases."""
    return min(PREP_ROWS, chunk_size)


def prep_qk(q, k, dt, trap, q_bias, k_bias, angles, D, th0, rows, dtype):
    """Prepared QS, KS [B, T, H, N] in ``dtype`` and the skip coefficient [B, T, H] fp32; th0 [B, H,
    nblk, S] are the phases entering each block of ``rows`` tokens (:func:`chunk_start_phases`)."""
    B, T, G, N = q.shape
    H = dt.shape[2]
    S = angles.shape[-1]
    nblk = th0.shape[2]
    QS = torch.empty(B, T, H, N, device=q.device, dtype=dtype)
    KS = torch.empty_like(QS)
    skip = torch.empty(B, T, H, device=q.device, dtype=torch.float32)
    sa = (angles.stride(0), angles.stride(1), 0 if angles.dim() == 3 else angles.stride(2))
    qb, kb = q_bias.float().contiguous(), k_bias.float().contiguous()
    angles_, th0_ = nonempty(angles, dt), nonempty(th0, dt)
    BN2 = max(16, next_pow2(N)) // 2
    _prep_qk_kernel[(nblk, B * H)](q, k, qb, kb, dt, trap, angles_, th0_, D if D is not None else skip, QS, KS, skip,
                                   T, H, G, nblk, N, S, *q.stride()[:3], *dt.stride(), *sa,
                                   HAS_D=D is not None, ROWS=rows, BLOCK_N2=BN2,
                                   num_warps=PREP_NUM_WARPS)
    return QS, KS, skip


def infer_out_chunk(chunk_size: int, save: bool):
    """Chunk of the group output kernel in inference (no saved per-chunk states, so the caller's
    chunk size need not be kept there): INFER_CORE_CHUNK where it divides chunk_size; else None."""
    if save or not INFER_CORE_CHUNK or chunk_size <= INFER_CORE_CHUNK or chunk_size % INFER_CORE_CHUNK:
        return None
    return INFER_CORE_CHUNK


def mamba3_fused_fwd(q, k, v, dA, dt, trap, q_bias, k_bias, angles, D, z, th0, S0, chunk_size,
                     save_pre=False, dot_dtype=None, groups=None):
    """Mamba-3 SISO forward on raw inputs (contiguous; dA, dt, trap [B, T, H] with equal strides;
    th0 the phases entering each block of ``prep_rows(chunk_size)`` tokens):
    the preparation pre-pass writes QS, KS, then the SSD core runs in chunk groups. (Preparing
    q, k inside the core loop instead was measured 2x slower on the H100: 255 registers and
    ~350 spilled per thread.)

    Returns (y [B, T, H, P] in v's dtype, saved or None, entering chunk states, chunk decays, final
    state fp32); saved = (y before the gate, prepared QS, KS [B, T, H, N], the skip coefficient
    [B, T, H] fp32) and the states and
    decays (for the backward) only when ``save_pre``."""
    dd = dot_dtype or v.dtype
    vk = v if v.dtype == dd else v.to(dd)
    QS, KS, skip = prep_qk(q, k, dt, trap, q_bias, k_bias, angles, D, th0, prep_rows(chunk_size), dd)
    y, ypre, states, dec, final = ssd_group_fwd(QS, KS, vk, dA, skip, z, S0, chunk_size, out_dtype=v.dtype,
                                                save=save_pre, groups=groups,
                                                out_chunk=infer_out_chunk(chunk_size, save_pre))
    return y, ((ypre, QS, KS, skip) if save_pre else None), states, dec, final
