"""Mamba-2 SSD, chunked PyTorch form (training path; hand-written backward).

Per head, inside a chunk of L tokens with l = inclusive cumsum of dt*A and xd = dt*x:
    y_t = sum_{s<=t} (C_t . B_s) exp(l_t - l_s) xd_s  +  exp(l_t) S_in C_t,
    S_out = exp(l_last) S_in + sum_s exp(l_last - l_s) xd_s B_s^T,
a masked quadratic ("attention-like") form inside the chunk and a short scan over chunks.

The quadratic form is evaluated in Q-token tiles (Q = SUBCHUNK, when L/Q is a power of two), and
every tile is one matmul of the group's C.B block (shared by the group's heads) with xd of all
those heads side by side, because the decay between two tokens factors through any token m
between them: exp(l_t - l_s) = exp(l_t - l_m) exp(l_m - l_s), a per-head row factor times a
per-head column factor.
- tiles below the diagonal, by levels of halving blocks: in each block of 2h tokens the quadrant
  of later-half rows and earlier-half columns, m = the last token of the earlier half (both
  factors <= 1), h = L/2, L/4, ..., Q: every level is one batched matmul;
- diagonal tiles: m = the tile's middle token, the causal mask on C.B; the factors are bounded
  by exp(+-DIAG_RANGE) when the tile's log decay on either side of m is within DIAG_RANGE, and
  the rare (tile, head) pairs beyond that are redone with their exact per-head Q x Q mask;
- tiles above the diagonal are zero and skipped.
This is the same chunk-L computation (state passing every L tokens), only without materialising
a per-head L x L mask. Negative exponents are clamped at -EXP_FLOOR: exp's underflow path is
~15x slower on CPU, and the clamped values are far below the dtype's resolution.

Backward (by hand, recomputing the cheap per-token factors; saves x, dt, B, C, y and the chunk
states): d xd, dC, dB mirror the forward tiles; the log-decay gradient needs no per-pair term,
    d l_t = sum_p dy_t y_t - sum_p xd_t d xd_t  (+ <dS_out, S_out> at the chunk's last token),
because every pair (t, s) contributes +/- the same amount to l_t and l_s.

Time is padded to a multiple of the chunk with dt = 0 (no decay, no input), which is exact; the
same trick makes packed sequences (cu_seqlens) exact when unpacked into a right-padded batch.
Layout: "group-major" [B * nc * G, L, H/G, P] so that every shared-B/C contraction is one batched
matmul over (batch, chunk, group) with the group's heads side by side (a view of [B, T, H, P]
when G = 1).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..utils import compute_dtype, pack_to_padded, padded_to_pack

# Smallest log decay fed to exp (exp(-80) ~ 2e-35 is still a normal float32; exp(-700) ~ 1e-304).
EXP_FLOOR = {torch.float32: 80.0, torch.float64: 700.0}
SUBCHUNK = 32  # tile of the intra-chunk quadratic form
# Largest |log| of the diagonal tiles' rank-1 factors (e^60 ~ 1e26 leaves float32 headroom for the sums).
DIAG_RANGE = {torch.float32: 60.0, torch.float64: 600.0}


def ssd_chunked(x, dt, A, B, C, D=None, z=None, *, initial_state: Optional[Tensor] = None,
                return_final_state: bool = False, cu_seqlens: Optional[Tensor] = None, chunk_size: int = 64):
    """Chunked SSD (same signature as :func:`mamba3.ops.mamba2.ssd`)."""
    if cu_seqlens is not None:
        pad = lambda t: None if t is None else pack_to_padded(t, cu_seqlens)
        y, final = _chunked(pad(x), pad(dt), A, pad(B), pad(C), D, pad(z), initial_state,
                            return_final_state, chunk_size)
        return padded_to_pack(y, cu_seqlens), final
    return _chunked(x, dt, A, B, C, D, z, initial_state, return_final_state, chunk_size)


def _chunked(x, dt, A, B, C, D, z, initial_state, return_final_state, chunk_size):
    Bsz, T, H, P = x.shape
    N = B.shape[-1]
    out_dtype = x.dtype
    cd = compute_dtype(x, dt, B, C)
    cast = lambda t: None if t is None else t.to(cd)
    if T == 0:  # nothing consumed: the state passes through
        y = x.new_zeros(Bsz, 0, H, P)
        final = None
        if return_final_state:
            final = x.new_zeros(Bsz, H, P, N, dtype=cd) if initial_state is None else cast(initial_state).clone()
        return y, final
    if D is not None and D.dim() == 1:
        D = D[:, None]
    L, Q = min(chunk_size, T), SUBCHUNK
    nb = chunk_size // Q
    if L > Q and chunk_size % Q == 0 and nb & (nb - 1) == 0:
        L = Q << (-(-L // Q) - 1).bit_length()   # short sequence: one chunk of 2^k tiles (<= chunk_size)
    else:
        Q = L
    y, final = _SSDChunked.apply(cast(x), cast(dt), cast(A), cast(B), cast(C), cast(D), cast(initial_state), L, Q)
    if z is not None:
        y = y * F.silu(z.to(cd))
    return y.to(out_dtype), (final if return_final_state else None)


# ---------------------------------------------------------------------------------------------
def _group_major(t: Tensor, nc: int, L: int, G: int) -> Tensor:
    """[Bsz, T, H, ...] -> [Bsz*nc*G, L, H/G, ...], zero-padded to nc*L tokens (a view when G = 1,
    no padding and t is contiguous)."""
    Bsz, T, H = t.shape[:3]
    rest = t.shape[3:]
    if nc * L != T:
        t = F.pad(t, (0, 0) * (len(rest) + 1) + (0, nc * L - T))
    t = t.reshape(Bsz, nc, L, G, H // G, *rest)
    if G > 1:
        t = t.transpose(2, 3)
    return t.reshape(Bsz * nc * G, L, H // G, *rest)


def _time_major(t: Tensor, Bsz: int, nc: int, G: int, T: int) -> Tensor:
    """Inverse of :func:`_group_major`: [Bsz*nc*G, L, K, ...] -> [Bsz, T, G*K, ...]."""
    L, K = t.shape[1:3]
    rest = t.shape[3:]
    t = t.view(Bsz, nc, G, L, K, *rest)
    if G > 1:
        t = t.transpose(2, 3)
    return t.reshape(Bsz, nc * L, G * K, *rest)[:, :T]


def _exp(t: Tensor, floor: float) -> Tensor:
    """exp of a fresh tensor of non-positive log decays, in place, clamped at -floor."""
    return t.clamp_(min=-floor).exp_()


def _diag_tiles(CB: Tensor, nb: int, Q: int) -> Tensor:
    """CB [Bn, L, L] -> its diagonal Q x Q tiles [Bn, nb, Q, Q] (a view)."""
    Bn = CB.shape[0]
    return CB.view(Bn, nb, Q, nb, Q).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)


class _Diag:
    """The diagonal Q x Q tiles of every chunk in shared-C.B form. With c the tile's middle token,
    exp(l_t - l_s) = exp(l_t - l_c) exp(l_c - l_s), so a tile is u * (tril(C.B) @ (v * xd)) for all
    of the group's heads in one matmul (u, v per head). Both factors stay within exp(+-lim)
    (DIAG_RANGE) when the tile's log decay on either side of c is at most lim; the (tile, head)
    pairs beyond that ("bad": only for extreme decays) are redone with their own exact Q x Q mask."""

    def __init__(self, p: "_Prep"):
        Q, K = p.Q, p.K
        self.n, self.Q, self.K, self.P = p.Bn * p.nb, Q, K, p.P
        lim = DIAG_RANGE[p.ell.dtype]
        self.ell = p.ell.view(self.n, Q, K)
        du = self.ell - self.ell[:, (Q - 1) // 2].unsqueeze(1)               # l_t - l_c  [n, Q, K]
        bad = (du[:, 0] > lim) | (du[:, -1] < -lim)                           # [n, K]
        self.bad = bad.nonzero().unbind(1) if bool(bad.any()) else None      # (tiles, heads)
        self.u = du.clamp(-lim, lim).exp_().unsqueeze(-1)                    # [n, Q, K, 1]
        self.v = du.neg_().clamp_(-lim, lim).exp_()                          # [n, Q, K]
        self.dt = p.dt.view(self.n, Q, K)
        self.xs, self.buf = p.xs, p.buf
        self.cb = _diag_tiles(p.CB, p.nb, Q).tril().reshape(self.n, Q, Q)   # causal, shared by heads
        self.floor = p.floor

    def tiles(self, t: Tensor) -> Tensor:
        """[Bn, L, K, P] -> [n, Q, K, P] (a view)."""
        return t.view(self.n, self.Q, self.K, self.P)

    def w(self, i: int) -> Tensor:
        """v * xd of every tile, [n, Q, K*P] (xd = dt x), in scratch buffer i."""
        out = self.buf(i, self.n, self.Q, self.K, self.P)
        torch.mul(self.tiles(self.xs), (self.v * self.dt).unsqueeze(-1), out=out)
        return out.view(self.n, self.Q, self.K * self.P)

    def xd_bad(self) -> Tensor:
        """xd of the bad (tile, head) pairs, [m, Q, P]."""
        tiles, heads = self.bad
        return self.tiles(self.xs)[tiles, :, heads] * self.dt[tiles, :, heads].unsqueeze(-1)

    def exact(self):
        """The bad pairs' decay masks M [m, Q, Q] and scores M * tril(C.B)."""
        tiles, heads = self.bad
        e = self.ell[tiles, :, heads]                                        # [m, Q]
        M = (e.unsqueeze(-1) - e.unsqueeze(-2)).clamp_(-self.floor, 0.0).exp_()
        return M, M * self.cb[tiles]

    def forward(self, y: Tensor) -> None:
        """y += the diagonal tiles' output (in place)."""
        n, Q = self.n, self.Q
        R = torch.bmm(self.cb, self.w(0), out=self.buf(1, n, Q, self.K * self.P)).view(n, Q, self.K, self.P)
        if self.bad is None:
            self.tiles(y).addcmul_(R, self.u)
            return
        tiles, heads = self.bad
        R.mul_(self.u)
        _, scores = self.exact()
        R[tiles, :, heads] = torch.bmm(scores, self.xd_bad())
        self.tiles(y).add_(R)

    def backward(self, dy: Tensor, dxd: Tensor) -> Tensor:
        """dxd += the tiles' d xd (in place); returns d tril(C.B) of the tiles [n, Q, Q]."""
        n, Q, KP = self.n, self.Q, self.K * self.P
        U = torch.mul(self.tiles(dy), self.u, out=self.buf(0, n, Q, self.K, self.P))
        if self.bad is not None:
            U[self.bad[0], :, self.bad[1]] = 0
        U = U.view(n, Q, KP)
        W = self.w(1)
        dcb = torch.bmm(U, W.transpose(1, 2))
        dW = torch.bmm(self.cb.transpose(1, 2), U, out=W)
        self.tiles(dxd).addcmul_(dW.view(n, Q, self.K, self.P), self.v.unsqueeze(-1))
        if self.bad is not None:
            tiles, heads = self.bad
            M, scores = self.exact()
            dyk, xk = self.tiles(dy)[tiles, :, heads], self.xd_bad()                  # [m, Q, P]
            dcb.index_add_(0, tiles, torch.bmm(dyk, xk.transpose(1, 2)).mul_(M))
            self.tiles(dxd)[tiles, :, heads] += torch.bmm(scores.transpose(1, 2), dyk)
        return dcb.tril_()


class _Quadrants:
    """One level of the below-diagonal tiling: the chunk cut into blocks of 2h tokens, and in each
    block the h x h quadrant of later-half rows t and earlier-half columns s. The decay factors
    through m = the block's token h - 1: u = exp(l_t - l_m) <= 1 per row, v = exp(l_m - l_s) <= 1
    per column, so the quadrant is u * (C.B quadrant @ (v * xd)) for all the group's heads at once.
    Levels h = L/2, L/4, ..., Q cover every tile below the diagonal exactly once."""

    def __init__(self, p: "_Prep", h: int):
        S = 2 * h
        self.nblk, self.h, self.m = p.L // S, h, p.Bn * (p.L // S)
        self.K, self.P = p.K, p.P
        eb = p.ell.view(self.m, S, p.K)
        ref = eb[:, h - 1 : h]
        self.u = _exp(eb[:, h:] - ref, p.floor).unsqueeze(-1)                 # [m, h, K, 1]
        v = _exp(ref - eb[:, :h], p.floor)                                     # [m, h, K]
        self.v = v.unsqueeze(-1)
        self.vdt = v * p.dt.view(self.m, S, p.K)[:, :h]
        self.xs, self.buf = p.xs, p.buf
        self.cbq = self.quadrant(p.CB).reshape(self.m, h, h)                   # small copy

    def quadrant(self, CB: Tensor) -> Tensor:
        """[Bn, L, L] -> the level's quadrants [Bn, nblk, h, h] (a view)."""
        S, n = 2 * self.h, self.nblk
        blocks = CB.view(CB.shape[0], n, S, n, S).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)
        return blocks[..., self.h :, : self.h]

    def halves(self, t: Tensor):
        """[Bn, L, K, P] -> (earlier, later) halves [m, h, K, P] of every block (views)."""
        b = t.view(self.m, 2, self.h, self.K, self.P)
        return b[:, 0], b[:, 1]

    def w(self, i: int) -> Tensor:
        """v * xd of the earlier halves, [m, h, K*P], in scratch buffer i."""
        out = self.buf(i, self.m, self.h, self.K, self.P)
        torch.mul(self.halves(self.xs)[0], self.vdt.unsqueeze(-1), out=out)
        return out.view(self.m, self.h, self.K * self.P)

    def forward(self, y: Tensor) -> None:
        R = torch.bmm(self.cbq, self.w(0), out=self.buf(1, self.m, self.h, self.K * self.P))
        self.halves(y)[1].addcmul_(R.view(self.m, self.h, self.K, self.P), self.u)

    def backward(self, dy: Tensor, dxd: Tensor, dCB: Tensor) -> None:
        U = torch.mul(self.halves(dy)[1], self.u, out=self.buf(0, self.m, self.h, self.K, self.P))
        U = U.view(self.m, self.h, self.K * self.P)
        W = self.w(1)
        self.quadrant(dCB).copy_(torch.bmm(U, W.transpose(1, 2)).view(-1, self.nblk, self.h, self.h))
        dW = torch.bmm(self.cbq.transpose(1, 2), U, out=W).view(self.m, self.h, self.K, self.P)
        self.halves(dxd)[0].addcmul_(dW, self.v)


def _levels(L: int, Q: int):
    """Half-block sizes of the below-diagonal levels, coarse to fine (L / Q a power of two)."""
    h = L // 2
    while h >= Q:
        yield h
        h //= 2


class _Prep:
    """Recomputable per-chunk quantities shared by forward and backward."""

    def __init__(self, x, dt, A, B, C, L, Q):
        Bsz, T, H, P = x.shape
        G, N = B.shape[-2:]
        self.Bsz, self.T, self.H, self.P, self.G, self.N = Bsz, T, H, P, G, N
        self.K, self.L, self.Q = H // G, L, Q
        self.nc = -(-T // L)
        self.nb = L // Q
        self.Bn = Bsz * self.nc * G
        self.floor = EXP_FLOOR[x.dtype]
        gm = lambda t: _group_major(t, self.nc, L, G)
        self.dt = gm(dt)                                                 # [Bn, L, K]
        self.A = A.view(1, G, 1, self.K)
        self.ell = torch.cumsum((self.dt.view(-1, G, L, self.K) * self.A).view(self.Bn, L, self.K), dim=1)
        xs = gm(x)                                                       # [Bn, L, K, P]
        s1 = xs.stride(1)
        if xs.stride() != (L * s1, s1, P, 1):  # rows of a wider tensor (the conv output) stay a view
            xs = xs.contiguous()
        self.xs = xs
        self.Bg = gm(B).view(self.Bn, L, N)                              # [Bn, L, N]
        self.Cg = gm(C).view(self.Bn, L, N)
        self.CB = torch.bmm(self.Cg, self.Bg.transpose(1, 2))            # [Bn, L, L]
        self.last = self.ell[:, -1]                                      # [Bn, K]
        self._bufs = [None, None]

    def w_end(self) -> Tensor:
        """exp(l_last - l_s) [Bn, L, K]: decay from each token to its chunk's end."""
        return _exp(self.last.unsqueeze(1) - self.ell, self.floor)

    def xd(self, f: Tensor) -> Tensor:
        """f * xd, [Bn, L, K*P] in scratch buffer 0 (f [Bn, L, K]; xd = dt x is never materialised:
        one pass over x per scaled copy)."""
        out = self.buf(0, self.Bn, self.L, self.K, self.P)
        torch.mul(self.xs, (self.dt * f).unsqueeze(-1), out=out)
        return out.view(self.Bn, self.L, self.K * self.P)

    def buf(self, i: int, *shape) -> Tensor:
        """Scratch buffer i (two, at least [Bn, L, K, P] floats) viewed as ``shape``: the passes of
        one call reuse them instead of touching fresh pages for every temporary (page faults on
        fresh memory cost about as much as a matmul here)."""
        n = 1
        for d in shape:
            n *= d
        if self._bufs[i] is None or self._bufs[i].numel() < n:
            self._bufs[i] = self.xs.new_empty(max(n, self.Bn * self.L * self.K * self.P))
        return self._bufs[i][:n].view(shape)

    def decay(self) -> Tensor:
        """exp(l_last) per chunk and head, [Bsz, nc, H, 1, 1]."""
        return _exp(self.last.clone(), self.floor).view(self.Bsz, self.nc, self.H, 1, 1)


def _forward(p: _Prep, D, s0):
    """Returns (y [Bsz, T, H, P], entering states [Bsz, nc, H, P, N], final state [Bsz, H, P, N])."""
    Bn, L, K, P, Q, N = p.Bn, p.L, p.K, p.P, p.Q, p.N
    # Chunk-local end states, then the scan over chunks, in place: S[:, c] becomes chunk c's
    # entering state.
    S = torch.bmm(p.xd(p.w_end()).transpose(1, 2), p.Bg).view(p.Bsz, p.nc, p.H, P, N)
    decay = p.decay()
    run = S.new_zeros(p.Bsz, p.H, P, N) if s0 is None else s0
    for c in range(p.nc):
        nxt = torch.addcmul(S[:, c], decay[:, c], run)
        S[:, c] = run
        run = nxt
    # Entering state read by every token: y = exp(l_t) C_t S_in^T.
    if s0 is not None or p.nc > 1:
        y = torch.bmm(p.Cg, S.view(Bn, K * P, N).transpose(1, 2)).view(Bn, L, K, P)
        y.mul_(_exp(p.ell.clone(), p.floor).unsqueeze(-1))
    else:
        y = p.ell.new_zeros(Bn, L, K, P)
    # Tiles below the diagonal, by quadrant levels.
    for h in _levels(L, Q):
        _Quadrants(p, h).forward(y)
    # Diagonal tiles.
    _Diag(p).forward(y)
    y = _time_major(y, p.Bsz, p.nc, p.G, p.T)
    return y, S, run


def _backward(p: _Prep, x, D, s0, y, S, final, dy, dS_final, needs):
    Bn, L, K, P, Q, nb, N, Bsz, nc, H = p.Bn, p.L, p.K, p.P, p.Q, p.nb, p.N, p.Bsz, p.nc, p.H
    ell = p.ell
    if dy is None:
        dy = torch.zeros_like(y)
    dyg = _group_major(dy, nc, L, p.G).contiguous()                      # [Bn, L, K, P]
    # Reverse scan, in place: dS[:, c] = dS_in[c] (through y) becomes dS_out[c], the gradient of
    # chunk c's end state.
    decay = p.decay()
    uses_s_in = s0 is not None or nc > 1
    run = ell.new_zeros(Bsz, H, P, N) if dS_final is None else dS_final
    dS = p.buf(1, Bsz, nc, H, P, N)
    if uses_s_in:
        ey = torch.mul(dyg, _exp(ell.clone(), p.floor).unsqueeze(-1), out=p.buf(0, Bn, L, K, P))
        ey = ey.view(Bn, L, K * P)
        torch.bmm(ey.transpose(1, 2), p.Cg, out=dS.view(Bn, K * P, N))
        dC = torch.bmm(ey, S.view(Bn, K * P, N))
        for c in range(nc - 1, -1, -1):
            prev = torch.addcmul(dS[:, c], decay[:, c], run)                 # dS_out[c - 1] (c = 0: ds0)
            dS[:, c] = run
            run = prev
    else:
        dC = ell.new_zeros(Bn, L, N)
        dS[:, 0] = run
    ds0 = run if s0 is not None else None
    dSo = dS.view(Bn, K * P, N)
    dlast = ell.new_empty(Bsz, nc, H)                                    # <dS_out, S_out>; S_out[c] = S[c + 1]
    torch.sum(dS[:, :-1] * S[:, 1:], (-1, -2), out=dlast[:, :-1])
    torch.sum(dS[:, -1] * final, (-1, -2), out=dlast[:, -1])
    # Through the chunk end states: d xd, dB and the decay to the chunk end.
    w_end = p.w_end()
    dxd = torch.bmm(p.Bg, dSo.transpose(1, 2)).view(Bn, L, K, P).mul_(w_end.unsqueeze(-1))
    dB = torch.bmm(p.xd(w_end), dSo)                                     # [Bn, L, N]
    # Tiles below the diagonal.
    dCB = ell.new_zeros(Bn, L, L)
    for h in _levels(L, Q):
        _Quadrants(p, h).backward(dyg, dxd, dCB)
    # Diagonal tiles.
    _diag_tiles(dCB, nb, Q).copy_(_Diag(p).backward(dyg, dxd).view(Bn, nb, Q, Q))
    dC += torch.bmm(dCB, p.Bg)
    dB += torch.bmm(dCB.transpose(1, 2), p.Cg)
    # Log decays: d l_t = sum_p (dy y_ssd - xd d xd) (+ <dS_out, S_out> at the chunk end).
    yg = _group_major(y, nc, L, p.G)
    dot = lambda a, b: torch.mul(a, b, out=p.buf(0, Bn, L, K, P)).sum(-1)    # sum_p, [Bn, L, K]
    xdxd = dot(p.xs, dxd)                                                # sum_p x d xd
    dell = dot(dyg, yg) - xdxd * p.dt
    dD = None
    if D is not None and D.shape[-1] == 1:  # y_ssd = y - D x; per-head D: one reduction serves both
        dyx = dot(dyg, p.xs)                                             # sum_p dy x
        dell -= dyx * D.view(1, p.G, 1, K).expand(Bsz * nc, -1, -1, -1).reshape(Bn, 1, K)
        dD = dyx.view(Bsz * nc, p.G, L, K).sum((0, 2)).reshape(H, 1)
    elif D is not None:
        dell -= (dyg * _group_major(x * D, nc, L, p.G)).sum(-1)
        dD = (dy * x).sum((0, 1))
    dell[:, -1] += dlast.view(Bn, K)
    da = dell.flip(1).cumsum(1).flip(1)                                  # ell = cumsum(a), a = dt A
    # Back to [Bsz, T, H(, P)] and through xd = dt x, a = dt A, y += D x.
    tm = lambda t: _time_major(t, Bsz, nc, p.G, p.T)
    dxd_t, dy_t = tm(dxd), dy
    dt_ = p.dt
    grads = {}
    if needs["x"]:
        dx = dxd_t.mul_(tm(dt_).unsqueeze(-1))                           # d xd's memory becomes dx
        if D is not None:
            dx = dx.addcmul_(dy_t, D)
        grads["x"] = dx
    if needs["dt"]:
        grads["dt"] = tm((da.view(-1, p.G, L, K) * p.A).view(Bn, L, K) + xdxd)
    if needs["A"]:
        grads["A"] = (da * dt_).view(Bsz * nc, p.G, L, K).sum((0, 2)).reshape(H)
    grads["D"] = dD
    if needs["B"]:
        grads["B"] = tm(dB.view(Bn, L, 1, N))
    if needs["C"]:
        grads["C"] = tm(dC.view(Bn, L, 1, N))
    grads["s0"] = ds0
    return grads


class _SSDChunked(torch.autograd.Function):
    """(x, dt, A, B, C, D [H, P] | None, s0 | None, L, Q) -> (y [Bsz, T, H, P], final state)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, s0, L, Q):
        p = _Prep(x, dt, A, B, C, L, Q)
        y, S, final = _forward(p, D, s0)
        if D is not None:
            y.addcmul_(x, D)
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(x, dt, A, B, C, D, s0, y, S, final)
            ctx.LQ = (L, Q)
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, D, s0, y, S, final = ctx.saved_tensors
        p = _Prep(x, dt, A, B, C, *ctx.LQ)
        names = ("x", "dt", "A", "B", "C", "D", "s0")
        g = _backward(p, x, D, s0, y, S, final, dy, dfinal, dict(zip(names, ctx.needs_input_grad)))
        return tuple(g.get(n) for n in names) + (None, None)
