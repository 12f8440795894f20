"""S4D initialisations of the diagonal state matrix (Gu, Gupta, Goel, Re 2022, section 4).

``d_state`` follows the paper: the real state size N, realised as N/2 complex modes (conjugate
pairs), n = 0 .. N/2 - 1. Returned as (log_A_real, A_imag), each [H, N/2], with
A = -exp(log_A_real) + i A_imag:

    "legs"   S4D-LegS: the eigenvalues of the normal part of HiPPO-LegS (A + P P^T with
             P_n = sqrt(n + 1/2)), which is -1/2 I + a skew-symmetric matrix: A_n = -1/2 + i w_n,
             w_n > 0 its imaginary spectrum, ascending. (The diagonal approximation of S4's
             HiPPO-LegS. Its frequencies follow an inverse law, which S4D-Inv approximates in
             closed form; they are *not* pi n: for N = 64 they run 0.26 .. 415.)
    "lin"    S4D-Lin: A_n = -1/2 + i pi n (Fourier-like frequencies, cf. S4-FouT).
    "inv"    S4D-Inv: A_n = -1/2 + i N/pi (N/(2n+1) - 1).
    "real"   S4D-Real: A_n = -(n + 1) (no oscillation).
    "random" control (not HiPPO-derived): real part -exp(g), imaginary part g', g, g' ~ N(0, 1)
             independently per (channel, mode): random decay rates and only low frequencies.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

S4D_INITS = ("legs", "lin", "inv", "real", "random")


def hippo_legs(N: int) -> Tensor:
    """The HiPPO-LegS state matrix [N, N] (float64): A_nk = -sqrt((2n+1)(2k+1)) for n > k,
    -(n+1) for n = k, 0 above the diagonal."""
    q = torch.arange(N, dtype=torch.float64)
    r = torch.sqrt(2 * q + 1)
    A = -torch.tril(r[:, None] * r[None, :], diagonal=-1)
    return A - torch.diag(q + 1)


def legs_diagonal(N: int) -> Tensor:
    """S4D-LegS spectrum: N/2 complex eigenvalues (complex128) of the normal part of HiPPO-LegS
    of size N, one per conjugate pair (positive imaginary part), ascending frequency."""
    if N < 2 or N % 2:
        raise ValueError(f"d_state must be an even int >= 2 for the LegS spectrum, got {N}")
    P = torch.sqrt(torch.arange(N, dtype=torch.float64) + 0.5)
    normal = hippo_legs(N) + P[:, None] * P[None, :]         # = -1/2 I + S, S skew-symmetric
    S = normal + 0.5 * torch.eye(N, dtype=torch.float64)
    w = torch.linalg.eigvalsh(-1j * S.to(torch.complex128))  # -iS is Hermitian: S = i diag(w)
    w = torch.sort(w).values[N // 2:]                         # the positive half, ascending
    return torch.complex(torch.full_like(w, -0.5), w)


def s4d_init(init: str, H: int, d_state: int, *, generator: Optional[torch.Generator] = None,
             device=None, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """(log_A_real [H, d_state/2], A_imag [H, d_state/2]) for one of :data:`S4D_INITS`.

    Deterministic inits are the same for every channel; "random" draws from ``generator``.
    """
    if init not in S4D_INITS:
        raise ValueError(f"init must be one of {list(S4D_INITS)}, got {init!r}")
    if not isinstance(d_state, int) or isinstance(d_state, bool) or d_state < 2 or d_state % 2:
        raise ValueError(f"d_state must be an even int >= 2 (N/2 complex modes), got {d_state!r}")
    if not isinstance(H, int) or H < 1:
        raise ValueError(f"H must be a positive int, got {H!r}")
    M = d_state // 2
    n = torch.arange(M, dtype=torch.float64)
    half = torch.full((M,), 0.5, dtype=torch.float64)
    if init == "legs":
        lam = legs_diagonal(d_state)
        real, imag = -lam.real, lam.imag
    elif init == "lin":
        real, imag = half, math.pi * n
    elif init == "inv":
        real, imag = half, d_state / math.pi * (d_state / (2 * n + 1) - 1)
    elif init == "real":
        real, imag = n + 1, torch.zeros(M, dtype=torch.float64)
    else:
        g = torch.randn(2, H, M, generator=generator, dtype=torch.float64)
        real, imag = torch.exp(g[0]), g[1]
    real, imag = real.expand(H, M), imag.expand(H, M)
    return torch.log(real).to(device=device, dtype=dtype).clone(), imag.to(device=device, dtype=dtype).clone()


def s4d_init_log_dt(H: int, dt_min: float = 1e-3, dt_max: float = 1e-1, *,
                    generator: Optional[torch.Generator] = None, device=None,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """log_dt [H] ~ U[log dt_min, log dt_max]."""
    if not (0 < dt_min <= dt_max):
        raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
    u = torch.rand(H, generator=generator, dtype=torch.float64)
    return (math.log(dt_min) + u * (math.log(dt_max) - math.log(dt_min))).to(device=device, dtype=dtype)
