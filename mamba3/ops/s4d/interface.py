"""Entry points for the S4D op: validation, then dispatch to the reference loop or FFT convolution."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..utils import check_impl, check_same_device, check_tensor, check_writable
from .common import check_params, check_state, validate_s4d
from .conv import s4d_conv
from .reference import s4d_reference, s4d_step_reference

S4D_IMPLS = ("auto", "reference", "conv")


def s4d(u: Tensor, log_dt: Tensor, log_A_real: Tensor, A_imag: Tensor, C: Tensor, D: Optional[Tensor] = None,
        *, initial_state: Optional[Tensor] = None, return_final_state: bool = False,
        cu_seqlens: Optional[Tensor] = None, impl: str = "auto"):
    """S4D: one diagonal complex SSM per channel (a linear time-invariant sequence map).

    Args:
        u: [B, T, H] input, one independent SSM per channel h.
        log_dt: [H] log step size (dt = exp(log_dt)).
        log_A_real, A_imag: [H, N] with A = -exp(log_A_real) + i A_imag (N complex modes,
            each standing for a conjugate pair: a real state of size 2N).
        C: [H, N, 2] real (re, im) or [H, N] complex output weights.  D: [H] skip, or None.
        initial_state: complex [B, H, N] (or real [B, H, N, 2]) state to continue from
            ([num_seqs, ...] with cu_seqlens).
        return_final_state: also return the complex state after the last token.
        cu_seqlens: [S + 1] int offsets of packed independent sequences (then B must be 1).
        impl: "auto" (= "conv"), "reference" (token loop) or "conv" (FFT convolution).

    Returns:
        (y [B, T, H] in u's dtype, complex final state [B, H, N] (complex128 for float64
        inputs, else complex64) or None). B is fixed to 1 (see ``mamba3.ops.s4d.common``).

    Example:
        >>> from mamba3.ops.s4d import s4d_init
        >>> H, N = 4, 8
        >>> log_A_real, A_imag = s4d_init("legs", H, 2 * N)
        >>> y, h = s4d(torch.randn(2, 16, H), torch.full((H,), -3.0), log_A_real, A_imag,
        ...            torch.randn(H, N, 2), torch.ones(H), return_final_state=True)
        >>> y.shape, h.shape
        (torch.Size([2, 16, 4]), torch.Size([2, 4, 8]))
    """
    check_impl(impl, S4D_IMPLS)
    validate_s4d(u, log_dt, log_A_real, A_imag, C, D, initial_state, cu_seqlens)
    fn = s4d_reference if impl == "reference" else s4d_conv
    return fn(u, log_dt, log_A_real, A_imag, C, D, initial_state=initial_state,
              return_final_state=return_final_state, cu_seqlens=cu_seqlens)


def s4d_step(u: Tensor, log_dt: Tensor, log_A_real: Tensor, A_imag: Tensor, C: Tensor, D: Optional[Tensor],
             state: Tensor, *, impl: str = "auto") -> Tensor:
    """Decode one token (recurrent mode) and update ``state`` in place.

    u: [B, H]; state: complex [B, H, N] or real [B, H, N, 2] (float32/float64; the layer cache
    stores this real view). Returns y [B, H] in u's dtype. ``impl`` is accepted for parity; the
    recurrence is the only form.
    """
    check_impl(impl, ("auto", "reference"))
    check_tensor("u", u, [("B", None), ("H", None)])
    B, H = u.shape
    N = check_params(log_dt, log_A_real, A_imag, C, D, H)
    check_state("state", state, B, H, N, "B")
    check_same_device(u=u, log_dt=log_dt, log_A_real=log_A_real, A_imag=A_imag, C=C, D=D, state=state)
    check_writable("state", state)
    y, new = s4d_step_reference(u, log_dt, log_A_real, A_imag, C, D, state)
    if state.is_complex():
        state.copy_(new)
    else:
        state.copy_(torch.view_as_real(new))
    return y.to(u.dtype)
