"""Entry points for the Mamba-3 MIMO op: validation, then dispatch to reference / chunked / triton."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import debug
from ..utils import check_cu_seqlens, check_impl, check_same_device, check_tensor, check_writable
from .common import Mamba3State, _validate_angles, validate_state
from .mimo_chunked import mamba3_mimo_chunked
from .mimo_reference import mamba3_mimo_reference, mamba3_mimo_step_reference

MIMO_IMPLS = ("auto", "reference", "chunked", "triton")
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# SSD-core kernels the Triton MIMO path launches (tile CHUNK = chunk_size * R rows); its preparation
# and epilogue kernels have no dots (a few fp32 tiles of scratch at most)
MIMO_TRITON_KERNELS_FWD = ("group_state", "group_out")
MIMO_TRITON_KERNELS_BWD = ("chunk_dstate", "chunk_bwd")


def default_mimo_chunk_size(rank: int) -> int:
    """64 // R rows of tokens, so a tile holds C*R = 64 (time, rank) rows (SPEC section 4)."""
    return max(1, 64 // rank)


def triton_mimo_supported(chunk_size: int, rank: int, tensors) -> bool:
    """Shapes and dtypes the Triton MIMO path takes: chunk_size * R a power of two >= 16, every
    tensor fp32 / bf16 / fp16 (``tensors``: iterable, None entries skipped)."""
    rows = chunk_size * rank
    return rows >= 16 and rows & (rows - 1) == 0 and all(t is None or t.dtype in TRITON_DTYPES for t in tensors)


def check_mimo_triton_inputs(chunk_size: int, rank: int, named) -> None:
    """impl='triton' shape and dtype rules, checked before triton is imported. named: (name, tensor
    or None) pairs. Raises ValueError (tile size) or TypeError naming the argument (dtype)."""
    rows = chunk_size * rank
    if rows < 16 or rows & (rows - 1):
        raise ValueError(f"impl='triton' needs chunk_size * R (the kernel tile of (time, rank) rows) a power of "
                         f"two >= 16, got chunk_size={chunk_size}, R={rank}; use impl='chunked' for other sizes")
    for name, t in named:
        if t is not None and t.dtype not in TRITON_DTYPES:
            raise TypeError(f"impl='triton' needs {name} in float32/bfloat16/float16, got {t.dtype} "
                            "(use impl='reference' or 'chunked' for float64)")


def mimo_triton_fits(chunk_size: int, rank: int, d_state: int, headdim: int, dtype: torch.dtype, backward: bool,
                     smem_limit: int) -> bool:
    """Whether every SSD-core kernel the Triton MIMO path launches (tile chunk_size * R rows) fits
    ``smem_limit`` bytes of shared memory per block, by the analytic bound of mamba3.ops.triton_utils."""
    from ..triton_utils import analytic_smem, group_stages
    names = MIMO_TRITON_KERNELS_FWD + (MIMO_TRITON_KERNELS_BWD if backward else ())
    dtype = torch.float32 if dtype == torch.float32 else torch.bfloat16
    stages = group_stages(dtype, smem_limit)
    return all(analytic_smem(n, chunk_size * rank, d_state, headdim, dtype, stages) <= smem_limit for n in names)


def _auto_picks_triton(q: Tensor, v: Tensor, chunk_size: int, tensors) -> bool:
    """impl='auto': Triton for CUDA tensors of a supported shape and dtype whose kernels fit the
    device's shared memory (:func:`mimo_triton_fits`); else the chunked path."""
    R, N, P = q.shape[2], q.shape[-1], v.shape[-1]
    if v.device.type != "cuda" or torch.compiler.is_compiling() or not triton_mimo_supported(chunk_size, R, tensors):
        return False
    from .interface import triton_available
    if not triton_available(v.device):
        return False
    try:
        from ..triton_utils import device_smem_limit
        backward = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
        return mimo_triton_fits(chunk_size, R, N, P, v.dtype, backward, device_smem_limit(v.device))
    except Exception:  # no accounting available: keep the kernels
        return True


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
        impl: "auto" (Triton for CUDA tensors when chunk_size * R is a power of two >= 16 and the
            inputs are fp32/bf16/fp16, else chunked), "reference", "chunked" or "triton".
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
    check_impl(impl, MIMO_IMPLS)
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
    if impl == "auto":
        tensors = args + (outproj_norm_weight,)
        impl = "triton" if _auto_picks_triton(q, v, chunk_size, tensors) else "chunked"
    if impl == "reference":
        out = mamba3_mimo_reference(*args, **kw)
    elif impl == "chunked":
        out = mamba3_mimo_chunked(*args, **kw)
    else:
        out = _run_triton(args, kw, R, N, P)
    if debug.enabled():
        debug.check_op(f"mamba3_mimo[{impl}]", (args, initial_state), out)
    return out


def _run_triton(args, kw, R, N, P):
    names = ("q", "k", "v", "dA", "dt", "trap", "q_bias", "k_bias", "angles", "mimo_x", "mimo_z", "mimo_o", "D", "z")
    tensors = args + (kw["outproj_norm_weight"],)
    v, C = args[2], kw["chunk_size"]
    check_mimo_triton_inputs(C, R, zip(names + ("outproj_norm_weight",), tensors))
    try:
        from .triton_mimo import mamba3_mimo_triton
    except ImportError as e:
        raise ValueError(f"impl='triton' needs an importable triton (>= 3.5): {e}; use impl='chunked'") from e
    if v.device.type == "cuda" and not torch.compiler.is_compiling():
        from ..triton_utils import check_launch_fits  # named ValueError instead of a Triton OutOfResources
        check_launch_fits(C * R, N, P, torch.float32 if v.dtype == torch.float32 else torch.bfloat16, v.device,
                          backward=torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))
    return mamba3_mimo_triton(*args, **kw)   # checks the device (CUDA, or CPU under TRITON_INTERPRET=1)


def mamba3_mimo_step(q: Tensor, k: Tensor, v: Tensor, dA: Tensor, dt: Tensor, trap: Tensor,
                     q_bias: Tensor, k_bias: Tensor, angles: Tensor, mimo_x: Tensor, mimo_z: Tensor,
                     mimo_o: Tensor, D: Optional[Tensor], z: Optional[Tensor], state: Mamba3State, *,
                     impl: str = "auto", outproj_norm_weight: Optional[Tensor] = None,
                     outproj_norm_eps: float = 1e-5) -> Tensor:
    """Decode one token and update ``state`` in place.

    q, k: [B, R, G, N]; v, z: [B, H, P]; dA, dt, trap: [B, H]; angles: [B, S] or [B, H, S];
    q_bias, k_bias: [H, R, N]; mimo_x/z/o: [H, R, P]; D: [H]; outproj_norm_weight: [H, P];
    state: Mamba3State(angle [B, H, S], ssm [B, H, P, N], k [B, R, H, N], v [B, H, P]).
    impl: "auto" (the Triton kernel of triton_mimo_step.py for CUDA tensors in fp32/bf16/fp16 with
    a contiguous state and a float32 angle, else the reference), "reference" or "triton" (also
    CPU tensors under TRITON_INTERPRET=1; float64 raises TypeError naming the argument).
    Returns out [B, H, P] in v's dtype. The state keeps its own dtypes (fp32 or bf16 ssm).
    """
    check_impl(impl, ("auto", "reference", "triton"))
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
    args = (q, k, v, dA, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o, D, z)
    if impl == "triton" or (impl == "auto" and _step_picks_triton(args + (outproj_norm_weight,), state)):
        if torch.compiler.is_compiling():  # the launch as an opaque op (in-place state declared mutated)
            from .. import custom_ops
            return custom_ops.mamba3_mimo_step_op(*args, state, outproj_norm_weight, outproj_norm_eps)
        try:
            from .triton_mimo_step import mamba3_mimo_step_triton
        except ImportError as e:
            raise ValueError(f"impl='triton' needs an importable triton (>= 3.5): {e}; use impl='reference'") from e
        return mamba3_mimo_step_triton(*args, state, outproj_norm_weight, outproj_norm_eps)
    y, new = mamba3_mimo_step_reference(q, k, v, dA, dt, trap, q_bias, k_bias, angles, mimo_x, mimo_z, mimo_o,
                                        D, z, state, outproj_norm_weight, outproj_norm_eps)
    for dst, src in zip(state, new):
        dst.copy_(src)
    return y.to(v.dtype)


def _step_picks_triton(tensors, state: Mamba3State) -> bool:
    """impl='auto' for the step: the Triton kernel for CUDA tensors it takes (fp32/bf16/fp16, state
    contiguous with a float32 angle); under torch.compile through the op ``mamba3::mimo_step``."""
    v = tensors[2]
    if v.device.type != "cuda":
        return False
    if any(t is not None and t.dtype not in TRITON_DTYPES for t in tensors + tuple(state[1:])):
        return False
    if state.angle.dtype != torch.float32 or not all(t.is_contiguous() for t in state):
        return False
    from .interface import triton_available
    return triton_available(v.device)
