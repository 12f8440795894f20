"""The Mamba-3 mixer layer (SPEC sections 1, 3, 5), parameter-compatible with the official module.

Forward per token: in_proj -> split [z | x | B | C | dd_dt | dd_A | trap | angles];
A = -max(f(dd_A), A_floor), dt = softplus(dd_dt + dt_bias); B, C RMS-normed over N, per-head
biases added; the op applies the rotary phase and the exponential-trapezoidal SSM; the output is
gated by silu(z) (optionally through the pre-gate grouped RMSNorm) and projected by out_proj.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..ops.conv import causal_conv1d, causal_conv1d_step
from ..ops.mamba3 import Mamba3State, mamba3_siso, mamba3_siso_step
from ..ops.mamba3 import mamba3_mimo, mamba3_mimo_step
from ..ops.mamba3.common import rotate_halves, rotate_interleaved
from ..ops.utils import check_same_device, check_tensor, seq_lengths
from .sizes import check_positive_ints, split_heads
from .cache import LayerCache, check_cache, check_input_tensor, checked_allocate
from .norm import RMSNormGated, rms_normalize, scale_cast

ROPE_MODES = ("data", "fixed", "none")
A_ACTIVATIONS = ("softplus", "heavy_tail")


@dataclasses.dataclass
class Mamba3Cache(LayerCache):
    """angle [B, H, S] fp32; ssm [B, H, P, N] (fp32 default); k [B, R, H, N]; v [B, H, P];
    conv [B, C, W-1] only for the short-conv ablation (else None)."""

    angle: Tensor
    ssm: Tensor
    k: Tensor
    v: Tensor
    conv: Optional[Tensor] = None


def heavy_tail(u: Tensor) -> Tensor:
    """Upstream's later A activation: 1 + u for u >= 0, 1 / (1 - u) for u < 0 (positive, smooth)."""
    return torch.where(u >= 0, 1.0 + u, 1.0 / (1.0 - torch.clamp(u, max=0.0)))


class Mamba3(nn.Module):
    """Mamba-3 mixer. Constructor names, defaults, initialisation and state-dict keys follow the
    official ``mamba_ssm.modules.mamba3.Mamba3`` so its checkpoints load with strict=True.

    Extensions (keyword-only): ``a_activation`` ("softplus" as in the paper, or "heavy_tail" as in
    upstream after PR #962), ablation switches ``use_trapezoid`` (False: Euler, lambda = 1),
    ``rope`` ("data" = data-dependent, "fixed" = standard position RoPE, "none"), ``use_bc_bias``,
    ``d_conv`` (> 0 adds Mamba-2's short causal conv on x, B, C), and ``impl`` for the op.
    """

    def __init__(self, d_model: int, d_state: int = 128, expand: int = 2, headdim: int = 64, ngroups: int = 1,
                 rope_fraction: float = 0.5, dt_min: float = 1e-3, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, A_floor: float = 1e-4, is_outproj_norm: bool = False,
                 is_mimo: bool = False, mimo_rank: int = 4, fuse_pregate_headwise_norm: bool = True,
                 chunk_size: int = 64, layer_idx: Optional[int] = None, device=None, dtype=None,
                 dropout: float = 0.0, n_layer: Optional[int] = None, *,
                 a_activation: str = "softplus", use_trapezoid: bool = True, rope: str = "data",
                 use_bc_bias: bool = True, d_conv: int = 0, impl: str = "auto"):
        super().__init__()
        fk = dict(device=device, dtype=dtype)
        check_positive_ints(d_model=d_model, d_state=d_state, expand=expand, headdim=headdim, ngroups=ngroups,
                            chunk_size=chunk_size)
        d_inner, nheads = split_heads(d_model, expand, headdim, ngroups)
        if rope_fraction not in (0.5, 1.0):
            raise ValueError(f"rope_fraction must be 0.5 or 1.0, got {rope_fraction}")
        if d_state % 2 != 0:
            raise ValueError(f"d_state must be even (rotary pairs), got {d_state}")
        if rope not in ROPE_MODES:
            raise ValueError(f"rope must be one of {ROPE_MODES}, got {rope!r}")
        if a_activation not in A_ACTIVATIONS:
            raise ValueError(f"a_activation must be one of {A_ACTIVATIONS}, got {a_activation!r}")
        if not isinstance(mimo_rank, int) or isinstance(mimo_rank, bool) or mimo_rank < 1:
            raise ValueError(f"mimo_rank must be an int >= 1, got {mimo_rank!r}")
        if not isinstance(d_conv, int) or isinstance(d_conv, bool) or d_conv < 0:
            raise ValueError(f"d_conv must be an int >= 0, got {d_conv!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"dt_min and dt_max must satisfy 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        if impl not in ("auto", "reference", "chunked", "triton"):
            raise ValueError(f"impl must be one of ['auto', 'reference', 'chunked', 'triton'], got {impl!r}")
        self.d_model, self.d_state, self.expand, self.headdim, self.ngroups = d_model, d_state, expand, headdim, ngroups
        self.d_inner, self.nheads = d_inner, nheads
        self.rope_fraction, self.A_floor = rope_fraction, A_floor
        self.is_outproj_norm, self.is_mimo = is_outproj_norm, is_mimo
        self.mimo_rank = mimo_rank if is_mimo else 1
        self.fuse_pregate_headwise_norm = fuse_pregate_headwise_norm
        self.chunk_size, self.layer_idx = chunk_size, layer_idx
        self.a_activation, self.use_trapezoid, self.rope = a_activation, use_trapezoid, rope
        self.use_bc_bias, self.d_conv, self.impl = use_bc_bias, d_conv, impl
        split = int(d_state * rope_fraction)
        split -= split % 2
        self.num_rope_angles = split // 2
        R, G, N, H = self.mimo_rank, ngroups, d_state, nheads

        d_in_proj = 2 * d_inner + 2 * N * G * R + 3 * H + self.num_rope_angles
        self.in_proj = nn.Linear(d_model, d_in_proj, bias=False, **fk)

        # dt_bias = softplus^{-1}(dt0), dt0 log-uniform in [dt_min, dt_max], floored.
        dt0 = torch.exp(torch.rand(H, device=device) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt0 = dt0.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt0 + torch.log(-torch.expm1(-dt0)))
        self.dt_bias._no_weight_decay = True

        if use_bc_bias:
            self.B_bias = nn.Parameter(torch.ones(H, R, N, device=device, dtype=torch.float32))
            self.C_bias = nn.Parameter(torch.ones(H, R, N, device=device, dtype=torch.float32))
        self.B_norm = _NormWeight(N, **fk)
        self.C_norm = _NormWeight(N, **fk)
        self.D = nn.Parameter(torch.ones(H, device=device))
        self.D._no_weight_decay = True
        if is_mimo:
            self.mimo_x = nn.Parameter(torch.full((H, R, headdim), 1.0 / R, device=device))
            self.mimo_z = nn.Parameter(torch.ones(H, R, headdim, device=device))
            self.mimo_o = nn.Parameter(torch.full((H, R, headdim), 1.0 / R, device=device))
        if d_conv > 0:
            conv_dim = d_inner + 2 * N * G * R
            self.conv1d = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, bias=True, **fk)
        if is_outproj_norm:
            self.norm = RMSNormGated(d_inner, eps=1e-5, group_size=headdim, norm_before_gate=True, **fk)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False, **fk)
        if rope == "fixed":
            inv = 10000.0 ** (-torch.arange(self.num_rope_angles, dtype=torch.float32) / max(self.num_rope_angles, 1))
            self.register_buffer("rope_freqs", inv.to(device) if device is not None else inv, persistent=False)

    # ----------------------------------------------------------------------------------------
    @checked_allocate
    def allocate_inference_cache(self, batch_size: int, max_seqlen: Optional[int] = None, *, device=None,
                                 dtype=None, state_dtype: Optional[torch.dtype] = None) -> Mamba3Cache:
        """Fixed-size decode state; ``max_seqlen`` is ignored (memory is constant in length).

        ``state_dtype``: dtype of the SSM state, float32 by default (float64 for a float64 model);
        bfloat16 halves decode memory traffic at some accuracy cost.
        """
        device = self.in_proj.weight.device if device is None else device
        dtype = self.in_proj.weight.dtype if dtype is None else dtype
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        state_dtype = wide if state_dtype is None else state_dtype
        B, R, H, P, N = batch_size, self.mimo_rank, self.nheads, self.headdim, self.d_state
        conv = None
        if self.d_conv > 0:
            conv = torch.zeros(B, self.conv1d.weight.shape[0], self.d_conv - 1, device=device, dtype=dtype)
        return Mamba3Cache(
            angle=torch.zeros(B, H, self.num_rope_angles, device=device, dtype=wide),
            ssm=torch.zeros(B, H, P, N, device=device, dtype=state_dtype),
            k=torch.zeros(B, R, H, N, device=device, dtype=dtype),
            v=torch.zeros(B, H, P, device=device, dtype=dtype),
            conv=conv,
        )

    # ----------------------------------------------------------------------------------------
    def _project(self, u: Tensor, cache: Optional[Mamba3Cache], cu_seqlens: Optional[Tensor], step: bool):
        """in_proj and everything before the SSM. u: [B, T, D]. Returns a dict of op inputs.

        Casts are folded into promoting ops and B, C are normalised in one ``F.rms_norm``: a
        prefill pays one pass over the tensor per op. In inference (no weight gradient) z and x
        come from GEMMs of their own, so the op gets them contiguous instead of copying strided
        views of one [B, T, W] output (two passes over [B, T, d_inner] each)."""
        Bsz, T, _ = u.shape
        H, P, N, G, R, S = self.nheads, self.headdim, self.d_state, self.ngroups, self.mimo_rank, self.num_rope_angles
        di, NG = self.d_inner, N * G * R
        if self.d_conv == 0 and not step and not (torch.is_grad_enabled() and self.in_proj.weight.requires_grad):
            w = self.in_proj.weight
            z, x, rest = F.linear(u, w[:di]), F.linear(u, w[di : 2 * di]), F.linear(u, w[2 * di :])
            BC, dd_dt, dd_A, trap, ang = torch.split(rest, [2 * NG, H, H, H, S], dim=-1)
        else:
            zxbcdt = self.in_proj(u)
            z, xBC, dd_dt, dd_A, trap, ang = torch.split(zxbcdt, [di, di + 2 * NG, H, H, H, S], dim=-1)
            if self.d_conv > 0:
                w, b = self.conv1d.weight[:, 0], self.conv1d.bias
                if step:
                    xBC = causal_conv1d_step(xBC[:, 0], w, b, cache.conv, activation="silu").unsqueeze(1)
                else:
                    xBC, conv_final = causal_conv1d(xBC, w, b, activation="silu",
                                                    initial_state=None if cache is None else cache.conv,
                                                    return_final_state=cache is not None, cu_seqlens=cu_seqlens)
                    if cache is not None:
                        cache.conv.copy_(conv_final)
            x, BC = torch.split(xBC, [di, 2 * NG], dim=-1)
        x = x.reshape(Bsz, T, H, P)
        z = z.reshape(Bsz, T, H, P)
        bc = rms_normalize(BC.reshape(Bsz, T, 2, R, G, N), 1e-5)                  # B then C, in >= fp32
        Bp = scale_cast(bc[:, :, 0], self.B_norm.weight, BC.dtype)
        Cp = scale_cast(bc[:, :, 1], self.C_norm.weight, BC.dtype)
        act = F.softplus if self.a_activation == "softplus" else heavy_tail
        dt = F.softplus(_wide_add(dd_dt, self.dt_bias))                             # [B, T, H], >= fp32
        A = -torch.clamp(act(_f32(dd_A)), min=self.A_floor)
        if self.use_trapezoid:
            trap = _f32(trap)
        else:  # Euler: lambda = sigmoid(inf) = 1
            trap = torch.full(trap.shape, math.inf, device=u.device,
                              dtype=torch.float64 if trap.dtype == torch.float64 else torch.float32)
        if self.use_bc_bias:
            q_bias, k_bias = _inference(self.C_bias), _inference(self.B_bias)      # [H, R, N]
        else:
            q_bias = k_bias = torch.zeros(H, R, N, device=u.device, dtype=torch.float32)
        angles = _f32(ang if self.rope == "data" else ang[..., :0])                # "none"/"fixed": no op phase
        if self.rope == "fixed":
            # Standard RoPE: the layer adds the biases and rotates by position; the op sees no phase.
            pos_phase = self._fixed_phase(Bsz, T, cache, cu_seqlens, u.device)  # [B, T, S]
            rotate = rotate_halves if self.is_mimo else rotate_interleaved  # MIMO: split-half pairs
            Bp = rotate(_add_bias_heads(Bp, k_bias), pos_phase[:, :, None, None, :])
            Cp = rotate(_add_bias_heads(Cp, q_bias), pos_phase[:, :, None, None, :])
            q_bias = k_bias = torch.zeros(H, R, N, device=u.device, dtype=torch.float32)
        return dict(z=z, x=x, B=Bp, C=Cp, dA=A * dt, dt=dt, trap=trap, angles=angles, q_bias=q_bias, k_bias=k_bias)

    def _fixed_phase(self, Bsz, T, cache, cu_seqlens, device):
        t = torch.arange(1, T + 1, device=device, dtype=torch.float32)
        if cu_seqlens is not None:  # positions restart in every packed sequence
            starts = torch.repeat_interleave(cu_seqlens[:-1].to(device), torch.tensor(seq_lengths(cu_seqlens), device=device))
            t = t - starts.float()
        phase = t[None, :, None] * self.rope_freqs[None, None, :]
        if cache is not None:
            base = cache.angle[:, 0, :]                                             # [B, S]
            if cu_seqlens is not None:
                seq_id = torch.repeat_interleave(torch.arange(len(seq_lengths(cu_seqlens)), device=device),
                                                 torch.tensor(seq_lengths(cu_seqlens), device=device))
                phase = phase + base[seq_id].unsqueeze(0)
            else:
                phase = phase + base.unsqueeze(1)
        return torch.remainder(phase.expand(Bsz if cu_seqlens is None else 1, -1, -1), 2 * math.pi)

    def _output(self, y: Tensor, z: Tensor, u: Tensor) -> Tensor:
        """y: [B, T, H, P] (already gated unless outproj norm) -> [B, T, D]."""
        if self.is_outproj_norm:
            y = self.norm(y.flatten(-2), z.flatten(-2))
        else:
            y = y.flatten(-2)
        return self.out_proj(y.to(u.dtype))

    def _op_state(self, cache: Mamba3Cache) -> Mamba3State:
        angle = cache.angle if self.rope == "data" else cache.angle[..., :0]
        return Mamba3State(angle=angle, ssm=cache.ssm, k=cache.k[:, 0], v=cache.v)

    def _save_phase(self, cache: Mamba3Cache, p: dict, final: Mamba3State, cu_seqlens) -> None:
        if self.rope == "data":
            cache.angle.copy_(final.angle)
        elif self.rope == "fixed":
            lengths = None if cu_seqlens is None else seq_lengths(cu_seqlens)
            T = p["x"].shape[1]
            if lengths is None:
                cache.angle.copy_(torch.remainder(cache.angle + T * self.rope_freqs, 2 * math.pi))
            else:
                n = torch.tensor(lengths, device=cache.angle.device, dtype=torch.float32)
                cache.angle.copy_(torch.remainder(cache.angle + n[:, None, None] * self.rope_freqs, 2 * math.pi))

    # ----------------------------------------------------------------------------------------
    def forward(self, u: Tensor, cache: Optional[Mamba3Cache] = None, cu_seqlens: Optional[Tensor] = None) -> Tensor:
        """u: [B, T, d_model] -> [B, T, d_model].

        With ``cache``, the sequence continues from the cached state (chunked prefill
        continuation) and the cache is left at the end of the sequence. With ``cu_seqlens``
        ([S+1], B = 1) packed sequences are independent; a cache then holds one row per sequence.
        """
        self._check_input(u, 3)
        if self.is_mimo:
            return self._forward_mimo(u, cache, cu_seqlens)
        nseq = u.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        if cache is not None:
            check_cache(cache, Mamba3Cache, nseq, "input (number of sequences)")
        p = self._project(u, cache, cu_seqlens, step=False)
        y, final = mamba3_siso(
            p["C"][:, :, 0], p["B"][:, :, 0], p["x"], p["dA"], p["dt"], p["trap"], p["q_bias"][:, 0],
            p["k_bias"][:, 0], p["angles"], _inference(self.D), None if self.is_outproj_norm else p["z"],
            initial_state=None if cache is None else _saved_copy(self._op_state(cache)),
            return_final_state=cache is not None,
            cu_seqlens=cu_seqlens, chunk_size=self.chunk_size, impl=self.impl)
        if cache is not None:  # caches hold inference state: never part of the autograd graph
            final = Mamba3State(*(t.detach() for t in final))
            cache.ssm.copy_(final.ssm)
            cache.k[:, 0].copy_(final.k)
            cache.v.copy_(final.v)
            self._save_phase(cache, p, final, cu_seqlens)
        return self._output(y, p["z"], u)

    @torch.no_grad()
    def step(self, u: Tensor, cache: Mamba3Cache) -> Tensor:
        """One decode token: u [B, d_model] or [B, 1, d_model] -> same shape; cache updated in place.

        Inference only (runs under no_grad: the cache is overwritten in place); to differentiate
        through a continuation use ``forward(u, cache=...)``.
        """
        check_input_tensor("u", u)
        squeeze = u.dim() == 2
        self._check_input(u.unsqueeze(1) if squeeze else u, 3)
        if not squeeze and u.shape[1] != 1:
            raise ValueError(f"step takes one token: u must be [B, d_model] or [B, 1, d_model], got {tuple(u.shape)}")
        u3 = u.unsqueeze(1) if squeeze else u
        check_cache(cache, Mamba3Cache, u3.shape[0])
        if self.is_mimo:
            out = self._step_mimo(u3, cache)
        elif self.d_conv == 0 and self.rope != "fixed":
            return self._step_siso(u3[:, 0], cache).view_as(u)
        else:
            out = self._step_siso_project(u3, cache)
        return out[:, 0] if squeeze else out

    def _step_siso_project(self, u3: Tensor, cache: Mamba3Cache) -> Tensor:
        """SISO decode through ``_project`` (any options): u3 [B, 1, d_model] -> [B, 1, d_model]."""
        p = self._project(u3, cache, None, step=True)
        y = mamba3_siso_step(
            p["C"][:, 0, 0], p["B"][:, 0, 0], p["x"][:, 0], p["dA"][:, 0], p["dt"][:, 0], p["trap"][:, 0],
            p["q_bias"][:, 0], p["k_bias"][:, 0], p["angles"][:, 0], self.D,
            None if self.is_outproj_norm else p["z"][:, 0], self._op_state(cache),
            impl="reference" if self.impl in ("reference", "chunked") else "auto")
        if self.rope == "fixed":
            cache.angle.copy_(torch.remainder(cache.angle + self.rope_freqs, 2 * math.pi))
        return self._output(y.unsqueeze(1), p["z"], u3)

    def _step_siso(self, u: Tensor, cache: Mamba3Cache) -> Tensor:
        """SISO decode without the short conv or fixed RoPE: u [B, d_model] -> [B, d_model].

        The values of ``_step_siso_project`` in fewer kernels (decode pays per launch):
        B and C normalised in one op, casts folded into promoting ops, only views of in_proj's
        output where the op accepts strided inputs."""
        Bsz = u.shape[0]
        H, P, N, G, S, di = self.nheads, self.headdim, self.d_state, self.ngroups, self.num_rope_angles, self.d_inner
        zx = self.in_proj(u)                                                        # [B, W]
        o = 2 * di + 2 * G * N
        # contiguous: the copies the Triton op would make anyway, here where torch.compile fuses them
        z, x = zx[:, :di].view(Bsz, H, P).contiguous(), zx[:, di : 2 * di].view(Bsz, H, P).contiguous()
        bc = rms_normalize(zx[:, 2 * di : o].view(Bsz, 2, G, N), 1e-5)            # [B, 2, G, N] B then C
        k = scale_cast(bc[:, 0], self.B_norm.weight, zx.dtype)
        q = scale_cast(bc[:, 1], self.C_norm.weight, zx.dtype)
        dd_dt, dd_A, trap = (zx[:, o + i * H : o + (i + 1) * H] for i in range(3))
        dt = F.softplus(_wide_add(dd_dt, self.dt_bias))                             # [B, H]
        act = F.softplus if self.a_activation == "softplus" else heavy_tail
        dA = torch.clamp(act(_f32(dd_A)), min=self.A_floor).mul_(dt).neg_()        # A * dt, A = -max(f, floor)
        if not self.use_trapezoid:  # Euler: lambda = sigmoid(inf) = 1
            trap = torch.full(trap.shape, math.inf, device=u.device,
                              dtype=torch.float64 if trap.dtype == torch.float64 else torch.float32)
        ang = zx[:, o + 3 * H : o + 3 * H + (S if self.rope == "data" else 0)]
        if self.use_bc_bias:
            q_bias, k_bias = self.C_bias[:, 0], self.B_bias[:, 0]                    # [H, N]
        else:
            q_bias = k_bias = torch.zeros(H, N, device=u.device, dtype=torch.float32)
        y = mamba3_siso_step(q, k, x, dA, dt, _f32(trap).contiguous(), q_bias, k_bias, _f32(ang).contiguous(),
                             self.D, None if self.is_outproj_norm else z, self._op_state(cache),
                             impl="reference" if self.impl in ("reference", "chunked") else "auto")
        return self._output(y.unsqueeze(1), z.unsqueeze(1), u.unsqueeze(1))[:, 0]

    def _check_input(self, u, ndim):
        check_tensor("u", u, [("B", None), ("T", None), ("d_model", self.d_model)])
        check_same_device(u=u, in_proj_weight=self.in_proj.weight)

    # MIMO forms (SPEC section 4). The op applies psi/zeta/phi, the per-rank pre-gate RMSNorm
    # (self.norm.weight viewed [H, P], fused before the gate) and the gate, so _output is bypassed.
    # There is no MIMO Triton kernel: impl "triton"/"auto" both run the chunked PyTorch path.
    def _forward_mimo(self, u, cache, cu_seqlens):
        nseq = u.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        if cache is not None:
            check_cache(cache, Mamba3Cache, nseq, "input (number of sequences)")
        p = self._project(u, cache, cu_seqlens, step=False)
        state = None
        if cache is not None:
            angle = cache.angle if self.rope == "data" else cache.angle[..., :0]
            state = _saved_copy(Mamba3State(angle=angle, ssm=cache.ssm, k=cache.k, v=cache.v))
        norm = {}
        if self.is_outproj_norm:
            norm = dict(outproj_norm_weight=self.norm.weight.view(self.nheads, self.headdim),
                        outproj_norm_eps=self.norm.eps)
        y, final = mamba3_mimo(
            p["C"], p["B"], p["x"], p["dA"], p["dt"], p["trap"], p["q_bias"], p["k_bias"], p["angles"],
            self.mimo_x, self.mimo_z, self.mimo_o, self.D, p["z"], initial_state=state,
            return_final_state=cache is not None, cu_seqlens=cu_seqlens, chunk_size=self.chunk_size,
            impl=self.impl if self.impl in ("reference", "chunked") else "auto", **norm)
        if cache is not None:  # caches hold inference state: never part of the autograd graph
            final = Mamba3State(*(t.detach() for t in final))
            cache.ssm.copy_(final.ssm)
            cache.k.copy_(final.k)
            cache.v.copy_(final.v)
            self._save_phase(cache, p, final, cu_seqlens)
        return self.out_proj(y.flatten(-2).to(u.dtype))

    def _step_mimo(self, u, cache):
        p = self._project(u, cache, None, step=True)
        angle = cache.angle if self.rope == "data" else cache.angle[..., :0]
        state = Mamba3State(angle=angle, ssm=cache.ssm, k=cache.k, v=cache.v)
        norm = {}
        if self.is_outproj_norm:
            norm = dict(outproj_norm_weight=self.norm.weight.view(self.nheads, self.headdim),
                        outproj_norm_eps=self.norm.eps)
        y = mamba3_mimo_step(
            p["C"][:, 0], p["B"][:, 0], p["x"][:, 0], p["dA"][:, 0], p["dt"][:, 0], p["trap"][:, 0],
            p["q_bias"], p["k_bias"], p["angles"][:, 0], self.mimo_x, self.mimo_z, self.mimo_o, self.D,
            p["z"][:, 0], state, **norm)
        if self.rope == "fixed":
            cache.angle.copy_(torch.remainder(cache.angle + self.rope_freqs, 2 * math.pi))
        return self.out_proj(y.flatten(-2).unsqueeze(1).to(u.dtype))


def _f32(t: Tensor) -> Tensor:
    """Upcast to float32, keeping float64 (the reference precision) as it is."""
    return t if t.dtype == torch.float64 else t.float()


def _inference(param: Tensor) -> Tensor:
    """``param`` detached when autograd is not recording: an autograd.Function (the Triton SISO
    forward) sees a parameter's requires_grad even under no_grad and would save its backward's
    tensors (the pre-gate output and every chunk's state: extra passes over memory)."""
    return param if torch.is_grad_enabled() else param.detach()


def _saved_copy(state: Mamba3State) -> Mamba3State:
    """The cache's state as an op's initial state: a copy when autograd is recording (it may save
    the state, and the cache is overwritten in place after the op), the cache's tensors otherwise."""
    return Mamba3State(*(t.clone() for t in state)) if torch.is_grad_enabled() else state


def _wide_add(a: Tensor, b: Tensor) -> Tensor:
    """``_f32(a) + _f32(b)`` as one promoting add when that already computes in fp32/fp64."""
    if torch.promote_types(a.dtype, b.dtype) in (torch.float32, torch.float64):
        return a + b
    return _f32(a) + _f32(b)


def _add_bias_heads(X: Tensor, bias: Tensor) -> Tensor:
    """X: [B, T, R, G, N] + bias [H, R, N] -> [B, T, R, H, N] (heads read their group)."""
    H = bias.shape[0]
    G = X.shape[3]
    Xh = X.repeat_interleave(H // G, dim=3) if G != H else X
    return Xh + bias.transpose(0, 1).to(Xh.dtype)


class _NormWeight(nn.Module):
    """Holds the learnable RMSNorm weight of size N (state-dict key ``B_norm.weight``)."""

    def __init__(self, d: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))
