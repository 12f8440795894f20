"""Entry points for the Mamba-3 MIMO op: validation, then dispatch to reference / chunked."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..utils import check_cu_seqlens, check_impl, check_same_device, check_tensor, check_writable
from .common import Mamba3State, _validate_angles, validate_state
from .mimo_chunked import mamba3_mimo_chunked
from .mimo_reference import mamba3_mimo_reference, mamba3_mimo_step_reference

MIMO_IMPLS = ("auto", "reference", "chunked")


def default_mimo_chunk_size(rank: int) -> int:
    """64 // R rows of tokens, so a tile holds C*R = 64 (time, rank) rows (SPEC section 4)."""
    return max(1, 64 // rank)


def _check_impl(impl: str, choices) -> None:
    if impl == "triton":
        raise ValueError("impl='triton' has no MIMO kernel yet; use impl='chunked' (or 'auto')")
    check_impl(impl, choices)


def _validate_common(q, k, v, q_bias, k_bias, mimo_x, mimo_z, mimo_o, D, z, outproj_norm_weight, outproj_norm_eps,
                     time: bool):
    """Shapes shared by the sequence and step forms; time=True for [B, T, ...] inputs."""
    lead = [("B", None), ("T", None)] if time else [("B", None)]
    check_tensor("v", v, lead + [("H", None), ("P", None)])
    lead = [("B", v.shape[0]), ("T", v.shape[1])] if time else [("B", v.shape[0])]
    H, P = v.shape[-2:]
    check_tensor("q", q, lead + [("R", None), ("G", None), ("N", None)])
    R, G, N = q.shape[-3:]
    if R < 1:
        raise ValueError(f"MIMO rank R={R} (q.shape[{len(lead)}]) must be >= 1")
    if G < 1 or H % G != 0:
        raise ValueError(f"number of groups G={G} (q.shape[{len(lead) + 1}]) must divide the number of heads H={H}")
    check_tensor("k", k, lead + [("R", R), ("G", G), ("N", N)])
    check_tensor("q_bias", q_bias, [("H", H), ("R", R), ("N", N)])
    check_tensor("k_bias", k_bias, [("H", H), ("R", R), ("N", N)])
    for name, t in (("mimo_x", mimo_x), ("mimo_z", mimo_z), ("mimo_o", mimo_o)):
        check_tensor(name, t, [("H", H), ("R", R), ("P", P)])
    if D is not None:
        check_tensor("D", D, [("H", H)])
    if z is not None:
        check_tensor("z", z, lead + [("H", H), ("P", P)])
    if outproj_norm_weight is not None:
        check_tensor("outproj_norm_weight", outproj_norm_weight, [("H", H), ("P", P)])
    if not isinstance(outproj_norm_eps, (int, float)) or outproj_norm_eps < 0:
        raise ValueError(f"outproj_norm_eps must be a float >= 0, got {outproj_norm_eps!r}")
    return H, P, R, N


def mamba3_mimo(q: Tensor, k: Tensor, v: Tensor, dA: Tensor, dt: Tensor, trap: Tensor,
                q_bias: Tensor, k_bias: Tensor, angles: Tensor, mimo_x: Tensor, mimo_z: Tensor, mimo_o: Tensor,
                D: Optional[Tensor] = None, z: Optional[Tensor] = None, *,
                initial_state: Optional[Mamba3State] = None, return_final_state: bool = False,
                cu_seqlens: Optional[Tensor] = None, chunk_size: Optional[int] = None, impl: str = "auto",
                outproj_norm_weight: Optional[Tensor] = None, outproj_norm_eps: float = 1e-5):
    """Mamba-3 MIMO sequence mixer: rank-R inputs/outputs sharing one [P, N] state per head.

    Args:
        q, k: [B, T, R, G, N] RMS-normed C and B projections per rank (before bias and rotation).
        v: [B, T, H, P] raw x (up-scaled per rank by mimo_x inside).
        dA, dt, trap: [B, T, H] log decay, step size, trapezoid logits (shared by ranks).
        q_bias, k_bias: [H, R, N] per-head per-rank biases.
        angles: [B, T, S] or [B, T, H, S] raw rotary logits; split-half pairs (i, i + N/2), i < S.
        mimo_x (psi), mimo_z (zeta), mimo_o (phi): [H, R, P].
        D: [H] skip (applied per rank to psi-scaled x), or None.
        z: [B, T, H, P] gate input: out = sum_r phi_r * Y_r * silu(zeta_r * z); None: sum_r phi_r * Y_r.
        initial_state: Mamba3State(angle [B, H, S], ssm [B, H, P, N], k [B, R, H, N], v [B, H, P]).
        return_final_state: also return the state after the last token (per sequence).
        cu_seqlens: [S + 1] int offsets of packed sequences (then B must be 1).
        chunk_size: tokens per chunk (any int >= 1), default 64 // R.
        impl: "auto" (= "chunked"), "reference" or "chunked".
        outproj_norm_weight: [H, P] per-rank RMSNorm over P before the gate (eps outproj_norm_eps).

    Returns:
        (out [B, T, H, P] in v's dtype, Mamba3State or None)

    Example:
        >>> B, T, R, G, H, N, P, S = 2, 10, 2, 1, 2, 8, 4, 2
        >>> q, k = torch.randn(B, T, R, G, N), torch.randn(B, T, R, G, N)
        >>> v = torch.randn(B, T, H, P); dt = torch.rand(B, T, H) * 0.1
        >>> ones = torch.ones(H, R, P)
        >>> y, st = mamba3_mimo(q, k, v, -dt, dt, torch.randn(B, T, H), torch.ones(H, R, N), torch.ones(H, R, N),
        ...                     torch.randn(B, T, S), ones / R, ones, ones / R, return_final_state=True)
        >>> y.shape, st.k.shape
        (torch.Size([2, 10, 2, 4]), torch.Size([2, 2, 2, 8]))
    """
    _check_impl(impl, MIMO_IMPLS)
    H, P, R, N = _validate_common(q, k, v, q_bias, k_bias, mimo_x, mimo_z, mimo_o, D, z, outproj_norm_weight,
                                  outproj_norm_eps, time=True)
    B, T = v.shape[:2]
    for name, t in (("dA", dA), ("dt", dt), ("trap", trap)):
        check_tensor(name, t, [("B", B), ("T", T), ("H", H)])
    _validate_angles(angles, B, T, H, N)
    if chunk_size is None:
        chunk_size = default_mimo_chunk_size(R)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (any C >= 1 is accepted; default 64 // R = "
                         f"{default_mimo_chunk_size(R)}), got {chunk_size!r}")
    check_cu_seqlens(cu_seqlens, T, B)
    nseq = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None:
        validate_state(initial_state, nseq, H, P, N, angles.shape[-1], rank=R)
    check_same_device(q=q, k=k, v=v, dA=dA, dt=dt, trap=trap, q_bias=q_bias, k_bias=k_bias, angles=angles,
                      mimo_x=mimo_x, mimo_z=mimo_z, mimo_o=mimo_o, D=D, z=z, outproj_norm_weight=outproj_norm_weight,
                      initial_state=initial_state)
    args = (q, k, v, dA, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z)
    kw = dict(initial_state=initial_state, return_final_state=return_final_state, cu_seqlens=cu_seqlens,
              chunk_size=chunk_size, outproj_norm_weight=outproj_norm_weight, outproj_norm_eps=outproj_norm_eps)
    if impl == "reference":
        return mamba3_mimo_reference(*args, **kw)
    return mamba3_mimo_chunked(*args, **kw)


def mamba3_mimo_step(q: Tensor, k: Tensor, v: Tensor, dA: Tensor, dt: Tensor, trap: Tensor,
                     q_bias: Tensor, k_bias: Tensor, angles: Tensor, mimo_x: Tensor, mimo_z: Tensor,
                     mimo_o: Tensor, D: Optional[Tensor], z: Optional[Tensor], state: Mamba3State, *,
                     impl: str = "auto", outproj_norm_weight: Optional[Tensor] = None,
                     outproj_norm_eps: float = 1e-5) -> Tensor:
    """Decode one token and update ``state`` in place.

    q, k: [B, R, G, N]; v, z: [B, H, P]; dA, dt, trap: [B, H]; angles: [B, S] or [B, H, S];
    q_bias, k_bias: [H, R, N]; mimo_x/z/o: [H, R, P]; D: [H]; outproj_norm_weight: [H, P];
    state: Mamba3State(angle [B, H, S], ssm [B, H, P, N], k [B, R, H, N], v [B, H, P]).
    Returns out [B, H, P] in v's dtype. The state keeps its own dtypes.
    """
    _check_impl(impl, ("auto", "reference"))
    H, P, R, N = _validate_common(q, k, v, q_bias, k_bias, mimo_x, mimo_z, mimo_o, D, z, outproj_norm_weight,
                                  outproj_norm_eps, time=False)
    B = v.shape[0]
    for name, t in (("dA", dA), ("dt", dt), ("trap", trap)):
        check_tensor(name, t, [("B", B), ("H", H)])
    _validate_angles(angles.unsqueeze(1) if isinstance(angles, Tensor) and angles.dim() >= 1 else angles, B, 1, H, N)
    validate_state(state, B, H, P, N, angles.shape[-1], rank=R)
    check_same_device(q=q, k=k, v=v, dA=dA, dt=dt, trap=trap, q_bias=q_bias, k_bias=k_bias, angles=angles,
                      mimo_x=mimo_x, mimo_z=mimo_z, mimo_o=mimo_o, D=D, z=z, outproj_norm_weight=outproj_norm_weight, state=state)
    check_writable("state", state)
    y, new = mamba3_mimo_step_reference(q, k, v, dA, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o,
                                        D, z, state, outproj_norm_weight, outproj_norm_eps)
    for dst, src in zip(state, new):
        dst.copy_(src)
    return y.to(v.dtype)
