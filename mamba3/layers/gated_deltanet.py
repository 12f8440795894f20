"""Gated DeltaNet mixer (Yang et al. 2025; SPEC section 11), parameter-compatible with
flash-linear-attention's ``fla.layers.GatedDeltaNet`` (same constructor names and state-dict keys).

Per token: q, k, v = short causal conv + SiLU of their projections; q, k L2-normalised per head;
g = -exp(A_log) * softplus(a_proj(x) + dt_bias) (log decay), beta = sigmoid(b_proj(x)) (times 2
with ``allow_neg_eigval``); the gated delta rule mixes over time; the output is
o_norm(o) * silu(g_proj(x)) per value head (RMSNorm over head_v_dim), then o_proj.
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
from ..ops.gated_delta import gated_delta_rule, gated_delta_rule_step
from ..ops.utils import check_tensor
from .cache import LayerCache, check_cache, check_input_tensor, checked_allocate
from .norm import RMSNorm, RMSNormGated

MODES = ("chunk", "fused_recurrent")


@dataclasses.dataclass
class GatedDeltaNetCache(LayerCache):
    """ssm [B, HV, V, K] (fp32, fp64 for a fp64 model); conv_q, conv_k [B, key_dim, W-1] and
    conv_v [B, value_dim, W-1] (None without short convs)."""

    ssm: Tensor
    conv_q: Optional[Tensor] = None
    conv_k: Optional[Tensor] = None
    conv_v: Optional[Tensor] = None


def l2_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / sqrt(sum x^2 + eps) over the last dim, in fp32 (fp64 kept)."""
    xf = x if x.dtype == torch.float64 else x.float()
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet layer; protocol of :mod:`mamba3.layers` (forward / step / allocate_inference_cache).

    ``hidden_size`` (first positional) is the model width. Heads: ``num_heads`` query/key heads of
    ``head_dim``, ``num_v_heads`` (default num_heads) value heads of ``head_dim * expand_v``.
    ``mode`` is kept for compatibility: "chunk" runs the chunked op, "fused_recurrent" the token
    loop. ``chunk_size`` and ``impl`` (op impl, overrides ``mode``) are extensions.
    """

    def __init__(self, hidden_size: int = 2048, expand_v: float = 2, head_dim: int = 256, num_heads: int = 6,
                 num_v_heads: Optional[int] = None, mode: str = "chunk", use_gate: bool = True,
                 use_short_conv: bool = True, allow_neg_eigval: bool = False, conv_size: int = 4,
                 conv_bias: bool = False, layer_idx: Optional[int] = None, norm_eps: float = 1e-5,
                 device=None, dtype=None, *, chunk_size: int = 64, impl: Optional[str] = None):
        super().__init__()
        fk = dict(device=device, dtype=dtype)
        for name, val in (("hidden_size", hidden_size), ("head_dim", head_dim), ("num_heads", num_heads),
                          ("conv_size", conv_size), ("chunk_size", chunk_size)):
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        num_v_heads = num_heads if num_v_heads is None else num_v_heads
        if not isinstance(num_v_heads, int) or num_v_heads < num_heads or num_v_heads % num_heads != 0:
            raise ValueError(f"num_v_heads={num_v_heads} must be a multiple of num_heads={num_heads}")
        head_v_dim = head_dim * expand_v
        if expand_v <= 0 or not math.isclose(head_v_dim, round(head_v_dim), rel_tol=1e-5):
            raise ValueError(f"expand_v={expand_v} times head_dim={head_dim} must be a positive integer, got {head_v_dim}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.hidden_size, self.expand_v, self.head_dim = hidden_size, expand_v, head_dim
        self.num_heads, self.num_v_heads, self.mode = num_heads, num_v_heads, mode
        self.use_gate, self.use_short_conv, self.allow_neg_eigval = use_gate, use_short_conv, allow_neg_eigval
        self.conv_size, self.conv_bias, self.layer_idx, self.norm_eps = conv_size, conv_bias, layer_idx, norm_eps
        self.head_k_dim, self.head_v_dim = head_dim, int(round(head_v_dim))
        self.key_dim, self.value_dim = num_heads * head_dim, num_v_heads * self.head_v_dim
        self.chunk_size = chunk_size
        self.impl = impl if impl is not None else ("chunked" if mode == "chunk" else "reference")
        self.d_model = hidden_size

        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False, **fk)
        self.k_proj = nn.Linear(hidden_size, self.key_dim, bias=False, **fk)
        self.v_proj = nn.Linear(hidden_size, self.value_dim, bias=False, **fk)
        self.a_proj = nn.Linear(hidden_size, num_v_heads, bias=False, **fk)
        self.b_proj = nn.Linear(hidden_size, num_v_heads, bias=False, **fk)
        # A ~ U(0, 16) per value head (stored as log); dt_bias = softplus^{-1}(dt), dt log-uniform
        # in [1e-3, 0.1] floored at 1e-4 (Mamba-2's init, as in fla).
        A = torch.empty(num_v_heads, dtype=torch.float32, device=device).uniform_(0, 16)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        dt = torch.exp(torch.rand(num_v_heads, device=device) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        dt = dt.clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.dt_bias._no_weight_decay = True
        if use_short_conv:
            conv = lambda c: nn.Conv1d(c, c, conv_size, groups=c, bias=conv_bias, **fk)
            self.q_conv1d, self.k_conv1d, self.v_conv1d = conv(self.key_dim), conv(self.key_dim), conv(self.value_dim)
        if use_gate:
            self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False, **fk)
            self.o_norm = RMSNormGated(self.head_v_dim, eps=norm_eps, group_size=self.head_v_dim,
                                       norm_before_gate=True, **fk)
        else:
            self.o_norm = RMSNorm(self.head_v_dim, eps=norm_eps, **fk)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False, **fk)

    # ----------------------------------------------------------------------------------------
    @checked_allocate
    def allocate_inference_cache(self, batch_size: int, max_seqlen: Optional[int] = None, *, device=None,
                                 dtype=None, state_dtype: Optional[torch.dtype] = None) -> GatedDeltaNetCache:
        """Fixed-size decode state (``max_seqlen`` is ignored: memory is constant in length)."""
        device = self.q_proj.weight.device if device is None else device
        dtype = self.q_proj.weight.dtype if dtype is None else dtype
        if state_dtype is None:
            state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        B, W = batch_size, self.conv_size - 1
        conv = lambda c: torch.zeros(B, c, W, device=device, dtype=dtype) if self.use_short_conv else None
        return GatedDeltaNetCache(
            ssm=torch.zeros(B, self.num_v_heads, self.head_v_dim, self.head_k_dim, device=device, dtype=state_dtype),
            conv_q=conv(self.key_dim), conv_k=conv(self.key_dim), conv_v=conv(self.value_dim))

    # ----------------------------------------------------------------------------------------
    def _short_conv(self, x: Tensor, name: str, cache, cu_seqlens, step: bool) -> Tensor:
        if not self.use_short_conv:
            return F.silu(x)
        mod = getattr(self, f"{name}_conv1d")
        w, b = mod.weight[:, 0], mod.bias
        if step:
            return causal_conv1d_step(x[:, 0], w, b, getattr(cache, f"conv_{name}"), activation="silu").unsqueeze(1)
        state = None if cache is None else getattr(cache, f"conv_{name}")
        y, final = causal_conv1d(x, w, b, activation="silu", initial_state=state,
                                 return_final_state=cache is not None, cu_seqlens=cu_seqlens)
        if cache is not None:
            state.copy_(final)
        return y

    def _project(self, x: Tensor, cache, cu_seqlens, step: bool):
        Bsz, T, _ = x.shape
        q = self._short_conv(self.q_proj(x), "q", cache, cu_seqlens, step)
        k = self._short_conv(self.k_proj(x), "k", cache, cu_seqlens, step)
        v = self._short_conv(self.v_proj(x), "v", cache, cu_seqlens, step)
        q = l2_normalize(q.unflatten(-1, (self.num_heads, self.head_k_dim)))
        k = l2_normalize(k.unflatten(-1, (self.num_heads, self.head_k_dim)))
        v = v.unflatten(-1, (self.num_v_heads, self.head_v_dim))
        a = self.a_proj(x)
        wide = torch.float64 if a.dtype == torch.float64 else torch.float32
        g = -torch.exp(self.A_log.to(wide)) * F.softplus(a.to(wide) + self.dt_bias.to(wide))   # [B, T, HV]
        beta = torch.sigmoid(self.b_proj(x).to(wide))
        if self.allow_neg_eigval:
            beta = 2.0 * beta
        return q, k, v, g, beta

    def _output(self, o: Tensor, x: Tensor) -> Tensor:
        """o [B, T, HV, V] -> [B, T, hidden_size]."""
        if self.use_gate:
            gate = self.g_proj(x).unflatten(-1, (self.num_v_heads, self.head_v_dim))
            o = self.o_norm(o, gate)
        else:
            o = self.o_norm(o)
        return self.o_proj(o.flatten(-2).to(x.dtype))

    # ----------------------------------------------------------------------------------------
    def forward(self, x: Tensor, cache: Optional[GatedDeltaNetCache] = None,
                cu_seqlens: Optional[Tensor] = None) -> Tensor:
        """x: [B, T, hidden_size] -> [B, T, hidden_size]; with ``cache`` the sequence continues from
        it and the cache is left at its end. With ``cu_seqlens`` ([S+1], B = 1) packed sequences are
        independent and a cache holds one row per sequence."""
        check_tensor("x", x, [("B", None), ("T", None), ("hidden_size", self.hidden_size)])
        if cache is not None:
            nseq = x.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
            check_cache(cache, GatedDeltaNetCache, nseq, "input (number of sequences)")
        q, k, v, g, beta = self._project(x, cache, cu_seqlens, step=False)
        o, final = gated_delta_rule(q, k, v, g, beta, initial_state=None if cache is None else cache.ssm,
                                    return_final_state=cache is not None, cu_seqlens=cu_seqlens,
                                    chunk_size=self.chunk_size, impl=self.impl)
        if cache is not None:
            cache.ssm.copy_(final)
        return self._output(o, x)

    def step(self, x: Tensor, cache: GatedDeltaNetCache) -> Tensor:
        """One decode token: x [B, hidden_size] or [B, 1, hidden_size] -> same shape; cache updated in place."""
        check_input_tensor("x", x)
        squeeze = x.dim() == 2
        x3 = x.unsqueeze(1) if squeeze else x
        check_tensor("x", x3, [("B", None), ("T", 1), ("hidden_size", self.hidden_size)])
        check_cache(cache, GatedDeltaNetCache, x3.shape[0])
        q, k, v, g, beta = self._project(x3, cache, None, step=True)
        o = gated_delta_rule_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], cache.ssm)
        out = self._output(o.unsqueeze(1), x3)
        return out[:, 0] if squeeze else out
