"""Entry points for Mamba-1's selective scan: validation, then dispatch to reference / chunked."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..utils import check_cu_seqlens, check_impl, check_same_device, check_tensor, check_writable
from .chunked import selective_scan_chunked
from .reference import selective_scan_reference, selective_scan_step_reference

SCAN_IMPLS = ("auto", "reference", "chunked")


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                   z: Optional[Tensor] = None, *, initial_state: Optional[Tensor] = None,
                   return_final_state: bool = False, cu_seqlens: Optional[Tensor] = None,
                   chunk_size: int = 32, impl: str = "auto"):
    """Mamba-1 selective scan (S6): a diagonal selective SSM per channel.

        h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,    y_t = C_t . h_t + D u_t   (then * silu(z_t))

    Args:
        u: [B, T, D] inputs (Mamba-1's x after the conv).
        delta: [B, T, D] step sizes, softplus already applied (>= 0; 0 means "skip this token").
        A: [D, N] decay rates (negative; A = -exp(A_log)).
        B, C: [B, T, N] input-dependent projections shared by all channels.
        D: [D] skip, or None.   z: [B, T, D] gate, or None.
        initial_state: [B, D, N] (or [num_seqs, D, N] with cu_seqlens) state to continue from.
        return_final_state: also return the state after the last token (per sequence).
        cu_seqlens: [S + 1] int offsets of packed sequences (then B must be 1).
        chunk_size: chunk length of the chunked form (shortened automatically for fast decays).
        impl: "auto" (chunked), "reference" (token loop) or "chunked".

    Returns:
        (y [B, T, D] in u's dtype, final state [., D, N] float32 (float64 for float64 input) or None)

    Example:
        >>> Bs, T, Dm, N = 2, 10, 6, 4
        >>> u = torch.randn(Bs, T, Dm); delta = torch.rand(Bs, T, Dm) * 0.1; A = -torch.rand(Dm, N)
        >>> y, h = selective_scan(u, delta, A, torch.randn(Bs, T, N), torch.randn(Bs, T, N),
        ...                       return_final_state=True)
        >>> y.shape, h.shape
        (torch.Size([2, 10, 6]), torch.Size([2, 6, 4]))
    """
    check_impl(impl, SCAN_IMPLS)
    validate_scan(u, delta, A, B, C, D, z, initial_state, cu_seqlens, chunk_size)
    fn = selective_scan_reference if impl == "reference" else selective_scan_chunked
    return fn(u, delta, A, B, C, D, z, initial_state=initial_state, return_final_state=return_final_state,
              cu_seqlens=cu_seqlens, chunk_size=chunk_size)


def selective_scan_step(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                        z: Optional[Tensor], state: Tensor) -> Tensor:
    """Decode one token and update ``state`` in place.

    u, delta, z: [B, D]; A: [D, N]; B, C: [B, N]; D: [D] or None; state: [B, D, N] (dtype kept).
    Returns y [B, D] in u's dtype.
    """
    check_tensor("u", u, [("B", None), ("D", None)])
    Bsz, Dm = u.shape
    check_tensor("A", A, [("D", Dm), ("N", None)])
    N = A.shape[1]
    check_tensor("delta", delta, [("B", Bsz), ("D", Dm)])
    check_tensor("B", B, [("B", Bsz), ("N", N)])
    check_tensor("C", C, [("B", Bsz), ("N", N)])
    if D is not None:
        check_tensor("D", D, [("D", Dm)])
    if z is not None:
        check_tensor("z", z, [("B", Bsz), ("D", Dm)])
    check_tensor("state", state, [("B", Bsz), ("D", Dm), ("N", N)])
    check_same_device(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, state=state)
    check_writable("state", state)
    y, new = selective_scan_step_reference(u, delta, A, B, C, D, z, state)
    state.copy_(new)
    return y.to(u.dtype)


def validate_scan(u, delta, A, B, C, D, z, initial_state, cu_seqlens, chunk_size) -> None:
    """Check every argument of :func:`selective_scan`; raise a named error before any compute."""
    check_tensor("u", u, [("B", None), ("T", None), ("D", None)])
    Bsz, T, Dm = u.shape
    check_tensor("delta", delta, [("B", Bsz), ("T", T), ("D", Dm)])
    check_tensor("A", A, [("D", Dm), ("N", None)])
    N = A.shape[1]
    check_tensor("B", B, [("B", Bsz), ("T", T), ("N", N)])
    check_tensor("C", C, [("B", Bsz), ("T", T), ("N", N)])
    if D is not None:
        check_tensor("D", D, [("D", Dm)])
    if z is not None:
        check_tensor("z", z, [("B", Bsz), ("T", T), ("D", Dm)])
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    check_cu_seqlens(cu_seqlens, T, Bsz)
    nseq = Bsz if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None:
        check_tensor("initial_state", initial_state, [("B", nseq), ("D", Dm), ("N", N)])
    check_same_device(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, initial_state=initial_state)
