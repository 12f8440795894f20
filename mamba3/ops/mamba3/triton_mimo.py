"""Mamba-3 MIMO (rank R) on the Triton SSD-core kernels of the SISO path.

A MIMO head is a SISO scalar-decay SSD over an expanded sequence of T*R rows, row t*R + r holding
(q_t[r], c_t k_t[r], X_t[r] = psi_r * x_t), with the decay dA_t on row t*R only (mimo_chunked.py
has the same (time, rank) tiles). The core's strictly-lower mask over rows then covers every
s < t pair correctly, and inside one time step it covers the ranks j < r with weight
c_t <q_t[r], k_t[j]> (an equal-angle rotation keeps dot products, so this is the un-rotated
biased dot). The exact same-time block gamma_t sum_j <qh_t[r], kh_t[j]> X_t[j] is restored with an
R x R correction per token:

    Y_t[r] = core_t[r] + sum_j (gamma_t M[r, j] - c_t [j < r] M[r, j]) X_t[j] + D X_t[r],
    M = <qh_t[r], kh_t[j]>

Training: preparation (bias, split-half rotation, scales), the correction and the rank contraction
run in PyTorch (differentiable); the chunked SSD with its state passing runs on Triton (SSDCoreFn).
Inference (no autograd): triton_mimo_fwd.py fuses the preparation and the epilogue into Triton
kernels around the SISO group-forward core, with no fp32 per-head intermediates.
The per-head PyTorch tensors are [B, T, R, H, N] fp32; without autograd, run_mimo
(mimo_chunked.py) bounds them by running head / batch-row blocks, as for the chunked path.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import Mamba3State, angle_increments, cumulative_angles, rotate_halves
from .mimo_chunked import _final_state, _last_token, run_mimo
from .mimo_interface import check_mimo_triton_inputs
from .mimo_reference import heads_from_groups, mimo_output
from .triton_siso import SSDCoreFn, check_triton_inputs
from .triton_mimo_fwd import mamba3_mimo_fused_fwd
from .triton_siso_fwd import INTERPRET


# The fused inference forward holds about 2 (bf16) to 3 (fp32) slabs per (batch row, head) where
# the chunked form peaks near 10: its head / batch blocks may be 4x larger (run_mimo).
FUSED_NO_GRAD_SLABS = 4


def mamba3_mimo_triton(q, k, v, dA, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D=None, z=None, *,
                       initial_state: Optional[Mamba3State] = None, return_final_state: bool = False,
                       cu_seqlens: Optional[Tensor] = None, chunk_size: Optional[int] = None,
                       outproj_norm_weight: Optional[Tensor] = None, outproj_norm_eps: float = 1e-5):
    """Triton Mamba-3 MIMO (same signature and results as :func:`mamba3.ops.mamba3_mimo`).

    chunk_size (tokens, default 64 // R) times R must be a power of two >= 16; inputs fp32, bf16
    or fp16 (core matmul operands in v's dtype, fp32 accumulation; the rest in fp32)."""
    R = q.shape[2]
    C = max(1, 64 // R) if chunk_size is None else chunk_size
    named = [("q", q), ("k", k), ("v", v), ("dA", dA), ("dt", dt), ("trap", trap), ("q_bias", q_bias),
             ("k_bias", k_bias), ("angles", angles), ("mimo_x", mimo_x), ("mimo_z", mimo_z), ("mimo_o", mimo_o),
             ("D", D), ("z", z), ("outproj_norm_weight", outproj_norm_weight)]
    check_mimo_triton_inputs(C, R, named)
    check_triton_inputs(C * R, named)                    # device: CUDA, or CPU under TRITON_INTERPRET=1
    return run_mimo(_forward, q, k, v, dA, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z,
                    initial_state, return_final_state, C, outproj_norm_weight, outproj_norm_eps, cu_seqlens,
                    no_grad_slabs=FUSED_NO_GRAD_SLABS)


def _forward(q, k, v, dA, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z, initial_state,
             return_final_state, C, norm_weight, eps, lengths):
    B, T, H, P = v.shape
    R, G, N = q.shape[2:]
    tensors = [q, k, v, dA, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z, norm_weight]
    tensors += [] if initial_state is None else list(initial_state)
    if T > 0 and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)):
        return _fused_forward(q, k, v, dA, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z,
                              initial_state, return_final_state, C, norm_weight, eps, lengths)
    kd = torch.float32 if INTERPRET else v.dtype          # core matmul operand dtype
    f32 = lambda t: None if t is None else t.float()
    dt32, lam = f32(dt), torch.sigmoid(f32(trap))                                   # [B, T, H]
    # fp32 per-head tensors come from one broadcast op on the (possibly half-precision) inputs
    qh = heads_from_groups(q, q_bias.float(), H)                                    # [B, T, R, H, N]
    kh = heads_from_groups(k, k_bias.float(), H)
    a0 = None if initial_state is None else initial_state.angle.float()
    theta = cumulative_angles(angle_increments(dt32, f32(angles)), a0)              # [B, T, H, S]
    psi = mimo_x.float().transpose(0, 1)                                            # [R, H, P]
    X = psi * v.unsqueeze(2)                                                        # [B, T, R, H, P]
    gamma = lam * dt32
    c = gamma + F.pad(((1.0 - lam) * dt32)[:, 1:], (0, 0, 0, 1))                   # 0 after the last token
    M = torch.einsum("btrhn,btjhn->bthrj", qh, kh)                                 # [B, T, H, R, R]
    qr = rotate_halves(qh, theta.unsqueeze(2))
    del qh
    kr = rotate_halves(kh, theta.unsqueeze(2))
    del kh
    k_last = _last_token(kr, lengths) if return_final_state and T > 0 else None

    S0 = _entering_state(initial_state, psi, lam, dt32) if T > 0 else None

    # expanded sequence of T*R rows (row t*R + r); decay on the first row of each token
    Qx = qr.reshape(B, T * R, H, N).to(kd)
    del qr
    Kx = (kr * c[:, :, None, :, None]).reshape(B, T * R, H, N).to(kd)
    del kr
    Vx = X.reshape(B, T * R, H, P).to(kd)
    dAx = F.pad(f32(dA).unsqueeze(2), (0, 0, 0, R - 1)).reshape(B, T * R, H)
    if T > 0:
        y, S = SSDCoreFn.apply(Qx, Kx, Vx, dAx, S0, C * R)
        Y = y.view(B, T, R, H, P)
    else:
        Y = X.new_zeros(B, 0, R, H, P)
        S = initial_state.ssm.float() if initial_state is not None else X.new_zeros(B, H, P, N)
    del Qx, Kx, Vx

    # same-time R x R block: gamma_t M - c_t strict_lower(M), M[r, j] = <qh[r], kh[j]>
    lower = torch.ones(R, R, dtype=torch.bool, device=v.device).tril(-1)
    W = gamma[..., None, None] * M - c[..., None, None] * M * lower
    Y = Y + torch.einsum("bthrj,btjhp->btrhp", W, X)
    if D is not None:
        Y = Y + D.float()[:, None] * X
    del X
    out = mimo_output(Y, f32(z), mimo_z.float(), mimo_o.float(), f32(norm_weight), eps)

    final = None
    if return_final_state:
        final = _final_state(S, theta, k_last, v, lengths, torch.float32, v.dtype, initial_state, R)
    return out.to(v.dtype), final


def _entering_state(initial_state, psi, lam, dt32):
    """Cache h plus the beta term of its last token, summed over ranks (decayed by alpha_0 inside
    the kernels); psi [R, H, P], lam and dt32 [B, T, H] fp32. None without an initial state."""
    if initial_state is None:
        return None
    X_prev = psi * initial_state.v.float().unsqueeze(1)                              # [B, R, H, P]
    return (initial_state.ssm.float() + ((1.0 - lam[:, 0]) * dt32[:, 0])[..., None, None]
            * torch.einsum("brhp,brhn->bhpn", X_prev, initial_state.k.float())).contiguous()


def _fused_forward(q, k, v, dA, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z, initial_state,
                   return_final_state, C, norm_weight, eps, lengths):
    """Inference (no autograd): the fused Triton stages of triton_mimo_fwd.py."""
    B, T, H, P = v.shape
    R = q.shape[2]
    S = angles.shape[-1]
    kd = torch.float32 if INTERPRET else v.dtype
    cont = lambda t: None if t is None else t.contiguous()
    q, k, v, dA, dt, trap, angles, z = map(cont, (q, k, v, dA, dt, trap, angles, z))
    a0 = None if initial_state is None else initial_state.angle
    S0 = _entering_state(initial_state, mimo_x.float().transpose(0, 1), torch.sigmoid(trap[:, :1].float()),
                         dt[:, :1].float())
    out, ssm, final_angle = mamba3_mimo_fused_fwd(q, k, v, dA, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z,
                                                  mimo_o, D, z, a0, S0, C, norm_weight, eps, kd)
    if not return_final_state:
        return out, None
    k_last = rotate_halves(heads_from_groups(_last_token(k, lengths), k_bias.float(), H), final_angle.unsqueeze(1))
    theta = final_angle.unsqueeze(1).expand(B, T, H, S)        # every token reads as the last one's phase
    return out, _final_state(ssm, theta, k_last, v, lengths, torch.float32, v.dtype, initial_state, R)
