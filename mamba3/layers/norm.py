"""RMS norms: plain, and gated/grouped (Mamba-2's RMSNormGated, Mamba-3's pre-gate grouped norm)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def rms_norm(x: Tensor, weight: Optional[Tensor], eps: float) -> Tensor:
    """RMSNorm over the last dim, computed in fp32 and cast back to x's dtype (:func:`rms_norm_cast`:
    one fused ``F.rms_norm`` kernel on CUDA, then the weight and the cast in one kernel)."""
    return rms_norm_cast(x, weight, eps, x.dtype)


# Fused forms (decode pays per launch, prefill per pass over [B, T, D]): the same values in fewer kernels.
def rms_normalize(x: Tensor, eps: float) -> Tensor:
    """x / rms(x) over the last dim, no weight, in >= fp32 (fp16/bf16 upcast): ``F.rms_norm``,
    one fused kernel on CUDA; on CPU the same op sequence as :func:`rms_norm`."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return F.rms_norm(xf, (xf.shape[-1],), None, eps)


def scale_cast(x: Tensor, weight: Tensor, dtype: torch.dtype) -> Tensor:
    """``(x * weight.to(x.dtype)).to(dtype)``; one kernel in eager (the product is written
    straight into a ``dtype`` tensor), the plain form under torch.compile (Inductor fuses it)."""
    if (x.dtype == dtype or torch.compiler.is_compiling() or torch.promote_types(x.dtype, weight.dtype) != x.dtype
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):  # out= has no autograd
        return (x * weight.to(x.dtype)).to(dtype)
    return torch.mul(x, weight, out=torch.empty(x.shape, dtype=dtype, device=x.device))


def rms_norm_cast(x: Tensor, weight: Optional[Tensor], eps: float, dtype: torch.dtype) -> Tensor:
    """``rms_norm(x, weight, eps)`` computed in >= fp32 and rounded once to ``dtype`` (equal to
    ``rms_norm(x, weight, eps).to(dtype)`` when x is fp32/fp64 or ``dtype`` is x's dtype)."""
    n = rms_normalize(x, eps)
    return n.to(dtype) if weight is None else scale_cast(n, weight, dtype)


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight over the last dim (``weight`` of size d)."""

    def __init__(self, d: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class RMSNormGated(nn.Module):
    """Grouped RMSNorm with a SiLU gate.

    norm_before_gate=True:  y = RMSNorm_g(x) * w * silu(z)      (Mamba-3 pre-gate grouped norm)
    norm_before_gate=False: y = RMSNorm_g(x * silu(z)) * w      (Mamba-2's RMSNormGated; fused,
                            see :func:`gated_rms_norm`)
    The RMS statistic is taken over contiguous groups of ``group_size`` channels.
    """

    def __init__(self, d: int, eps: float = 1e-5, group_size: Optional[int] = None,
                 norm_before_gate: bool = True, device=None, dtype=None):
        super().__init__()
        group_size = d if group_size is None else group_size
        if d % group_size != 0:
            raise ValueError(f"group_size={group_size} must divide d={d}")
        self.eps, self.group_size, self.norm_before_gate = eps, group_size, norm_before_gate
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))

    def forward(self, x: Tensor, z: Optional[Tensor] = None) -> Tensor:
        dtype = x.dtype
        x = x.float() if dtype in (torch.float16, torch.bfloat16) else x
        if z is not None and not self.norm_before_gate:
            return gated_rms_norm(x, z.to(x.dtype), self.weight.to(x.dtype), self.eps, self.group_size).to(dtype)
        g = x.unflatten(-1, (-1, self.group_size))
        x = rms_normalize(g, self.eps).flatten(-2) * self.weight.to(x.dtype)
        if z is not None and self.norm_before_gate:
            x = x * F.silu(z.to(x.dtype))
        return x.to(dtype)


def gated_rms_norm(x: Tensor, z: Tensor, weight: Tensor, eps: float, group_size: int) -> Tensor:
    """RMSNorm over groups of ``group_size`` channels of x * silu(z), times ``weight`` (Mamba-2's
    RMSNormGated, gate first). x, z: [..., d] in one dtype; weight [d]. Hand-written backward
    (recomputes the gate; saves x, z and the per-group 1/rms): a few passes instead of autograd's
    chain of saved temporaries."""
    return _GatedRMSNorm.apply(x, z, weight, eps, group_size)


class _GatedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, z, w, eps, gs):
        g = F.silu(z).mul_(x)                                             # x * silu(z)
        gv = g.unflatten(-1, (-1, gs))
        r = torch.linalg.vector_norm(gv, dim=-1, keepdim=True).square_().div_(gs).add_(eps).rsqrt_()
        gv.mul_(r)
        ctx.save_for_backward(x, z, w, r)
        ctx.gs = gs
        return g.mul_(w)

    @staticmethod
    def backward(ctx, dout):
        x, z, w, r = ctx.saved_tensors
        gs = ctx.gs
        sz = F.silu(z)
        n = sz * x
        nv = n.unflatten(-1, (-1, gs)).mul_(r)                               # normalised gated input
        buf = torch.mul(dout, n)
        dw = buf.sum(tuple(range(dout.dim() - 1))) if ctx.needs_input_grad[2] else None
        dn = dout * w                                                         # d(normalised)
        dnv = dn.unflatten(-1, (-1, gs))
        c = torch.mul(dnv, nv, out=buf.view_as(dnv)).mean(-1, keepdim=True)
        dnv.addcmul_(nv, c, value=-1.0).mul_(r)                              # d(x * silu(z))
        dz = torch.ops.aten.silu_backward(torch.mul(dn, x, out=n), z) if ctx.needs_input_grad[1] else None
        dx = sz.mul_(dn) if ctx.needs_input_grad[0] else None
        return dx, dz, dw, None, None
