"""Mamba-3 MIMO (rank R) on Triton: fused preparation / epilogue kernels around the SISO SSD core.

A MIMO head is a SISO scalar-decay SSD over an expanded sequence of T*R rows, row t*R + r holding
(q_t[r], c_t k_t[r], X_t[r] = psi_r * x_t), with the decay dA_t on row t*R only (mimo_chunked.py
has the same (time, rank) tiles). The core's strictly-lower mask over rows then covers every
s < t pair correctly, and inside one time step it covers the ranks j < r with weight
c_t <q_t[r], k_t[j]> (an equal-angle rotation keeps dot products, so this is the un-rotated
biased dot). The exact same-time block gamma_t sum_j <qh_t[r], kh_t[j]> X_t[j] is restored with an
R x R correction per token:

    Y_t[r] = core_t[r] + sum_j (gamma_t M[r, j] - c_t [j < r] M[r, j]) X_t[j] + D X_t[r],
    M = <qh_t[r], kh_t[j]>

Forward: triton_mimo_fwd.py (preparation kernel -> SISO group-forward core -> epilogue kernel with
the correction, norm, gate and rank sum); backward: triton_mimo_bwd.py (the same stages reversed,
the SISO core backward in the middle). No [B, T, R, H, N] fp32 intermediate; without autograd,
run_mimo (mimo_chunked.py) still runs head / batch-row blocks for very long inputs.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .common import Mamba3State, differentiable_final_phase, rotate_halves
from .mimo_chunked import _final_state, _last_token, run_mimo
from .mimo_interface import check_mimo_triton_inputs
from .mimo_reference import heads_from_groups
from .triton_mimo_bwd import mimo_core_and_prep_bwd
from .triton_mimo_fwd import MIMO_PREP_ROWS, mamba3_mimo_fused_fwd
from .triton_siso import check_triton_inputs
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


def _entering_state(initial_state, psi, lam, dt32):
    """Cache h plus the beta term of its last token, summed over ranks (decayed by alpha_0 inside
    the kernels); psi [R, H, P], lam and dt32 [B, 1, H] fp32. None without an initial state.
    Differentiable (PyTorch): the kernels take it as their initial state and return its gradient."""
    if initial_state is None:
        return None
    X_prev = psi * initial_state.v.float().unsqueeze(1)                              # [B, R, H, P]
    return (initial_state.ssm.float() + ((1.0 - lam[:, 0]) * dt32[:, 0])[..., None, None]
            * torch.einsum("brhp,brhn->bhpn", X_prev, initial_state.k.float())).contiguous()


def _forward(q, k, v, dA, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z, initial_state,
             return_final_state, C, norm_weight, eps, lengths):
    B, T, H, P = v.shape
    R = q.shape[2]
    S = angles.shape[-1]
    if T == 0:
        N = q.shape[-1]
        S0 = None if initial_state is None else initial_state.ssm.float()
        ssm = S0 if S0 is not None else v.new_zeros(B, H, P, N, dtype=torch.float32)
        out = v.new_zeros(B, 0, H, P)
        if not return_final_state:
            return out, None
        return out, _final_state(ssm, v.new_zeros(B, 0, H, S, dtype=torch.float32), None, v, lengths,
                                 torch.float32, v.dtype, initial_state, R)
    tensors = [q, k, v, dA, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z, norm_weight]
    tensors += [] if initial_state is None else list(initial_state)
    train = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    a0 = None if initial_state is None else initial_state.angle
    S0 = _entering_state(initial_state, mimo_x.float().transpose(0, 1), torch.sigmoid(trap[:, :1].float()),
                         dt[:, :1].float())
    out, ssm, final_angle = MimoFn.apply(q, k, v, dA, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o,
                                         D, z, norm_weight, a0, S0, C, eps, train)
    if not return_final_state:
        return out, None
    final_angle = differentiable_final_phase(final_angle, dt, angles, a0)
    k_last = rotate_halves(heads_from_groups(_last_token(k, lengths), k_bias.float(), H), final_angle.unsqueeze(1))
    theta = final_angle.unsqueeze(1).expand(B, T, H, S)        # every token reads as the last one's phase
    return out, _final_state(ssm, theta, k_last, v, lengths, torch.float32, v.dtype, initial_state, R)


class MimoFn(torch.autograd.Function):
    """Fused Triton MIMO forward (saves the prepared rows, the same-time block, the core output and
    the entering chunk states) and its Triton backward. The final phase it returns carries no
    gradient here: _forward attaches it (common.differentiable_final_phase)."""

    @staticmethod
    def forward(ctx, q, k, v, dA, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z, norm_weight, a0,
                S0, chunk_size, eps, train):
        kd = torch.float32 if INTERPRET else v.dtype
        cont = lambda t: None if t is None else t.contiguous()
        q, k, v, dA, dt, trap, angles, z = map(cont, (q, k, v, dA, dt, trap, angles, z))
        out, final, final_angle, saved = mamba3_mimo_fused_fwd(
            q, k, v, dA, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z, a0, S0, chunk_size,
            norm_weight, eps, kd, save=train)
        if train:
            ctx.save_for_backward(q, k, v, dA, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, z,
                                  norm_weight, *saved)
        ctx.meta = (chunk_size, eps, None if D is None else D.dtype, None if a0 is None else a0.dtype,
                    S0 is not None)
        ctx.mark_non_differentiable(final_angle)
        ctx.set_materialize_grads(False)
        return out, final, final_angle

    @staticmethod
    def backward(ctx, dout, dfinal, _dangle):
        chunk_size, eps, d_dtype, a0_dtype, has_s0 = ctx.meta
        saved = ctx.saved_tensors
        v = saved[2]
        if dout is None:
            dout = torch.zeros(v.shape, device=v.device, dtype=v.dtype)
        g = mimo_core_and_prep_bwd(saved + (MIMO_PREP_ROWS,), dout,
                                   None if dfinal is None else dfinal.float().contiguous(), chunk_size, eps)
        ins = dict(zip(("q", "k", "v", "dA", "dt", "trap", "q_bias", "k_bias", "angles", "mimo_x", "mimo_z",
                        "mimo_o", "z", "norm_weight"), saved[:14]))
        cast = lambda n: None if g[n] is None or ins[n] is None else g[n].to(ins[n].dtype)
        return (cast("q"), cast("k"), cast("v"), cast("dA"), cast("dt"), cast("trap"), cast("q_bias"),
                cast("k_bias"), cast("angles"), cast("mimo_x"), cast("mimo_z"), cast("mimo_o"),
                None if d_dtype is None else g["D"].to(d_dtype), cast("z"), cast("norm_weight"),
                None if a0_dtype is None else g["a0"].to(a0_dtype),
                g["S0"] if has_s0 else None, None, None, None)
