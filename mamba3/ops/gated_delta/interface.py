"""Entry points for the gated delta rule: validation, then dispatch to reference / chunked."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..utils import check_cu_seqlens, check_impl, check_same_device, check_tensor, check_writable
from .chunked import gated_delta_rule_chunked
from .reference import gated_delta_rule_reference, gated_delta_step_reference

GDN_IMPLS = ("auto", "reference", "chunked")


def _check_scale(scale) -> None:
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale <= 0):
        raise ValueError(f"scale must be None or a positive float, got {scale!r}")


def validate_gated_delta(q, k, v, g, beta, scale, initial_state, cu_seqlens, chunk_size) -> None:
    """Shape / dtype guards shared by every form (raise before any compute)."""
    check_tensor("q", q, [("B", None), ("T", None), ("H", None), ("K", None)])
    B, T, H, K = q.shape
    check_tensor("k", k, [("B", B), ("T", T), ("H", H), ("K", K)])
    check_tensor("v", v, [("B", B), ("T", T), ("HV", None), ("V", None)])
    HV = v.shape[2]
    if HV % H != 0:
        raise ValueError(f"the number of value heads HV={HV} (v.shape[2]) must be a multiple of the "
                         f"number of query/key heads H={H}")
    check_tensor("g", g, [("B", B), ("T", T), ("HV", HV)])
    check_tensor("beta", beta, [("B", B), ("T", T), ("HV", HV)])
    _check_scale(scale)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    check_cu_seqlens(cu_seqlens, T, B)
    if initial_state is not None:
        nseq = B if cu_seqlens is None else cu_seqlens.numel() - 1
        check_tensor("initial_state", initial_state, [("num_seqs", nseq), ("HV", HV), ("V", v.shape[3]), ("K", K)])
    check_same_device(q=q, k=k, v=v, g=g, beta=beta, initial_state=initial_state)


def gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *, scale: Optional[float] = None,
                     initial_state: Optional[Tensor] = None, return_final_state: bool = False,
                     cu_seqlens: Optional[Tensor] = None, chunk_size: int = 64, impl: str = "auto"):
    """Gated DeltaNet sequence mixer (Yang et al. 2025).

    S_t = exp(g_t) S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,   o_t = S_t (scale * q_t).

    Args:
        q, k: [B, T, H, K]; the caller L2-normalises them (the layer does), the op does not.
        v: [B, T, HV, V]; HV a multiple of H (value head j reads q/k head j // (HV // H)).
        g: [B, T, HV] log decay (expected <= 0).
        beta: [B, T, HV] write strength; (0, 1) classic, (0, 2) the [-1, 1]-eigenvalue variant.
        scale: query scale, default K ** -0.5.
        initial_state: [B, HV, V, K] (one row per sequence with cu_seqlens).
        return_final_state: also return the state after the last token (per sequence).
        cu_seqlens: [S + 1] int offsets of packed sequences (then B must be 1).
        chunk_size: chunk length of the chunked form.
        impl: "auto" (chunked), "reference" (token loop) or "chunked".

    Returns:
        (o [B, T, HV, V] in v's dtype, final state [B or S, HV, V, K] (fp32/fp64) or None)

    Example:
        >>> B, T, H, K, V = 2, 10, 2, 8, 4
        >>> q = torch.randn(B, T, H, K); k = torch.nn.functional.normalize(torch.randn(B, T, H, K), dim=-1)
        >>> o, S = gated_delta_rule(q, k, torch.randn(B, T, H, V), -torch.rand(B, T, H),
        ...                         torch.rand(B, T, H), return_final_state=True)
        >>> o.shape, S.shape
        (torch.Size([2, 10, 2, 4]), torch.Size([2, 2, 4, 8]))
    """
    check_impl(impl, GDN_IMPLS)
    validate_gated_delta(q, k, v, g, beta, scale, initial_state, cu_seqlens, chunk_size)
    fn = gated_delta_rule_reference if impl == "reference" else gated_delta_rule_chunked
    return fn(q, k, v, g, beta, scale=scale, initial_state=initial_state, return_final_state=return_final_state,
              cu_seqlens=cu_seqlens, chunk_size=chunk_size)


def gated_delta_rule_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor, *,
                          scale: Optional[float] = None) -> Tensor:
    """Decode one token and update ``state`` in place.

    q, k: [B, H, K]; v: [B, HV, V]; g, beta: [B, HV]; state: [B, HV, V, K] (any float dtype; it
    keeps its dtype). Returns o [B, HV, V] in v's dtype.
    """
    check_tensor("q", q, [("B", None), ("H", None), ("K", None)])
    B, H, K = q.shape
    check_tensor("k", k, [("B", B), ("H", H), ("K", K)])
    check_tensor("v", v, [("B", B), ("HV", None), ("V", None)])
    HV, V = v.shape[1:]
    if HV % H != 0:
        raise ValueError(f"the number of value heads HV={HV} (v.shape[1]) must be a multiple of the "
                         f"number of query/key heads H={H}")
    check_tensor("g", g, [("B", B), ("HV", HV)])
    check_tensor("beta", beta, [("B", B), ("HV", HV)])
    check_tensor("state", state, [("B", B), ("HV", HV), ("V", V), ("K", K)])
    _check_scale(scale)
    check_same_device(q=q, k=k, v=v, g=g, beta=beta, state=state)
    check_writable("state", state)
    o, new = gated_delta_step_reference(q, k, v, g, beta, state, K ** -0.5 if scale is None else scale)
    state.copy_(new)
    return o.to(v.dtype)
