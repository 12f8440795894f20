"""Pieces shared by every form of the Mamba-3 op: the carried state, rotary layouts, gate math
and input validation.

Notation (SPEC sections 1-3): per token t and head h
    lambda_t = sigmoid(trap_t),  alpha_t = exp(dA_t),
    beta_t = (1 - lambda_t) * dt_t * alpha_t,  gamma_t = lambda_t * dt_t,
    theta_t = theta_{t-1} + dt_t * pi * tanh(angles_t)   (cumulative rotary phase, S angles)
    k_t = Rot(theta_t) (B_t + k_bias),  q_t = Rot(theta_t) (C_t + q_bias)
    S_t = alpha_t S_{t-1} + beta_t x_{t-1} k_{t-1}^T + gamma_t x_t k_t^T,   y_t = S_t q_t + D x_t
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..utils import (FLOAT_DTYPES, check_cu_seqlens, check_same_device, check_tensor, pack_to_padded,
                     padded_to_pack, seq_lengths)

TWO_PI = 2.0 * math.pi


class Mamba3State(NamedTuple):
    """Everything a Mamba-3 sequence carries from one token to the next.

    angle: [B, H, S]    float32 cumulative rotary phase of the last token, reduced mod 2*pi
    ssm:   [B, H, P, N] float32 recurrent state h_T (true state, not a chunk-shifted one)
    k:     [B, H, N] (SISO) or [B, R, H, N] (MIMO): last token's biased, rotated k, unscaled
    v:     [B, H, P] last token's raw x (MIMO: before the psi up-scaling)
    """

    angle: Tensor
    ssm: Tensor
    k: Tensor
    v: Tensor


def zero_state(batch: int, nheads: int, headdim: int, d_state: int, n_angles: int, *,
               rank: Optional[int] = None, device=None, dtype=torch.float32,
               state_dtype=torch.float32) -> Mamba3State:
    """A fresh state (what a sequence starts from). ``dtype`` is the k/v dtype."""
    kshape = (batch, nheads, d_state) if rank is None else (batch, rank, nheads, d_state)
    return Mamba3State(
        angle=torch.zeros(batch, nheads, n_angles, device=device, dtype=torch.float32),
        ssm=torch.zeros(batch, nheads, headdim, d_state, device=device, dtype=state_dtype),
        k=torch.zeros(kshape, device=device, dtype=dtype),
        v=torch.zeros(batch, nheads, headdim, device=device, dtype=dtype),
    )


def trapezoid_coeffs(dt: Tensor, trap: Tensor, lengths: Optional[Tensor] = None):
    """lam = sigmoid(trap), gamma_t = lam_t dt_t and the single-SSD key scale c_t = gamma_t +
    (1 - lam_{t+1}) dt_{t+1}, the second term 0 after the last token (after each sequence's last one
    with ``lengths`` [B]); dt, trap and the results [B, T, H]."""
    lam = torch.sigmoid(trap)
    gamma = lam * dt
    shifted = torch.nn.functional.pad(((1.0 - lam) * dt)[:, 1:], (0, 0, 0, 1))    # (1-lam_{t+1}) dt_{t+1}
    if lengths is not None:
        valid = torch.arange(dt.shape[1], device=dt.device)[None, :] < (lengths[:, None] - 1)
        shifted = shifted * valid[..., None]
    return lam, gamma, gamma + shifted


def angle_increments(dt: Tensor, angles: Tensor) -> Tensor:
    """Per-token phase increments dt * pi * tanh(angles).

    dt: [B, T, H]; angles: [B, T, S] (shared by heads) or [B, T, H, S]  ->  [B, T, H, S]
    """
    rate = math.pi * torch.tanh(angles)
    if rate.dim() == 3:
        rate = rate.unsqueeze(2)
    return dt.unsqueeze(-1) * rate


class _FinalPhase(torch.autograd.Function):
    """Gives a final phase computed without autograd (the Triton phase kernels) the gradient of
    theta_T = a0 + sum_t dt_t pi tanh(angles_t) (mod 2 pi: derivative 1)."""

    @staticmethod
    def forward(ctx, value, dt, angles, a0):
        ctx.save_for_backward(dt, angles)
        ctx.a0_dtype = None if a0 is None else a0.dtype
        return value.view_as(value)

    @staticmethod
    def backward(ctx, g):
        dt, angles = ctx.saved_tensors
        g = g.float()
        th = torch.tanh(angles.float())
        if angles.dim() == 3:                                  # shared by the heads: g [B, H, S]
            ddt = math.pi * torch.einsum("bts,bhs->bth", th, g)
            dang = math.pi * (1 - th * th) * torch.einsum("bth,bhs->bts", dt.float(), g)
        else:
            ddt = math.pi * (th * g.unsqueeze(1)).sum(-1)
            dang = math.pi * (1 - th * th) * dt.float().unsqueeze(-1) * g.unsqueeze(1)
        return (None, ddt.to(dt.dtype), dang.to(angles.dtype),
                None if ctx.a0_dtype is None else g.to(ctx.a0_dtype))


def differentiable_final_phase(value: Tensor, dt: Tensor, angles: Tensor, a0: Optional[Tensor]) -> Tensor:
    """``value`` (the final phase [B, H, S]) with the gradient it has as a function of dt [B, T, H],
    angles ([B, T, S] or [B, T, H, S]) and the initial phase a0 [B, H, S] (or None), when autograd
    needs it; else ``value`` itself."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (dt, angles, a0)):
        return _FinalPhase.apply(value, dt, angles, a0)
    return value


def cumulative_angles(inc: Tensor, initial: Optional[Tensor] = None, block: int = 256) -> Tensor:
    """Inclusive cumulative sum of phase increments along time, reduced mod 2*pi.

    inc: [B, T, H, S] -> [B, T, H, S]. The sum is taken in blocks whose carry is wrapped mod
    2*pi, so fp32 phases stay accurate however long the sequence (a plain fp32 cumsum over 16K
    tokens drifts by ~1e-3 rad). Wrapping is exact for the rotation (cos/sin are 2*pi periodic).
    """
    B, T, H, S = inc.shape
    # Sum and wrap in float64 (the [B, T, H, S] angles are small next to the state math): fp32
    # partial sums round at ~1e-6 rad and fp32(2*pi) is off by 1.7e-7, errors that add up along
    # the sequence (measured: 2e-4 rad after 20k tokens, 1e-3 after 100k, in fp32).
    wide = inc.dtype if inc.device.type == "mps" else torch.float64  # MPS has no float64
    carry = inc.new_zeros(B, H, S, dtype=wide) if initial is None else initial.to(wide)
    out = []
    for start in range(0, T, block):
        part = torch.remainder(torch.cumsum(inc[:, start : start + block].to(wide), dim=1) + carry.unsqueeze(1),
                               TWO_PI)
        out.append(part.to(inc.dtype))
        carry = part[:, -1]
    if not out:
        return inc.new_zeros(B, 0, H, S)
    return torch.cat(out, dim=1)


def rotate_interleaved(x: Tensor, theta: Tensor) -> Tensor:
    """SISO rotary layout: pairs (2i, 2i+1) for i < S rotate by theta_i; the rest is unchanged.

    x: [..., N]; theta: [..., S] with 2S <= N (broadcast over leading dims).
    Rotation [cos -sin; sin cos] with +theta (sign convention of the official kernels).
    """
    S = theta.shape[-1]
    if S == 0:
        return x
    rot, rest = x[..., : 2 * S], x[..., 2 * S :]
    pairs = rot.unflatten(-1, (S, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    c, s = torch.cos(theta), torch.sin(theta)
    rotated = torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)
    return torch.cat((rotated, rest), dim=-1)


def rotate_halves(x: Tensor, theta: Tensor) -> Tensor:
    """MIMO rotary layout: pairs (i, i + N/2) for i < S rotate by theta_i."""
    S = theta.shape[-1]
    if S == 0:
        return x
    half = x.shape[-1] // 2
    a, b = x[..., :S], x[..., half : half + S]
    c, s = torch.cos(theta), torch.sin(theta)
    ra, rb = a * c - b * s, a * s + b * c
    return torch.cat((ra, x[..., S:half], rb, x[..., half + S :]), dim=-1)


def interleaved_to_halves(x: Tensor, n_angles: int) -> Tensor:
    """Permute the last dim so that an interleaved rotary layout becomes the split-half one.

    Interleaved dims (2i, 2i+1), i < S go to (i, N/2 + i); the unrotated dims fill the rest in
    order. Used to show SISO == MIMO(R=1) and to convert checkpoints.
    """
    N = x.shape[-1]
    half = N // 2
    perm = [0] * N
    rest = list(range(2 * n_angles, N))
    for i in range(n_angles):
        perm[i] = 2 * i
        perm[half + i] = 2 * i + 1
    first, second = rest[: half - n_angles], rest[half - n_angles :]
    for j, d in enumerate(first):
        perm[n_angles + j] = d
    for j, d in enumerate(second):
        perm[half + n_angles + j] = d
    return x[..., perm]


def expand_groups(x: Tensor, nheads: int) -> Tensor:
    """[..., G, N] -> [..., H, N]: head h reads group h // (H // G)."""
    G = x.shape[-2]
    return x if G == nheads else x.repeat_interleave(nheads // G, dim=-2)


def validate_siso(q, k, v, dA, dt, trap, q_bias, k_bias, angles, D, z, initial_state, cu_seqlens,
                  chunk_size) -> None:
    """Check every argument of the SISO op; raise a named error before any compute."""
    check_tensor("v", v, [("B", None), ("T", None), ("H", None), ("P", None)])
    B, T, H, P = v.shape
    check_tensor("q", q, [("B", B), ("T", T), ("G", None), ("N", None)])
    G, N = q.shape[2], q.shape[3]
    if G < 1 or H % G != 0:
        raise ValueError(f"number of groups G={G} (q.shape[2]) must divide the number of heads H={H} (v.shape[2])")
    check_tensor("k", k, [("B", B), ("T", T), ("G", G), ("N", N)])
    for name, t in (("dA", dA), ("dt", dt), ("trap", trap)):
        check_tensor(name, t, [("B", B), ("T", T), ("H", H)])
    check_tensor("q_bias", q_bias, [("H", H), ("N", N)])
    check_tensor("k_bias", k_bias, [("H", H), ("N", N)])
    _validate_angles(angles, B, T, H, N)
    if D is not None:
        check_tensor("D", D, [("H", H)])
    if z is not None:
        check_tensor("z", z, [("B", B), ("T", T), ("H", H), ("P", P)])
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    check_cu_seqlens(cu_seqlens, T, B)
    nseq = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None:
        validate_state(initial_state, nseq, H, P, N, angles.shape[-1], rank=None)
    check_same_device(q=q, k=k, v=v, dA=dA, dt=dt, trap=trap, q_bias=q_bias, k_bias=k_bias, angles=angles, D=D, z=z,
                      initial_state=initial_state)


def _validate_angles(angles, B, T, H, N) -> None:
    if not isinstance(angles, torch.Tensor):
        raise TypeError(f"angles must be a torch.Tensor, got {type(angles).__name__}")
    if angles.dim() == 3:
        check_tensor("angles", angles, [("B", B), ("T", T), ("S", None)])
    else:
        check_tensor("angles", angles, [("B", B), ("T", T), ("H", H), ("S", None)])
    S = angles.shape[-1]
    if 2 * S > N:
        raise ValueError(f"angles has S={S} rotary angles but d_state N={N} only holds N/2={N // 2} pairs")


def validate_state(state, batch, H, P, N, S, rank=None) -> None:
    if not isinstance(state, (Mamba3State, tuple)) or len(state) != 4:
        raise TypeError("initial_state must be a Mamba3State(angle, ssm, k, v) 4-tuple")
    angle, ssm, k, v = state
    check_tensor("initial_state.angle", angle, [("B", batch), ("H", H), ("S", S)])
    check_tensor("initial_state.ssm", ssm, [("B", batch), ("H", H), ("P", P), ("N", N)])
    if rank is None:
        check_tensor("initial_state.k", k, [("B", batch), ("H", H), ("N", N)])
    else:
        check_tensor("initial_state.k", k, [("B", batch), ("R", rank), ("H", H), ("N", N)])
    check_tensor("initial_state.v", v, [("B", batch), ("H", H), ("P", P)])


def check_finite(name: str, t: Tensor) -> None:
    """Cheap NaN/Inf guard for small tensors (parameters, states)."""
    if t is not None and t.dtype in FLOAT_DTYPES and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def siso_varlen(forward, q, k, v, dA, dt, trap, q_bias, k_bias, angles, D, z, initial_state, return_final_state,
                chunk_size, cu_seqlens):
    """Run a padded-batch SISO form on packed sequences ([1, total, ...] with ``cu_seqlens``; with
    ``cu_seqlens=None`` the batch runs as it is).

    The sequences are right-padded into a batch; padding has dt = dA = 0, which leaves the state, the
    phase and the shifted trapezoid scale untouched, so outputs and final states are exact.
    ``forward(q, ..., z, initial_state, return_final_state, chunk_size, lengths)`` must zero the
    shifted term after each row's last token (``lengths`` [S]) and read the final k/v there.
    """
    if cu_seqlens is None:
        return forward(q, k, v, dA, dt, trap, q_bias, k_bias, angles, D, z, initial_state, return_final_state,
                       chunk_size, None)
    pad = lambda t: None if t is None else pack_to_padded(t, cu_seqlens)
    lengths = torch.tensor(seq_lengths(cu_seqlens), device=v.device)
    y, final = forward(pad(q), pad(k), pad(v), pad(dA), pad(dt), pad(trap), q_bias, k_bias, pad(angles), D,
                       pad(z), initial_state, return_final_state, chunk_size, lengths)
    return padded_to_pack(y, cu_seqlens), final
