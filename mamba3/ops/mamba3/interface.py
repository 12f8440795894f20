"""Entry points for the Mamba-3 SISO op: validation, then dispatch to reference / chunked / triton."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import debug
from ..utils import check_impl, check_same_device, check_tensor, check_writable
from .. import custom_ops  # torch.library ops for compiling the Triton path (no triton import)
from .chunked import mamba3_siso_chunked
from .common import Mamba3State, _validate_angles, validate_siso, validate_state
from .reference import mamba3_siso_reference, mamba3_siso_step_reference

SISO_IMPLS = ("auto", "reference", "chunked", "triton")


def triton_available(device: torch.device) -> bool:
    """True when the Triton SISO kernels can run for tensors on ``device``."""
    if device.type != "cuda":
        return False
    try:
        from . import triton_siso  # noqa: F401
    except Exception:  # triton missing or too old: fall back to the chunked path
        return False
    return True


SISO_TRITON_KERNELS_FWD = ("prep_qk", "group_state", "group_out")
SISO_TRITON_KERNELS_BWD = ("chunk_dstate", "chunk_bwd")


def triton_fits(chunk: int, d_state: int, headdim: int, dtype: torch.dtype, backward: bool, smem_limit: int) -> bool:
    """Whether every SISO Triton kernel of this configuration fits ``smem_limit`` bytes of shared
    memory per block, by the (conservative) analytic bound of ``mamba3.ops.triton_utils``."""
    from ..triton_utils import analytic_smem, group_stages
    names = SISO_TRITON_KERNELS_FWD + (SISO_TRITON_KERNELS_BWD if backward else ())
    stages = group_stages(dtype, smem_limit)
    return all(analytic_smem(n, chunk, d_state, headdim, dtype, stages) <= smem_limit for n in names)


def _auto_triton_fits(q: Tensor, v: Tensor, chunk_size: int) -> bool:
    """impl='auto' on CUDA: take the Triton path only when it fits the device's shared memory
    (the fp32 backward at chunk 64 / N 128 / P 64 is bounded at ~224 KB: H100/H200 only)."""
    if torch.compiler.is_compiling():
        return True
    try:
        from ..triton_utils import device_smem_limit
        limit = _smem_limit(v.device.index if v.device.index is not None else torch.cuda.current_device(),
                            device_smem_limit)
        backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, v))
        dtype = torch.float32 if q.dtype == torch.float32 else torch.bfloat16
        ok = triton_fits(chunk_size, q.shape[-1], v.shape[-1], dtype, backward, limit)
    except Exception:  # no accounting available: keep the kernels
        return True
    if not ok:
        import warnings
        warnings.warn(f"mamba3_siso: the Triton kernels for chunk_size={chunk_size}, d_state={q.shape[-1]}, "
                      f"headdim={v.shape[-1]} ({dtype}, backward={backward}) exceed this GPU's {limit // 1024} KB "
                      "of shared memory per block; using the chunked PyTorch path (use bf16 inputs or a "
                      "smaller chunk_size for the kernels)", stacklevel=3)
    return ok


_SMEM_LIMITS: dict = {}


def _smem_limit(index: int, query) -> int:
    if index not in _SMEM_LIMITS:
        _SMEM_LIMITS[index] = query(index)
    return _SMEM_LIMITS[index]


def mamba3_siso(q: Tensor, k: Tensor, v: Tensor, dA: Tensor, dt: Tensor, trap: Tensor,
                q_bias: Tensor, k_bias: Tensor, angles: Tensor, D: Optional[Tensor] = None,
                z: Optional[Tensor] = None, *, initial_state: Optional[Mamba3State] = None,
                return_final_state: bool = False, cu_seqlens: Optional[Tensor] = None,
                chunk_size: int = 64, impl: str = "auto"):
    """Mamba-3 SISO sequence mixer (exponential-trapezoidal SSM with data-dependent rotary).

    Args:
        q, k: [B, T, G, N] RMS-normed C and B projections (before bias and rotation); heads read
            group h // (H // G).
        v: [B, T, H, P] the x projection.
        dA: [B, T, H] log decay dt * A (<= 0).
        dt: [B, T, H] step size (> 0).
        trap: [B, T, H] trapezoid logits; lambda = sigmoid(trap) (lambda = 1 is Mamba-2's Euler rule).
        q_bias, k_bias: [H, N] per-head biases added to C and B before rotation.
        angles: [B, T, S] (shared by heads) or [B, T, H, S] raw rotary logits; the phase advances
            by dt * pi * tanh(angles); pairs (2i, 2i+1) for i < S rotate, S <= N/2 (S may be 0).
        D: [H] skip, or None.   z: [B, T, H, P] gate (y * silu(z)), or None.
        initial_state: Mamba3State to continue from ([num_seqs, ...] with cu_seqlens).
        return_final_state: also return the state after the last token (per sequence).
        cu_seqlens: [S + 1] int offsets of packed sequences (then B must be 1).
        chunk_size: chunk length of the chunked/Triton forms.
        impl: "auto" (fastest available), "reference", "chunked" or "triton".

    Returns:
        (y [B, T, H, P] in v's dtype, Mamba3State or None)

    Example:
        >>> B, T, G, H, N, P, S = 2, 10, 1, 2, 8, 4, 2
        >>> q, k = torch.randn(B, T, G, N), torch.randn(B, T, G, N)
        >>> v = torch.randn(B, T, H, P); dt = torch.rand(B, T, H) * 0.1
        >>> y, st = mamba3_siso(q, k, v, -dt, dt, torch.randn(B, T, H), torch.ones(H, N),
        ...                     torch.ones(H, N), torch.randn(B, T, S), return_final_state=True)
        >>> y.shape, st.ssm.shape
        (torch.Size([2, 10, 2, 4]), torch.Size([2, 2, 4, 8]))
    """
    check_impl(impl, SISO_IMPLS)
    validate_siso(q, k, v, dA, dt, trap, q_bias, k_bias, angles, D, z, initial_state, cu_seqlens, chunk_size)
    if impl == "auto":
        impl = "triton" if triton_available(v.device) and _auto_triton_fits(q, v, chunk_size) else "chunked"
    elif impl == "triton" and v.device.type == "cuda" and not torch.compiler.is_compiling():
        from ..triton_utils import check_launch_fits  # named ValueError instead of a Triton OutOfResources
        check_launch_fits(chunk_size, q.shape[-1], v.shape[-1],
                          torch.float32 if q.dtype == torch.float32 else torch.bfloat16, v.device,
                          backward=torch.is_grad_enabled() and any(t.requires_grad for t in (q, v)))
    args = (q, k, v, dA, dt, trap, q_bias, k_bias, angles, D, z)
    kw = dict(initial_state=initial_state, return_final_state=return_final_state, cu_seqlens=cu_seqlens,
              chunk_size=chunk_size)
    if impl == "reference":
        out = mamba3_siso_reference(*args, **kw)
    elif impl == "chunked":
        out = mamba3_siso_chunked(*args, **kw)
    else:
        if not triton_available(v.device):
            raise ValueError("impl='triton' needs CUDA tensors and an importable triton (>= 3.5); "
                             "use impl='chunked' on CPU")
        if torch.compiler.is_compiling():  # opaque custom ops: fullgraph compile, no graph break
            out = custom_ops.mamba3_siso_op(*args, **kw)
        else:
            from .triton_siso import mamba3_siso_triton
            out = mamba3_siso_triton(*args, **kw)
    if debug.enabled():
        debug.check_op(f"mamba3_siso[{impl}]", (args, initial_state), out)
    return out


def mamba3_siso_step(q: Tensor, k: Tensor, v: Tensor, dA: Tensor, dt: Tensor, trap: Tensor,
                     q_bias: Tensor, k_bias: Tensor, angles: Tensor, D: Optional[Tensor],
                     z: Optional[Tensor], state: Mamba3State, *, impl: str = "auto") -> Tensor:
    """Decode one token and update ``state`` in place.

    q, k: [B, G, N]; v, z: [B, H, P]; dA, dt, trap: [B, H]; angles: [B, S] or [B, H, S];
    state: Mamba3State(angle [B, H, S], ssm [B, H, P, N], k [B, H, N], v [B, H, P]).
    Returns y [B, H, P] in v's dtype. The state keeps its own dtypes (fp32 or bf16 ssm).
    """
    check_impl(impl, ("auto", "reference", "triton"))
    check_tensor("v", v, [("B", None), ("H", None), ("P", None)])
    B, H, P = v.shape
    check_tensor("q", q, [("B", B), ("G", None), ("N", None)])
    G, N = q.shape[1:]
    if H % G != 0:
        raise ValueError(f"number of groups G={G} (q.shape[1]) must divide the number of heads H={H}")
    check_tensor("k", k, [("B", B), ("G", G), ("N", N)])
    for name, t in (("dA", dA), ("dt", dt), ("trap", trap)):
        check_tensor(name, t, [("B", B), ("H", H)])
    check_tensor("q_bias", q_bias, [("H", H), ("N", N)])
    check_tensor("k_bias", k_bias, [("H", H), ("N", N)])
    _validate_angles(angles.unsqueeze(1) if isinstance(angles, Tensor) and angles.dim() >= 1 else angles, B, 1, H, N)
    if D is not None:
        check_tensor("D", D, [("H", H)])
    if z is not None:
        check_tensor("z", z, [("B", B), ("H", H), ("P", P)])
    validate_state(state, B, H, P, N, angles.shape[-1])
    check_same_device(q=q, k=k, v=v, dA=dA, dt=dt, trap=trap, q_bias=q_bias, k_bias=k_bias, angles=angles, D=D, z=z, state=state)
    check_writable("state", state)
    if impl == "triton" or (impl == "auto" and triton_available(v.device)):
        if torch.compiler.is_compiling():
            return custom_ops.mamba3_siso_step_op(q, k, v, dA, dt, trap, q_bias, k_bias, angles, D, z, state)
        from .triton_step import mamba3_siso_step_triton
        return mamba3_siso_step_triton(q, k, v, dA, dt, trap, q_bias, k_bias, angles, D, z, state)
    y, new = mamba3_siso_step_reference(q, k, v, dA, dt, trap, q_bias, k_bias, angles, D, z, state)
    for dst, src in zip(state, new):
        dst.copy_(src)
    return y.to(v.dtype)
