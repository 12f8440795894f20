"""Mamba-3 SISO forward without saving for a backward (inference / no-grad prefill): the rotation
happens inside the SSD core, so the per-head prepared q, k [B, T, H, N] never touch memory.

The training forward (triton_siso_fwd.mamba3_fused_fwd) writes the rotated, biased q and the
rotated, trapezoid-scaled k of every head and reads them back in the core: with H heads sharing one
group's q, k that is 2 H N values written and read per token, more than v, z and y together.
Here each core program loads the raw group q, k tile (shared by the heads of the group, so it is
served from L2), adds its head's biases, rotates and scales in registers, and runs the chunk.

Register budget: the rotation works on even / odd halves [C, N/2] of the tile. Instead of
interleaving them back (a layout shuffle) the state is kept as two halves too, S = [S_even |
S_odd] over the pair index, and every product over N becomes two products over N/2:
    Q K^T = Qe Ke^T + Qo Ko^T,   S Q = S_e Qe + S_o Qo,   S += V^T K  ->  S_e += V^T Ke, S_o += V^T Ko.
Entering and final states in memory keep the interleaved [P, N] layout of every other path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_siso_fwd import (_GroupRun, _chunk_coeffs, _chunk_phase, _chunk_theta, _cos_sin, _load_chunk, _load_ell,
                              _rotated_pairs, nonempty, static_loop)

INFER_NUM_WARPS = 8      # the two state halves and the rotation tiles spill at 4 warps
INFER_NUM_STAGES = 1
INFER_PHASE = 2          # 1: phase cumsum inside the core loop; 2: a parallel pre-pass writes it


@triton.jit
def _token_phase_kernel(DT, ANG, TH0, TH, T, H, nc, S, sdb, sdt, sdh, sab, sat, sah,
                        CHUNK: tl.constexpr, BLOCK_S: tl.constexpr):
    """TH[b, t, h, s] = cumulative phase (fp32) of every token of chunk c; grid (chunks, B*H)."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    t = c * CHUNK + tl.arange(0, CHUNK)
    i = tl.arange(0, BLOCK_S)
    dt = tl.load(DT + b * sdb + t * sdt + h * sdh, mask=t < T, other=0.0).to(tl.float32)
    theta = _chunk_theta(ANG, TH0, dt, b, bh, c, T, nc, S, sab, sat, sah, h, CHUNK, BLOCK_S)
    tl.store(TH + ((b * T + t[:, None]) * H + h) * S + i[None, :], theta, mask=(t[:, None] < T) & (i[None, :] < S))


def token_phases(dt, angles, th0, chunk_size):
    """Cumulative phase of every token, [B, T, H, S] fp32 (th0 from ``chunk_start_phases``)."""
    B, T, H = dt.shape
    S = angles.shape[-1]
    nc = th0.shape[2]
    th = torch.empty(B, T, H, S, device=dt.device, dtype=torch.float32)
    sa = (angles.stride(0), angles.stride(1), 0 if angles.dim() == 3 else angles.stride(2))
    _token_phase_kernel[(nc, B * H)](dt, angles, th0, th, T, H, nc, S, *dt.stride(), *sa, CHUNK=chunk_size,
                                     BLOCK_S=max(16, triton.next_power_of_2(S)), num_warps=4)
    return th


@triton.jit
def _load_halves(ptr, p, i, P, N2, BLOCK_P: tl.constexpr, BLOCK_N2: tl.constexpr):
    """Even and odd columns [BLOCK_P, BLOCK_N2] fp32 of an interleaved [P, 2 N2] state."""
    m = (p[:, None] < P) & (i[None, :] < N2)
    off = p[:, None] * (2 * N2) + 2 * i[None, :]
    return tl.load(ptr + off, mask=m, other=0.0), tl.load(ptr + off + 1, mask=m, other=0.0)


@triton.jit
def _store_halves(ptr, se, so, p, i, P, N2):
    m = (p[:, None] < P) & (i[None, :] < N2)
    off = p[:, None] * (2 * N2) + 2 * i[None, :]
    tl.store(ptr + off, se, mask=m)
    tl.store(ptr + off + 1, so, mask=m)


@triton.jit
def _k_halves(K, KB, DT, TRAP, ANG, TH0, b, g, h, bh, c, T, nc, N, S,
              sqb, sqt, sqg, sdb, sdt, sdh, sab, sat, sah, CHUNK: tl.constexpr, BLOCK_N2: tl.constexpr,
              PHASE: tl.constexpr):
    """(gamma [C], cos, sin [C, N2] fp32, k even / odd halves rotated and scaled by c_t, fp32).
    PHASE 0: no rotation; 1: phase from the raw angles (cumsum in the chunk); 2: ANG holds the
    cumulative phase [B, T, H, S] fp32 (``token_phases``)."""
    t = c * CHUNK + tl.arange(0, CHUNK)
    dt, gamma, cs = _chunk_coeffs(DT, TRAP, b, h, c, T, sdb, sdt, sdh, CHUNK)
    if PHASE == 0:
        cos = tl.full([CHUNK, BLOCK_N2], 1.0, tl.float32)
        sin = tl.zeros([CHUNK, BLOCK_N2], dtype=tl.float32)
    elif PHASE == 1:
        cos, sin = _chunk_phase(ANG, TH0, dt, b, bh, tl.minimum(c, nc - 1), T, nc, S, sab, sat, sah, h, CHUNK,
                                BLOCK_N2)
    else:
        i = tl.arange(0, BLOCK_N2)
        cos, sin = _cos_sin(tl.load(ANG + b * sab + h * sah + t[:, None] * sat + i[None, :],
                                    mask=(t[:, None] < T) & (i[None, :] < S), other=0.0))
    ke, ko, kre, kro = _rotated_pairs(K, KB, b, g, h, t, T, N, sqb, sqt, sqg, cos, sin, BLOCK_N2)
    return gamma, cos, sin, ke, ko, kre * cs[:, None], kro * cs[:, None]


@triton.jit
def _state_update(se, so, ka, kb, v, ell, CHUNK: tl.constexpr, PREC: tl.constexpr):
    """S <- exp(ell_last) S + sum_s exp(ell_last - ell_s) V_s K_s^T on both halves."""
    last = tl.sum(tl.where(tl.arange(0, CHUNK) == CHUNK - 1, ell, 0.0), axis=0)
    vw = tl.trans((v.to(tl.float32) * tl.exp(last - ell)[:, None]).to(ka.dtype))
    se = se * tl.exp(last) + tl.dot(vw, ka, input_precision=PREC)
    so = so * tl.exp(last) + tl.dot(vw, kb, input_precision=PREC)
    return se, so, last


@triton.jit
def _infer_state_chunk(K, KB, DT, TRAP, ANG, TH0, V, dA, se, so, b, g, h, bh, c, T, nc, N, P, S,
                       sqb, sqt, sqg, svb, svt, svh, sdb, sdt, sdh, sab, sat, sah,
                       CHUNK: tl.constexpr, BLOCK_N2: tl.constexpr, BLOCK_P: tl.constexpr, PREC: tl.constexpr,
                       PHASE: tl.constexpr):
    _, _, _, _, _, ka, kb = _k_halves(K, KB, DT, TRAP, ANG, TH0, b, g, h, bh, c, T, nc, N, S,
                                      sqb, sqt, sqg, sdb, sdt, sdh, sab, sat, sah, CHUNK, BLOCK_N2, PHASE)
    v = _load_chunk(V, b, h, c, T, svb, svt, svh, CHUNK, BLOCK_P, P)
    ell = _load_ell(dA, b, h, c, T, sdb, sdt, sdh, CHUNK)
    return _state_update(se, so, ka.to(v.dtype), kb.to(v.dtype), v, ell, CHUNK, PREC)


@triton.jit
def _infer_state_kernel(K, KB, DT, TRAP, ANG, TH0, V, dA, SG, DECG, T, H, G, nc, N, P, S, CPG,
                        sqb, sqt, sqg, svb, svt, svh, sdb, sdt, sdh, sab, sat, sah,
                        CHUNK: tl.constexpr, BLOCK_N2: tl.constexpr, BLOCK_P: tl.constexpr,
                        PREC: tl.constexpr, CPG_STATIC: tl.constexpr, PHASE: tl.constexpr):
    """Local end state of chunk group grp (zero entering state) -> SG[b, h, grp] (interleaved
    [P, N] fp32) and its total log decay -> DECG[b, h, grp]."""
    grp = tl.program_id(0)
    bh = tl.program_id(1)
    ng = tl.num_programs(0)
    b = bh // H
    h = bh % H
    g = h // (H // G)
    se = tl.zeros([BLOCK_P, BLOCK_N2], dtype=tl.float32)
    so = tl.zeros([BLOCK_P, BLOCK_N2], dtype=tl.float32)
    total = 0.0
    if CPG_STATIC > 0:  # interpreter: loop bounds must be Python ints
        for j in range(CPG_STATIC):
            se, so, last = _infer_state_chunk(K, KB, DT, TRAP, ANG, TH0, V, dA, se, so, b, g, h, bh, grp * CPG + j,
                                              T, nc, N, P, S, sqb, sqt, sqg, svb, svt, svh, sdb, sdt, sdh, sab, sat,
                                              sah, CHUNK, BLOCK_N2, BLOCK_P, PREC, PHASE)
            total += last
    else:
        for j in range(0, CPG):
            se, so, last = _infer_state_chunk(K, KB, DT, TRAP, ANG, TH0, V, dA, se, so, b, g, h, bh, grp * CPG + j,
                                              T, nc, N, P, S, sqb, sqt, sqg, svb, svt, svh, sdb, sdt, sdh, sab, sat,
                                              sah, CHUNK, BLOCK_N2, BLOCK_P, PREC, PHASE)
            total += last
    _store_halves(SG + (bh * ng + grp) * P * N, se, so, tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N2), P, N // 2)
    tl.store(DECG + bh * ng + grp, total)


@triton.jit
def _infer_out_chunk(Q, K, QB, KB, DT, TRAP, ANG, TH0, V, dA, Z, Y, se, so, d_skip, b, g, h, bh, c, T, nc, N, P, S,
                     sqb, sqt, sqg, svb, svt, svh, sdb, sdt, sdh, sab, sat, sah, HAS_Z: tl.constexpr,
                     CHUNK: tl.constexpr, BLOCK_N2: tl.constexpr, BLOCK_P: tl.constexpr, PREC: tl.constexpr,
                     PHASE: tl.constexpr):
    """Output tile of chunk c from its entering state halves; returns the leaving halves."""
    i = tl.arange(0, CHUNK)
    p = tl.arange(0, BLOCK_P)
    t = c * CHUNK + i
    gamma, cos, sin, ke, ko, ka, kb = _k_halves(K, KB, DT, TRAP, ANG, TH0, b, g, h, bh, c, T, nc, N, S,
                                                sqb, sqt, sqg, sdb, sdt, sdh, sab, sat, sah, CHUNK, BLOCK_N2, PHASE)
    qe, qo, qa, qb = _rotated_pairs(Q, QB, b, g, h, t, T, N, sqb, sqt, sqg, cos, sin, BLOCK_N2)
    skip = d_skip + gamma * tl.sum(qe * ke + qo * ko, axis=1)    # rotation preserves <q, k>
    v = _load_chunk(V, b, h, c, T, svb, svt, svh, CHUNK, BLOCK_P, P)
    qa, qb, ka, kb = qa.to(v.dtype), qb.to(v.dtype), ka.to(v.dtype), kb.to(v.dtype)
    ell = _load_ell(dA, b, h, c, T, sdb, sdt, sdh, CHUNK)
    scores = tl.dot(qa, tl.trans(ka), input_precision=PREC)
    scores = tl.dot(qb, tl.trans(kb), scores, input_precision=PREC)
    scores *= tl.exp(tl.where(i[:, None] > i[None, :], ell[:, None] - ell[None, :], -float("inf")))
    y = tl.dot(qa, tl.trans(se.to(v.dtype)), input_precision=PREC)
    y = tl.dot(qb, tl.trans(so.to(v.dtype)), y, input_precision=PREC) * tl.exp(ell)[:, None]
    y = tl.dot(scores.to(v.dtype), v, y, input_precision=PREC)
    y += skip[:, None] * v.to(tl.float32)
    mask = (t[:, None] < T) & (p[None, :] < P)
    off = b * svb + t[:, None] * svt + h * svh + p[None, :]
    if HAS_Z:
        z = tl.load(Z + off, mask=mask, other=0.0).to(tl.float32)
        y = y * z * tl.sigmoid(z)
    tl.store(Y + off, y.to(Y.dtype.element_ty), mask=mask)
    se, so, _ = _state_update(se, so, ka, kb, v, ell, CHUNK, PREC)
    return se, so


@triton.jit
def _infer_out_kernel(Q, K, QB, KB, DT, TRAP, ANG, TH0, Dp, V, dA, Z, SIN, SF, Y, T, H, G, nc, N, P, S, CPG,
                      sqb, sqt, sqg, svb, svt, svh, sdb, sdt, sdh, sab, sat, sah,
                      HAS_SIN: tl.constexpr, WRITE_FINAL: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                      CHUNK: tl.constexpr, BLOCK_N2: tl.constexpr, BLOCK_P: tl.constexpr,
                      PREC: tl.constexpr, CPG_STATIC: tl.constexpr, PHASE: tl.constexpr):
    """Chunk group grp of one (batch, head) from raw q, k: y = intra + inter + (D + gamma <q, k>) v,
    gated by silu(z). SIN [B, H, ng, P, N] fp32 entering states; WRITE_FINAL: final state -> SF."""
    grp = tl.program_id(0)
    bh = tl.program_id(1)
    ng = tl.num_programs(0)
    b = bh // H
    h = bh % H
    g = h // (H // G)
    p = tl.arange(0, BLOCK_P)
    i2 = tl.arange(0, BLOCK_N2)
    i = tl.arange(0, CHUNK)
    N2 = N // 2
    if HAS_SIN:
        se, so = _load_halves(SIN + (bh * ng + grp) * P * N, p, i2, P, N2, BLOCK_P, BLOCK_N2)
    else:
        se = tl.zeros([BLOCK_P, BLOCK_N2], dtype=tl.float32)
        so = tl.zeros([BLOCK_P, BLOCK_N2], dtype=tl.float32)
    d_skip = 0.0
    if HAS_D:
        d_skip = tl.load(Dp + h).to(tl.float32)
    if CPG_STATIC > 0:  # interpreter: loop bounds must be Python ints
        for j in range(CPG_STATIC):
            se, so = _infer_out_chunk(Q, K, QB, KB, DT, TRAP, ANG, TH0, V, dA, Z, Y, se, so, d_skip, b, g, h, bh,
                                      grp * CPG + j, T, nc, N, P, S, sqb, sqt, sqg, svb, svt, svh, sdb, sdt, sdh,
                                      sab, sat, sah, HAS_Z, CHUNK, BLOCK_N2, BLOCK_P, PREC, PHASE)
    else:
        for j in range(0, CPG):
            se, so = _infer_out_chunk(Q, K, QB, KB, DT, TRAP, ANG, TH0, V, dA, Z, Y, se, so, d_skip, b, g, h, bh,
                                      grp * CPG + j, T, nc, N, P, S, sqb, sqt, sqg, svb, svt, svh, sdb, sdt, sdh,
                                      sab, sat, sah, HAS_Z, CHUNK, BLOCK_N2, BLOCK_P, PREC, PHASE)
    if WRITE_FINAL:
        _store_halves(SF + bh * P * N, se, so, p, i2, P, N2)


def mamba3_infer_fwd(q, k, v, dA, dt, trap, q_bias, k_bias, angles, D, z, th0, S0, chunk_size,
                     dot_dtype=None, groups=None, num_warps=None, num_stages=None, phase=None):
    """Mamba-3 SISO forward on raw inputs with the rotation inside the core (nothing saved).

    q, k [B, T, G, N] (N even); v, z [B, T, H, P]; dA, dt, trap [B, T, H] with equal strides;
    q_bias, k_bias [H, N]; angles [B, T, S] or [B, T, H, S]; D [H] or None; th0 [B, H, nc, S]
    (chunk_start_phases at ``chunk_size``); S0 [B, H, P, N] fp32 or None; all contiguous.
    ``dot_dtype`` (default v's): dtype of the matmul operands. ``phase`` (default INFER_PHASE):
    1 computes the phase inside the core loop, 2 in a parallel pre-pass (``token_phases``).
    Returns (y [B, T, H, P] in v's dtype, final state [B, H, P, N] fp32)."""
    B, T, G, N = q.shape
    H, P = v.shape[2], v.shape[3]
    S = angles.shape[-1]
    dd = dot_dtype or v.dtype
    vk = v if v.dtype == dd else v.to(dd)
    r = _GroupRun(B, T, H, N, P, chunk_size, v.device, v.dtype, dd, False, False, groups)
    meta = dict(CHUNK=chunk_size, BLOCK_N2=max(16, triton.next_power_of_2(N)) // 2, BLOCK_P=r.meta["BLOCK_P"],
                PREC=r.meta["PREC"], CPG_STATIC=r.meta["CPG_STATIC"],
                num_warps=num_warps or INFER_NUM_WARPS, num_stages=num_stages or INFER_NUM_STAGES)
    qb, kb = q_bias.float().contiguous(), k_bias.float().contiguous()
    phase = 0 if S == 0 or T == 0 else (phase or INFER_PHASE)
    if phase == 2:
        angles = token_phases(dt, angles, th0, chunk_size)
    angles_, th0_ = nonempty(angles, dt), nonempty(th0, dt)
    sa = (angles.stride(0), angles.stride(1), 0 if angles.dim() == 3 else angles.stride(2))
    meta["PHASE"] = phase
    strides = (*q.stride()[:3], *v.stride()[:3], *dt.stride(), *sa)
    grid = (r.ng, B * H)
    sin, has_sin, write_final = r.entering(S0, lambda sg, decg: _infer_state_kernel[grid](
        k, kb, dt, trap, angles_, th0_, vk, dA, sg, decg, T, H, G, r.nc, N, P, S, r.cpg, *strides, **meta))
    _infer_out_kernel[grid](q, k, qb, kb, dt, trap, angles_, th0_, D if D is not None else r.final, vk, dA,
                            z if z is not None else r.y, sin, r.final, r.y, T, H, G, r.nc, N, P, S, r.cpg, *strides,
                            HAS_SIN=has_sin, WRITE_FINAL=write_final, HAS_D=D is not None, HAS_Z=z is not None,
                            **meta)
    return r.y, r.final
