"""Triton forward kernels of the chunked scalar-decay SSD core used by Mamba-3 SISO (and Mamba-2).

The core, per (batch b, head h), on prepared per-head tensors (rotation, biases and the
trapezoid scale already applied):

    y_t = sum_{s<t, same chunk} (Q_t . K_s) exp(ell_t - ell_s) V_s + exp(ell_t) S_c Q_t
    S_{c+1} = exp(ell_last) S_c + sum_s exp(ell_last - ell_s) V_s K_s^T        (S_0 = initial)

with ell the inclusive within-chunk cumsum of dA. Chunk-parallel in three launches so that a
small batch x heads still fills the GPU:
    1. _chunk_state_kernel  grid (chunks, B*H):   chunk-local state of every chunk
    2. _state_scan_kernel   grid (P*N blocks, B*H): short sequential pass over chunk states,
       overwriting each local state with the state entering its chunk; final state in fp32
    3. _chunk_out_kernel    grid (chunks, B*H):   intra-chunk quadratic form + inter-chunk term
Layouts: Q, K [B, T, H, N]; V [B, T, H, P]; dA [B, T, H] fp32; states [B, H, nc, P, N].
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


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


INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
FUSED_NUM_WARPS = None  # override of the fused chunk kernels' warps (benchmarks try 4 and 8)


def static_loop(n: int) -> int:
    """Under TRITON_INTERPRET runtime loop bounds break (numpy 2 scalars); pass them as constexpr."""
    return n if INTERPRET else 0


def nonempty(t, fallback):
    """An empty tensor (S = 0 rotary angles) may have a null data pointer, which a launch refuses;
    the kernels never touch it (all masks are off), so any valid tensor can stand in."""
    return t if t.numel() > 0 else fallback


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands multiply in full precision (no tf32); bf16/fp16 use the tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def ssd_core_fwd(Q, K, V, dA, S0, chunk_size: int, state_dtype=None):
    """Run the three forward launches.

    Q, K [B, T, H, N] and V [B, T, H, P] share one dtype; dA [B, T, H] fp32; S0 [B, H, P, N]
    fp32 or None. Returns (y [B, T, H, P] fp32, entering states [B, H, nc, P, N], final fp32 state).
    """
    B, T, H, N = Q.shape
    P = V.shape[-1]
    C = chunk_size
    nc = max(1, triton.cdiv(T, C))
    st_dtype = state_dtype or (torch.float32 if Q.dtype == torch.float32 else Q.dtype)
    states = torch.empty(B, H, nc, P, N, device=Q.device, dtype=st_dtype)
    dec = torch.empty(B, H, nc, device=Q.device, dtype=torch.float32)
    final = torch.empty(B, H, P, N, device=Q.device, dtype=torch.float32)
    y = torch.empty(B, T, H, P, device=Q.device, dtype=torch.float32)
    BN, BP = max(16, triton.next_power_of_2(N)), max(16, triton.next_power_of_2(P))
    prec = dot_precision(Q.dtype)
    nw = 4 if C * max(BN, BP) <= 4096 else 8
    _chunk_state_kernel[(nc, B * H)](K, V, dA, states, dec, T, H, nc, N, P,
                                     *K.stride()[:3], *V.stride()[:3], *dA.stride(),
                                     CHUNK=C, BLOCK_N=BN, BLOCK_P=BP, PREC=prec, num_warps=nw)
    PN = P * N
    BLOCK = min(512, triton.next_power_of_2(PN))
    s0 = S0 if S0 is not None else final
    _state_scan_kernel[(triton.cdiv(PN, BLOCK), B * H)](states, dec, s0, final, nc, PN,
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

@triton.jit
def _tanh(x):
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _chunk_coeffs(DT, TRAP, b, h, c, T, sb, st, sh, CHUNK: tl.constexpr):
    """dt, gamma = lam dt and the single-SSD scale c_t = gamma_t + (1 - lam_{t+1}) dt_{t+1}."""
    t = c * CHUNK + tl.arange(0, CHUNK)
    base = b * sb + h * sh
    dt = tl.load(DT + base + t * st, mask=t < T, other=0.0).to(tl.float32)
    lam = tl.sigmoid(tl.load(TRAP + base + t * st, mask=t < T, other=0.0).to(tl.float32))
    nxt = (t + 1) < T
    dt_n = tl.load(DT + base + (t + 1) * st, mask=nxt, other=0.0).to(tl.float32)
    lam_n = tl.sigmoid(tl.load(TRAP + base + (t + 1) * st, mask=nxt, other=0.0).to(tl.float32))
    gamma = lam * dt
    return dt, gamma, gamma + (1.0 - lam_n) * dt_n


@triton.jit
def _chunk_phase(ANG, TH0, dt, b, bh, c, T, nc, S, sab, sat, sah, h,
                 CHUNK: tl.constexpr, BLOCK_N2: tl.constexpr):
    """cos, sin [CHUNK, BLOCK_N2] of the cumulative phase of pair i (1, 0 for unrotated pairs)."""
    t = c * CHUNK + tl.arange(0, CHUNK)
    i = tl.arange(0, BLOCK_N2)
    rot = i < S
    raw = tl.load(ANG + b * sab + h * sah + t[:, None] * sat + i[None, :],
                  mask=(t[:, None] < T) & rot[None, :], other=0.0).to(tl.float32)
    th0 = tl.load(TH0 + (bh * nc + c) * S + i, mask=rot, other=0.0)
    theta = th0[None, :] + tl.cumsum(dt[:, None] * 3.141592653589793 * _tanh(raw), axis=0)
    return tl.where(rot[None, :], tl.cos(theta), 1.0), tl.where(rot[None, :], tl.sin(theta), 0.0)


@triton.jit
def _rotated_pairs(X, XB, b, g, h, t, T, N, sxb, sxt, sxg, cos, sin, BLOCK_N2: tl.constexpr):
    """Biased even/odd halves (e, o) and their rotation (re, ro), each [CHUNK, BLOCK_N2] fp32."""
    i = tl.arange(0, BLOCK_N2)
    ev = 2 * i
    m = (t[:, None] < T) & (ev[None, :] < N)
    base = X + b * sxb + g * sxg + t[:, None] * sxt
    mo = (t[:, None] < T) & (ev[None, :] + 1 < N)
    e = tl.load(base + ev[None, :], mask=m, other=0.0).to(tl.float32) \
        + tl.load(XB + h * N + ev, mask=ev < N, other=0.0)[None, :]
    o = tl.load(base + ev[None, :] + 1, mask=mo, other=0.0).to(tl.float32) \
        + tl.load(XB + h * N + ev + 1, mask=ev + 1 < N, other=0.0)[None, :]
    return e, o, e * cos - o * sin, e * sin + o * cos


@triton.jit
def _interleave(e, o, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr):
    return tl.reshape(tl.join(e, o), [CHUNK, BLOCK_N])


@triton.jit
def _fused_state_kernel(K, KB, V, dA, DT, TRAP, ANG, TH0, ST, DEC, T, H, G, nc, N, P, S,
                        skb, skt, skg, svb, svt, svh, sdb, sdt, sdh, sab, sat, sah,
                        CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
                        PREC: tl.constexpr):
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    g = h // (H // G)
    t = c * CHUNK + tl.arange(0, CHUNK)
    dt, gamma, cs = _chunk_coeffs(DT, TRAP, b, h, c, T, sdb, sdt, sdh, CHUNK)
    cos, sin = _chunk_phase(ANG, TH0, dt, b, bh, c, T, nc, S, sab, sat, sah, h, CHUNK, BLOCK_N // 2)
    ke, ko, kre, kro = _rotated_pairs(K, KB, b, g, h, t, T, N, skb, skt, skg, cos, sin, BLOCK_N // 2)
    v = _load_chunk(V, b, h, c, T, svb, svt, svh, CHUNK, BLOCK_P, P)
    ell = _load_ell(dA, b, h, c, T, sdb, sdt, sdh, CHUNK)
    last = tl.sum(tl.where(tl.arange(0, CHUNK) == CHUNK - 1, ell, 0.0), axis=0)
    # fold the decay to the chunk end into the k side: kc_s exp(ell_last - ell_s)
    w = cs * tl.exp(last - ell)
    kw = _interleave(kre * w[:, None], kro * w[:, None], CHUNK, BLOCK_N).to(v.dtype)
    local = tl.dot(tl.trans(v), kw, input_precision=PREC)                # [P, N]
    p = tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    tl.store(ST + (bh * nc + c) * P * N + p[:, None] * N + n[None, :], local.to(ST.dtype.element_ty),
             mask=(p[:, None] < P) & (n[None, :] < N))
    tl.store(DEC + bh * nc + c, last)


@triton.jit
def _fused_out_kernel(Q, K, QB, KB, V, dA, DT, TRAP, ANG, TH0, Dp, Z, ST, Y, YPRE, QS, KS,
                      T, H, G, nc, N, P, S,
                      sqb, sqt, sqg, svb, svt, svh, sdb, sdt, sdh, sab, sat, sah,
                      HAS_D: tl.constexpr, HAS_Z: tl.constexpr, SAVE_PRE: tl.constexpr,
                      CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
                      PREC: tl.constexpr):
    """Q, K share strides (same [B, T, G, N] layout); V, Z, Y, YPRE share V's strides. With
    SAVE_PRE also stores the pre-gate output and the prepared per-head QS, KS [B, T, H, N]."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    g = h // (H // G)
    i = tl.arange(0, CHUNK)
    t = c * CHUNK + i
    dt, gamma, cs = _chunk_coeffs(DT, TRAP, b, h, c, T, sdb, sdt, sdh, CHUNK)
    cos, sin = _chunk_phase(ANG, TH0, dt, b, bh, c, T, nc, S, sab, sat, sah, h, CHUNK, BLOCK_N // 2)
    qe, qo, qre, qro = _rotated_pairs(Q, QB, b, g, h, t, T, N, sqb, sqt, sqg, cos, sin, BLOCK_N // 2)
    ke, ko, kre, kro = _rotated_pairs(K, KB, b, g, h, t, T, N, sqb, sqt, sqg, cos, sin, BLOCK_N // 2)
    diag = gamma * tl.sum(qe * ke + qo * ko, axis=1)                       # un-rotated <q, k>
    v = _load_chunk(V, b, h, c, T, svb, svt, svh, CHUNK, BLOCK_P, P)
    dtype = v.dtype
    q = _interleave(qre, qro, CHUNK, BLOCK_N).to(dtype)
    k = _interleave(kre * cs[:, None], kro * cs[:, None], CHUNK, BLOCK_N).to(dtype)
    ell = _load_ell(dA, b, h, c, T, sdb, sdt, sdh, CHUNK)
    strict = i[:, None] > i[None, :]
    seg = tl.where(strict, ell[:, None] - ell[None, :], -float("inf"))
    scores = tl.dot(q, tl.trans(k), input_precision=PREC) * tl.exp(seg)
    y = tl.dot(scores.to(dtype), v, input_precision=PREC)
    p = tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    s = tl.load(ST + (bh * nc + c) * P * N + p[:, None] * N + n[None, :],
                mask=(p[:, None] < P) & (n[None, :] < N), other=0.0)
    y += tl.dot(q, tl.trans(s.to(dtype)), input_precision=PREC) * tl.exp(ell)[:, None]
    skip = diag
    if HAS_D:
        skip += tl.load(Dp + h).to(tl.float32)
    y += skip[:, None] * v.to(tl.float32)
    mask = (t[:, None] < T) & (p[None, :] < P)
    off = b * svb + t[:, None] * svt + h * svh + p[None, :]
    if SAVE_PRE:
        tl.store(YPRE + off, y.to(YPRE.dtype.element_ty), mask=mask)
        offn = ((b * T + t[:, None]) * H + h) * N + n[None, :]
        maskn = (t[:, None] < T) & (n[None, :] < N)
        tl.store(QS + offn, q, mask=maskn)
        tl.store(KS + offn, k, mask=maskn)
    if HAS_Z:
        z = tl.load(Z + off, mask=mask, other=0.0).to(tl.float32)
        y = y * z * tl.sigmoid(z)
    tl.store(Y + off, y.to(Y.dtype.element_ty), mask=mask)


def chunk_start_phases(dt, angles, init_angle, chunk_size):
    """Phase entering each chunk, [B, H, nc, S] fp32 in [0, 2pi), and the final phase [B, H, S].

    dt [B, T, H]; angles [B, T, S] or [B, T, H, S]; init_angle [B, H, S] or None. Chunk sums in
    fp32, the running sum across chunks in fp64 (reduced mod 2*pi)."""
    B, T, H = dt.shape
    S = angles.shape[-1]
    C = chunk_size
    nc = max(1, triton.cdiv(T, C))
    pad = nc * C - T
    rate = torch.nn.functional.pad(torch.pi * torch.tanh(angles.float()), (0, 0) * (angles.dim() - 2) + (0, pad))
    dtp = torch.nn.functional.pad(dt.float(), (0, 0, 0, pad)).view(B, nc, C, H)
    if angles.dim() == 3:
        sums = torch.einsum("bcth,bcts->bhcs", dtp, rate.view(B, nc, C, S))
    else:
        sums = (dtp.unsqueeze(-1) * rate.view(B, nc, C, H, S)).sum(2).permute(0, 2, 1, 3)
    run = torch.cumsum(sums.double(), dim=2)
    start = run - sums.double()
    if init_angle is not None:
        start = start + init_angle.double().unsqueeze(2)
    two_pi = 2 * torch.pi
    final = torch.remainder(start[:, :, -1] + sums[:, :, -1].double(), two_pi).float()
    return torch.remainder(start, two_pi).float().contiguous(), final


def mamba3_fused_fwd(q, k, v, dA, dt, trap, q_bias, k_bias, angles, D, z, th0, S0, chunk_size,
                     save_pre=False, dot_dtype=None):
    """Fused forward on raw inputs (contiguous; dA, dt, trap [B, T, H] with equal strides).

    Returns (y [B, T, H, P] in v's dtype, saved or None, entering states, chunk decays, final
    state fp32); saved = (y before the gate, prepared Q, K [B, T, H, N]) when ``save_pre``."""
    B, T, H, P = v.shape
    G, N = q.shape[2], q.shape[3]
    S = angles.shape[-1]
    C = chunk_size
    nc = th0.shape[2]
    dd = dot_dtype or v.dtype
    vk = v if v.dtype == dd else v.to(dd)
    st_dtype = torch.float32 if dd == torch.float32 else dd
    states = torch.empty(B, H, nc, P, N, device=v.device, dtype=st_dtype)
    dec = torch.empty(B, H, nc, device=v.device, dtype=torch.float32)
    final = torch.empty(B, H, P, N, device=v.device, dtype=torch.float32)
    y = torch.empty(B, T, H, P, device=v.device, dtype=v.dtype)
    ypre = torch.empty_like(y) if save_pre and z is not None else y  # no gate: pre-gate == y
    qs = torch.empty(B, T, H, N, device=v.device, dtype=dd) if save_pre else y
    ks = torch.empty(B, T, H, N, device=v.device, dtype=dd) if save_pre else y
    BN, BP = max(32, triton.next_power_of_2(N)), max(16, triton.next_power_of_2(P))
    prec = dot_precision(dd)
    nw = FUSED_NUM_WARPS or (4 if C * max(BN, BP) <= 4096 else 8)
    sa = (angles.stride(0), angles.stride(1), 0 if angles.dim() == 3 else angles.stride(2))
    qb, kb = q_bias.float().contiguous(), k_bias.float().contiguous()
    angles, th0 = nonempty(angles, dt), nonempty(th0, dt)
    _fused_state_kernel[(nc, B * H)](k, kb, vk, dA, dt, trap, angles, th0, states, dec, T, H, G, nc, N, P, S,
                                     *k.stride()[:3], *vk.stride()[:3], *dA.stride(), *sa,
                                     CHUNK=C, BLOCK_N=BN, BLOCK_P=BP, PREC=prec, num_warps=nw)
    PN = P * N
    BLOCK = min(512, triton.next_power_of_2(PN))
    s0 = S0 if S0 is not None else final
    _state_scan_kernel[(triton.cdiv(PN, BLOCK), B * H)](states, dec, s0, final, nc, PN,
                                                       HAS_S0=S0 is not None, BLOCK=BLOCK,
                                                       NC_STATIC=static_loop(nc), num_warps=4)
    _fused_out_kernel[(nc, B * H)](q, k, qb, kb, vk, dA, dt, trap, angles, th0,
                                   D if D is not None else dec, z if z is not None else y, states, y, ypre, qs, ks,
                                   T, H, G, nc, N, P, S, *q.stride()[:3], *vk.stride()[:3], *dA.stride(), *sa,
                                   HAS_D=D is not None, HAS_Z=z is not None, SAVE_PRE=save_pre,
                                   CHUNK=C, BLOCK_N=BN, BLOCK_P=BP, PREC=prec, num_warps=nw)
    return y, ((ypre, qs, ks) if save_pre else None), states, dec, final
