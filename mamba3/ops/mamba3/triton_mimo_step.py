"""Mamba-3 MIMO decode step in Triton (state updated in place).

The token (SPEC sections 4-5):
    theta = theta_prev + dt * pi * tanh(angles)                     (S angles, shared by ranks)
    k_t[r] = Rot_halves(theta) (B[r, g(h)] + k_bias[h, r]),  q_t[r] likewise from C
    X[r] = psi[h, r] * x                                            (psi = mimo_x)
    S <- alpha S + beta sum_r X_prev[r] k_prev[r]^T + gamma sum_r X[r] k_t[r]^T
    Y[r] = S q_t[r] + D X[r]          (optionally Y[r] <- RMSNorm_P(Y[r]) * w[h], eps)
    out = sum_r phi[h, r] * Y[r] * silu(zeta[h, r] * z)              (no gate when z is None)
then the cache writes: angle mod 2*pi, the rotated biased k_t [B, R, H, N], raw x. The state
tile [P, N] is read and written once, in its own dtype (fp32 or bf16); all math is fp32. The
rank contraction (norm, gate, phi sum) is fused, so only out [B, H, P] leaves the kernel.
Rotary pairs are split-half (i, i + N/2), i < S, as in the chunked MIMO forms.

Two forms of the rank-R work: R rank-1 updates and R row reductions on the CUDA cores, or (dot)
two tensor-core products, S <- alpha S + A @ [k_prev; k_t] and Y = S @ [q_t], with the ranks of
both tokens as the 2R (padded to 16) columns of A. tf32 dots are the default wherever the products
would run as tf32 (bf16 / fp16 state, or torch's fp32 matmul precision "high"): H100, 1.5B layer
shape, 187 us against 195 us per layer (bf16 state), 252 against 329 (fp32 state, tf32).

Two launch shapes:
- single: one program per (batch, head) holds the whole [P, N] tile and also writes state.k and
  state.angle (after a barrier: every warp has read the previous token's values first). Used with
  the out-proj norm (it needs all of P per rank) or when the P split is 1.
- P split: grid (B*H, P / BLOCK_P); a program owns rows [j BLOCK_P, (j+1) BLOCK_P) of the state,
  out and state.v. Every block needs the previous token's k and theta, so the main kernel leaves
  state.k / state.angle alone and a small second kernel (grid B*H, stream-ordered after the first)
  recomputes the rotated k_t and the wrapped theta and writes them. For the CUDA-core form the
  default (H100) is 2 blocks at 1 warp, 4 % (bf16 state) / 10 % (fp32) faster than the single
  launch; 4 blocks were slower. The dot form defaults to the single launch at 2 warps.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..launch import fast_launch
from ..utils import cdiv, next_pow2

from .common import Mamba3State
from .triton_siso import check_power_of_two, check_triton_inputs
from .triton_siso_fwd import dot_precision as state_dot_precision, nonempty
from .triton_step import _step_phase, _trapezoid_coeffs


@triton.jit
def _rotated_halves(x_ptr, xb_ptr, n, partner, N, sign, cos_n, sin_n, mask):
    """Biased, split-half-rotated vector (fp32): x[n] cos - x[n + N/2] sin (n < N/2),
    x[n - N/2] sin + x[n] cos (n >= N/2); cos = 1, sin = 0 on unrotated dims; 0 where not mask.
    Pointers / index tensors broadcast (a [R, N] or [N, R] tile of ranks at once)."""
    m = mask & (n < N)
    x = tl.load(x_ptr + n, mask=m, other=0.0).to(tl.float32) + tl.load(xb_ptr + n, mask=m, other=0.0)
    mp = mask & (partner < N)
    xp = tl.load(x_ptr + partner, mask=mp, other=0.0).to(tl.float32) + tl.load(xb_ptr + partner, mask=mp, other=0.0)
    return x * cos_n + sign * xp * sin_n


@triton.jit
def _halves_phase(ang_ptr, th_ptr, n, dt, N, S):
    """Split-half rotary layout of the dims n and the new phase: (partner, sign, pair, own = dims
    that store theta[pair], theta, cos_n, sin_n)."""
    half = N // 2
    first = n < half
    pair = tl.where(first, n, n - half)
    partner = tl.where(first, n + half, n - half)
    sign = tl.where(first, -1.0, 1.0)
    rot = (pair < S) & (n < N)
    theta, cos_n, sin_n = _step_phase(ang_ptr, th_ptr, pair, rot, dt)
    return partner, sign, pair, rot & first, theta, cos_n, sin_n


@triton.jit
def _store_wrapped_phase(th_ptr, pair, own, theta):
    """state.angle <- theta mod 2 pi (call after every warp has read theta_prev)."""
    wrapped = theta - 6.283185307179586 * tl.floor(theta / 6.283185307179586)
    tl.store(th_ptr + pair, wrapped, mask=own)


@fast_launch
@triton.jit
def _mimo_step_kernel(Q, K, V, dA, DT, TRAP, QB, KB, ANG, PSI, ZETA, PHI, D, Z, W,
                      ST_ANG, ST_SSM, ST_K, ST_V, OUT,
                      H, G, N, P, S, eps,
                      q_sb, k_sb, v_sb, z_sb, da_sb, dt_sb, trap_sb, ang_sb, ang_sh,
                      R: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_NORM: tl.constexpr,
                      WRITE_KA: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
                      DOT: tl.constexpr, BLOCK_R: tl.constexpr, PREC: tl.constexpr):
    """Program (bh, j): rows p in [j BLOCK_P, (j+1) BLOCK_P). WRITE_KA (single path, one block
    covers P) also writes state.k and state.angle; HAS_NORM needs that single block.
    DOT: the rank-R update and readout as two tensor-core products, columns c of [BLOCK_P, BLOCK_R]
    being (previous token, rank c) for c < R and (current token, rank c - R) for R <= c < 2R:
        S <- alpha S + A @ Kmat,  A[p, c] = coef_c psi[r(c), p] v_c[p],  Kmat[c] = k_prev[r] or k_t[r]
        Y = S @ Qt,               Qt[:, c] = q_t[c] (c < R, else 0)
    else R rank-1 updates and R row reductions on the CUDA cores."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    g = h // (H // G)
    dt = tl.load(DT + b * dt_sb + h).to(tl.float32)
    da = tl.load(dA + b * da_sb + h).to(tl.float32)
    lam = tl.sigmoid(tl.load(TRAP + b * trap_sb + h).to(tl.float32))
    alpha, beta, gamma = _trapezoid_coeffs(dt, da, lam)
    n = tl.arange(0, BLOCK_N)
    partner, sign, pair, own, theta, cos_n, sin_n = _halves_phase(
        ANG + b * ang_sb + h * ang_sh, ST_ANG + bh * S, n, dt, N, S)

    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    nmask = n < N
    pmask = p < P
    x = tl.load(V + b * v_sb + h * P + p, mask=pmask, other=0.0).to(tl.float32)
    v_prev = tl.load(ST_V + bh * P + p, mask=pmask, other=0.0).to(tl.float32)
    smask = pmask[:, None] & nmask[None, :]
    sptr = ST_SSM + bh.to(tl.int64) * P * N + p[:, None] * N + n[None, :]   # > 2^31 state elements
    s = alpha * tl.load(sptr, mask=smask, other=0.0).to(tl.float32)
    if HAS_D:
        dh = tl.load(D + h).to(tl.float32)
    if HAS_Z:
        zz = tl.load(Z + b * z_sb + h * P + p, mask=pmask, other=0.0).to(tl.float32)
    if HAS_NORM:
        w = tl.load(W + h * P + p, mask=pmask, other=0.0).to(tl.float32)
    if DOT:
        c = tl.arange(0, BLOCK_R)
        prev = c < R
        r_of = tl.where(prev, c, c - R)
        used = c < 2 * R
        cur = used & (c >= R)
        psi = tl.load(PSI + (h * R + r_of)[None, :] * P + p[:, None], mask=pmask[:, None] & used[None, :],
                      other=0.0).to(tl.float32)                                         # [BLOCK_P, BLOCK_R]
        a = psi * tl.where(prev[None, :], beta * v_prev[:, None], gamma * x[:, None])
        kp_ptr = ST_K + ((b * R + r_of) * H + h)[:, None] * N + n[None, :]             # [BLOCK_R, BLOCK_N]
        k_prev = tl.load(kp_ptr, mask=prev[:, None] & nmask[None, :], other=0.0).to(tl.float32)
        k_t = _rotated_halves(K + b * k_sb + ((r_of * G + g) * N)[:, None], KB + ((h * R + r_of) * N)[:, None],
                              n[None, :], partner[None, :], N, sign[None, :], cos_n[None, :], sin_n[None, :],
                              cur[:, None])
        s = tl.dot(a, k_prev + k_t, s, input_precision=PREC)
        if WRITE_KA:
            tl.debug_barrier()  # every warp has read k_prev before the slots are overwritten
            tl.store(kp_ptr, k_t.to(ST_K.dtype.element_ty), mask=cur[:, None] & nmask[None, :])
        q_t = _rotated_halves(Q + b * q_sb + ((c * G + g) * N)[None, :], QB + ((h * R + c) * N)[None, :],
                              n[:, None], partner[:, None], N, sign[:, None], cos_n[:, None], sin_n[:, None],
                              prev[None, :])                                              # [BLOCK_N, BLOCK_R]
        y = tl.dot(s, q_t, input_precision=PREC)                                         # [BLOCK_P, BLOCK_R]
        psi = tl.where(prev[None, :], psi, 0.0)
        if HAS_D:
            y += dh * psi * x[:, None]
        if HAS_NORM:
            y = y * tl.rsqrt(tl.sum(y * y, axis=0) / P + eps)[None, :] * w[:, None]
        if HAS_Z:
            zr = tl.load(ZETA + (h * R + c)[None, :] * P + p[:, None], mask=pmask[:, None] & prev[None, :],
                         other=0.0).to(tl.float32) * zz[:, None]
            y = y * zr * tl.sigmoid(zr)
        phi = tl.load(PHI + (h * R + c)[None, :] * P + p[:, None], mask=pmask[:, None] & prev[None, :],
                      other=0.0).to(tl.float32)
        out = tl.sum(phi * y, axis=1)
    else:
        for r in tl.static_range(R):
            psi = tl.load(PSI + (h * R + r) * P + p, mask=pmask, other=0.0).to(tl.float32)
            kptr = ST_K + ((b * R + r) * H + h) * N + n
            k_prev = tl.load(kptr, mask=nmask, other=0.0).to(tl.float32)
            k = _rotated_halves(K + b * k_sb + (r * G + g) * N, KB + (h * R + r) * N, n, partner, N, sign,
                                cos_n, sin_n, nmask)
            s += (beta * psi * v_prev)[:, None] * k_prev[None, :] + (gamma * psi * x)[:, None] * k[None, :]
            if WRITE_KA:
                tl.debug_barrier()  # every warp has read k_prev[r] before its slot is overwritten
                tl.store(kptr, k.to(ST_K.dtype.element_ty), mask=nmask)
        out = tl.zeros([BLOCK_P], dtype=tl.float32)
        for r in tl.static_range(R):
            q = _rotated_halves(Q + b * q_sb + (r * G + g) * N, QB + (h * R + r) * N, n, partner, N, sign,
                                cos_n, sin_n, nmask)
            y = tl.sum(s * q[None, :], axis=1)                                    # [BLOCK_P]
            if HAS_D:
                y += dh * tl.load(PSI + (h * R + r) * P + p, mask=pmask, other=0.0).to(tl.float32) * x
            if HAS_NORM:
                y = y * tl.rsqrt(tl.sum(y * y, axis=0) / P + eps) * w
            if HAS_Z:
                zr = tl.load(ZETA + (h * R + r) * P + p, mask=pmask, other=0.0).to(tl.float32) * zz
                y = y * zr * tl.sigmoid(zr)
            out += tl.load(PHI + (h * R + r) * P + p, mask=pmask, other=0.0).to(tl.float32) * y

    tl.debug_barrier()  # v_prev (and theta_prev) read by every warp before they are overwritten
    tl.store(sptr, s.to(ST_SSM.dtype.element_ty), mask=smask)
    tl.store(OUT + bh * P + p, out.to(OUT.dtype.element_ty), mask=pmask)
    tl.store(ST_V + bh * P + p, x.to(ST_V.dtype.element_ty), mask=pmask)
    if WRITE_KA:
        _store_wrapped_phase(ST_ANG + bh * S, pair, own, theta)


@fast_launch
@triton.jit
def _mimo_step_cache_kernel(K, KB, ANG, DT, ST_ANG, ST_K, H, G, N, S, k_sb, dt_sb, ang_sb, ang_sh,
                            R: tl.constexpr, BLOCK_N: tl.constexpr):
    """P-split path, after every block of _mimo_step_kernel: state.k[b, :, h] <- the rotated
    biased k_t of every rank, state.angle[b, h] <- theta mod 2 pi (same math as the main kernel)."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    g = h // (H // G)
    dt = tl.load(DT + b * dt_sb + h).to(tl.float32)
    n = tl.arange(0, BLOCK_N)
    partner, sign, pair, own, theta, cos_n, sin_n = _halves_phase(
        ANG + b * ang_sb + h * ang_sh, ST_ANG + bh * S, n, dt, N, S)
    for r in tl.static_range(R):
        k = _rotated_halves(K + b * k_sb + (r * G + g) * N, KB + (h * R + r) * N, n, partner, N, sign, cos_n, sin_n,
                            n < N)
        tl.store(ST_K + ((b * R + r) * H + h) * N + n, k.to(ST_K.dtype.element_ty), mask=n < N)
    tl.debug_barrier()  # theta_prev read by every warp before it is overwritten
    _store_wrapped_phase(ST_ANG + bh * S, pair, own, theta)


def _rows(t: torch.Tensor):
    """``t`` with every dim but the first contiguous (a copy only if not), and its batch stride:
    the layer's strided views of one in_proj output launch without copies."""
    expected = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:])):
        if size != 1 and stride != expected:
            t = t.contiguous()
            break
        expected *= size
    return t, t.stride(0)


def _p_block(P: int, p_blocks: Optional[int], norm: bool) -> int:
    """BLOCK_P of the launch: next_pow2(P) // p_blocks, at least 16 (or next_pow2(P) if smaller);
    p_blocks None: 2 without the norm for P >= 64, else 1. The norm needs all of P: one block."""
    full = next_pow2(P)
    if norm:
        return full
    if p_blocks is None:
        p_blocks = 2 if P >= 64 else 1
    return max(full // p_blocks, min(16, full))


def mamba3_mimo_step_triton(q, k, v, dA, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z,
                            state: Mamba3State, outproj_norm_weight: Optional[torch.Tensor] = None,
                            outproj_norm_eps: float = 1e-5, num_warps: Optional[int] = None,
                            p_blocks: Optional[int] = None, dot: Optional[bool] = None,
                            dot_precision: Optional[str] = None) -> torch.Tensor:
    """One MIMO decode token (shapes as :func:`mamba3.ops.mamba3_mimo_step`, already validated);
    ``state`` is updated in place (its tensors must be contiguous; angle float32, ssm fp32 / bf16 /
    fp16). Returns out [B, H, P] in v's dtype. No autograd.

    p_blocks: split of P over programs (a positive power of two; None: 2 for P >= 64, else 1).
    BLOCK_P = next_pow2(P) // p_blocks, clamped to at least 16; with the out-proj norm, or when
    that leaves one block, the single-program kernel runs. num_warps: of the main kernel.
    dot: the rank-R update and readout as two tensor-core products (rank tile next_pow2(2R), at
    least 16; needs BLOCK_P and N of at least 16, else the CUDA-core form runs). None: dot when
    its precision is tf32, with p_blocks 1 and 2 warps unless given.
    dot_precision: of those products ("tf32" / "ieee"); None: tf32 for a bf16 / fp16 state (its own
    rounding is coarser), for an fp32 state torch's fp32 matmul setting (ieee unless "high")."""
    check_power_of_two("p_blocks", p_blocks)
    check_triton_inputs(16, [("q", q), ("k", k), ("v", v), ("dA", dA), ("dt", dt), ("trap", trap),
                             ("q_bias", q_bias), ("k_bias", k_bias), ("angles", angles), ("mimo_x", mimo_x),
                             ("mimo_z", mimo_z), ("mimo_o", mimo_o), ("D", D), ("z", z),
                             ("outproj_norm_weight", outproj_norm_weight), ("state.ssm", state.ssm),
                             ("state.k", state.k), ("state.v", state.v)])
    if state.angle.dtype != torch.float32:
        raise TypeError(f"impl='triton' needs state.angle in float32, got {state.angle.dtype}")
    for name, t in zip(Mamba3State._fields, state):
        if not t.is_contiguous():
            raise ValueError(f"state.{name} must be contiguous (the step updates it in place)")
    B, H, P = v.shape
    R, G, N = q.shape[1:]
    S = angles.shape[-1]
    out = torch.empty(B, H, P, device=v.device, dtype=v.dtype)
    if B == 0 or H == 0:
        return out
    (q, q_sb), (k, k_sb), (v, v_sb) = _rows(q), _rows(k), _rows(v)
    (dA, da_sb), (dt, dt_sb), (trap, trap_sb), (angles, ang_sb) = _rows(dA), _rows(dt), _rows(trap), _rows(angles)
    z, z_sb = (None, 0) if z is None else _rows(z)
    ang_sh = angles.stride(1) if angles.dim() == 3 else 0
    qb, kb = q_bias.float().contiguous(), k_bias.float().contiguous()
    c = lambda t: None if t is None else t.contiguous()
    psi, zeta, phi, D, w = map(c, (mimo_x, mimo_z, mimo_o, D, outproj_norm_weight))
    BN = next_pow2(max(N, 2))
    prec = dot_precision or state_dot_precision(state.ssm.dtype)
    # H100, B=128, H=64, P=64, N=128, R=4 (gpu_mimo_step.py, us per layer, bf16 / fp32 state, no
    # norm): tf32 dots at p_blocks 1, 2 warps 187 / 252 against 195 / 329 for the best CUDA-core
    # launch; ieee dots (fp32 on the CUDA cores through the mma layouts) 4,200-8,500.
    use_dot = (prec == "tf32") if dot is None else bool(dot)
    use_dot = use_dot and BN >= 16 and next_pow2(P) >= 16
    if use_dot and p_blocks is None:
        p_blocks = 1
    BP = _p_block(P, p_blocks, w is not None)      # >= 16 whenever next_pow2(P) is
    split = cdiv(P, BP)
    if use_dot:
        # same shape, dots: p1 at 1 / 2 / 4 warps 256 / 187 / 256 (bf16 state); p2 189 / 212 / 281
        nw = num_warps or 2
    elif split == 1:
        # same shape: 2 warps 205 / 358, 4 warps 424 / 758, 8 warps 506 / 597. ptxas (sm_90, 2
        # warps): 255 registers and 68 / 272 B spilled (bf16 / fp32 state): 4 blocks, 8 warps an
        # SM, so few loads in flight.
        nw = num_warps or (2 if BN * BP <= 8192 else 4)
    else:
        # same shape: p_blocks 2 at 1 warp 197 / 322, 2 warps 266 / 451, 4 warps 418 / 541;
        # p_blocks 4 at 1 warp 233 / 364, 2 warps 293 / 405. Fewer registers per program (ptxas:
        # BLOCK_P 16 at 2 warps 130 / 168, no spills) did not pay: the extra launch and the k /
        # angle recompute did.
        nw = num_warps or 1
    ang_arg, st_ang = nonempty(angles, dt), nonempty(state.angle, dt)
    _mimo_step_kernel[(B * H, split)](
        q, k, v, dA, dt, trap, qb, kb, ang_arg, psi, zeta, phi,
        out if D is None else D, out if z is None else z, out if w is None else w,
        st_ang, state.ssm, state.k, state.v, out,
        H, G, N, P, S, float(outproj_norm_eps),
        q_sb, k_sb, v_sb, z_sb, da_sb, dt_sb, trap_sb, ang_sb, ang_sh,
        R=R, HAS_D=D is not None, HAS_Z=z is not None, HAS_NORM=w is not None,
        WRITE_KA=split == 1, BLOCK_N=BN, BLOCK_P=BP, DOT=use_dot,
        BLOCK_R=max(16, next_pow2(2 * R)), PREC=prec, num_warps=nw)
    if split > 1:   # same stream: starts after every block above has read the old k / theta
        _mimo_step_cache_kernel[(B * H,)](
            k, kb, ang_arg, dt, st_ang, state.k, H, G, N, S, k_sb, dt_sb, ang_sb, ang_sh,
            R=R, BLOCK_N=BN, num_warps=1 if BN <= 128 else 2)
    return out
