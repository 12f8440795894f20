"""One-pass Mamba-3 SISO forward: the per-token preparation inside the chunk-group core.

The two-pass forward (``triton_siso_fwd.mamba3_fused_fwd``) writes the per-head prepared
QS = rot(q + q_bias), KS = c_t rot(k + k_bias) [B, T, H, N] to memory and reads them back in the
core (at config A, 8x2048, 268 MB each way, more than the inputs and output together). Here the
core program of one (batch, head, group, slice of P) prepares each chunk itself from the raw
q, k (shared by the heads of a group, so mostly L2 hits), dt, trap and angles, carrying the
cumulative rotary phase (fp64, mod 2 pi) through its chunks as it carries the state.

Registers: q, k and the state are held as their even and odd columns (rotation pairs) in
separate [., N/2] tiles; every product over N is the sum of an even and an odd dot, so the
rotated halves never need interleaving, and the state can be split over P between programs
(BLOCK_P < P: each recomputes the chunk's preparation, which is cheap beside its registers).

Launches: with one group per (batch, head) the whole forward is one launch. With several
groups (small batch x heads) the phases entering each chunk come from ``chunk_start_phases``
(unless the caller has them), a state pre-pass gives each group's local end state and the
scan over groups gives the entering states. With ``save`` (training) the kernel also writes
what the backward reads: QS, KS, the skip coefficient, the pre-gate output, the chunk states and
decays, in the layouts of the two-pass forward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_siso_fwd import (INTERPRET, _interleave, _load_chunk, _load_ell, _rotated_pairs, _row_coeffs, _row_phase,
                              _state_scan_kernel, chunk_start_phases, choose_groups, dot_precision, group_pipeline_depth,
                              nonempty, static_loop)

ONEPASS_NUM_WARPS = 4
ONEPASS_NUM_STAGES = None  # None: group_pipeline_depth
ONEPASS_P_SPLIT = 1       # programs sharing one (batch, head, group) over P


@triton.jit
def _prepare_chunk(Q, K, QB, KB, DT, TRAP, ANG, Dp, b, g, h, t, T, N, S,
                   sqb, sqt, sqg, sdb, sdt, sdh, sab, sat, sah, carry,
                   WITH_Q: tl.constexpr, HAS_D: tl.constexpr, BLOCK_N2: tl.constexpr, DOT: tl.constexpr):
    """Rows t (one chunk) of one head from the phase ``carry`` [BLOCK_N2] fp64 entering them:
    (qe, qo, ke, ko) the even / odd columns of rot(q + q_bias) and c_t rot(k + k_bias), each
    [C, BLOCK_N2] in DOT; the skip coefficient D + gamma_t <q_t + q_bias, k_t + k_bias> [C] fp32
    (zeros without WITH_Q, and then qe = qo = ke) and the phase leaving the chunk (mod 2 pi)."""
    dt, gamma, cs = _row_coeffs(DT, TRAP, b, h, t, T, sdb, sdt, sdh)
    cos, sin, rate = _row_phase(ANG, dt, b, h, t, T, S, sab, sat, sah, carry.to(tl.float32), BLOCK_N2)
    carry += tl.sum(dt[:, None] * rate, axis=0).to(tl.float64)
    carry -= 6.283185307179586 * tl.floor(carry * 0.15915494309189535)
    _, _, kre, kro = _rotated_pairs(K, KB, b, g, h, t, T, N, sqb, sqt, sqg, cos, sin, BLOCK_N2)
    if WITH_Q:
        _, _, qre, qro = _rotated_pairs(Q, QB, b, g, h, t, T, N, sqb, sqt, sqg, cos, sin, BLOCK_N2)
        skip = gamma * tl.sum(qre * kre + qro * kro, axis=1)   # a rotation keeps <q, k> (same angle)
        if HAS_D:
            skip += tl.load(Dp + h).to(tl.float32)
        return qre.to(DOT), qro.to(DOT), (kre * cs[:, None]).to(DOT), (kro * cs[:, None]).to(DOT), skip, carry
    kre = (kre * cs[:, None]).to(DOT)
    kro = (kro * cs[:, None]).to(DOT)
    return kre, kro, kre, kro, gamma * 0.0, carry


@triton.jit
def _state_halves(ptr, p, j, P, N):
    """Even / odd columns [BLOCK_P, BLOCK_N2] of a [P, N] fp32 state at ``ptr``."""
    m = (p[:, None] < P) & (2 * j[None, :] < N)
    off = p[:, None] * N + 2 * j[None, :]
    mo = (p[:, None] < P) & (2 * j[None, :] + 1 < N)
    return tl.load(ptr + off, mask=m, other=0.0), tl.load(ptr + off + 1, mask=mo, other=0.0)


@triton.jit
def _store_state_halves(ptr, se, so, p, j, P, N):
    off = p[:, None] * N + 2 * j[None, :]
    tl.store(ptr + off, se.to(ptr.dtype.element_ty), mask=(p[:, None] < P) & (2 * j[None, :] < N))
    tl.store(ptr + off + 1, so.to(ptr.dtype.element_ty), mask=(p[:, None] < P) & (2 * j[None, :] + 1 < N))


@triton.jit
def _phase_entering(PH0, bh, grp, nph, ph_grp, S, HAS_PH0: tl.constexpr, BLOCK_N2: tl.constexpr):
    """fp64 [BLOCK_N2] phase entering group ``grp``: PH0 [B*H, nph, S] at block grp * ph_grp."""
    j = tl.arange(0, BLOCK_N2)
    if HAS_PH0:
        return tl.load(PH0 + (bh * nph + grp * ph_grp) * S + j, mask=j < S, other=0.0).to(tl.float64)
    return tl.zeros([BLOCK_N2], dtype=tl.float64)


@triton.jit
def _onepass_state_kernel(K, V, KB, DT, TRAP, ANG, dA, PH0, SG, DECG, T, H, G, nc, N, P, S, CPG, nph, ph_grp,
                          sqb, sqt, sqg, svb, svt, svh, sdb, sdt, sdh, sab, sat, sah,
                          HAS_PH0: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N2: tl.constexpr, BLOCK_P: tl.constexpr,
                          PREC: tl.constexpr, CPG_STATIC: tl.constexpr):
    """Local end state of chunk group g (zero entering state, [P, N] fp32 -> SG[b, h, g]) and the
    group's total log decay (-> DECG[b, h, g]), preparing k on the fly."""
    grp = tl.program_id(0)
    bh = tl.program_id(1)
    ng = tl.num_programs(0)
    b = bh // H
    h = bh % H
    g = h // (H // G)
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    j = tl.arange(0, BLOCK_N2)
    i = tl.arange(0, CHUNK)
    DOT = V.dtype.element_ty
    carry = _phase_entering(PH0, bh, grp, nph, ph_grp, S, HAS_PH0, BLOCK_N2)
    se = tl.zeros([BLOCK_P, BLOCK_N2], dtype=tl.float32)
    so = tl.zeros([BLOCK_P, BLOCK_N2], dtype=tl.float32)
    total = 0.0
    for jj in range(CPG_STATIC if CPG_STATIC > 0 else CPG):
        c = grp * CPG + jj
        t = c * CHUNK + i
        _, _, ke, ko, _, carry = _prepare_chunk(K, K, KB, KB, DT, TRAP, ANG, KB, b, g, h, t, T, N, S, sqb, sqt, sqg,
                                                sdb, sdt, sdh, sab, sat, sah, carry, False, False, BLOCK_N2, DOT)
        v = tl.load(V + b * svb + t[:, None] * svt + h * svh + p[None, :],
                    mask=(t[:, None] < T) & (p[None, :] < P), other=0.0)
        ell = _load_ell(dA, b, h, c, T, sdb, sdt, sdh, CHUNK)
        last = tl.sum(tl.where(i == CHUNK - 1, ell, 0.0), axis=0)
        vw = tl.trans((v.to(tl.float32) * tl.exp(last - ell)[:, None]).to(DOT))
        se = se * tl.exp(last) + tl.dot(vw, ke, input_precision=PREC)
        so = so * tl.exp(last) + tl.dot(vw, ko, input_precision=PREC)
        total += last
    _store_state_halves(SG + (bh * ng + grp) * P * N, se, so, p, j, P, N)
    tl.store(DECG + bh * ng + grp, total, mask=tl.program_id(2) == 0)


@triton.jit
def _onepass_out_kernel(Q, K, V, QB, KB, DT, TRAP, ANG, dA, Dp, Z, PH0, SIN, Y, YPRE, QS, KS, SKIP, ST, DEC, SF, FIN,
                        T, H, G, nc, N, P, S, CPG, nph, ph_grp,
                        sqb, sqt, sqg, svb, svt, svh, sdb, sdt, sdh, sab, sat, sah,
                        HAS_PH0: tl.constexpr, HAS_SIN: tl.constexpr, WRITE_FINAL: tl.constexpr,
                        WRITE_PHASE: tl.constexpr, HAS_D: tl.constexpr,
                        HAS_Z: tl.constexpr, SAVE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N2: tl.constexpr,
                        BLOCK_P: tl.constexpr, PREC: tl.constexpr, CPG_STATIC: tl.constexpr):
    """Chunk group ``grp`` of one (batch, head), columns p of P: y (gated), from the entering state
    SIN [B, H, ng, P, N] fp32 (HAS_SIN) or zero, and the entering phase PH0. WRITE_FINAL (one group):
    final state -> SF [B, H, P, N], final phase -> FIN [B, H, S]. SAVE: the backward's tensors."""
    grp = tl.program_id(0)
    bh = tl.program_id(1)
    ng = tl.num_programs(0)
    b = bh // H
    h = bh % H
    g = h // (H // G)
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    j = tl.arange(0, BLOCK_N2)
    i = tl.arange(0, CHUNK)
    DOT = V.dtype.element_ty
    carry = _phase_entering(PH0, bh, grp, nph, ph_grp, S, HAS_PH0, BLOCK_N2)
    if HAS_SIN:
        se, so = _state_halves(SIN + (bh * ng + grp) * P * N, p, j, P, N)
    else:
        se = tl.zeros([BLOCK_P, BLOCK_N2], dtype=tl.float32)
        so = tl.zeros([BLOCK_P, BLOCK_N2], dtype=tl.float32)
    strict = i[:, None] > i[None, :]
    first = (i * 0 + tl.program_id(2)) == 0   # the first P slice's program writes the per-token saves
    for jj in range(CPG_STATIC if CPG_STATIC > 0 else CPG):
        c = grp * CPG + jj
        t = c * CHUNK + i
        qe, qo, ke, ko, skip, carry = _prepare_chunk(Q, K, QB, KB, DT, TRAP, ANG, Dp, b, g, h, t, T, N, S, sqb, sqt,
                                                     sqg, sdb, sdt, sdh, sab, sat, sah, carry, True, HAS_D, BLOCK_N2,
                                                     DOT)
        off = b * svb + t[:, None] * svt + h * svh + p[None, :]
        mask = (t[:, None] < T) & (p[None, :] < P)
        v = tl.load(V + off, mask=mask, other=0.0)
        ell = _load_ell(dA, b, h, c, T, sdb, sdt, sdh, CHUNK)
        last = tl.sum(tl.where(i == CHUNK - 1, ell, 0.0), axis=0)
        scores = tl.dot(qo, tl.trans(ko), tl.dot(qe, tl.trans(ke), input_precision=PREC), input_precision=PREC)
        scores *= tl.exp(tl.where(strict, ell[:, None] - ell[None, :], -float("inf")))
        y = tl.dot(qo, tl.trans(so.to(DOT)), tl.dot(qe, tl.trans(se.to(DOT)), input_precision=PREC),
                   input_precision=PREC) * tl.exp(ell)[:, None]
        y = tl.dot(scores.to(DOT), v, y, input_precision=PREC)
        y += skip[:, None] * v.to(tl.float32)
        if SAVE:
            tl.store(YPRE + off, y.to(YPRE.dtype.element_ty), mask=mask)
            if c < nc:
                _store_state_halves(ST + (bh * nc + c) * P * N, se, so, p, j, P, N)
                tl.store(DEC + bh * nc + c, last, mask=tl.program_id(2) == 0)
            n = tl.arange(0, 2 * BLOCK_N2)
            qk_off = ((b * T + t[:, None]) * H + h) * N + n[None, :]
            qk_mask = (t[:, None] < T) & (n[None, :] < N) & first[:, None]
            tl.store(QS + qk_off, _interleave(qe, qo, CHUNK, 2 * BLOCK_N2), mask=qk_mask)
            tl.store(KS + qk_off, _interleave(ke, ko, CHUNK, 2 * BLOCK_N2), mask=qk_mask)
            tl.store(SKIP + (b * T + t) * H + h, skip, mask=(t < T) & first)
        if HAS_Z:
            z = tl.load(Z + off, mask=mask, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(Y + off, y.to(Y.dtype.element_ty), mask=mask)
        vw = tl.trans((v.to(tl.float32) * tl.exp(last - ell)[:, None]).to(DOT))
        se = se * tl.exp(last) + tl.dot(vw, ke, input_precision=PREC)
        so = so * tl.exp(last) + tl.dot(vw, ko, input_precision=PREC)
    if WRITE_FINAL:
        _store_state_halves(SF + bh * P * N, se, so, p, j, P, N)
    if WRITE_PHASE:
        tl.store(FIN + bh * S + j, carry.to(tl.float32), mask=(j < S) & ((j * 0 + tl.program_id(2)) == 0))


def mamba3_onepass_fwd(q, k, v, dA, dt, trap, q_bias, k_bias, angles, D, z, a0, S0, chunk_size, *,
                       phases=None, save=False, dot_dtype=None, groups=None, p_split=None):
    """Mamba-3 SISO forward in one pass over the raw inputs (contiguous; dA, dt, trap [B, T, H] with
    equal strides; q, k [B, T, G, N]; angles [B, T, S] or [B, T, H, S]; a0 [B, H, S] entering phase
    or None; S0 [B, H, P, N] fp32 entering state or None). ``phases``: (th0 [B, H, nblk, S] the phases
    entering each block of ``rows`` tokens, the final phase [B, H, S], rows) from
    ``chunk_start_phases`` if the caller has them (else computed here when needed).

    Returns (y [B, T, H, P] in v's dtype, saved, entering chunk states, chunk decays, final state
    fp32, final phase [B, H, S] fp32); saved = (y before the gate, QS, KS [B, T, H, N], skip
    [B, T, H] fp32), states and decays only with ``save`` (the two-pass forward's layouts)."""
    B, T, G, N = q.shape
    H, P, S = v.shape[2], v.shape[3], angles.shape[-1]
    C = chunk_size
    dd = dot_dtype or v.dtype
    vk = v if v.dtype == dd else v.to(dd)
    dev = v.device
    nc = max(1, triton.cdiv(T, C))
    ng = groups or choose_groups(nc, B * H)
    cpg = triton.cdiv(nc, ng)
    ng = triton.cdiv(nc, cpg)
    split = p_split or ONEPASS_P_SPLIT
    BP = max(16, triton.next_power_of_2(triton.cdiv(P, split)))
    BN2 = max(16, triton.next_power_of_2(N) // 2)
    final = torch.empty(B, H, P, N, device=dev, dtype=torch.float32)
    fin_phase = torch.empty(B, H, S, device=dev, dtype=torch.float32)
    y = torch.empty(B, T, H, P, device=dev, dtype=v.dtype)
    ypre = torch.empty_like(y) if save and z is not None else y
    st_dtype = torch.float32 if dd == torch.float32 else dd
    states = torch.empty(B, H, nc, P, N, device=dev, dtype=st_dtype) if save else final
    dec = torch.empty(B, H, nc, device=dev, dtype=torch.float32) if save else final
    QS = torch.empty(B, T, H, N, device=dev, dtype=dd) if save else y
    KS = torch.empty_like(QS) if save else y
    skip = torch.empty(B, T, H, device=dev, dtype=torch.float32) if save else final
    # the phase entering each group
    th0 = None
    if phases is not None:
        th0, fin_phase, rows = phases
    elif ng > 1 and S > 0:
        th0, fin_phase = chunk_start_phases(dt, angles, a0, C)
        rows = C
    if th0 is not None and S > 0:
        ph0, nph, ph_grp = th0, th0.shape[2], cpg * C // rows
    elif a0 is not None and S > 0:
        ph0, nph, ph_grp = a0.float().contiguous(), 1, 0
    else:
        ph0, nph, ph_grp = None, 1, 0
    sa = (angles.stride(0), angles.stride(1), 0 if angles.dim() == 3 else angles.stride(2))
    angles_ = nonempty(angles, dt)
    qb, kb = q_bias.float().contiguous(), k_bias.float().contiguous()
    prec = dot_precision(dd)
    meta = dict(CHUNK=C, BLOCK_N2=BN2, BLOCK_P=BP, PREC=prec, CPG_STATIC=static_loop(cpg),
                num_warps=8 if prec == "ieee" else ONEPASS_NUM_WARPS, num_stages=ONEPASS_NUM_STAGES or group_pipeline_depth(dd, dev))
    grid = (ng, B * H, triton.cdiv(P, BP))
    common = (T, H, G, nc, N, P, S, cpg, nph, ph_grp, *q.stride()[:3], *vk.stride()[:3], *dt.stride(), *sa)
    ph = ph0 if ph0 is not None else final
    fin_ptr = nonempty(fin_phase, final) if th0 is None else final   # the kernel writes the phase only if not known
    if ng == 1:
        sin, has_sin = (S0, True) if S0 is not None else (final, False)
    else:
        sg = torch.empty(B, H, ng, P, N, device=dev, dtype=torch.float32)
        decg = torch.empty(B, H, ng, device=dev, dtype=torch.float32)
        _onepass_state_kernel[grid](k, vk, kb, dt, trap, angles_, dA, ph, sg, decg, *common,
                                    HAS_PH0=ph0 is not None, **meta)
        PN = P * N
        BLOCK = min(512, triton.next_power_of_2(PN))
        _state_scan_kernel[(triton.cdiv(PN, BLOCK), B * H)](sg, decg, S0 if S0 is not None else final, final, ng, PN,
                                                           HAS_S0=S0 is not None, BLOCK=BLOCK,
                                                           NC_STATIC=static_loop(ng), num_warps=4)
        sin, has_sin = sg, True
    _onepass_out_kernel[grid](q, k, vk, qb, kb, dt, trap, angles_, dA, D if D is not None else final,
                              z if z is not None else y, ph, sin, y, ypre, QS, KS, skip, states, dec, final,
                              fin_ptr, *common, HAS_PH0=ph0 is not None, HAS_SIN=has_sin, WRITE_FINAL=ng == 1,
                              WRITE_PHASE=th0 is None,
                              HAS_D=D is not None, HAS_Z=z is not None, SAVE=save, **meta)
    if S == 0:
        fin_phase = torch.zeros(B, H, 0, device=dev, dtype=torch.float32)
    saved = (ypre, QS, KS, skip) if save else None
    return y, saved, (states if save else None), (dec if save else None), final, fin_phase
