"""Mamba-3 SISO on Triton kernels (impl="triton").

Layout of the computation (the single-SSD fold of chunked.py, SPEC section 2):
    1. per-token preparation in PyTorch (differentiable): per-head biased q/k, cumulative rotary
       phase, rotation, trapezoid scale c, un-rotated diagonal <q, k> and the entering state
    2. the scalar-decay SSD core on Triton kernels, chunk-parallel (triton_siso_fwd.py,
       triton_siso_bwd.py) behind a torch.autograd.Function
    3. the skip/diagonal term and the gate, in PyTorch
Inputs are fp32, bf16 or fp16 (the core multiplies in the input dtype, accumulates in fp32; fp32
inputs multiply in full fp32). Varlen input is right-padded per sequence (padding has dt = dA = 0,
which changes nothing), as chunked.py does.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..utils import pack_to_padded, padded_to_pack, seq_lengths
from .chunked import _final_state
from .common import Mamba3State, angle_increments, cumulative_angles, expand_groups, rotate_interleaved
from .triton_siso_bwd import ssd_core_bwd
from .triton_siso_fwd import INTERPRET, ssd_core_fwd

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class SSDCoreFn(torch.autograd.Function):
    """(Q, K [B,T,H,N], V [B,T,H,P], dA [B,T,H] fp32, S0 [B,H,P,N] fp32 | None) ->
    (y [B,T,H,P] fp32, final state [B,H,P,N] fp32); see triton_siso_fwd.py for the math."""

    @staticmethod
    def forward(ctx, Q, K, V, dA, S0, chunk_size):
        Q, K, V, dA = (t.contiguous() for t in (Q, K, V, dA))
        S0c = None if S0 is None else S0.float().contiguous()
        y, states, dec, final = ssd_core_fwd(Q, K, V, dA, S0c, chunk_size)
        ctx.save_for_backward(Q, K, V, dA, states, dec)
        ctx.chunk_size = chunk_size
        ctx.has_s0 = S0 is not None
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        Q, K, V, dA, states, dec = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros(V.shape, device=V.device, dtype=Q.dtype)
        dy = dy.to(Q.dtype).contiguous()
        dsf = None if dfinal is None else dfinal.float().contiguous()
        dQ, dK, dV, ddA, dS0 = ssd_core_bwd(Q, K, V, dA, dy, states, dec, dsf, ctx.chunk_size)
        return dQ, dK, dV, ddA, (dS0 if ctx.has_s0 else None), None


def check_triton_inputs(chunk_size: int, tensors) -> None:
    """Kernel-specific checks (the generic shape checks ran in interface.validate_siso)."""
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"impl='triton' needs chunk_size a power of two >= 16, got {chunk_size}")
    dev = None
    for name, t in tensors:
        if t is None:
            continue
        if t.dtype not in KERNEL_DTYPES:
            raise TypeError(f"impl='triton' needs {name} in float32/bfloat16/float16, got {t.dtype} "
                            "(use impl='reference' or 'chunked' for float64)")
        if dev is None:
            dev = t.device
        elif t.device != dev:
            raise ValueError(f"{name} is on {t.device} but other inputs are on {dev}")
    if dev is not None and dev.type != "cuda" and not INTERPRET:
        raise ValueError(f"impl='triton' needs CUDA tensors, got {dev} (set TRITON_INTERPRET=1 to "
                         "run the kernels on CPU tensors)")


def mamba3_siso_triton(q, k, v, dA, dt, trap, q_bias, k_bias, angles, D=None, z=None, *,
                       initial_state: Optional[Mamba3State] = None, return_final_state: bool = False,
                       cu_seqlens: Optional[Tensor] = None, chunk_size: int = 64):
    """Triton Mamba-3 SISO (same signature and results as :func:`mamba3.ops.mamba3_siso`)."""
    check_triton_inputs(chunk_size, [("q", q), ("k", k), ("v", v), ("dA", dA), ("dt", dt), ("trap", trap),
                                     ("q_bias", q_bias), ("k_bias", k_bias), ("angles", angles), ("D", D),
                                     ("z", z)])
    if initial_state is not None:
        check_triton_inputs(chunk_size, [("initial_state." + f, t) for f, t in initial_state._asdict().items()]
                            if isinstance(initial_state, Mamba3State) else [])
    if cu_seqlens is None:
        return _forward(q, k, v, dA, dt, trap, q_bias, k_bias, angles, D, z, initial_state,
                        return_final_state, chunk_size, None)
    pad = lambda t: None if t is None else pack_to_padded(t, cu_seqlens)
    lengths = torch.tensor(seq_lengths(cu_seqlens), device=v.device)
    y, final = _forward(pad(q), pad(k), pad(v), pad(dA), pad(dt), pad(trap), q_bias, k_bias, pad(angles), D,
                        pad(z), initial_state, return_final_state, chunk_size, lengths)
    return padded_to_pack(y, cu_seqlens), final


def _forward(q, k, v, dA, dt, trap, q_bias, k_bias, angles, D, z, initial_state, return_final_state,
             chunk_size, lengths):
    B, T, H, P = v.shape
    out_dtype = v.dtype
    # dtype of the core's matmul operands; the Triton interpreter's bf16/fp16 dot is broken
    # (numpy has no bf16), so under TRITON_INTERPRET the core multiplies in fp32
    kd = torch.float32 if INTERPRET else v.dtype
    f32 = lambda t: t.float()
    dt32, dA32 = f32(dt), f32(dA)
    qh = expand_groups(f32(q), H) + f32(q_bias)                                # [B, T, H, N]
    kh = expand_groups(f32(k), H) + f32(k_bias)
    init_angle = None if initial_state is None else initial_state.angle.float()
    theta = cumulative_angles(angle_increments(dt32, f32(angles)), init_angle)  # [B, T, H, S]
    qr, kr = rotate_interleaved(qh, theta), rotate_interleaved(kh, theta)
    lam = torch.sigmoid(f32(trap))
    gamma = lam * dt32
    c = gamma + F.pad(((1.0 - lam) * dt32)[:, 1:], (0, 0, 0, 1))             # 0 after the last token
    diag = gamma * (qh * kh).sum(-1)
    S0 = None
    if initial_state is not None:
        S0 = initial_state.ssm.float() + (((1.0 - lam[:, 0]) * dt32[:, 0])[..., None, None]
                                          * initial_state.v.float().unsqueeze(-1)
                                          * initial_state.k.float().unsqueeze(-2))
    y, S = SSDCoreFn.apply(qr.to(kd), (kr * c.unsqueeze(-1)).to(kd), v.to(kd), dA32, S0, chunk_size)
    skip = diag if D is None else diag + f32(D)
    y = y + skip.unsqueeze(-1) * f32(v)
    if z is not None:
        y = y * F.silu(f32(z))
    final = None
    if return_final_state:
        final = _final_state(S, theta, kr, v, lengths, torch.float32, out_dtype, initial_state)
    return y.to(out_dtype), final
