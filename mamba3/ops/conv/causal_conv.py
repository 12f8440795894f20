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
    if initial_state is not None:
        check_tensor("initial_state", initial_state, [("B", B), ("C", C), ("W-1", W - 1)])
    if T == 0:  # empty sequence: nothing consumed, the state passes through
        prefix = x.new_zeros(B, C, W - 1) if initial_state is None else initial_state.to(x.dtype).clone()
        return x.new_zeros(B, 0, C), prefix if return_final_state else None
    wd = weight.to(x.dtype)
    bd = None if bias is None else bias.to(x.dtype)
    prefix = None if initial_state is None else initial_state.to(x.dtype)
    # Column slices of a wider tensor: one copy is cheaper than W strided multiply-adds.
    y = _CausalConv.apply(x if x.is_contiguous() else x.contiguous(), wd, bd, prefix, activation == "silu")
    final = None
    if return_final_state:  # the last W - 1 inputs, oldest first
        if T >= W - 1:
            final = x[:, T - (W - 1):].transpose(1, 2).contiguous()
        else:
            full = torch.cat([x.new_zeros(B, C, W - 1) if prefix is None else prefix, x.transpose(1, 2)], dim=2)
            final = full[:, :, T:].contiguous()
    return y, final


def _shifted_taps(x: Tensor, prefix: Optional[Tensor], W: int):
    """For each tap j = 1..W-1 (input j steps back): (x slice ending j before the end, and the
    prefix rows [W-1-j, W-1) that the first min(j, T) outputs read). prefix: [B, W-1, C] or None."""
    T = x.shape[1]
    for j in range(1, W):
        head = None
        if prefix is not None:
            head = prefix[:, W - 1 - j : W - 1 - j + min(j, T)]
        yield j, x[:, : max(T - j, 0)], head


class _CausalConv(torch.autograd.Function):
    """Depthwise causal conv (+ SiLU) on time-major [B, T, C] tensors by W shifted multiply-adds:
    no layout copies (the conv kernels want channel-major input), one output buffer."""

    @staticmethod
    def forward(ctx, x, w, b, prefix, silu):
        W = w.shape[1]
        wt = w.t().contiguous()                                             # [W, C]: contiguous taps
        pre = None if prefix is None else prefix.transpose(1, 2)            # [B, W-1, C]
        a = torch.mul(x, wt[W - 1]) if b is None else torch.addcmul(b, x, wt[W - 1])
        for j, xs, head in _shifted_taps(x, pre, W):
            if xs.shape[1]:
                a[:, j:].addcmul_(xs, wt[W - 1 - j])
            if head is not None:
                a[:, : head.shape[1]].addcmul_(head, wt[W - 1 - j])
        train = any(ctx.needs_input_grad)
        if train:
            ctx.save_for_backward(x, wt, pre, a)
            ctx.has = (b is not None, silu)
        if not silu:
            return a
        return F.silu(a) if train else F.silu(a, inplace=True)

    @staticmethod
    def backward(ctx, dy):
        x, wt, pre, a = ctx.saved_tensors
        has_b, silu = ctx.has
        W = wt.shape[0]
        da = torch.ops.aten.silu_backward(dy, a) if silu else dy
        dx = dw = db = dpre = None
        if ctx.needs_input_grad[0]:
            dx = da * wt[W - 1]
            for j in range(1, min(W, x.shape[1] + 1)):
                dx[:, :-j].addcmul_(da[:, j:], wt[W - 1 - j])
        if ctx.needs_input_grad[1]:
            dwt = torch.empty_like(wt)
            buf = torch.mul(x, da)
            dwt[W - 1] = buf.sum((0, 1))
            for j, xs, head in _shifted_taps(x, pre, W):
                n = xs.shape[1]
                acc = torch.mul(xs, da[:, j:], out=buf[:, :n]).sum((0, 1)) if n else torch.zeros_like(wt[0])
                if head is not None:
                    acc = acc + (head * da[:, : head.shape[1]]).sum((0, 1))
                dwt[W - 1 - j] = acc
            dw = dwt.t()
        if has_b and ctx.needs_input_grad[2]:
            db = da.sum((0, 1))
        if pre is not None and ctx.needs_input_grad[3]:
            dpre = torch.zeros_like(pre)                                      # [B, W-1, C]
            for j in range(1, W):
                n = min(j, x.shape[1])
                dpre[:, W - 1 - j : W - 1 - j + n].addcmul_(da[:, :n], wt[W - 1 - j])
            dpre = dpre.transpose(1, 2)
        return dx, dw, db, dpre, None


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
