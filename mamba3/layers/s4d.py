"""The S4D mixer layer (Gu, Gupta, Goel, Re 2022): one diagonal complex SSM per channel,
D skip, GELU, then a GLU output projection, with the shared mixer protocol.

Per token: y = GLU(W (dropout(gelu(SSM(x) + D x)))), W: Linear(d, 2d). The SSM is linear time
invariant, so forward uses the FFT convolution mode and step the recurrence; both continue from
a cache. B is fixed to 1 (see ``mamba3.ops.s4d.common``). The SSM parameters (log_dt,
log_A_real, A_imag, C, D) are kept in float32 (float64 for a float64 layer) and carry
``_no_weight_decay = True``; S4 practice also trains them with a smaller learning rate
(``ssm_parameters()`` lists them for a separate optimizer group).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..ops.s4d import S4D_INITS, s4d, s4d_init, s4d_init_log_dt, s4d_step
from ..ops.utils import check_tensor
from .cache import LayerCache, check_cache, check_input_tensor, checked_allocate


@dataclasses.dataclass
class S4DCache(LayerCache):
    """state [B, H, N/2, 2]: the complex state (real, imag) per channel and mode, float32
    (float64 for a float64 layer)."""

    state: Tensor


class S4D(nn.Module):
    """S4D mixer.

    Args:
        d_model: channels H (one independent SSM each; no input projection, as in S4D).
        d_state: real state size N per channel, realised as N/2 complex modes (paper convention).
        init: "legs" | "lin" | "inv" | "real" | "random" (see ``mamba3.ops.s4d.init``).
        dt_min, dt_max: log-uniform range of the initial step size.
        dropout: after the GELU.   impl: op form, "auto" | "conv" | "reference".
    """

    def __init__(self, d_model: int, d_state: int = 64, init: str = "legs", dt_min: float = 1e-3,
                 dt_max: float = 1e-1, dropout: float = 0.0, layer_idx: Optional[int] = None, device=None,
                 dtype=None, *, impl: str = "auto"):
        super().__init__()
        if not isinstance(d_model, int) or isinstance(d_model, bool) or d_model < 1:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        if not isinstance(d_state, int) or isinstance(d_state, bool) or d_state < 2 or d_state % 2:
            raise ValueError(f"d_state must be an even int >= 2 (d_state/2 complex modes), got {d_state!r}")
        if init not in S4D_INITS:
            raise ValueError(f"init must be one of {list(S4D_INITS)}, got {init!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.d_model, self.d_state, self.init, self.layer_idx, self.impl = d_model, d_state, init, layer_idx, impl
        H, M = d_model, d_state // 2
        pd = torch.float64 if dtype == torch.float64 else torch.float32
        log_A_real, A_imag = s4d_init(init, H, d_state, device=device, dtype=pd)
        self.log_dt = nn.Parameter(s4d_init_log_dt(H, dt_min, dt_max, device=device, dtype=pd))
        self.log_A_real = nn.Parameter(log_A_real)
        self.A_imag = nn.Parameter(A_imag)
        # C ~ complex standard normal (E|C|^2 = 1), stored as (re, im) pairs.
        self.C = nn.Parameter(torch.randn(H, M, 2, device=device, dtype=pd) * 0.5 ** 0.5)
        self.D = nn.Parameter(torch.randn(H, device=device, dtype=pd))
        for p in self.ssm_parameters():
            p._no_weight_decay = True
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(d_model, 2 * d_model, device=device, dtype=dtype)

    def ssm_parameters(self) -> list[nn.Parameter]:
        return [self.log_dt, self.log_A_real, self.A_imag, self.C, self.D]

    def _params(self):
        return self.log_dt, self.log_A_real, self.A_imag, self.C, self.D

    # ----------------------------------------------------------------------------------------
    @checked_allocate
    def allocate_inference_cache(self, batch_size: int, max_seqlen: Optional[int] = None, *, device=None,
                                 dtype=None) -> S4DCache:
        """Zero state; ``max_seqlen`` is ignored (constant memory). The state dtype is float32
        (float64 when ``dtype`` or the layer is float64)."""
        device = self.log_dt.device if device is None else device
        wide = torch.float64 if torch.float64 in (dtype, self.log_dt.dtype) else torch.float32
        return S4DCache(state=torch.zeros(batch_size, self.d_model, self.d_state // 2, 2, device=device, dtype=wide))

    def _output(self, y: Tensor, x: Tensor) -> Tensor:
        y = self.dropout(F.gelu(y.to(x.dtype)))
        return F.glu(self.out_proj(y), dim=-1)

    def forward(self, x: Tensor, cache: Optional[S4DCache] = None, cu_seqlens: Optional[Tensor] = None) -> Tensor:
        """x: [B, T, d_model] -> [B, T, d_model]; with ``cache`` continue from it and leave it at
        the end; with ``cu_seqlens`` ([S+1], B = 1) packed sequences are independent."""
        check_tensor("x", x, [("B", None), ("T", None), ("d_model", self.d_model)])
        nseq = x.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        if cache is not None:
            check_cache(cache, S4DCache, nseq, "input (number of sequences)")
        y, final = s4d(x, *self._params(), initial_state=None if cache is None else cache.state,
                       return_final_state=cache is not None, cu_seqlens=cu_seqlens, impl=self.impl)
        if cache is not None:
            cache.state.copy_(torch.view_as_real(final))
        return self._output(y, x)

    def step(self, x: Tensor, cache: S4DCache) -> Tensor:
        """One decode token: x [B, d_model] or [B, 1, d_model] -> same shape; cache updated in place."""
        check_input_tensor("x", x)
        squeeze = x.dim() == 2
        x3 = x.unsqueeze(1) if squeeze else x
        check_tensor("x", x3, [("B", None), ("T", 1), ("d_model", self.d_model)])
        check_cache(cache, S4DCache, x3.shape[0])
        y = s4d_step(x3[:, 0], *self._params(), cache.state)
        out = self._output(y, x3[:, 0])
        return out if squeeze else out.unsqueeze(1)
