"""Mamba3 layer: official parameter layout, an independent per-token implementation, decode,
continuation, varlen, validation."""
import math

import pytest
import torch
import torch.nn.functional as F

from mamba3 import Mamba3


def hand_written(m: Mamba3, u: torch.Tensor) -> torch.Tensor:
    """Per-token Mamba-3 written from SPEC sections 1-3 with complex numbers for the rotation."""
    Bsz, T, _ = u.shape
    H, P, N, G, S = m.nheads, m.headdim, m.d_state, m.ngroups, m.num_rope_angles
    d_in = m.d_inner
    proj = u @ m.in_proj.weight.T
    out = torch.zeros(Bsz, T, d_in, dtype=u.dtype)
    for b in range(Bsz):
        h = torch.zeros(H, P, N, dtype=u.dtype)
        phase = torch.zeros(H, S, dtype=u.dtype)
        k_prev = torch.zeros(H, N, dtype=u.dtype)
        x_prev = torch.zeros(H, P, dtype=u.dtype)
        for t in range(T):
            row = proj[b, t]
            z, x = row[:d_in].view(H, P), row[d_in : 2 * d_in].view(H, P)
            o = 2 * d_in
            Bv, Cv = row[o : o + G * N].view(G, N), row[o + G * N : o + 2 * G * N].view(G, N)
            o += 2 * G * N
            dd_dt, dd_A, trap, ang = row[o : o + H], row[o + H : o + 2 * H], row[o + 2 * H : o + 3 * H], row[o + 3 * H :]
            A = -torch.clamp(F.softplus(dd_A), min=m.A_floor)
            dt = F.softplus(dd_dt + m.dt_bias)
            lam = torch.sigmoid(trap)
            Bv = Bv / torch.sqrt(Bv.pow(2).mean(-1, keepdim=True) + 1e-5) * m.B_norm.weight
            Cv = Cv / torch.sqrt(Cv.pow(2).mean(-1, keepdim=True) + 1e-5) * m.C_norm.weight
            for hh in range(H):
                g = hh * G // H
                kb = Bv[g] + m.B_bias[hh, 0]
                qb = Cv[g] + m.C_bias[hh, 0]
                phase[hh] = phase[hh] + dt[hh] * math.pi * torch.tanh(ang)
                rot = torch.polar(torch.ones_like(phase[hh]), phase[hh])

                def rotate(vec):
                    c = torch.complex(vec[0 : 2 * S : 2], vec[1 : 2 * S : 2]) * rot
                    r = vec.clone()
                    r[0 : 2 * S : 2], r[1 : 2 * S : 2] = c.real, c.imag
                    return r

                k_t, q_t = rotate(kb), rotate(qb)
                alpha = torch.exp(A[hh] * dt[hh])
                h[hh] = (alpha * h[hh] + (1 - lam[hh]) * dt[hh] * alpha * torch.outer(x_prev[hh], k_prev[hh])
                         + lam[hh] * dt[hh] * torch.outer(x[hh], k_t))
                y = h[hh] @ q_t + m.D[hh] * x[hh]
                if m.is_outproj_norm:
                    w = m.norm.weight.view(H, P)[hh]
                    y = y / torch.sqrt(y.pow(2).mean() + 1e-5) * w
                out[b, t, hh * P : (hh + 1) * P] = y * F.silu(z[hh])
                k_prev[hh], x_prev[hh] = k_t, x[hh]
    return out @ m.out_proj.weight.T


def make(**kw):
    torch.manual_seed(0)
    base = dict(d_model=16, d_state=8, headdim=4, chunk_size=4)
    base.update(kw)
    m = Mamba3(**base).double()
    with torch.no_grad():  # make biases and norm weights non-trivial
        for name, p in m.named_parameters():
            if name not in ("B_bias", "C_bias", "B_norm.weight", "C_norm.weight", "D"):
                continue
            p.add_(0.3 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("kw", [dict(), dict(rope_fraction=1.0), dict(ngroups=2), dict(is_outproj_norm=True),
                                dict(rope_fraction=1.0, ngroups=2, is_outproj_norm=True)])
@pytest.mark.parametrize("grad", [True, False])
def test_layer_matches_hand_written(kw, grad):
    """grad=False is the inference form (z, x and the rest of in_proj as separate GEMMs)."""
    m = make(**kw)
    u = torch.randn(2, 11, 16, dtype=torch.float64)
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(m(u), hand_written(m, u), atol=1e-10, rtol=0)


@pytest.mark.parametrize("kw", [dict(), dict(rope="fixed", use_trapezoid=False), dict(d_conv=4),
                                dict(is_mimo=True, mimo_rank=2)])
def test_inference_continuation_equals_training_form_and_writes_cache_in_place(kw):
    """No grad: the cache's own tensors are the op's initial state (no copies) and are overwritten
    in place afterwards; the results equal the autograd-recording form (which copies the state)."""
    m = make(**kw)
    u = torch.randn(2, 13, 16, dtype=torch.float64)
    c_inf, c_ref = m.allocate_inference_cache(2), m.allocate_inference_cache(2)
    ptrs = [t.data_ptr() for _, t in c_inf.tensors()]
    with torch.no_grad():
        y_inf = torch.cat([m(u[:, :6], cache=c_inf), m(u[:, 6:], cache=c_inf)], 1)
    y_ref = torch.cat([m(u[:, :6], cache=c_ref), m(u[:, 6:], cache=c_ref)], 1)
    assert y_ref.requires_grad and not y_inf.requires_grad
    torch.testing.assert_close(y_inf, y_ref, atol=1e-12, rtol=0)
    for (name, a), (_, b) in zip(c_inf.tensors(), c_ref.tensors()):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0, msg=name)
    assert [t.data_ptr() for _, t in c_inf.tensors()] == ptrs


def test_official_state_dict_layout_and_init():
    m = Mamba3(d_model=64, d_state=32, headdim=16, is_outproj_norm=True)
    sd = m.state_dict()
    H, N, P, d_inner = 8, 32, 16, 128
    S = int(N * 0.5) // 2
    expected = {"in_proj.weight": (2 * d_inner + 2 * N + 3 * H + S, 64), "dt_bias": (H,), "B_bias": (H, 1, N),
                "C_bias": (H, 1, N), "B_norm.weight": (N,), "C_norm.weight": (N,), "D": (H,),
                "norm.weight": (d_inner,), "out_proj.weight": (64, d_inner)}
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert torch.all(sd["B_bias"] == 1) and torch.all(sd["C_bias"] == 1) and torch.all(sd["D"] == 1)
    dt = F.softplus(sd["dt_bias"])
    assert float(dt.min()) >= 1e-3 * 0.999 and float(dt.max()) <= 0.1 * 1.001
    assert sd["B_bias"].dtype == torch.float32
    # the 1.5B layer: 8192 + 256 + 192 + 32 = 8672 in_proj outputs
    assert Mamba3(2048, d_state=128, headdim=64, device="meta").in_proj.weight.shape == (8672, 2048)
    m2 = Mamba3(d_model=64, d_state=32, headdim=16, is_outproj_norm=True)
    m2.load_state_dict(sd, strict=True)


@pytest.mark.parametrize("kw", [dict(), dict(is_outproj_norm=True, ngroups=2), dict(rope="fixed"),
                                dict(rope="none", use_trapezoid=False, use_bc_bias=False), dict(d_conv=4),
                                dict(a_activation="heavy_tail")])
def test_step_loop_and_continuation_equal_forward(kw):
    m = make(**kw)
    u = torch.randn(2, 13, 16, dtype=torch.float64)
    y = m(u)
    cache = m.allocate_inference_cache(2)
    ys = torch.stack([m.step(u[:, t], cache) for t in range(13)], 1)
    torch.testing.assert_close(ys, y, atol=1e-11, rtol=0)
    for split in (4, 7):  # on and inside a chunk boundary (chunk_size=4)
        c2 = m.allocate_inference_cache(2)
        y2 = torch.cat([m(u[:, :split], cache=c2), m(u[:, split:], cache=c2)], 1)
        torch.testing.assert_close(y2, y, atol=1e-11, rtol=0)
        for (name, a), (_, b) in zip(cache.tensors(), c2.tensors()):
            torch.testing.assert_close(a, b, atol=1e-11, rtol=0, msg=name)
    # a (B, 1, D) step keeps its shape
    assert m.step(u[:, :1], cache).shape == (2, 1, 16)


@pytest.mark.parametrize("kw", [dict(), dict(rope="fixed"), dict(d_conv=4)])
def test_varlen_packed_equals_per_sequence(kw):
    m = make(**kw)
    lengths = [3, 9, 6]
    seqs = [torch.randn(1, n, 16, dtype=torch.float64) for n in lengths]
    cu = torch.tensor([0, 3, 12, 18], dtype=torch.int32)
    cache = m.allocate_inference_cache(3)
    y = m(torch.cat(seqs, 1), cu_seqlens=cu, cache=cache)
    for i, s in enumerate(seqs):
        ci = m.allocate_inference_cache(1)
        torch.testing.assert_close(y[:, cu[i] : cu[i + 1]], m(s, cache=ci), atol=1e-11, rtol=0)
        for (name, a), (_, b) in zip(cache.tensors(), ci.tensors()):
            torch.testing.assert_close(a[i : i + 1], b, atol=1e-11, rtol=0, msg=name)


def test_heavy_tail_activation_values():
    from mamba3.layers.mamba3 import heavy_tail
    u = torch.tensor([-3.0, -0.5, 0.0, 2.0])
    torch.testing.assert_close(heavy_tail(u), torch.tensor([0.25, 1 / 1.5, 1.0, 3.0]))


def test_gradients_flow_to_every_parameter():
    m = make(is_outproj_norm=True)
    m(torch.randn(2, 9, 16, dtype=torch.float64)).pow(2).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_cache_memory_is_constant_and_bf16_state_option():
    m = Mamba3(d_model=32, d_state=16, headdim=8)
    c = m.allocate_inference_cache(3, state_dtype=torch.bfloat16)
    assert c.ssm.dtype == torch.bfloat16 and c.angle.dtype == torch.float32
    assert c.k.shape == (3, 1, 8, 16) and c.v.shape == (3, 8, 8) and c.ssm.shape == (3, 8, 8, 16)
    n0 = c.nbytes()
    m(torch.randn(3, 50, 32), cache=c)
    assert c.nbytes() == n0


@pytest.mark.parametrize("kw,match", [
    (dict(d_model=16, headdim=5), "headdim=5 must divide d_inner"),
    (dict(d_model=16, headdim=4, ngroups=3), "ngroups=3 must divide the number of heads 8"),
    (dict(d_model=16, headdim=4, rope_fraction=0.25), "rope_fraction must be 0.5 or 1.0"),
    (dict(d_model=16, headdim=4, d_state=7), "d_state must be even"),
    (dict(d_model=0), "d_model must be a positive int"),
    (dict(d_model=16, headdim=4, rope="yes"), "rope must be one of"),
    (dict(d_model=16, headdim=4, mimo_rank=0, is_mimo=True), "mimo_rank must be an int >= 1"),
    (dict(d_model=16, headdim=4, a_activation="relu"), "a_activation must be one of"),
])
def test_constructor_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        Mamba3(**kw)


def test_forward_validation():
    m = Mamba3(d_model=16, d_state=8, headdim=4)
    with pytest.raises(ValueError, match=r"u must have shape \[B, T, d_model\]"):
        m(torch.randn(2, 5, 12))
    with pytest.raises(ValueError, match=r"u must have 3 dims"):
        m(torch.randn(5, 16))
    c = m.allocate_inference_cache(3)
    with pytest.raises(ValueError, match="cache holds batch 3 but the input"):
        m(torch.randn(2, 5, 16), cache=c)
    with pytest.raises(ValueError, match="step takes one token"):
        m.step(torch.randn(3, 2, 16), c)
    with pytest.raises(TypeError, match="u must have dtype"):
        m(torch.randint(0, 5, (2, 5, 16)))


def test_snapshot_restore_resumes_exactly():
    m = make(d_conv=4)
    u = torch.randn(2, 12, 16, dtype=torch.float64)
    cache = m.allocate_inference_cache(2)
    m(u[:, :5], cache=cache)
    snap = cache.snapshot()
    y_a = m(u[:, 5:], cache=cache)
    cache.reset()
    cache.restore(snap)
    torch.testing.assert_close(m(u[:, 5:], cache=cache), y_a, atol=0, rtol=0)
    # row-wise: restore row 1's prefix state into row 0 of a fresh cache
    one = m.allocate_inference_cache(1)
    one.restore(snap_rows(snap, [1]), rows=[0])
    torch.testing.assert_close(m(u[1:, 5:], cache=one), y_a[1:], atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="snapshot holds"):
        cache.restore({"ssm": snap["ssm"]})


def snap_rows(snap, rows):
    return {k: v[rows] for k, v in snap.items()}


def test_inference_forward_asks_the_triton_op_to_save_nothing(monkeypatch):
    """Under no_grad the Triton SISO forward is asked for no saved tensors (an autograd.Function
    sees a parameter's requires_grad even under no_grad): the eager layer and the fused custom op.
    While recording autograd it saves. On CPU the kernels run under the Triton interpreter."""
    pytest.importorskip("triton", reason="the Triton SISO op needs triton installed")
    from mamba3.ops.mamba3 import interface, triton_siso
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":
        monkeypatch.setattr(interface, "triton_available", lambda device: True)
    seen = []
    real = triton_siso.mamba3_fused_fwd
    monkeypatch.setattr(triton_siso, "mamba3_fused_fwd", lambda *a, **k: seen.append(k["save_pre"]) or real(*a, **k))
    torch.manual_seed(0)
    m = Mamba3(16, d_state=16, headdim=8, chunk_size=16, device=dev)
    u = torch.randn(1, 20, 16, device=dev)
    cache = m.allocate_inference_cache(1)
    with torch.no_grad():
        y = m(u, cache=cache)
        p = m._project(u, None, None, step=False)
        got = torch.ops.mamba3.siso_fused(p["C"][:, :, 0], p["B"][:, :, 0], p["x"], p["dA"], p["dt"], p["trap"],
                                          m.C_bias[:, 0], m.B_bias[:, 0], p["angles"], m.D, p["z"], None, None,
                                          None, None, 16)
    assert seen == [False, False]
    torch.testing.assert_close(m.out_proj(got[0].flatten(-2)), y, rtol=1e-5, atol=1e-5)
    m(u).sum().backward()
    assert seen == [False, False, True]
