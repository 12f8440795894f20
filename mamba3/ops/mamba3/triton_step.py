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

from .common import Mamba3State
from .triton_siso import check_triton_inputs
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


@triton.jit
def _step_kernel(Q, K, V, dA, DT, TRAP, QB, KB, ANG, D, Z, ST_ANG, ST_SSM, ST_K, ST_V, Y,
                 H, G, N, P, S, ang_sb, ang_sh,
                 HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
    bh = tl.program_id(0)
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

    p = tl.arange(0, BLOCK_P)
    nmask = n < N
    pmask = p < P
    k_prev = tl.load(ST_K + bh * N + n, mask=nmask, other=0.0).to(tl.float32)
    v_prev = tl.load(ST_V + bh * P + p, mask=pmask, other=0.0).to(tl.float32)
    x = tl.load(V + bh * P + p, mask=pmask, other=0.0).to(tl.float32)
    smask = pmask[:, None] & nmask[None, :]
    sptr = ST_SSM + bh * P * N + p[:, None] * N + n[None, :]
    s = tl.load(sptr, mask=smask, other=0.0).to(tl.float32)
    s = alpha * s + (beta * v_prev)[:, None] * k_prev[None, :] + (gamma * x)[:, None] * k[None, :]
    y = tl.sum(s * q[None, :], axis=1)
    if HAS_D:
        y += tl.load(D + h).to(tl.float32) * x
    if HAS_Z:
        zz = tl.load(Z + bh * P + p, mask=pmask, other=0.0).to(tl.float32)
        y = y * zz * tl.sigmoid(zz)
    tl.store(sptr, s.to(ST_SSM.dtype.element_ty), mask=smask)
    tl.store(Y + bh * P + p, y.to(Y.dtype.element_ty), mask=pmask)
    tl.store(ST_K + bh * N + n, k.to(ST_K.dtype.element_ty), mask=nmask)
    tl.store(ST_V + bh * P + p, x.to(ST_V.dtype.element_ty), mask=pmask)
    wrapped = theta - 6.283185307179586 * tl.floor(theta / 6.283185307179586)
    tl.store(ST_ANG + bh * S + pair, wrapped, mask=rot & (n % 2 == 0))


def mamba3_siso_step_triton(q, k, v, dA, dt, trap, q_bias, k_bias, angles, D, z, state: Mamba3State,
                            num_warps=None):
    """One decode token (shapes as :func:`mamba3.ops.mamba3_siso_step`); ``state`` is updated in
    place; returns y [B, H, P] in v's dtype. State tensors must be contiguous."""
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
    BN, BP = triton.next_power_of_2(max(N, 2)), triton.next_power_of_2(P)
    nw = num_warps or (4 if BN * BP <= 8192 else 8)  # 4 warps measured faster at P=64, N=128
    _step_kernel[(B * H,)](q, k, v, dA, dt, trap, qb, kb, nonempty(angles, dt), D if D is not None else y,
                           z if z is not None else y, nonempty(state.angle, dt), state.ssm, state.k, state.v, y, H, G, N, P, S, ang_sb, ang_sh,
                           HAS_D=D is not None, HAS_Z=z is not None, BLOCK_N=BN, BLOCK_P=BP, num_warps=nw)
    return y
