"""Depthwise causal conv1d over time with an explicit carried state.

Layout: x [B, T, C] (time-major like every other op here), weight [C, W], bias [C] or None,
state [B, C, W - 1] = the last W - 1 inputs (oldest first), as in the official conv cache.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..utils import (check_cu_seqlens, check_same_device, check_tensor, check_writable, pack_to_padded,
                     padded_to_pack, seq_lengths)


def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, activation: Optional[str] = None,
                  initial_state: Optional[Tensor] = None, return_final_state: bool = False,
                  cu_seqlens: Optional[Tensor] = None):
    """y_t = act(sum_j weight[:, j] * x_{t - (W-1) + j} + bias); returns (y [B, T, C], state or None).

    With ``cu_seqlens`` ([S+1], B = 1) each packed sequence starts from its own initial state
    (zeros, or ``initial_state[i]``) and the final state has one row per sequence.
    """
    check_tensor("x", x, [("B", None), ("T", None), ("C", None)])
    B, T, C = x.shape
    check_tensor("weight", weight, [("C", C), ("W", None)])
    W = weight.shape[1]
    if bias is not None:
        check_tensor("bias", bias, [("C", C)])
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    check_cu_seqlens(cu_seqlens, T, B)
    check_same_device(x=x, weight=weight, bias=bias, initial_state=initial_state)
    if cu_seqlens is not None:
        lengths = seq_lengths(cu_seqlens)
        if initial_state is not None:
            check_tensor("initial_state", initial_state, [("num_seqs", len(lengths)), ("C", C), ("W-1", W - 1)])
        xp = pack_to_padded(x, cu_seqlens)
        y, st = causal_conv1d(xp, weight, bias, activation=activation, initial_state=initial_state,
                              return_final_state=False)
        y = padded_to_pack(y, cu_seqlens)
        if not return_final_state:
            return y, None
        init = xp.new_zeros(len(lengths), C, W - 1) if initial_state is None else initial_state.to(x.dtype)
        full = torch.cat([init, xp.transpose(1, 2)], dim=2)          # [S, C, W-1+Tmax]
        final = torch.stack([full[i, :, n : n + W - 1] for i, n in enumerate(lengths)])
        return y, final
    nseq = B
    if initial_state is not None:
        check_tensor("initial_state", initial_state, [("B", nseq), ("C", C), ("W-1", W - 1)])
        prefix = initial_state.to(x.dtype)
    else:
        prefix = x.new_zeros(B, C, W - 1)
    if T == 0:  # empty sequence: conv1d rejects inputs shorter than the kernel
        return x.new_zeros(B, 0, C), prefix.clone() if return_final_state else None
    full = torch.cat([prefix, x.transpose(1, 2)], dim=2)             # [B, C, W-1+T]
    y = F.conv1d(full, weight.unsqueeze(1).to(x.dtype), None if bias is None else bias.to(x.dtype), groups=C)
    if activation == "silu":
        y = F.silu(y)
    final = full[:, :, full.shape[2] - (W - 1):].clone() if return_final_state else None
    return y.transpose(1, 2).contiguous(), final   # time-major and contiguous for what follows


def causal_conv1d_step(x: Tensor, weight: Tensor, bias: Optional[Tensor], state: Tensor, *,
                       activation: Optional[str] = None) -> Tensor:
    """One token: x [B, C]; ``state`` [B, C, W-1] is shifted in place. Returns y [B, C]."""
    check_tensor("x", x, [("B", None), ("C", None)])
    B, C = x.shape
    check_tensor("weight", weight, [("C", C), ("W", None)])
    W = weight.shape[1]
    if bias is not None:
        check_tensor("bias", bias, [("C", C)])
    check_tensor("state", state, [("B", B), ("C", C), ("W-1", W - 1)])
    check_same_device(x=x, weight=weight, bias=bias, state=state)
    check_writable("state", state)
    window = torch.cat([state.to(x.dtype), x.unsqueeze(-1)], dim=-1)  # [B, C, W]
    y = (window * weight.to(x.dtype)).sum(-1)
    if bias is not None:
        y = y + bias.to(x.dtype)
    if W > 1:
        state.copy_(window[:, :, 1:])
    return F.silu(y) if activation == "silu" else y
