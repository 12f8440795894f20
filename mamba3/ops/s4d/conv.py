"""S4D convolution mode: materialise the kernel, then a causal FFT convolution, O(L log L).

Unrolling h_t = dA h_{t-1} + dB u_t from h_{-1} = h0 gives

    y_t = sum_{s<=t} K[t - s] u_s + 2 Re(sum_n C_n dA_n^(t+1) h0_n) + D u_t,
    K[l] = 2 Re(sum_n C_n dB_n dA_n^l)        (a Vandermonde product in dA),
    h_{T-1} = dA^T h0 + dB sum_s dA^(T-1-s) u_s.

Powers are taken as exp(l * dt A), never by repeated multiplication, so the kernel is exact to
rounding for any length. The kernel costs O(H N L) memory ([H, N, L] complex).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..utils import compute_dtype, pack_to_padded, padded_to_pack, seq_lengths
from .common import as_complex, discretize, state_as_complex


def s4d_kernel(log_dt: Tensor, log_A_real: Tensor, A_imag: Tensor, C: Tensor, L: int,
               real_dtype: Optional[torch.dtype] = None) -> Tensor:
    """The length-L convolution kernel K [H, L] (real, float32 or float64)."""
    rd = real_dtype or compute_dtype(log_dt, log_A_real, A_imag)
    dtA, dB = discretize(log_dt, log_A_real, A_imag, rd)
    ell = torch.arange(L, device=dtA.device, dtype=rd)
    vander = torch.exp(dtA[..., None] * ell)                                  # [H, N, L]
    return 2.0 * torch.einsum("hn,hnl->hl", as_complex(C, rd) * dB, vander).real


def causal_fft_conv(u: Tensor, K: Tensor) -> Tensor:
    """y[b, t, h] = sum_{s<=t} K[h, t-s] u[b, s, h] via zero-padded real FFTs. u [B, T, H], K [H, T]."""
    T = u.shape[1]
    n = 1 << (2 * T - 1).bit_length()          # >= 2T - 1: no circular wrap-around
    uf = torch.fft.rfft(u.transpose(1, 2), n=n)                               # [B, H, n/2+1]
    kf = torch.fft.rfft(K, n=n)                                               # [H, n/2+1]
    return torch.fft.irfft(uf * kf, n=n)[..., :T].transpose(1, 2)


def _conv_dense(u, log_dt, log_A_real, A_imag, C, D, initial_state, return_final_state, lengths):
    T = u.shape[1]
    rd = compute_dtype(u, log_dt, log_A_real, A_imag)
    uc = u.to(rd)
    dtA, dB = discretize(log_dt, log_A_real, A_imag, rd)
    Cc = as_complex(C, rd)
    y = causal_fft_conv(uc, s4d_kernel(log_dt, log_A_real, A_imag, C, T, rd)) if T > 0 else uc.clone()
    h0 = None if initial_state is None else state_as_complex(initial_state, rd)
    if h0 is not None and T > 0:
        ell1 = torch.arange(1, T + 1, device=u.device, dtype=rd)
        decay = torch.exp(dtA[..., None] * ell1)                              # dA^(t+1): [H, N, T]
        y = y + 2.0 * torch.einsum("bhn,hnt->bth", h0 * Cc, decay).real
    if D is not None:
        y = y + D.to(rd) * uc
    final = None
    if return_final_state:
        ct = dtA.dtype
        if lengths is None:
            expo = torch.arange(T - 1, -1, -1, device=u.device, dtype=rd)    # T-1-s
            w = torch.exp(dtA[..., None] * expo)                              # [H, N, T]
            final = dB * torch.einsum("bsh,hns->bhn", uc.to(ct), w)
            if h0 is not None:
                final = final + torch.exp(dtA * T) * h0
        else:  # right-padded rows of different lengths: exponent len_b - 1 - s, masked past the end
            lens = lengths.to(device=u.device, dtype=rd)
            expo = lens[:, None] - 1 - torch.arange(T, device=u.device, dtype=rd)      # [B, T]
            w = torch.exp(dtA[None, :, :, None] * expo.clamp(min=0)[:, None, None, :])  # [B, H, N, T]
            w = w * (expo >= 0)[:, None, None, :]
            final = dB * torch.einsum("bsh,bhns->bhn", uc.to(ct), w)
            if h0 is not None:
                final = final + torch.exp(dtA[None] * lens[:, None, None]) * h0
    return y.to(u.dtype), final


def s4d_conv(u: Tensor, log_dt: Tensor, log_A_real: Tensor, A_imag: Tensor, C: Tensor,
             D: Optional[Tensor] = None, *, initial_state: Optional[Tensor] = None,
             return_final_state: bool = False, cu_seqlens: Optional[Tensor] = None):
    """S4D by FFT convolution (same signature as :func:`mamba3.ops.s4d`).

    u: [B, T, H]; returns (y [B, T, H] in u's dtype, final complex state [B, H, N] or None).
    Packed sequences (``cu_seqlens``) are right-padded to one batch and unpacked afterwards.
    """
    if cu_seqlens is None:
        return _conv_dense(u, log_dt, log_A_real, A_imag, C, D, initial_state, return_final_state, None)
    lengths = torch.tensor(seq_lengths(cu_seqlens), device=u.device)
    up = pack_to_padded(u, cu_seqlens)
    y, final = _conv_dense(up, log_dt, log_A_real, A_imag, C, D, initial_state, return_final_state, lengths)
    return padded_to_pack(y, cu_seqlens), final
