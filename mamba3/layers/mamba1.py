"""The Mamba-1 mixer layer (selective scan, S6; SPEC section 11), parameter-compatible with the
official ``mamba_ssm.modules.mamba_simple.Mamba``.

Forward per token: in_proj -> [x | z]; x -> depthwise causal conv (width d_conv) -> SiLU;
x_proj(x) -> [dt (dt_rank) | B (N) | C (N)]; delta = softplus(dt_proj(dt)) per channel;
A = -exp(A_log) [d_inner, N]; selective scan (mamba3.ops.mamba1) with D skip and silu(z) gate;
out_proj.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..ops.conv import causal_conv1d, causal_conv1d_step
from ..ops.mamba1 import selective_scan, selective_scan_step
from ..ops.utils import check_tensor
from .cache import LayerCache, check_cache, check_input_tensor, checked_allocate


@dataclasses.dataclass
class Mamba1Cache(LayerCache):
    """conv [B, d_inner, d_conv - 1] (last conv inputs, oldest first); ssm [B, d_inner, N] (float32)."""

    conv: Tensor
    ssm: Tensor


class Mamba1(nn.Module):
    """Mamba-1 mixer with the official names, defaults, initialisation and state-dict keys
    (in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj).
    Extension (keyword-only): ``chunk_size`` and ``impl`` of the selective-scan op.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: Union[int, str] = "auto", dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init: str = "random", dt_scale: float = 1.0, dt_init_floor: float = 1e-4,
                 conv_bias: bool = True, bias: bool = False, use_fast_path: bool = True,
                 layer_idx: Optional[int] = None, device=None, dtype=None, *, chunk_size: int = 32,
                 impl: str = "auto"):
        super().__init__()
        fk = dict(device=device, dtype=dtype)
        for name, val in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv), ("expand", expand),
                          ("chunk_size", chunk_size)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        if not isinstance(self.dt_rank, int) or self.dt_rank < 1:
            raise ValueError(f"dt_rank must be 'auto' or a positive int, got {dt_rank!r}")
        self.layer_idx, self.chunk_size, self.impl = layer_idx, chunk_size, impl
        Di, N, R = self.d_inner, d_state, self.dt_rank

        self.in_proj = nn.Linear(d_model, 2 * Di, bias=bias, **fk)                  # [x | z]
        self.conv1d = nn.Conv1d(Di, Di, d_conv, groups=Di, padding=d_conv - 1, bias=conv_bias, **fk)
        self.x_proj = nn.Linear(Di, R + 2 * N, bias=False, **fk)                     # [dt | B | C]
        self.dt_proj = nn.Linear(R, Di, bias=True, **fk)

        # dt_proj keeps the variance of dt; its bias makes softplus(bias) log-uniform in [dt_min, dt_max].
        std = R ** -0.5 * dt_scale
        with torch.no_grad():
            if dt_init == "constant":
                self.dt_proj.weight.fill_(std)
            else:
                self.dt_proj.weight.uniform_(-std, std)
            dt0 = torch.exp(torch.rand(Di, **fk) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt0 = dt0.clamp(min=dt_init_floor)
            self.dt_proj.bias.copy_(dt0 + torch.log(-torch.expm1(-dt0)))
        self.dt_proj.bias._no_reinit = True

        # S4D-real: A[d, n] = -(n + 1), stored as A_log in float32.
        A = torch.arange(1, N + 1, dtype=torch.float32, device=device).repeat(Di, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(Di, device=device))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(Di, d_model, bias=bias, **fk)

    # ----------------------------------------------------------------------------------------
    @checked_allocate
    def allocate_inference_cache(self, batch_size: int, max_seqlen: Optional[int] = None, *, device=None,
                                 dtype=None, state_dtype: Optional[torch.dtype] = None) -> Mamba1Cache:
        """Fixed-size decode state (``max_seqlen`` ignored). The conv state has the model dtype,
        the SSM state float32 (float64 for a float64 model) unless ``state_dtype`` is given."""
        device = self.in_proj.weight.device if device is None else device
        dtype = self.in_proj.weight.dtype if dtype is None else dtype
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        return Mamba1Cache(
            conv=torch.zeros(batch_size, self.d_inner, self.d_conv - 1, device=device, dtype=dtype),
            ssm=torch.zeros(batch_size, self.d_inner, self.d_state, device=device,
                            dtype=wide if state_dtype is None else state_dtype),
        )

    # ----------------------------------------------------------------------------------------
    def _scan_inputs(self, x: Tensor):
        """x [..., d_inner] after the conv -> delta [..., d_inner], B, C [..., N], A [d_inner, N]."""
        dt, Bp, Cp = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(_f32(F.linear(dt, self.dt_proj.weight)) + _f32(self.dt_proj.bias))
        A = -torch.exp(_f32(self.A_log))
        return delta, Bp, Cp, A

    def forward(self, u: Tensor, cache: Optional[Mamba1Cache] = None, cu_seqlens: Optional[Tensor] = None) -> Tensor:
        """u: [B, T, d_model] -> [B, T, d_model].

        With ``cache`` the sequence continues from the cached conv and SSM states and the cache is
        left at the end of the sequence. With ``cu_seqlens`` ([S+1], B = 1) packed sequences are
        independent; a cache then holds one row per sequence.
        """
        check_tensor("u", u, [("B", None), ("T", None), ("d_model", self.d_model)])
        nseq = u.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        if cache is not None:
            check_cache(cache, Mamba1Cache, nseq, "input (number of sequences)")
        x, z = self.in_proj(u).chunk(2, dim=-1)
        x, conv_final = causal_conv1d(x, self.conv1d.weight[:, 0], self.conv1d.bias, activation="silu",
                                      initial_state=None if cache is None else cache.conv,
                                      return_final_state=cache is not None, cu_seqlens=cu_seqlens)
        x = x.contiguous()  # the conv returns a channel-major view
        delta, Bp, Cp, A = self._scan_inputs(x)
        y, final = selective_scan(x, delta, A, Bp, Cp, self.D, z, initial_state=None if cache is None else cache.ssm,
                                  return_final_state=cache is not None, cu_seqlens=cu_seqlens,
                                  chunk_size=self.chunk_size, impl=self.impl)
        if cache is not None:
            cache.conv.copy_(conv_final)
            cache.ssm.copy_(final)
        return self.out_proj(y.to(u.dtype))

    def step(self, u: Tensor, cache: Mamba1Cache) -> Tensor:
        """One decode token: u [B, d_model] or [B, 1, d_model] -> same shape; cache updated in place."""
        check_input_tensor("u", u)
        squeeze = u.dim() == 2
        u3 = u.unsqueeze(1) if squeeze else u
        check_tensor("u", u3, [("B", None), ("T", 1), ("d_model", self.d_model)])
        check_cache(cache, Mamba1Cache, u3.shape[0])
        x, z = self.in_proj(u3[:, 0]).chunk(2, dim=-1)
        x = causal_conv1d_step(x, self.conv1d.weight[:, 0], self.conv1d.bias, cache.conv, activation="silu")
        delta, Bp, Cp, A = self._scan_inputs(x)
        y = selective_scan_step(x, delta, A, Bp, Cp, self.D, z, cache.ssm)
        out = self.out_proj(y.to(u.dtype))
        return out if squeeze else out.unsqueeze(1)


def _f32(t: Tensor) -> Tensor:
    """Upcast to float32, keeping float64 (the reference precision) as it is."""
    return t if t.dtype == torch.float64 else t.float()
