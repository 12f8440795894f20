"""Shared pieces of the S4D op: parameter conversion, zero-order-hold discretisation, validation.

Parameterisation (Gu, Gupta, Goel, Re 2022, "On the Parameterization and Initialization of
Diagonal State Space Models"), per channel h and complex mode n:

    A[h, n]  = -exp(log_A_real[h, n]) + i * A_imag[h, n]      (real part always < 0: stable)
    dt[h]    = exp(log_dt[h])
    dA[h, n] = exp(dt A)                                       (zero-order hold)
    dB[h, n] = (exp(dt A) - 1) / A * B,   B = 1
    h_t      = dA h_{t-1} + dB u_t,       y_t = 2 Re(sum_n C[h, n] h_t[n]) + D[h] u_t

B is fixed to 1: for a diagonal single-input single-output SSM, B_n and C_n only ever appear as
the product B_n C_n in the output, so a learned B adds no expressivity (it would only rescale
what a carried state means). Each complex mode stands for a conjugate pair (the factor 2 Re),
so N complex modes are a real state of size 2N.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..utils import check_cu_seqlens, check_same_device, check_tensor

REAL = (torch.float32, torch.float64)
COMPLEX = (torch.complex64, torch.complex128)


def complex_of(real_dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if real_dtype == torch.float64 else torch.complex64


def as_complex(C: Tensor, real_dtype: torch.dtype) -> Tensor:
    """C given as real [..., 2] (re, im) or complex -> complex of the matching precision."""
    if C.is_complex():
        return C.to(complex_of(real_dtype))
    C = C.to(real_dtype)
    return torch.complex(C[..., 0], C[..., 1])


def cexpm1(z: Tensor) -> Tensor:
    """exp(z) - 1 for complex z, accurate for small |z| (dt A is ~1e-3 at initialisation):
    exp(a + ib) - 1 = expm1(a) cos b - 2 sin^2(b / 2) + i exp(a) sin b."""
    a, b = z.real, z.imag
    return torch.complex(torch.expm1(a) * torch.cos(b) - 2.0 * torch.sin(0.5 * b) ** 2, torch.exp(a) * torch.sin(b))


def discretize(log_dt: Tensor, log_A_real: Tensor, A_imag: Tensor, real_dtype: torch.dtype):
    """ZOH. Returns (dtA [H, N] complex = log dA, dB [H, N] complex)."""
    dt = torch.exp(log_dt.to(real_dtype))
    A = torch.complex(-torch.exp(log_A_real.to(real_dtype)), A_imag.to(real_dtype))
    dtA = A * dt[:, None]
    return dtA, cexpm1(dtA) / A


def state_as_complex(state: Tensor, real_dtype: torch.dtype) -> Tensor:
    """A state given as complex [..., N] or real [..., N, 2] -> complex [..., N]."""
    return as_complex(state, real_dtype)


def check_params(log_dt, log_A_real, A_imag, C, D, H: Optional[int]) -> int:
    """Validate the per-channel parameters; returns N (complex modes)."""
    check_tensor("log_dt", log_dt, [("H", H)])
    H = log_dt.shape[0]
    check_tensor("log_A_real", log_A_real, [("H", H), ("N", None)])
    N = log_A_real.shape[1]
    check_tensor("A_imag", A_imag, [("H", H), ("N", N)])
    if not isinstance(C, Tensor):
        raise TypeError(f"C must be a torch.Tensor, got {type(C).__name__}")
    if C.is_complex():
        check_tensor("C", C, [("H", H), ("N", N)], dtypes=COMPLEX)
    else:
        check_tensor("C", C, [("H", H), ("N", N), ("re/im", 2)])
    if D is not None:
        check_tensor("D", D, [("H", H)])
    return N


def check_state(name: str, state, rows: int, H: int, N: int, what: str) -> None:
    """A state is complex [rows, H, N] or real [rows, H, N, 2]."""
    if not isinstance(state, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(state).__name__}")
    if state.is_complex():
        check_tensor(name, state, [(what, rows), ("H", H), ("N", N)], dtypes=COMPLEX)
    else:
        check_tensor(name, state, [(what, rows), ("H", H), ("N", N), ("re/im", 2)], dtypes=REAL)


def validate_s4d(u, log_dt, log_A_real, A_imag, C, D, initial_state, cu_seqlens) -> None:
    check_tensor("u", u, [("B", None), ("T", None), ("H", None)])
    B, T, H = u.shape
    N = check_params(log_dt, log_A_real, A_imag, C, D, H)
    check_cu_seqlens(cu_seqlens, T, B)
    if initial_state is not None:
        rows = B if cu_seqlens is None else cu_seqlens.numel() - 1
        check_state("initial_state", initial_state, rows, H, N, "B" if cu_seqlens is None else "num_seqs")
    check_same_device(u=u, log_dt=log_dt, log_A_real=log_A_real, A_imag=A_imag, C=C, D=D, initial_state=initial_state)
