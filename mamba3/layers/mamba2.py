"""The Mamba-2 mixer layer (SPEC section 11), parameter-compatible with the official module.

Forward per token: in_proj -> [z | xBC | dt]; xBC -> depthwise causal conv (width d_conv) -> SiLU
-> split x (H, P), B (G, N), C (G, N); A = -exp(A_log) per head, dt = softplus(dt + dt_bias)
(clamped to dt_limit); SSD (mamba3.ops.mamba2.ssd); y -> RMSNormGated(y, z) = RMSNorm(y * silu(z))
over groups of d_inner / G channels (or y * silu(z) without the norm); out_proj.
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
from ..ops.mamba2 import ssd, ssd_step
from ..ops.utils import check_tensor
from .sizes import check_positive_ints, split_heads
from .cache import LayerCache, check_cache, check_input_tensor, checked_allocate
from .norm import RMSNormGated


@dataclasses.dataclass
class Mamba2Cache(LayerCache):
    """conv [B, conv_dim, d_conv - 1] (last inputs of the xBC conv, oldest first);
    ssm [B, H, P, N] (float32 by default)."""

    conv: Tensor
    ssm: Tensor


class Mamba2(nn.Module):
    """Mamba-2 mixer. Constructor names, defaults, initialisation and state-dict keys follow the
    official ``mamba_ssm.modules.mamba2.Mamba2`` (in_proj, conv1d, dt_bias, A_log, D, norm,
    out_proj) so its checkpoints load with strict=True (tensor-parallel and d_ssm < d_inner aside).
    Extension (keyword-only): ``impl`` for the SSD op ("auto", "reference", "chunked").
    """

    def __init__(self, d_model: int, d_state: int = 128, d_conv: int = 4, conv_init: Optional[float] = None,
                 expand: int = 2, headdim: int = 64, d_ssm: Optional[int] = None, ngroups: int = 1,
                 A_init_range=(1, 16), D_has_hdim: bool = False, rmsnorm: bool = True,
                 norm_before_gate: bool = False, dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, dt_limit=(0.0, float("inf")), bias: bool = False,
                 conv_bias: bool = True, chunk_size: int = 256, use_mem_eff_path: bool = True,
                 layer_idx: Optional[int] = None, process_group=None, sequence_parallel: bool = True,
                 device=None, dtype=None, *, impl: str = "auto"):
        super().__init__()
        fk = dict(device=device, dtype=dtype)
        # Official arguments kept for signature compatibility; use_mem_eff_path only picks a kernel there.
        if d_ssm is not None and d_ssm != expand * d_model:
            raise ValueError(f"d_ssm (SSM on part of d_inner, gated MLP on the rest) is not supported; got {d_ssm}")
        if process_group is not None:
            raise ValueError("tensor parallelism (process_group) is not supported")
        check_positive_ints(d_model=d_model, d_state=d_state, d_conv=d_conv, expand=expand, headdim=headdim,
                            ngroups=ngroups, chunk_size=chunk_size)
        d_inner, nheads = split_heads(d_model, expand, headdim, ngroups)
        if not (A_init_range[0] > 0 and A_init_range[1] >= A_init_range[0]):
            raise ValueError(f"A_init_range must satisfy 0 < lo <= hi, got {A_init_range}")
        self.d_model, self.d_state, self.d_conv, self.conv_init, self.expand = d_model, d_state, d_conv, conv_init, expand
        self.d_inner, self.headdim, self.nheads, self.ngroups = d_inner, headdim, nheads, ngroups
        self.D_has_hdim, self.rmsnorm, self.norm_before_gate = D_has_hdim, rmsnorm, norm_before_gate
        self.dt_limit, self.chunk_size, self.layer_idx, self.impl = tuple(dt_limit), chunk_size, layer_idx, impl
        G, N, H = ngroups, d_state, nheads

        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * G * N + H, bias=bias, **fk)   # [z | xBC | dt]
        self.conv_dim = d_inner + 2 * G * N
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1,
                                bias=conv_bias, **fk)
        if conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)

        # dt_bias = softplus^{-1}(dt0), dt0 log-uniform in [dt_min, dt_max], floored.
        dt0 = torch.exp(torch.rand(H, **fk) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt0 = dt0.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt0 + torch.log(-torch.expm1(-dt0)))
        self.dt_bias._no_weight_decay = True
        A = torch.empty(H, dtype=torch.float32, device=device).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A).to(dtype=dtype))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(d_inner if D_has_hdim else H, device=device))
        self.D._no_weight_decay = True
        if rmsnorm:
            self.norm = RMSNormGated(d_inner, eps=1e-5, group_size=d_inner // G, norm_before_gate=norm_before_gate,
                                     **fk)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias, **fk)

    # ----------------------------------------------------------------------------------------
    @checked_allocate
    def allocate_inference_cache(self, batch_size: int, max_seqlen: Optional[int] = None, *, device=None,
                                 dtype=None, state_dtype: Optional[torch.dtype] = None) -> Mamba2Cache:
        """Fixed-size decode state (``max_seqlen`` ignored). The conv state has the model dtype,
        the SSM state float32 (float64 for a float64 model) unless ``state_dtype`` is given."""
        device = self.in_proj.weight.device if device is None else device
        dtype = self.in_proj.weight.dtype if dtype is None else dtype
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        return Mamba2Cache(
            conv=torch.zeros(batch_size, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype),
            ssm=torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device,
                            dtype=wide if state_dtype is None else state_dtype),
        )

    # ----------------------------------------------------------------------------------------
    def _split(self, zxbcdt: Tensor):
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)

    def _in_proj(self, u: Tensor):
        """in_proj as three matmuls over the row blocks of its weight: z, xBC, dt come out
        contiguous (the conv and the norm run ~2x faster on contiguous inputs than on column
        slices of one [.., 2 d_inner + 2GN + H] output; same FLOPs)."""
        sizes = [self.d_inner, self.conv_dim, self.nheads]
        ws = torch.split(self.in_proj.weight, sizes)
        bs = (None,) * 3 if self.in_proj.bias is None else torch.split(self.in_proj.bias, sizes)
        return tuple(F.linear(u, w, b) for w, b in zip(ws, bs))

    def _ssm_inputs(self, xBC: Tensor, dt_raw: Tensor):
        """xBC [..., conv_dim] after the conv; dt_raw [..., H] -> x [.., H, P], B, C [.., G, N], dt, A, D."""
        G, N = self.ngroups, self.d_state
        x, Bp, Cp = torch.split(xBC, [self.d_inner, G * N, G * N], dim=-1)
        x = x.unflatten(-1, (self.nheads, self.headdim))
        Bp, Cp = Bp.unflatten(-1, (G, N)), Cp.unflatten(-1, (G, N))
        dt = F.softplus(_f32(dt_raw) + _f32(self.dt_bias))
        if self.dt_limit != (0.0, float("inf")):
            dt = dt.clamp(min=self.dt_limit[0], max=self.dt_limit[1])
        A = -torch.exp(_f32(self.A_log))
        D = self.D.view(self.nheads, self.headdim) if self.D_has_hdim else self.D
        return x, Bp, Cp, dt, A, D

    def _output(self, y: Tensor, z: Tensor, u: Tensor) -> Tensor:
        """y [.., d_inner] (ungated when rmsnorm) -> out_proj(norm(y, z))."""
        if self.rmsnorm:
            y = self.norm(y, z)
        return self.out_proj(y.to(u.dtype))

    def forward(self, u: Tensor, cache: Optional[Mamba2Cache] = None, cu_seqlens: Optional[Tensor] = None) -> Tensor:
        """u: [B, T, d_model] -> [B, T, d_model].

        With ``cache`` the sequence continues from the cached conv and SSM states and the cache is
        left at the end of the sequence. With ``cu_seqlens`` ([S+1], B = 1) packed sequences are
        independent; a cache then holds one row per sequence.
        """
        check_tensor("u", u, [("B", None), ("T", None), ("d_model", self.d_model)])
        nseq = u.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        if cache is not None:
            check_cache(cache, Mamba2Cache, nseq, "input (number of sequences)")
        Bsz, T, _ = u.shape
        z, xBC, dt_raw = self._in_proj(u)
        xBC, conv_final = causal_conv1d(xBC, self.conv1d.weight[:, 0], self.conv1d.bias, activation="silu",
                                        initial_state=None if cache is None else cache.conv,
                                        return_final_state=cache is not None, cu_seqlens=cu_seqlens)
        x, Bp, Cp, dt, A, D = self._ssm_inputs(xBC, dt_raw)
        gate = None if self.rmsnorm else z.unflatten(-1, (self.nheads, self.headdim))
        y, final = ssd(x, dt, A, Bp, Cp, D, gate, initial_state=None if cache is None else cache.ssm,
                       return_final_state=cache is not None, cu_seqlens=cu_seqlens, chunk_size=self.chunk_size,
                       impl=self.impl)
        if cache is not None:
            cache.conv.copy_(conv_final)
            cache.ssm.copy_(final)
        return self._output(y.flatten(-2), z, u)

    def step(self, u: Tensor, cache: Mamba2Cache) -> Tensor:
        """One decode token: u [B, d_model] or [B, 1, d_model] -> same shape; cache updated in place."""
        check_input_tensor("u", u)
        squeeze = u.dim() == 2
        u3 = u.unsqueeze(1) if squeeze else u
        check_tensor("u", u3, [("B", None), ("T", 1), ("d_model", self.d_model)])
        check_cache(cache, Mamba2Cache, u3.shape[0])
        z, xBC, dt_raw = self._split(self.in_proj(u3[:, 0]))
        xBC = causal_conv1d_step(xBC, self.conv1d.weight[:, 0], self.conv1d.bias, cache.conv, activation="silu")
        x, Bp, Cp, dt, A, D = self._ssm_inputs(xBC, dt_raw)
        gate = None if self.rmsnorm else z.unflatten(-1, (self.nheads, self.headdim))
        y = ssd_step(x, dt, A, Bp, Cp, D, gate, cache.ssm)
        out = self._output(y.flatten(-2), z, u3[:, 0])
        return out if squeeze else out.unsqueeze(1)


def _f32(t: Tensor) -> Tensor:
    """Upcast to float32, keeping float64 (the reference precision) as it is."""
    return t if t.dtype == torch.float64 else t.float()
