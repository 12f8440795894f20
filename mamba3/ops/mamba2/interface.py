"""Entry points for Mamba-2's SSD op: validation, then dispatch to reference / chunked / triton.

The Triton path is :func:`mamba3.ops.mamba3.triton_siso.ssd_triton`: Mamba-2 is Mamba-3 SISO with
lambda = 1, no rotation and no biases, so the Mamba-3 kernels run it (imported lazily: no triton
import on the CPU paths)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..utils import check_cu_seqlens, check_impl, check_same_device, check_tensor, check_writable
from .chunked import ssd_chunked
from .reference import ssd_reference, ssd_step_reference

SSD_IMPLS = ("auto", "reference", "chunked", "triton")
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
        chunk_size: chunk length of the chunked form (the official kernels use 256). The Triton
            kernels need a power of two >= 16.
        impl: "auto", "reference" (token loop), "chunked" (PyTorch) or "triton" (the Mamba-3 SISO
            kernels; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1; no float64). "auto" takes
            Triton for CUDA float32/bf16/fp16 input when triton imports, else chunked. The chunk
            length only tiles the computation (results agree to rounding), so on the Triton path
            "auto" uses the largest power of two <= max(chunk_size, 16) whose kernels fit the
            device's shared memory (chunk 256 at d_state 128 does not), chunked if none does.

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
    tensors = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, initial_state=initial_state)
    backward = torch.is_grad_enabled() and any(t.requires_grad for t in tensors.values() if t is not None)
    if impl == "auto":
        impl, chunk_size = _auto_impl(tensors, chunk_size, backward)
    elif impl == "triton":
        check_triton_ssd(tensors, chunk_size, backward)
    kw = dict(initial_state=initial_state, return_final_state=return_final_state, cu_seqlens=cu_seqlens,
              chunk_size=chunk_size)
    if impl == "triton":
        from ..mamba3.triton_siso import ssd_triton
        return ssd_triton(x, dt, A, B, C, D, z, **kw)
    fn = ssd_reference if impl == "reference" else ssd_chunked
    return fn(x, dt, A, B, C, D, z, **kw)


def triton_available(device: torch.device) -> bool:
    """True when the Triton SSD kernels can run for tensors on ``device`` (CUDA, triton importable)."""
    if device.type != "cuda":
        return False
    try:
        from ..mamba3 import triton_siso  # noqa: F401
    except Exception:  # triton missing or too old: the chunked path
        return False
    return True


def triton_chunk(chunk_size: int, d_state: int, headdim: int, dtype: torch.dtype, backward: bool,
                 smem_limit: int) -> Optional[int]:
    """impl='auto': the kernel chunk length, the largest power of two <= max(chunk_size, 16) (and
    >= 16) whose Triton kernels fit ``smem_limit`` bytes of shared memory per block; None if none."""
    from ..mamba3.interface import triton_fits
    c = 1 << (max(chunk_size, 16).bit_length() - 1)
    kd = torch.float32 if dtype == torch.float32 else torch.bfloat16
    while c >= 16:
        if triton_fits(c, d_state, headdim, kd, backward, smem_limit):
            return c
        c //= 2
    return None


def _auto_impl(tensors: dict, chunk_size: int, backward: bool):
    x, B = tensors["x"], tensors["B"]
    if not triton_available(x.device) or any(t is not None and t.dtype not in TRITON_DTYPES
                                             for t in tensors.values()):
        return "chunked", chunk_size
    c = triton_chunk(chunk_size, B.shape[-1], x.shape[-1], x.dtype, backward, _device_smem(x.device))
    return ("chunked", chunk_size) if c is None else ("triton", c)


def _device_smem(device: torch.device) -> int:
    """Shared memory per block of a CUDA device (bytes, cached); 99 KB (the smallest target part)
    when it cannot be queried."""
    from ..triton_utils import SMEM_99KB, device_smem_limit
    try:
        from ..mamba3.interface import _smem_limit
        return _smem_limit(device.index if device.index is not None else torch.cuda.current_device(),
                           device_smem_limit)
    except Exception:
        return SMEM_99KB


def check_triton_ssd(tensors: dict, chunk_size: int, backward: bool) -> None:
    """impl='triton': named errors for what the kernels cannot take (dtype, device, chunk)."""
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"impl='triton' needs chunk_size a power of two >= 16, got {chunk_size}")
    for name, t in tensors.items():
        if t is not None and t.dtype not in TRITON_DTYPES:
            raise TypeError(f"impl='triton' needs {name} in float32/bfloat16/float16, got {t.dtype} "
                            "(use impl='reference' or 'chunked' for float64)")
    x = tensors["x"]
    if x.device.type != "cuda":
        try:
            from ..mamba3 import triton_siso_fwd
        except Exception as e:
            raise ValueError(f"impl='triton' needs an importable triton ({e}); use impl='chunked'") from None
        if not triton_siso_fwd.INTERPRET:
            raise ValueError(f"impl='triton' needs CUDA tensors, got {x.device} (set TRITON_INTERPRET=1 "
                             "before importing triton to run the kernels on CPU tensors; or impl='chunked')")
        return
    if not triton_available(x.device):
        raise ValueError("impl='triton' needs an importable triton (>= 3.5); use impl='chunked'")
    if not torch.compiler.is_compiling():  # named ValueError instead of a Triton OutOfResources
        from ..triton_utils import check_launch_fits
        check_launch_fits(chunk_size, tensors["B"].shape[-1], x.shape[-1],
                          torch.float32 if x.dtype == torch.float32 else torch.bfloat16, x.device,
                          backward=backward)


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
