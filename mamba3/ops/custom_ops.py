"""Mamba-3 SISO as ``torch.library`` custom ops, so ``torch.compile(fullgraph=True)`` traces a
model on the Triton path without graph breaks (Triton launches are opaque to dynamo).

Ops (all device-generic: CUDA -> the Triton kernels, other devices -> an explicit PyTorch form of
the same math, so the registrations import and run without triton or CUDA):

    mamba3::siso_fwd(Q, K, V, dA, S0?, chunk_size) -> (y, states, dec, final)
        the chunked scalar-decay SSD core of Mamba-3 SISO (triton_siso_fwd.ssd_core_fwd):
        y_t = sum_{s<t, same chunk} (Q_t . K_s) e^{ell_t - ell_s} V_s + e^{ell_t} S_c Q_t,
        S_{c+1} = e^{ell_last} S_c + sum_s e^{ell_last - ell_s} V_s K_s^T  (ell: in-chunk cumsum
        of dA). Layouts: Q, K [B, T, H, N]; V [B, T, H, P]; dA [B, T, H]; S0, final [B, H, P, N];
        states [B, H, nc, P, N] (state entering each chunk); dec [B, H, nc] (ell at chunk end).
    mamba3::siso_bwd(Q, K, V, dA, dY, states, dec, dSF?, chunk_size) -> (dQ, dK, dV, ddA, dS0)
        its gradients (triton_siso_bwd.ssd_core_bwd); the autograd formula of siso_fwd.
    mamba3::siso_step(q, k, v, dA, dt, trap, q_bias, k_bias, angles, D?, z?, angle!, ssm!, k!, v!)
        -> y: one decode token, the four state tensors updated in place (declared mutated).
    mamba3::siso_fused(q, k, v, dA, dt, trap, q_bias, k_bias, angles, D?, z?, a0?, s0?, k0?, v0?,
                       chunk_size) -> (y, angle, ssm, k, v): the whole SISO forward and its final
        state, no autograd (inference: prefill). CUDA: the fused Triton forward of
        ``triton_siso.mamba3_siso_triton`` (preparation pre-pass + SSD core with skip and gate).

:func:`mamba3_siso_op` / :func:`mamba3_siso_step_op` have the signatures of ``mamba3_siso`` /
``mamba3_siso_step``. With autograd recording (or packed sequences) the per-token preparation
(biases, phase, rotation, trapezoid scale, skip, gate) is plain PyTorch that compiles normally and
only the core is an op; in inference the whole forward is ``mamba3::siso_fused``. ``interface.py``
routes its Triton branch here while ``torch.compiler.is_compiling()`` (eager CUDA keeps the fused
kernels; CPU is unchanged).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .mamba3.chunked import _final_state, mamba3_siso_chunked
from .mamba3.common import (Mamba3State, angle_increments, cumulative_angles, expand_groups,
                            rotate_interleaved, siso_varlen)
from .mamba3.reference import mamba3_siso_step_reference


def _on_triton(t: Tensor) -> bool:
    """Kernels for CUDA tensors (not float64); on CPU only fp32 under the Triton interpreter (tests:
    the interpreter has no bf16 dot)."""
    if t.device.type == "cuda":
        return t.dtype != torch.float64
    return t.device.type == "cpu" and t.dtype == torch.float32 and os.environ.get("TRITON_INTERPRET") == "1"


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the saved chunk states (as the Triton forward stores them)."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else _wide(dtype)


def _nchunks(T: int, C: int) -> int:
    return max(1, -(-T // C))


# ------------------------------------------------------------------------------ PyTorch core
def _chunks(Q, K, V, dA, C):
    B, T, H, N = Q.shape
    wd = _wide(Q.dtype)
    nc = _nchunks(T, C)
    pad = lambda t: F.pad(t.to(wd), (0, 0) * (t.dim() - 2) + (0, nc * C - T))
    q, k = pad(Q).view(B, nc, C, H, N), pad(K).view(B, nc, C, H, N)
    v = pad(V).view(B, nc, C, H, V.shape[-1])
    ell = torch.cumsum(pad(dA).view(B, nc, C, H), dim=2)                    # [B, nc, C, H]
    ellh = ell.transpose(2, 3)                                                # [B, nc, H, C]
    strict = torch.ones(C, C, dtype=torch.bool, device=Q.device).tril(-1)
    seg = ellh.unsqueeze(-1) - ellh.unsqueeze(-2)                             # [.., t, s]
    L = torch.exp(torch.where(strict, seg, torch.full_like(seg, -torch.inf)))
    last = ell[:, :, -1]                                                      # [B, nc, H]
    w = torch.exp(last.unsqueeze(2) - ell)                                    # decay to chunk end
    return q, k, v, ell, L, last, w


def _core_fwd_torch(Q, K, V, dA, S0, C):
    B, T, H, N = Q.shape
    P = V.shape[-1]
    q, k, v, ell, L, last, w = _chunks(Q, K, V, dA, C)
    nc = q.shape[1]
    scores = torch.einsum("bctHn,bcsHn->bcHts", q, k)
    y = torch.einsum("bcHts,bcsHp->bctHp", scores * L, v)
    local = torch.einsum("bcsHp,bcsHn->bcHpn", v * w.unsqueeze(-1), k)
    S = q.new_zeros(B, H, P, N) if S0 is None else S0.to(q.dtype)
    entering = []
    for i in range(nc):
        entering.append(S)
        S = torch.exp(last[:, i])[..., None, None] * S + local[:, i]
    Sen = torch.stack(entering, 1)                                            # [B, nc, H, P, N]
    y = y + torch.einsum("bctHn,bcHpn->bctHp", q, Sen) * torch.exp(ell).unsqueeze(-1)
    y = y.reshape(B, nc * C, H, P)[:, :T]
    return (y.contiguous(), Sen.transpose(1, 2).to(_state_dtype(Q.dtype)).contiguous(),
            last.transpose(1, 2).contiguous(), S)


def _core_bwd_torch(Q, K, V, dA, dY, states, dec, dSF, C):
    """Hand-written gradients of _core_fwd_torch (same chunking; no autograd inside an op)."""
    B, T, H, N = Q.shape
    P = V.shape[-1]
    q, k, v, ell, L, last, w = _chunks(Q, K, V, dA, C)
    nc = q.shape[1]
    wd = q.dtype
    dy = F.pad(dY.to(wd), (0, 0, 0, 0, 0, nc * C - T)).view(B, nc, C, H, P)
    Sen = states.to(wd).transpose(1, 2)                                       # [B, nc, H, P, N]
    scores = torch.einsum("bctHn,bcsHn->bcHts", q, k)
    # intra-chunk y_t = sum_s scores_ts L_ts v_s
    dM = torch.einsum("bctHp,bcsHp->bcHts", dy, v)
    dv = torch.einsum("bcHts,bctHp->bcsHp", scores * L, dy)
    G = dM * L
    dq = torch.einsum("bcHts,bcsHn->bctHn", G, k)
    dk = torch.einsum("bcHts,bctHn->bcsHn", G, q)
    dL = G * scores                                                           # d/d seg (= d/d L * L)
    dell = (dL.sum(-1) - dL.sum(-2)).transpose(2, 3)                          # [B, nc, C, H]
    # inter-chunk y_t += e^{ell_t} S_c q_t
    e = torch.exp(ell).unsqueeze(-1)
    dq = dq + torch.einsum("bctHp,bcHpn->bctHn", dy * e, Sen)
    dell = dell + (dy * e * torch.einsum("bctHn,bcHpn->bctHp", q, Sen)).sum(-1)
    dSen = torch.einsum("bctHp,bctHn->bcHpn", dy * e, q)
    # state scan S_{c+1} = e^{last_c} S_c + local_c, backwards
    g = q.new_zeros(B, H, P, N) if dSF is None else dSF.to(wd)
    dlocal, dlast = [None] * nc, [None] * nc
    for i in range(nc - 1, -1, -1):
        a = torch.exp(last[:, i])                                             # [B, H]
        dlocal[i] = g
        dlast[i] = a * (g * Sen[:, i]).sum((-1, -2))
        g = a[..., None, None] * g + dSen[:, i]
    dS0 = g
    dlocal, dlast = torch.stack(dlocal, 1), torch.stack(dlast, 1)            # [B, nc, H, P, N], [B, nc, H]
    # local_c = sum_s w_s v_s k_s^T with w_s = e^{last - ell_s}
    wv = w.unsqueeze(-1)
    dv = dv + torch.einsum("bcHpn,bcsHn->bcsHp", dlocal, k) * wv
    dk_loc = torch.einsum("bcHpn,bcsHp->bcsHn", dlocal, v)
    dk = dk + dk_loc * wv
    dwl = (dk_loc * k).sum(-1) * w                                            # d/d(last - ell_s)
    dell = dell - dwl
    dell[:, :, -1] += dlast + dwl.sum(2)
    dda = dell.flip(2).cumsum(2).flip(2)                                      # ell = cumsum(dA)
    unpad = lambda t: t.reshape(B, nc * C, *t.shape[3:])[:, :T].contiguous()
    return unpad(dq), unpad(dk), unpad(dv), unpad(dda), dS0


# ------------------------------------------------------------------------------ ops
@torch.library.custom_op("mamba3::siso_fwd", mutates_args=())
def siso_fwd(Q: Tensor, K: Tensor, V: Tensor, dA: Tensor, S0: Optional[Tensor],
             chunk_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if _on_triton(Q):
        from .mamba3.triton_siso_fwd import ssd_core_fwd
        Q, K, V = (t.contiguous() for t in (Q, K, V))
        y, states, dec, final = ssd_core_fwd(Q, K, V, dA.float().contiguous(),
                                             None if S0 is None else S0.float().contiguous(), chunk_size)
        return y, states, dec, final
    return _core_fwd_torch(Q, K, V, dA, S0, chunk_size)


@siso_fwd.register_fake
def _(Q, K, V, dA, S0, chunk_size):
    B, T, H, N = Q.shape
    P, nc, wd = V.shape[-1], _nchunks(T, chunk_size), _wide(Q.dtype)
    return (Q.new_empty(B, T, H, P, dtype=wd), Q.new_empty(B, H, nc, P, N, dtype=_state_dtype(Q.dtype)),
            Q.new_empty(B, H, nc, dtype=wd), Q.new_empty(B, H, P, N, dtype=wd))


@torch.library.custom_op("mamba3::siso_bwd", mutates_args=())
def siso_bwd(Q: Tensor, K: Tensor, V: Tensor, dA: Tensor, dY: Tensor, states: Tensor, dec: Tensor,
             dSF: Optional[Tensor], chunk_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if _on_triton(Q):
        from .mamba3.triton_siso_bwd import ssd_core_bwd
        c = lambda t: t.contiguous()
        return ssd_core_bwd(c(Q), c(K), c(V), c(dA.float()), c(dY.to(Q.dtype)), c(states), c(dec),
                            None if dSF is None else c(dSF.float()), chunk_size)
    return _core_bwd_torch(Q, K, V, dA, dY, states, dec, dSF, chunk_size)


@siso_bwd.register_fake
def _(Q, K, V, dA, dY, states, dec, dSF, chunk_size):
    B, H, P, N = Q.shape[0], Q.shape[2], V.shape[-1], Q.shape[-1]
    wd = _wide(Q.dtype)
    return (Q.new_empty(Q.shape, dtype=wd), K.new_empty(K.shape, dtype=wd), V.new_empty(V.shape, dtype=wd),
            dA.new_empty(dA.shape, dtype=wd), Q.new_empty(B, H, P, N, dtype=wd))


def _fwd_setup(ctx, inputs, output):
    Q, K, V, dA, S0, chunk_size = inputs
    _, states, dec, _ = output
    ctx.save_for_backward(Q, K, V, dA, states, dec)
    ctx.chunk_size, ctx.has_s0 = chunk_size, S0 is not None
    ctx.dtypes = (Q.dtype, K.dtype, V.dtype, dA.dtype, None if S0 is None else S0.dtype)


def _fwd_backward(ctx, dy, dstates, ddec, dfinal):
    Q, K, V, dA, states, dec = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros(V.shape, device=V.device, dtype=_wide(Q.dtype))
    dQ, dK, dV, ddA, dS0 = siso_bwd(Q, K, V, dA, dy, states, dec, dfinal, ctx.chunk_size)
    qd, kd, vd, ad, sd = ctx.dtypes
    return (dQ.to(qd), dK.to(kd), dV.to(vd), ddA.to(ad), dS0.to(sd) if ctx.has_s0 else None, None)


siso_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup)


@torch.library.custom_op("mamba3::siso_step", mutates_args=("angle", "ssm", "k_state", "v_state"))
def siso_step(q: Tensor, k: Tensor, v: Tensor, dA: Tensor, dt: Tensor, trap: Tensor, q_bias: Tensor,
              k_bias: Tensor, angles: Tensor, D: Optional[Tensor], z: Optional[Tensor], angle: Tensor,
              ssm: Tensor, k_state: Tensor, v_state: Tensor) -> Tensor:
    state = Mamba3State(angle, ssm, k_state, v_state)
    if _on_triton(v):
        from .mamba3.triton_step import mamba3_siso_step_triton
        return mamba3_siso_step_triton(q, k, v, dA, dt, trap, q_bias, k_bias, angles, D, z, state)
    y, new = mamba3_siso_step_reference(q, k, v, dA, dt, trap, q_bias, k_bias, angles, D, z, state)
    for dst, src in zip(state, new):
        dst.copy_(src)
    return y.to(v.dtype)


@siso_step.register_fake
def _(q, k, v, dA, dt, trap, q_bias, k_bias, angles, D, z, angle, ssm, k_state, v_state):
    return torch.empty_like(v)


@torch.library.custom_op("mamba3::siso_fused", mutates_args=())
def siso_fused(q: Tensor, k: Tensor, v: Tensor, dA: Tensor, dt: Tensor, trap: Tensor, q_bias: Tensor,
               k_bias: Tensor, angles: Tensor, D: Optional[Tensor], z: Optional[Tensor], a0: Optional[Tensor],
               s0: Optional[Tensor], k0: Optional[Tensor], v0: Optional[Tensor],
               chunk_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    # detached: an autograd.Function sees requires_grad (parameters) even under no_grad, and the
    # Triton forward would then save its backward's tensors (pre-gate output, chunk states)
    d = lambda t: None if t is None else t.detach()
    init = None if s0 is None else Mamba3State(d(a0), d(s0), d(k0), d(v0))
    args = tuple(map(d, (q, k, v, dA, dt, trap, q_bias, k_bias, angles, D, z)))
    with torch.no_grad():
        if _on_triton(v) and chunk_size >= 16 and chunk_size & (chunk_size - 1) == 0:  # the kernels' chunks
            from .mamba3.triton_siso import mamba3_siso_triton
            y, fin = mamba3_siso_triton(*args, initial_state=init, return_final_state=True, chunk_size=chunk_size)
        else:
            y, fin = mamba3_siso_chunked(*args, initial_state=init, return_final_state=True, chunk_size=chunk_size)
    wd = _wide(v.dtype)
    outs = tuple(t.to(dt_).contiguous() for t, dt_ in zip((y, *fin), (v.dtype, wd, wd, v.dtype, v.dtype)))
    # an op's outputs may not alias its inputs (a state passed through, a zero-size phase)
    ins = {t.untyped_storage().data_ptr() for t in (*args, *(init or ())) if t is not None}
    return tuple(t.clone() if t.untyped_storage().data_ptr() in ins else t for t in outs)


@siso_fused.register_fake
def _(q, k, v, dA, dt, trap, q_bias, k_bias, angles, D, z, a0, s0, k0, v0, chunk_size):
    B, _, H, P = v.shape
    N, S, wd = q.shape[-1], angles.shape[-1], _wide(v.dtype)
    return (v.new_empty(v.shape), v.new_empty(B, H, S, dtype=wd), v.new_empty(B, H, P, N, dtype=wd),
            v.new_empty(B, H, N), v.new_empty(B, H, P))


# ------------------------------------------------------------------------------ op-level API
def mamba3_siso_op(q, k, v, dA, dt, trap, q_bias, k_bias, angles, D=None, z=None, *,
                   initial_state: Optional[Mamba3State] = None, return_final_state: bool = False,
                   cu_seqlens: Optional[Tensor] = None, chunk_size: int = 64):
    """Mamba-3 SISO through the ops (signature and results of ``mamba3_siso``; inputs are assumed
    validated): in inference (no input requires grad, or grad mode off) and without packed
    sequences one ``mamba3::siso_fused``, else PyTorch preparation around ``mamba3::siso_fwd``.
    Varlen reads the sequence lengths on the host (one graph break)."""
    if v.shape[1] == 0:
        return mamba3_siso_chunked(q, k, v, dA, dt, trap, q_bias, k_bias, angles, D, z, initial_state=initial_state,
                                   return_final_state=return_final_state, cu_seqlens=cu_seqlens,
                                   chunk_size=chunk_size)
    state = tuple(initial_state) if initial_state is not None else (None,) * 4
    ins = (q, k, v, dA, dt, trap, q_bias, k_bias, angles, D, z) + state
    if cu_seqlens is None and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ins)):
        y, *fin = siso_fused(*ins, chunk_size)
        return y, (Mamba3State(*fin) if return_final_state else None)
    return siso_varlen(_forward, q, k, v, dA, dt, trap, q_bias, k_bias, angles, D, z, initial_state,
                       return_final_state, chunk_size, cu_seqlens)


def _forward(q, k, v, dA, dt, trap, q_bias, k_bias, angles, D, z, initial_state, return_final_state,
             chunk_size, lengths):
    B, T, H, P = v.shape
    out_dtype, wd = v.dtype, _wide(v.dtype)
    kd = torch.float32 if (v.device.type == "cpu" and wd == torch.float32) else v.dtype  # core operand dtype
    f = lambda t: t.to(wd)
    dtw, dAw = f(dt), f(dA)
    qh = expand_groups(f(q), H) + f(q_bias)                                   # [B, T, H, N]
    kh = expand_groups(f(k), H) + f(k_bias)
    init_angle = None if initial_state is None else initial_state.angle.to(wd)
    theta = cumulative_angles(angle_increments(dtw, f(angles)), init_angle)  # [B, T, H, S]
    qr, kr = rotate_interleaved(qh, theta), rotate_interleaved(kh, theta)
    lam = torch.sigmoid(f(trap))
    gamma = lam * dtw
    shifted = F.pad(((1.0 - lam) * dtw)[:, 1:], (0, 0, 0, 1))                # 0 after the last token
    if lengths is not None:  # padded varlen: no next token after each sequence's last one
        shifted = shifted * (torch.arange(T, device=v.device)[None, :] < (lengths[:, None] - 1))[..., None]
    c = gamma + shifted
    diag = gamma * (qh * kh).sum(-1)
    S0 = None
    if initial_state is not None:
        S0 = initial_state.ssm.to(wd) + (((1.0 - lam[:, 0]) * dtw[:, 0])[..., None, None]
                                         * initial_state.v.to(wd).unsqueeze(-1) * initial_state.k.to(wd).unsqueeze(-2))
    y, _, _, S = siso_fwd(qr.to(kd), (kr * c.unsqueeze(-1)).to(kd), v.to(kd), dAw, S0, chunk_size)
    skip = diag if D is None else diag + f(D)
    y = y + skip.unsqueeze(-1) * f(v)
    if z is not None:
        y = y * F.silu(f(z))
    final = None
    if return_final_state:
        final = _final_state(S, theta, kr, v, lengths, wd, out_dtype, initial_state)
    return y.to(out_dtype), final


def mamba3_siso_step_op(q, k, v, dA, dt, trap, q_bias, k_bias, angles, D, z, state: Mamba3State) -> Tensor:
    """One decode token through ``mamba3::siso_step`` (``state`` updated in place)."""
    return siso_step(q, k, v, dA, dt, trap, q_bias, k_bias, angles, D, z, *state)


# ------------------------------------------------------------------------------ MIMO decode step
# mamba3::mimo_step(q, k, v, dA, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D?, z?, w?, eps,
#                   angle!, ssm!, k!, v!) -> out: one MIMO decode token (triton_mimo_step.py on CUDA /
#   the interpreter, else mamba3_mimo_step_reference), the four state tensors updated in place.
def _mimo_step_on_triton(v: Tensor, tensors, angle: Tensor) -> bool:
    return (_on_triton(v) and angle.dtype == torch.float32
            and all(t is None or t.dtype in (torch.float32, torch.bfloat16, torch.float16) for t in tensors))


@torch.library.custom_op("mamba3::mimo_step", mutates_args=("angle", "ssm", "k_state", "v_state"))
def mimo_step(q: Tensor, k: Tensor, v: Tensor, dA: Tensor, dt: Tensor, trap: Tensor, q_bias: Tensor,
              k_bias: Tensor, angles: Tensor, mimo_x: Tensor, mimo_z: Tensor, mimo_o: Tensor, D: Optional[Tensor],
              z: Optional[Tensor], norm_weight: Optional[Tensor], norm_eps: float, angle: Tensor, ssm: Tensor,
              k_state: Tensor, v_state: Tensor) -> Tensor:
    args = (q, k, v, dA, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z)
    state = Mamba3State(angle, ssm, k_state, v_state)
    if _mimo_step_on_triton(v, args + (norm_weight, ssm, k_state, v_state), angle) and \
            all(t.is_contiguous() for t in state):
        from .mamba3.triton_mimo_step import mamba3_mimo_step_triton
        return mamba3_mimo_step_triton(*args, state, norm_weight, norm_eps)
    from .mamba3.mimo_reference import mamba3_mimo_step_reference
    y, new = mamba3_mimo_step_reference(*args, state, norm_weight, norm_eps)
    for dst, src in zip(state, new):
        dst.copy_(src)
    return y.to(v.dtype)


@mimo_step.register_fake
def _(q, k, v, dA, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z, norm_weight, norm_eps,
      angle, ssm, k_state, v_state):
    return torch.empty_like(v)


def mamba3_mimo_step_op(q, k, v, dA, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z,
                        state: Mamba3State, outproj_norm_weight=None, outproj_norm_eps: float = 1e-5) -> Tensor:
    """One MIMO decode token through ``mamba3::mimo_step`` (``state`` updated in place)."""
    return mimo_step(q, k, v, dA, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z,
                     outproj_norm_weight, float(outproj_norm_eps), *state)
