"""Mamba3 layer with is_mimo=True: a hand-written per-token MIMO layer, decode, continuation,
varlen, parameter layout and validation."""
import math

import pytest
import torch
import torch.nn.functional as F

from mamba3 import Mamba3


def hand_written_mimo(m: Mamba3, u: torch.Tensor) -> torch.Tensor:
    """Per-token MIMO Mamba-3 from SPEC sections 1-4, complex numbers for the split-half rotation."""
    Bsz, T, _ = u.shape
    H, P, N, G, S, R = m.nheads, m.headdim, m.d_state, m.ngroups, m.num_rope_angles, m.mimo_rank
    d_in, half = m.d_inner, N // 2
    proj = u @ m.in_proj.weight.T
    out = torch.zeros(Bsz, T, d_in, dtype=u.dtype)
    rms = lambda v, w: v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    for b in range(Bsz):
        h = torch.zeros(H, P, N, dtype=u.dtype)
        phase = torch.zeros(H, S, dtype=u.dtype)
        k_prev = torch.zeros(H, R, N, dtype=u.dtype)
        x_prev = torch.zeros(H, P, dtype=u.dtype)
        for t in range(T):
            row = proj[b, t]
            z, x = row[:d_in].view(H, P), row[d_in : 2 * d_in].view(H, P)
            o = 2 * d_in
            Bv = row[o : o + R * G * N].view(R, G, N)                          # rank-major, then group
            Cv = row[o + R * G * N : o + 2 * R * G * N].view(R, G, N)
            o += 2 * R * G * N
            dd_dt, dd_A, trap, ang = row[o : o + H], row[o + H : o + 2 * H], row[o + 2 * H : o + 3 * H], row[o + 3 * H :]
            A = -torch.clamp(F.softplus(dd_A), min=m.A_floor)
            dt = F.softplus(dd_dt + m.dt_bias)
            lam = torch.sigmoid(trap)
            Bv, Cv = rms(Bv, m.B_norm.weight), rms(Cv, m.C_norm.weight)
            for hh in range(H):
                g = hh * G // H
                phase[hh] = phase[hh] + dt[hh] * math.pi * torch.tanh(ang)
                rot = torch.polar(torch.ones_like(phase[hh]), phase[hh])

                def rotate(vec):                       # pairs (i, i + N/2), i < S
                    c = torch.complex(vec[:S], vec[half : half + S]) * rot
                    r = vec.clone()
                    r[:S], r[half : half + S] = c.real, c.imag
                    return r

                k_t = torch.stack([rotate(Bv[r, g] + m.B_bias[hh, r]) for r in range(R)])
                q_t = torch.stack([rotate(Cv[r, g] + m.C_bias[hh, r]) for r in range(R)])
                X, Xp = m.mimo_x[hh] * x[hh], m.mimo_x[hh] * x_prev[hh]       # [R, P]
                alpha = torch.exp(A[hh] * dt[hh])
                h[hh] = (alpha * h[hh] + (1 - lam[hh]) * dt[hh] * alpha * sum(torch.outer(Xp[r], k_prev[hh, r]) for r in range(R))
                         + lam[hh] * dt[hh] * sum(torch.outer(X[r], k_t[r]) for r in range(R)))
                acc = torch.zeros(P, dtype=u.dtype)
                for r in range(R):
                    y = h[hh] @ q_t[r] + m.D[hh] * X[r]
                    if m.is_outproj_norm:
                        y = rms(y, m.norm.weight.view(H, P)[hh])
                    acc = acc + m.mimo_o[hh, r] * y * F.silu(m.mimo_z[hh, r] * z[hh])
                out[b, t, hh * P : (hh + 1) * P] = acc
                k_prev[hh], x_prev[hh] = k_t, x[hh]
    return out @ m.out_proj.weight.T


def make(R=2, **kw):
    torch.manual_seed(0)
    base = dict(d_model=16, d_state=8, headdim=4, chunk_size=3, is_mimo=True, mimo_rank=R)
    base.update(kw)
    m = Mamba3(**base).double()
    with torch.no_grad():  # make biases, norms and MIMO vectors non-trivial
        for name, p in m.named_parameters():
            if name not in ("in_proj.weight", "out_proj.weight", "dt_bias"):
                p.add_(0.3 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("kw", [dict(), dict(R=1), dict(R=4, ngroups=2), dict(is_outproj_norm=True),
                                dict(R=4, rope_fraction=1.0, is_outproj_norm=True)])
def test_layer_matches_hand_written(kw):
    m = make(**kw)
    u = torch.randn(2, 7, 16, dtype=torch.float64)
    torch.testing.assert_close(m(u), hand_written_mimo(m, u), atol=1e-10, rtol=0)


@pytest.mark.parametrize("kw", [dict(R=1), dict(R=2), dict(R=4, is_outproj_norm=True), dict(R=2, rope="fixed"),
                                dict(R=2, rope="none", is_outproj_norm=True)])
def test_step_loop_and_continuation_equal_forward(kw):
    m = make(**kw)
    u = torch.randn(2, 10, 16, dtype=torch.float64)
    y = m(u)
    cache = m.allocate_inference_cache(2)
    ys = torch.stack([m.step(u[:, t], cache) for t in range(10)], 1)
    torch.testing.assert_close(ys, y, atol=1e-11, rtol=0)
    for split in (3, 5):                                   # chunk 3: on a boundary and inside a chunk
        c = m.allocate_inference_cache(2)
        y1, y2 = m(u[:, :split], cache=c), m(u[:, split:-2], cache=c)
        y3 = torch.stack([m.step(u[:, t : t + 1], c)[:, 0] for t in (8, 9)], 1)  # then decode
        torch.testing.assert_close(torch.cat([y1, y2, y3], 1), y, atol=1e-11, rtol=0)
        for (name, a), (_, b) in zip(c.tensors(), cache.tensors()):
            torch.testing.assert_close(a, b, atol=1e-11, rtol=0, msg=name)


@pytest.mark.parametrize("kw", [dict(R=2), dict(R=4, is_outproj_norm=True)])
def test_varlen_packed_equals_per_sequence(kw):
    m = make(**kw)
    lens = [4, 7, 1]
    u = torch.randn(1, sum(lens), 16, dtype=torch.float64)
    cu = torch.tensor([0, 4, 11, 12], dtype=torch.int32)
    cache = m.allocate_inference_cache(3)
    y = m(u, cu_seqlens=cu, cache=cache)
    for i, (s, n) in enumerate(zip(cu[:-1].tolist(), lens)):
        c = m.allocate_inference_cache(1)
        torch.testing.assert_close(y[:, s : s + n], m(u[:, s : s + n], cache=c), atol=1e-11, rtol=0)
        for (name, a), (_, b) in zip(c.tensors(), cache.tensors()):
            torch.testing.assert_close(a[0], b[i], atol=1e-11, rtol=0, msg=name)


def test_state_dict_layout_and_init():
    R, H, P, N = 4, 8, 4, 8
    m = Mamba3(16, d_state=N, headdim=P, is_mimo=True, mimo_rank=R, is_outproj_norm=True)
    sd = m.state_dict()
    S = m.num_rope_angles
    expect = {"in_proj.weight": (2 * 32 + 2 * N * R + 3 * H + S, 16), "dt_bias": (H,), "B_bias": (H, R, N),
              "C_bias": (H, R, N), "B_norm.weight": (N,), "C_norm.weight": (N,), "D": (H,),
              "mimo_x": (H, R, P), "mimo_z": (H, R, P), "mimo_o": (H, R, P), "norm.weight": (32,),
              "out_proj.weight": (16, 32)}
    assert {k: tuple(v.shape) for k, v in sd.items()} == expect
    torch.testing.assert_close(m.mimo_x, torch.full((H, R, P), 1 / R))
    torch.testing.assert_close(m.mimo_z, torch.ones(H, R, P))
    torch.testing.assert_close(m.mimo_o, torch.full((H, R, P), 1 / R))
    assert m.allocate_inference_cache(3).k.shape == (3, R, H, N)
    assert not hasattr(Mamba3(16, d_state=N, headdim=P), "mimo_x")      # SISO has no MIMO vectors


def test_gradients_flow_to_every_parameter():
    m = make(R=2, is_outproj_norm=True)
    m(torch.randn(2, 5, 16, dtype=torch.float64)).pow(2).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


def test_float32_model_runs_and_matches_float64():
    m = make(R=4)
    u = torch.randn(2, 9, 16, dtype=torch.float64)
    y64 = m(u)
    y32 = m.float()(u.float())
    assert y32.dtype == torch.float32
    assert (y32.double() - y64).norm() / y64.norm() < 1e-4


@pytest.mark.parametrize("rank", [0, -1, 1.5])
def test_mimo_rank_validation(rank):
    with pytest.raises(ValueError, match=r"mimo_rank must be an int >= 1, got"):
        Mamba3(16, d_state=8, headdim=4, is_mimo=True, mimo_rank=rank)


def test_backward_through_continuation_from_cache():
    """The cache is overwritten in place after the op: the op must not hold on to it for backward."""
    m = make(R=2)
    u = torch.randn(2, 8, 16, dtype=torch.float64, requires_grad=True)
    cache = m.allocate_inference_cache(2)
    with torch.no_grad():
        m(u[:, :3], cache=cache)
    m(u[:, 3:], cache=cache).pow(2).sum().backward()
    assert u.grad[:, 3:].abs().sum() > 0 and not cache.ssm.requires_grad
