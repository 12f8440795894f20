"""Mamba-3 SISO decode step as one Triton kernel (state updated in place).

One program per (batch, head) does the whole token: phase update theta += dt*pi*tanh(angles),
bias + interleaved rotation of q and k, the trapezoid update
    S <- alpha S + beta x_prev k_prev^T + gamma x k^T      (alpha = e^dA, beta = (1-lam) dt alpha,
                                                            gamma = lam dt, lam = sigmoid(trap))
the readout y = S q + D x, the gate y * silu(z), and the cache writes (angle mod 2*pi, rotated
k, raw x). The state tile [P, N] is read and written once, in its own dtype (fp32 or bf16).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..launch import fast_launch
from ..utils import next_pow2

from .common import Mamba3State
from .triton_siso import check_power_of_two, check_triton_inputs
from .triton_siso_fwd import nonempty

TWO_PI = 2.0 * math.pi


@triton.jit
def _trapezoid_coeffs(dt, da, lam):
    """alpha = exp(dA), beta = (1 - lambda) dt alpha (previous token), gamma = lambda dt (current)."""
    alpha = tl.exp(da)
    return alpha, (1.0 - lam) * dt * alpha, lam * dt


@triton.jit
def _step_phase(ang_ptr, th_ptr, pair, rot, dt):
    """New phase theta = theta_old + dt pi tanh(angle) of each dim's pair, and its cos / sin
    (1 / 0 on unrotated dims)."""
    raw = tl.load(ang_ptr + pair, mask=rot, other=0.0).to(tl.float32)
    th_old = tl.load(th_ptr + pair, mask=rot, other=0.0)
    # tanh(x) = 1 - 2 / (exp(2x) + 1), stable for large |x|
    theta = th_old + dt * 3.141592653589793 * (1.0 - 2.0 / (tl.exp(2.0 * raw) + 1.0))
    return theta, tl.where(rot, tl.cos(theta), 1.0), tl.where(rot, tl.sin(theta), 0.0)


@triton.jit
def _rotated(x_ptr, xb_ptr, n, N, S, cos_n, sin_n):
    """Biased, interleaved-rotated vector (fp32): x[n] cos - x[n+1] sin (even n), x[n-1] sin + x[n] cos (odd)."""
    partner = n ^ 1
    x = tl.load(x_ptr + n, mask=n < N, other=0.0).to(tl.float32) + tl.load(xb_ptr + n, mask=n < N, other=0.0)
    xp = tl.load(x_ptr + partner, mask=partner < N, other=0.0).to(tl.float32) \
        + tl.load(xb_ptr + partner, mask=partner < N, other=0.0)
    sign = tl.where(n % 2 == 0, -1.0, 1.0)
    return x * cos_n + sign * xp * sin_n


@fast_launch
@triton.jit
def _step_kernel(Q, K, V, dA, DT, TRAP, QB, KB, ANG, D, Z, ST_ANG, ST_SSM, ST_K, ST_V, Y, CNT,
                 H, G, N, P, S, ang_sb, ang_sh,
                 HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, P_BLOCK: tl.constexpr, SPLIT: tl.constexpr):
    """Grid (B*H, SPLIT): program (bh, j) updates state rows [j, j+1) * BLOCK_P / SPLIT in loop steps
    of P_BLOCK rows. With SPLIT > 1 every program reads the k / angle cache, so only the last of
    them to finish (a counter CNT[bh], reset by that program) overwrites it."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    g = h // (H // G)
    dt = tl.load(DT + bh).to(tl.float32)
    da = tl.load(dA + bh).to(tl.float32)
    lam = tl.sigmoid(tl.load(TRAP + bh).to(tl.float32))
    alpha, beta, gamma = _trapezoid_coeffs(dt, da, lam)

    n = tl.arange(0, BLOCK_N)
    pair = n // 2
    rot = pair < S
    theta, cos_n, sin_n = _step_phase(ANG + b * ang_sb + h * ang_sh, ST_ANG + bh * S, pair, rot, dt)
    q = _rotated(Q + (b * G + g) * N, QB + h * N, n, N, S, cos_n, sin_n)
    k = _rotated(K + (b * G + g) * N, KB + h * N, n, N, S, cos_n, sin_n)

    nmask = n < N
    k_prev = tl.load(ST_K + bh * N + n, mask=nmask, other=0.0).to(tl.float32)
    d_skip = 0.0
    if HAS_D:
        d_skip = tl.load(D + h).to(tl.float32)
    # P in row blocks of P_BLOCK (a runtime loop): fewer live registers per thread, so more
    # programs per SM keep more state loads in flight
    ROWS: tl.constexpr = BLOCK_P // SPLIT
    for p0 in range(0, ROWS, P_BLOCK):
        p = split * ROWS + p0 + tl.arange(0, P_BLOCK)
        pmask = p < P
        v_prev = tl.load(ST_V + bh * P + p, mask=pmask, other=0.0).to(tl.float32)
        x = tl.load(V + bh * P + p, mask=pmask, other=0.0).to(tl.float32)
        smask = pmask[:, None] & nmask[None, :]
        sptr = ST_SSM + bh * P * N + p[:, None] * N + n[None, :]
        s = tl.load(sptr, mask=smask, other=0.0).to(tl.float32)
        s = alpha * s + (beta * v_prev)[:, None] * k_prev[None, :] + (gamma * x)[:, None] * k[None, :]
        y = tl.sum(s * q[None, :], axis=1) + d_skip * x
        if HAS_Z:
            zz = tl.load(Z + bh * P + p, mask=pmask, other=0.0).to(tl.float32)
            y = y * zz * tl.sigmoid(zz)
        tl.store(sptr, s.to(ST_SSM.dtype.element_ty), mask=smask)
        tl.store(Y + bh * P + p, y.to(Y.dtype.element_ty), mask=pmask)
        tl.store(ST_V + bh * P + p, x.to(ST_V.dtype.element_ty), mask=pmask)
    wrapped = theta - 6.283185307179586 * tl.floor(theta / 6.283185307179586)
    amask = rot & (n % 2 == 0)
    if SPLIT > 1:  # acq_rel: this program's reads of the k / angle cache happen before its count
        count = tl.atomic_add(CNT + bh, 1)
        tl.store(CNT + bh, 0, mask=count == SPLIT - 1)
        last = (n * 0 + count) == SPLIT - 1      # as a vector (a scalar & vector mask is refused by 3.9's interpreter)
        tl.store(ST_K + bh * N + n, k.to(ST_K.dtype.element_ty), mask=nmask & last)
        tl.store(ST_ANG + bh * S + pair, wrapped, mask=amask & last)
    else:
        tl.store(ST_K + bh * N + n, k.to(ST_K.dtype.element_ty), mask=nmask)
        tl.store(ST_ANG + bh * S + pair, wrapped, mask=amask)


_COUNTERS: dict = {}   # device -> int32 zeros, one per (batch, head): the split step's finish counts


def _counters(device, n: int):
    """Zeroed int32 scratch of at least n entries (the kernel resets what it uses), or None when it
    would have to be allocated during CUDA-graph capture (the split launch is skipped then)."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        buf = _COUNTERS[device] = torch.zeros(max(n, 1024), device=device, dtype=torch.int32)
    return buf


def step_launch(BH: int, BP: int, BN: int, state_bytes: int):
    """(num_warps, p_block, split) for B*H programs' worth of [BP, BN] states. Measured on the H100
    (P=64, N=128, CUDA-graph medians, benchmarks/gpu_decode_sweep.py): below ~4 programs per SM the
    rows are split over 4 programs (B=1: more SMs share the state traffic); at B*H >= 1024 an fp32
    state takes 2 warps x 32-row steps (B=64: 0.0588 -> 0.0517 ms, B=256: 0.2226 -> 0.1925) and a
    bf16 state 1 warp x 8 rows (0.0261 -> 0.0191, 0.1178 -> 0.1040)."""
    if BN * BP > 8192:
        return 8, BP, 1
    if BH < 256:
        return 4, max(1, BP // 4), min(4, BP)
    if BH < 1024:
        return 4, max(1, BP // 2), 1
    return (2, max(1, BP // 2), 1) if state_bytes == 4 else (1, max(1, BP // 8), 1)


def mamba3_siso_step_triton(q, k, v, dA, dt, trap, q_bias, k_bias, angles, D, z, state: Mamba3State,
                            num_warps=None, p_block=None, split=None):
    """One decode token (shapes as :func:`mamba3.ops.mamba3_siso_step`); ``state`` is updated in
    place; returns y [B, H, P] in v's dtype. State tensors must be contiguous. Launch settings
    (default :func:`step_launch`): ``p_block`` rows of the state per loop step of a program,
    ``split`` programs per (batch, head) over the rows; both powers of two."""
    check_power_of_two("p_block", p_block)
    check_power_of_two("split", split)
    check_triton_inputs(16, [("q", q), ("k", k), ("v", v), ("dA", dA), ("dt", dt), ("trap", trap),
                             ("q_bias", q_bias), ("k_bias", k_bias), ("angles", angles), ("D", D), ("z", z),
                             ("state.ssm", state.ssm), ("state.k", state.k), ("state.v", state.v)])
    if state.angle.dtype != torch.float32:
        raise TypeError(f"state.angle must be float32, got {state.angle.dtype}")
    for name, t in zip(("angle", "ssm", "k", "v"), state):
        if not t.is_contiguous():
            raise ValueError(f"state.{name} must be contiguous (the step updates it in place)")
    B, H, P = v.shape
    G, N = q.shape[1:]
    S = angles.shape[-1]
    c = lambda t: None if t is None else t.contiguous()
    q, k, v, dA, dt, trap, q_bias, k_bias, z = map(c, (q, k, v, dA, dt, trap, q_bias, k_bias, z))
    angles = angles.contiguous()
    ang_sb, ang_sh = (angles.stride(0), 0) if angles.dim() == 2 else (angles.stride(0), angles.stride(1))
    y = torch.empty(B, H, P, device=v.device, dtype=v.dtype)
    qb, kb = q_bias.float().contiguous(), k_bias.float().contiguous()
    BN, BP = next_pow2(max(N, 2)), next_pow2(P)
    nw0, pb0, sp0 = step_launch(B * H, BP, BN, state.ssm.element_size())
    sp = min(BP, split or sp0)
    cnt = _counters(v.device, B * H) if sp > 1 else y
    if cnt is None:
        sp, cnt = 1, y
    pb = min(BP // sp, p_block or pb0)
    _step_kernel[(B * H, sp)](q, k, v, dA, dt, trap, qb, kb, nonempty(angles, dt), D if D is not None else y,
                              z if z is not None else y, nonempty(state.angle, dt), state.ssm, state.k, state.v, y,
                              cnt, H, G, N, P, S, ang_sb, ang_sh, HAS_D=D is not None, HAS_Z=z is not None,
                              BLOCK_N=BN, BLOCK_P=BP, P_BLOCK=pb, SPLIT=sp, num_warps=num_warps or nw0)
    return y
