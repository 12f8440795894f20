"""Entry points for Mamba-2's SSD op: validation, then dispatch to reference / chunked."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..utils import check_cu_seqlens, check_impl, check_same_device, check_tensor, check_writable
from .chunked import ssd_chunked
from .reference import ssd_reference, ssd_step_reference

SSD_IMPLS = ("auto", "reference", "chunked")


def ssd(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
        z: Optional[Tensor] = None, *, initial_state: Optional[Tensor] = None, return_final_state: bool = False,
        cu_seqlens: Optional[Tensor] = None, chunk_size: int = 64, impl: str = "auto"):
    """Mamba-2 state space duality (SSD) mixer: a scalar-decay selective SSM per head.

        S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T,     y_t = S_t C_t + D x_t   (then * silu(z_t))

    Args:
        x: [B, T, H, P] inputs (Mamba-2's x after the conv).
        dt: [B, T, H] step sizes, already softplus'd (> 0; 0 means "skip this token").
        A: [H] negative decay rates (A = -exp(A_log)).
        B, C: [B, T, G, N] input / output projections; head h reads group h // (H // G).
        D: [H] or [H, P] skip, or None.
        z: [B, T, H, P] optional gate; Mamba-2 itself gates inside its norm, so usually None.
        initial_state: [B, H, P, N] (or [num_seqs, H, P, N] with cu_seqlens) state to continue from.
        return_final_state: also return the state after the last token (per sequence).
        cu_seqlens: [S + 1] int offsets of packed sequences (then B must be 1).
        chunk_size: chunk length of the chunked form (the official kernels use 256).
        impl: "auto" (chunked), "reference" (token loop) or "chunked".

    Returns:
        (y [B, T, H, P] in x's dtype, final state [., H, P, N] float32 (float64 for float64 input) or None)

    Example:
        >>> Bs, T, H, P, G, N = 2, 10, 4, 8, 1, 16
        >>> x = torch.randn(Bs, T, H, P); dt = torch.rand(Bs, T, H) * 0.1; A = -torch.rand(H)
        >>> y, s = ssd(x, dt, A, torch.randn(Bs, T, G, N), torch.randn(Bs, T, G, N), return_final_state=True)
        >>> y.shape, s.shape
        (torch.Size([2, 10, 4, 8]), torch.Size([2, 4, 8, 16]))
    """
    check_impl(impl, SSD_IMPLS)
    validate_ssd(x, dt, A, B, C, D, z, initial_state, cu_seqlens, chunk_size)
    fn = ssd_reference if impl == "reference" else ssd_chunked
    return fn(x, dt, A, B, C, D, z, initial_state=initial_state, return_final_state=return_final_state,
              cu_seqlens=cu_seqlens, chunk_size=chunk_size)


def ssd_step(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
             z: Optional[Tensor], state: Tensor) -> Tensor:
    """Decode one token and update ``state`` in place.

    x, z: [B, H, P]; dt: [B, H]; A: [H]; B, C: [B, G, N]; D: [H] / [H, P] / None;
    state: [B, H, P, N] (any float dtype, kept). Returns y [B, H, P] in x's dtype.
    """
    check_tensor("x", x, [("B", None), ("H", None), ("P", None)])
    Bsz, H, P = x.shape
    check_tensor("B", B, [("B", Bsz), ("G", None), ("N", None)])
    G, N = B.shape[1:]
    _check_groups(G, H)
    check_tensor("C", C, [("B", Bsz), ("G", G), ("N", N)])
    check_tensor("dt", dt, [("B", Bsz), ("H", H)])
    _check_common(A, D, H, P)
    if z is not None:
        check_tensor("z", z, [("B", Bsz), ("H", H), ("P", P)])
    check_tensor("state", state, [("B", Bsz), ("H", H), ("P", P), ("N", N)])
    check_same_device(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, state=state)
    check_writable("state", state)
    y, new = ssd_step_reference(x, dt, A, B, C, D, z, state)
    state.copy_(new)
    return y.to(x.dtype)


def validate_ssd(x, dt, A, B, C, D, z, initial_state, cu_seqlens, chunk_size) -> None:
    """Check every argument of :func:`ssd`; raise a named error before any compute."""
    check_tensor("x", x, [("B", None), ("T", None), ("H", None), ("P", None)])
    Bsz, T, H, P = x.shape
    check_tensor("B", B, [("B", Bsz), ("T", T), ("G", None), ("N", None)])
    G, N = B.shape[2:]
    _check_groups(G, H)
    check_tensor("C", C, [("B", Bsz), ("T", T), ("G", G), ("N", N)])
    check_tensor("dt", dt, [("B", Bsz), ("T", T), ("H", H)])
    _check_common(A, D, H, P)
    if z is not None:
        check_tensor("z", z, [("B", Bsz), ("T", T), ("H", H), ("P", P)])
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    check_cu_seqlens(cu_seqlens, T, Bsz)
    nseq = Bsz if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None:
        check_tensor("initial_state", initial_state, [("B", nseq), ("H", H), ("P", P), ("N", N)])
    check_same_device(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, initial_state=initial_state)


def _check_groups(G: int, H: int) -> None:
    if G < 1 or H % G != 0:
        raise ValueError(f"number of groups G={G} (B.shape[-2]) must divide the number of heads H={H} (x.shape[-2])")


def _check_common(A, D, H, P) -> None:
    check_tensor("A", A, [("H", H)])
    if D is not None:
        if isinstance(D, Tensor) and D.dim() == 2:
            check_tensor("D", D, [("H", H), ("P", P)])
        else:
            check_tensor("D", D, [("H", H)])
