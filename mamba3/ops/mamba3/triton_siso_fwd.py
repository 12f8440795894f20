"""Triton forward kernels of the chunked scalar-decay SSD core used by Mamba-3 SISO (and Mamba-2).

The core, per (batch b, head h), on prepared per-head tensors (rotation, biases and the
trapezoid scale already applied):

    y_t = sum_{s<t, same chunk} (Q_t . K_s) exp(ell_t - ell_s) V_s + exp(ell_t) S_c Q_t
    S_{c+1} = exp(ell_last) S_c + sum_s exp(ell_last - ell_s) V_s K_s^T        (S_0 = initial)

with ell the inclusive within-chunk cumsum of dA. Chunk-parallel in three launches so that a
small batch x heads still fills the GPU:
    1. _chunk_state_kernel  grid (chunks, B*H):   chunk-local state of every chunk
    2. _state_scan_kernel   grid (P*N blocks, B*H): short sequential pass over chunk states,
       overwriting each local state with the state entering its chunk; final state in fp32
    3. _chunk_out_kernel    grid (chunks, B*H):   intra-chunk quadratic form + inter-chunk term
Layouts: Q, K [B, T, H, N]; V [B, T, H, P]; dA [B, T, H] fp32; states [B, H, nc, P, N].
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _load_chunk(ptr, b, h, c, T, stride_b, stride_t, stride_h, CHUNK: tl.constexpr, BLOCK: tl.constexpr, DIM):
    """[CHUNK, BLOCK] tile of a [B, T, H, DIM] tensor (last dim contiguous), zero-padded."""
    t = c * CHUNK + tl.arange(0, CHUNK)
    d = tl.arange(0, BLOCK)
    mask = (t[:, None] < T) & (d[None, :] < DIM)
    ptrs = ptr + b * stride_b + t[:, None] * stride_t + h * stride_h + d[None, :]
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _load_ell(dA_ptr, b, h, c, T, sdb, sdt, sdh, CHUNK: tl.constexpr):
    """Inclusive within-chunk cumsum of dA (fp32), zero past the end."""
    t = c * CHUNK + tl.arange(0, CHUNK)
    a = tl.load(dA_ptr + b * sdb + t * sdt + h * sdh, mask=t < T, other=0.0).to(tl.float32)
    return tl.cumsum(a, axis=0)


@triton.jit
def _chunk_state_kernel(K, V, dA, ST, DEC, T, H, nc, N, P,
                        skb, skt, skh, svb, svt, svh, sdb, sdt, sdh,
                        CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
                        PREC: tl.constexpr):
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    k = _load_chunk(K, b, h, c, T, skb, skt, skh, CHUNK, BLOCK_N, N)
    v = _load_chunk(V, b, h, c, T, svb, svt, svh, CHUNK, BLOCK_P, P)
    ell = _load_ell(dA, b, h, c, T, sdb, sdt, sdh, CHUNK)
    last = tl.sum(tl.where(tl.arange(0, CHUNK) == CHUNK - 1, ell, 0.0), axis=0)
    w = tl.exp(last - ell)
    vw = (v.to(tl.float32) * w[:, None]).to(k.dtype)
    local = tl.dot(tl.trans(vw), k, input_precision=PREC)              # [P, N] fp32
    p = tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    base = ST + (bh * nc + c) * P * N
    tl.store(base + p[:, None] * N + n[None, :], local.to(ST.dtype.element_ty),
             mask=(p[:, None] < P) & (n[None, :] < N))
    tl.store(DEC + bh * nc + c, last)


@triton.jit
def _scan_step(ST, DEC, carry, bh, c, nc, PN, offs, mask):
    ptrs = ST + (bh * nc + c) * PN + offs
    loc = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    decay = tl.exp(tl.load(DEC + bh * nc + c))
    tl.store(ptrs, carry.to(ST.dtype.element_ty), mask=mask)
    return decay * carry + loc


@triton.jit
def _state_scan_kernel(ST, DEC, S0, SF, nc, PN, HAS_S0: tl.constexpr, BLOCK: tl.constexpr,
                       NC_STATIC: tl.constexpr):
    """In place: ST[c] <- state entering chunk c; SF <- state after the last chunk (fp32)."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < PN
    if HAS_S0:
        carry = tl.load(S0 + bh * PN + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros([BLOCK], dtype=tl.float32)
    if NC_STATIC > 0:  # interpreter: loop bounds must be Python ints
        for c in range(NC_STATIC):
            carry = _scan_step(ST, DEC, carry, bh, c, nc, PN, offs, mask)
    else:
        for c in range(nc):
            carry = _scan_step(ST, DEC, carry, bh, c, nc, PN, offs, mask)
    tl.store(SF + bh * PN + offs, carry, mask=mask)


@triton.jit
def _chunk_out_kernel(Q, K, V, dA, ST, Y, T, H, nc, N, P,
                      sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh, syb, syt, syh,
                      CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
                      PREC: tl.constexpr):
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    q = _load_chunk(Q, b, h, c, T, sqb, sqt, sqh, CHUNK, BLOCK_N, N)
    k = _load_chunk(K, b, h, c, T, skb, skt, skh, CHUNK, BLOCK_N, N)
    v = _load_chunk(V, b, h, c, T, svb, svt, svh, CHUNK, BLOCK_P, P)
    ell = _load_ell(dA, b, h, c, T, sdb, sdt, sdh, CHUNK)
    i = tl.arange(0, CHUNK)
    strict = i[:, None] > i[None, :]
    seg = tl.where(strict, ell[:, None] - ell[None, :], -float("inf"))
    scores = tl.dot(q, tl.trans(k), input_precision=PREC) * tl.exp(seg)
    y = tl.dot(scores.to(v.dtype), v, input_precision=PREC)             # [C, P]
    p = tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    s = tl.load(ST + (bh * nc + c) * P * N + p[:, None] * N + n[None, :],
                mask=(p[:, None] < P) & (n[None, :] < N), other=0.0)
    y += tl.dot(q, tl.trans(s.to(q.dtype)), input_precision=PREC) * tl.exp(ell)[:, None]
    t = c * CHUNK + i
    ptrs = Y + b * syb + t[:, None] * syt + h * syh + p[None, :]
    tl.store(ptrs, y.to(Y.dtype.element_ty), mask=(t[:, None] < T) & (p[None, :] < P))


INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def static_loop(n: int) -> int:
    """Under TRITON_INTERPRET runtime loop bounds break (numpy 2 scalars); pass them as constexpr."""
    return n if INTERPRET else 0


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands multiply in full precision (no tf32); bf16/fp16 use the tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def ssd_core_fwd(Q, K, V, dA, S0, chunk_size: int, state_dtype=None):
    """Run the three forward launches.

    Q, K [B, T, H, N] and V [B, T, H, P] share one dtype; dA [B, T, H] fp32; S0 [B, H, P, N]
    fp32 or None. Returns (y [B, T, H, P] fp32, entering states [B, H, nc, P, N], final fp32 state).
    """
    B, T, H, N = Q.shape
    P = V.shape[-1]
    C = chunk_size
    nc = max(1, triton.cdiv(T, C))
    st_dtype = state_dtype or (torch.float32 if Q.dtype == torch.float32 else Q.dtype)
    states = torch.empty(B, H, nc, P, N, device=Q.device, dtype=st_dtype)
    dec = torch.empty(B, H, nc, device=Q.device, dtype=torch.float32)
    final = torch.empty(B, H, P, N, device=Q.device, dtype=torch.float32)
    y = torch.empty(B, T, H, P, device=Q.device, dtype=torch.float32)
    BN, BP = max(16, triton.next_power_of_2(N)), max(16, triton.next_power_of_2(P))
    prec = dot_precision(Q.dtype)
    nw = 4 if C * max(BN, BP) <= 4096 else 8
    _chunk_state_kernel[(nc, B * H)](K, V, dA, states, dec, T, H, nc, N, P,
                                     *K.stride()[:3], *V.stride()[:3], *dA.stride(),
                                     CHUNK=C, BLOCK_N=BN, BLOCK_P=BP, PREC=prec, num_warps=nw)
    PN = P * N
    BLOCK = min(1024, triton.next_power_of_2(PN))
    s0 = S0 if S0 is not None else final
    _state_scan_kernel[(triton.cdiv(PN, BLOCK), B * H)](states, dec, s0, final, nc, PN,
                                                       HAS_S0=S0 is not None, BLOCK=BLOCK,
                                                       NC_STATIC=static_loop(nc), num_warps=4)
    _chunk_out_kernel[(nc, B * H)](Q, K, V, dA, states, y, T, H, nc, N, P,
                                   *Q.stride()[:3], *K.stride()[:3], *V.stride()[:3], *dA.stride(),
                                   *y.stride()[:3],
                                   CHUNK=C, BLOCK_N=BN, BLOCK_P=BP, PREC=prec, num_warps=nw)
    return y, states, dec, final
