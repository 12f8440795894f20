"""Mamba-3 SISO on Triton kernels (impl="triton").

Single-SSD fold of chunked.py (SPEC section 2), chunk-parallel:
    forward  (triton_siso_fwd.py): the phases entering each block of PREP_ROWS tokens (two
             launches); a preparation kernel per (block, batch*head) writes the biased/rotated q,
             the rotated/scaled k and the skip coefficient D + gamma <q, k>; the SSD core then runs
             in chunk groups with the state in registers and writes intra + inter + skip x, gated
             by silu(z).
    backward (triton_siso_bwd.py): the gate backward in one pass over [B, T, H, P],
             the SSD-core backward (three launches mirroring the forward; the chunk kernel also sums
             d skip = <dO, v>), a kernel back through
             bias/rotation/scale per (block, batch*group) that sums the q/k gradients over the
             group's heads (also d gamma, d c, the block-local phase terms and bias partial sums),
             one cumsum over the blocks' phase-gradient sums, and a pass over [B, T, H] finishing
             d dt, d trap and d angles (phase_dt_bwd).
Inputs fp32, bf16 or fp16: matmul operands in v's dtype (fp32 multiplies in full fp32), fp32
accumulation. Varlen input is right-padded per sequence (padding has dt = dA = 0, which changes
nothing), as chunked.py does.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import Mamba3State, differentiable_final_phase, expand_groups, rotate_interleaved, siso_varlen
from .triton_siso_bwd import gate_bwd, phase_dt_bwd, prep_bwd, prep_bwd_rows, ssd_core_bwd
from .triton_siso_fwd import INTERPRET, chunk_start_phases, mamba3_fused_fwd, prep_rows

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
QK_GRADS_16BIT = True  # the core backward hands d(rotated q), d(scaled k) to the prep backward in bf16/fp16


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


def check_power_of_two(name: str, value) -> None:
    """Launch-setting arguments (None or a positive power of two), with a ValueError naming them."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1
                              or value & (value - 1)):
        raise ValueError(f"{name} must be None or a positive power of two, got {value!r}")


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
    return siso_varlen(_forward, q, k, v, dA, dt, trap, q_bias, k_bias, angles, D, z, initial_state,
                       return_final_state, chunk_size, cu_seqlens)


def _forward(q, k, v, dA, dt, trap, q_bias, k_bias, angles, D, z, initial_state, return_final_state,
             chunk_size, lengths):
    B, T, H, P = v.shape
    if T == 0:  # nothing consumed: the state passes through
        fin = None
        if return_final_state:
            fin = Mamba3State(*initial_state) if initial_state is not None else Mamba3State(
                v.new_zeros(B, H, angles.shape[-1], dtype=torch.float32),
                v.new_zeros(B, H, P, q.shape[-1], dtype=torch.float32),
                v.new_zeros(B, H, q.shape[-1]), v.new_zeros(B, H, P))
        return v.new_zeros(B, 0, H, P), fin
    a0, s0, k0, v0 = initial_state if initial_state is not None else (None,) * 4
    th0, final_angle = chunk_start_phases(dt, angles, a0, prep_rows(chunk_size))  # per block of rows
    # inside Function.forward needs_input_grad ignores no_grad: decide here whether to save
    train = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (
        q, k, v, dA, dt, trap, q_bias, k_bias, angles, D, z, a0, s0, k0, v0))
    y, S = Mamba3SisoFn.apply(q, k, v, dA, dt, trap, q_bias, k_bias, angles, D, z, a0, s0, k0, v0, th0,
                              chunk_size, train)
    if not return_final_state:
        return y, None
    final_angle = differentiable_final_phase(final_angle, dt, angles, a0)
    rows = torch.arange(B, device=v.device)
    idx = torch.full((B,), T - 1, device=v.device, dtype=torch.long) if lengths is None \
        else (lengths - 1).clamp(min=0)
    k_last = rotate_interleaved(expand_groups(k[rows, idx].float(), H) + k_bias.float(), final_angle)
    k_last, v_last = k_last.to(v.dtype), v[rows, idx]
    if lengths is not None and initial_state is not None and bool((lengths == 0).any()):
        empty = (lengths == 0)[:, None, None]
        final_angle = torch.where(empty, a0.float(), final_angle)
        k_last = torch.where(empty, k0.to(k_last.dtype), k_last)
        v_last = torch.where(empty, v0.to(v_last.dtype), v_last)
    elif lengths is not None and bool((lengths == 0).any()):
        empty = (lengths == 0)[:, None, None]
        k_last, v_last = k_last.masked_fill(empty, 0), v_last.masked_fill(empty, 0)
    return y, Mamba3State(angle=final_angle, ssm=S, k=k_last, v=v_last)


def _entering_state(s0, k0, v0, lam0, dt0):
    """Cache h plus the beta term of its last token (decayed by alpha_0 inside the kernels)."""
    if s0 is None:
        return None
    return s0.float() + ((1.0 - lam0) * dt0)[..., None, None] * v0.float().unsqueeze(-1) * k0.float().unsqueeze(-2)


class Mamba3SisoFn(torch.autograd.Function):
    """Fused Triton forward (saves the prepared Q, K, the pre-gate output and the entering chunk
    states); backward = Triton SSD-core backward kernels, then a Triton kernel back through the
    per-token preparation, then one [B, T, H] pass for dt, trap and angles (and small PyTorch
    algebra for an initial state)."""

    @staticmethod
    def forward(ctx, q, k, v, dA, dt, trap, q_bias, k_bias, angles, D, z, a0, s0, k0, v0, th0, chunk_size, train):
        kd = torch.float32 if INTERPRET else v.dtype
        cont = lambda t: None if t is None else t.contiguous()
        q, k, v, dA, dt, trap, angles, z = map(cont, (q, k, v, dA, dt, trap, angles, z))
        S0 = None if s0 is None else _entering_state(s0, k0, v0, torch.sigmoid(trap[:, 0].float()), dt[:, 0].float())
        y, saved, states, dec, final = mamba3_fused_fwd(q, k, v, dA, dt, trap, q_bias, k_bias, angles, D, z, th0,
                                                        S0, chunk_size, save_pre=train, dot_dtype=kd)
        if train:
            ctx.save_for_backward(q, k, v, dA, dt, trap, q_bias, k_bias, angles, D, z, a0, s0, k0, v0, th0,
                                  *saved, states, dec)
        ctx.meta = (kd, chunk_size)
        ctx.set_materialize_grads(False)   # an unused final state sends None, not a zero [B, H, P, N]
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        (q, k, v, dA, dt, trap, q_bias, k_bias, angles, D, z, a0, s0, k0, v0, th0,
         ypre, Q, K, skip, states, dec) = ctx.saved_tensors
        kd, C = ctx.meta
        B, T, H, P = v.shape
        if dy is None:
            dy = torch.zeros(v.shape, device=v.device, dtype=v.dtype)
        dO, dz, _ = gate_bwd(dy, z, ypre, v, kd, skip_sum=False)   # one pass over [B, T, H, P]
        vk = v if v.dtype == kd else v.to(kd)
        dskip = torch.empty(B, T, H, device=v.device, dtype=torch.float32)   # <dO, v>, from the core backward
        dQ, dK, dv, ddA, dS0 = ssd_core_bwd(Q, K, vk, dA, dO, states, dec,
                                            None if dfinal is None else dfinal.float().contiguous(), C,
                                            skip=skip, dv_dtype=v.dtype,
                                            dqk_dtype=kd if QK_GRADS_16BIT else torch.float32,
                                            dskip_out=dskip)          # dv: + skip dO
        rows = prep_bwd_rows(C)
        dq, dk, dtot, ddt_loc, dang_loc, dcs, dgamma, dqb, dkb = prep_bwd(q, k, q_bias, k_bias, dt, trap, angles,
                                                                         th0, prep_rows(C), rows, dQ, dK, dskip)
        # c_t = gamma_t + u_{t+1}, u_t = (1 - lam_t) dt_t;  S0 = s0 + u_0 v0 k0^T (d u_0 from dS0)
        du0 = None if s0 is None else torch.einsum("bhpn,bhp,bhn->bh", dS0, v0.float(), k0.float())
        ddt, dtrap, dang, dtheta0 = phase_dt_bwd(dtot, ddt_loc, dang_loc, angles, dgamma, dcs, trap, dt, rows, du0)
        da0 = ds0 = dk0 = dv0 = None
        if s0 is not None:
            u0 = ((1.0 - torch.sigmoid(trap[:, 0].float())) * dt[:, 0].float())[..., None]
            ds0 = dS0
            dv0 = u0 * torch.einsum("bhpn,bhn->bhp", dS0, k0.float())
            dk0 = u0 * torch.einsum("bhpn,bhp->bhn", dS0, v0.float())
        if a0 is not None:
            da0 = dtheta0
        cast = lambda gr, ref: None if gr is None or ref is None else gr.to(ref.dtype)
        return (cast(dq, q), cast(dk, k), cast(dv, v), cast(ddA, dA), cast(ddt, dt), cast(dtrap, trap),
                cast(dqb, q_bias), cast(dkb, k_bias), cast(dang, angles),
                None if D is None else dskip.sum((0, 1)).to(D.dtype), cast(dz, z), cast(da0, a0), cast(ds0, s0),
                cast(dk0, k0), cast(dv0, v0), None, None, None)


def ssd_triton(x, dt, A, B, C, D=None, z=None, *, initial_state=None, return_final_state=False,
               cu_seqlens=None, chunk_size=64):
    """Mamba-2 SSD (:func:`mamba3.ops.mamba2.ssd`) on the Mamba-3 SISO kernels.

    Mamba-2 is Mamba-3 SISO with lambda = 1 (trap = +inf: Euler rule, no previous-token term),
    no rotation (one pair at zero phase rate) and zero biases: q = C, k = B, v = x, dA = dt A.
    Returns (y [B, T, H, P] in x's dtype, final state [., H, P, N] fp32 or None).
    """
    Bsz, T, H, P = x.shape
    N = B.shape[-1]
    nseq = Bsz if cu_seqlens is None else cu_seqlens.numel() - 1
    trap = torch.full_like(dt, float("inf"))
    zeros_b = torch.zeros(H, N, device=x.device, dtype=torch.float32)
    angles = torch.zeros(Bsz, T, 1, device=x.device, dtype=torch.float32)
    init = None
    if initial_state is not None:
        init = Mamba3State(angle=torch.zeros(nseq, H, 1, device=x.device, dtype=torch.float32), ssm=initial_state,
                           k=x.new_zeros(nseq, H, N), v=x.new_zeros(nseq, H, P))
    D2 = D is not None and D.dim() == 2                  # [H, P] skip: applied outside with the gate
    y, fin = mamba3_siso_triton(C, B, x, dt * A.float(), dt, trap, zeros_b, zeros_b, angles,
                                None if D2 else D, None if D2 else z, initial_state=init,
                                return_final_state=return_final_state, cu_seqlens=cu_seqlens,
                                chunk_size=chunk_size)
    if D2:
        y = y.float() + D.float() * x.float()
        if z is not None:
            y = y * F.silu(z.float())
        y = y.to(x.dtype)
    return y, (fin.ssm if return_final_state else None)
