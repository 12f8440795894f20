"""Mamba-3 MIMO op: chunked vs float64 reference (forward, final state, gradcheck), step loop,
continuation, varlen, equality with SISO at R = 1, validation."""
import pytest
import torch

from mamba3.ops import mamba3_mimo, mamba3_mimo_step, mamba3_siso
from mamba3.ops.mamba3 import Mamba3State, mamba3_mimo_chunked, mamba3_mimo_reference
from mamba3.ops.mamba3.common import interleaved_to_halves, zero_state

NAMES = ("q", "k", "v", "dA", "dt", "trap", "q_bias", "k_bias", "angles", "mimo_x", "mimo_z", "mimo_o", "D", "z")
PARAMS = ("q_bias", "k_bias", "mimo_x", "mimo_z", "mimo_o", "D")


def make_inputs(B=2, T=13, R=2, G=1, H=2, N=8, P=4, S=2, dtype=torch.float64, per_head_angles=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    dt = torch.nn.functional.softplus(r(B, T, H) - 1.0)
    A = -(torch.rand(H, generator=g, dtype=dtype) + 0.5)
    angles = r(B, T, H, S) if per_head_angles else r(B, T, S)
    return dict(q=r(B, T, R, G, N), k=r(B, T, R, G, N), v=r(B, T, H, P), dA=dt * A, dt=dt, trap=r(B, T, H),
                q_bias=r(H, R, N), k_bias=r(H, R, N), angles=angles, mimo_x=r(H, R, P), mimo_z=r(H, R, P),
                mimo_o=r(H, R, P), D=r(H), z=r(B, T, H, P))


def call(fn, x, **kw):
    return fn(*[x[n] for n in NAMES], **kw)


def slice_t(x, a, b):
    return {n: (t if n in PARAMS or t is None else t[:, a:b]) for n, t in x.items()}


def norm_kw(on, H=2, P=4, seed=3):
    if not on:
        return {}
    g = torch.Generator().manual_seed(seed)
    return dict(outproj_norm_weight=torch.randn(H, P, generator=g, dtype=torch.float64), outproj_norm_eps=1e-5)


def zeros64(batch, R, H=2, P=4, N=8, S=2):
    """A float64 fresh state (zero_state keeps the phase in float32)."""
    return Mamba3State(*(t.double() for t in zero_state(batch, H, P, N, S, rank=R)))


def assert_state_close(s1, s2, atol=1e-10):
    for name, a, b in zip(Mamba3State._fields, s1, s2):
        torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=0, msg=f"state.{name}")


@pytest.mark.parametrize("R", [1, 2, 4])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("chunk", [1, 4, None])
def test_chunked_matches_reference_fp64(R, norm, chunk):
    x = make_inputs(R=R, G=2, H=4, per_head_angles=(R == 2))
    kw = dict(return_final_state=True, **norm_kw(norm, H=4))
    y_ref, s_ref = call(mamba3_mimo_reference, x, **kw)
    y, s = call(mamba3_mimo_chunked, x, chunk_size=chunk, **kw)
    torch.testing.assert_close(y, y_ref, atol=1e-11, rtol=0)
    assert_state_close(s, s_ref)
    assert s.k.shape == (2, R, 4, 8)


def test_rank8_and_no_optional_inputs():
    x = make_inputs(R=8, T=9)
    x["D"], x["z"] = None, None
    y_ref, s_ref = call(mamba3_mimo_reference, x, return_final_state=True)
    y, s = call(mamba3_mimo, x, return_final_state=True)       # default chunk 64 // 8 = 8, T not a multiple
    torch.testing.assert_close(y, y_ref, atol=1e-11, rtol=0)
    assert_state_close(s, s_ref)


def test_fp32_relative_to_fp64():
    x = make_inputs(T=40, R=4, dtype=torch.float32, seed=1)
    y_ref, _ = call(mamba3_mimo_reference, {n: t.double() for n, t in x.items()})
    y, _ = call(mamba3_mimo, x)
    assert y.dtype == torch.float32
    assert (y.double() - y_ref).norm() / y_ref.norm() < 1e-4


@pytest.mark.parametrize("norm", [False, True])
def test_gradcheck_chunked(norm):
    x = make_inputs(B=1, T=5, R=2, H=2, N=4, P=2, S=1)
    kw = norm_kw(norm, H=2, P=2)
    names = list(NAMES) + (["w"] if norm else [])
    if norm:
        x["w"] = kw.pop("outproj_norm_weight")
    leaves = {n: t.clone().requires_grad_(True) for n, t in x.items() if n not in ("dA",)}
    init = zeros64(1, 2, H=2, P=2, N=4, S=1)
    init = Mamba3State(*(torch.randn_like(t) * 0.5 for t in init))

    def f(*args):
        d = dict(zip([n for n in names if n != "dA"], args))
        d["dA"] = -0.7 * d["dt"]
        y, s = mamba3_mimo_chunked(*[d[n] for n in NAMES], chunk_size=2, initial_state=init,
                                   return_final_state=True, outproj_norm_weight=d.get("w"), **kw)
        return y, s.ssm
    assert torch.autograd.gradcheck(f, tuple(leaves[n] for n in names if n != "dA"), atol=1e-7)


def test_chunked_grads_match_reference():
    x = make_inputs(T=7, R=2)
    grads = []
    for fn in (mamba3_mimo_reference, mamba3_mimo_chunked):
        leaves = {n: t.clone().requires_grad_(True) for n, t in x.items()}
        y, s = call(fn, leaves, return_final_state=True, **({"chunk_size": 3} if fn is mamba3_mimo_chunked else {}))
        (y.pow(2).sum() + s.ssm.sum()).backward()
        grads.append({n: t.grad for n, t in leaves.items()})
    for n in NAMES:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-10, rtol=1e-9, msg=n)


@pytest.mark.parametrize("R", [1, 2, 4])
@pytest.mark.parametrize("norm", [False, True])
def test_step_loop_matches_forward(R, norm):
    x = make_inputs(R=R, T=9)
    kw = norm_kw(norm)
    y_ref, s_ref = call(mamba3_mimo, x, return_final_state=True, **kw)
    state = zeros64(2, R)
    ys = []
    for t in range(9):
        xt = {n: (v if n in PARAMS else v[:, t]) for n, v in x.items()}
        ys.append(mamba3_mimo_step(*[xt[n] for n in NAMES], state, **kw))
    torch.testing.assert_close(torch.stack(ys, 1), y_ref, atol=1e-11, rtol=0)
    assert_state_close(state, s_ref)


@pytest.mark.parametrize("R", [1, 2, 4])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("split", [3, 4, 8])           # chunk 4: inside a chunk and on boundaries
def test_prefix_plus_continuation_equals_whole(R, norm, split):
    x = make_inputs(R=R, T=13)
    kw = dict(chunk_size=4, return_final_state=True, **norm_kw(norm))
    y, s = call(mamba3_mimo, x, **kw)
    y1, s1 = call(mamba3_mimo, slice_t(x, 0, split), **kw)
    y2, s2 = call(mamba3_mimo, slice_t(x, split, 13), initial_state=s1, **kw)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, atol=1e-11, rtol=0)
    assert_state_close(s2, s)


@pytest.mark.parametrize("R", [1, 2, 4])
@pytest.mark.parametrize("norm", [False, True])
def test_varlen_equals_per_sequence(R, norm):
    lens = [5, 0, 9, 1]
    x = make_inputs(B=1, T=sum(lens), R=R)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    g = torch.Generator().manual_seed(7)
    init = zeros64(len(lens), R)
    init = Mamba3State(*(torch.randn(t.shape, generator=g, dtype=t.dtype) for t in init))
    kw = dict(return_final_state=True, **norm_kw(norm))
    y, s = call(mamba3_mimo, x, cu_seqlens=cu, initial_state=init, chunk_size=4, **kw)
    y_ref, s_ref = call(mamba3_mimo_reference, x, cu_seqlens=cu, initial_state=init, **kw)
    torch.testing.assert_close(y, y_ref, atol=1e-11, rtol=0)
    assert_state_close(s, s_ref)
    start = 0
    for i, n in enumerate(lens):  # and each sequence alone through the chunked path
        one = Mamba3State(*(t[i : i + 1] for t in init))
        yi, si = call(mamba3_mimo, slice_t(x, start, start + n), initial_state=one, chunk_size=4, **kw)
        torch.testing.assert_close(y[:, start : start + n], yi, atol=1e-11, rtol=0)
        assert_state_close(Mamba3State(*(t[i : i + 1] for t in s)), si)
        start += n


def test_rank1_unit_mimo_equals_siso():
    """R = 1, psi = zeta = phi = 1: MIMO is SISO once the rotary layout is permuted to split-half."""
    B, T, G, H, N, P, S = 2, 11, 1, 2, 8, 4, 3
    x = make_inputs(B=B, T=T, R=1, G=G, H=H, N=N, P=P, S=S)
    q, k = x["q"][:, :, 0], x["k"][:, :, 0]                                  # SISO layout [B, T, G, N]
    qb, kb = x["q_bias"][:, 0], x["k_bias"][:, 0]
    args = (x["v"], x["dA"], x["dt"], x["trap"])
    y_siso, s_siso = mamba3_siso(q, k, *args, qb, kb, x["angles"], x["D"], x["z"], return_final_state=True,
                                 chunk_size=4)
    h = lambda t: interleaved_to_halves(t, S)
    ones = torch.ones(H, 1, P, dtype=torch.float64)
    y, s = mamba3_mimo(h(q).unsqueeze(2), h(k).unsqueeze(2), *args, h(qb).unsqueeze(1), h(kb).unsqueeze(1),
                       x["angles"], ones, ones, ones, x["D"], x["z"], return_final_state=True)
    torch.testing.assert_close(y, y_siso, atol=1e-11, rtol=0)
    torch.testing.assert_close(s.ssm, h(s_siso.ssm), atol=1e-11, rtol=0)
    torch.testing.assert_close(s.k[:, 0], h(s_siso.k), atol=1e-11, rtol=0)


def test_empty_sequence_and_impl_reference():
    x = make_inputs(T=0)
    y, s = call(mamba3_mimo, x, return_final_state=True)
    assert y.shape == (2, 0, 2, 4) and s.k.shape == (2, 2, 2, 8) and float(s.ssm.abs().sum()) == 0.0
    x = make_inputs(T=5)
    y_ref, _ = call(mamba3_mimo, x, impl="reference")
    y, _ = call(mamba3_mimo, x, impl="chunked", chunk_size=2)
    torch.testing.assert_close(y, y_ref, atol=1e-11, rtol=0)


@pytest.mark.parametrize("name,bad,match", [
    ("mimo_x", torch.ones(2, 3, 4), r"mimo_x must have shape \[H, R, P\].*dim 1: expected 2, got 3"),
    ("mimo_z", torch.ones(2, 2, 5), r"mimo_z must have shape \[H, R, P\].*dim 2: expected 4, got 5"),
    ("mimo_o", torch.ones(2, 2), r"mimo_o must have 3 dims \[H, R, P\]"),
    ("q_bias", torch.ones(2, 8), r"q_bias must have 3 dims \[H, R, N\]"),
    ("k", torch.ones(2, 13, 3, 1, 8), r"k must have shape \[B, T, R, G, N\].*dim 2: expected 2, got 3"),
    ("q", torch.ones(2, 13, 0, 1, 8), r"MIMO rank R=0 \(q.shape\[2\]\) must be >= 1"),
])
def test_validation_shapes(name, bad, match):
    x = make_inputs()
    x[name] = bad.double()
    with pytest.raises(ValueError, match=match):
        call(mamba3_mimo, x)


@pytest.mark.parametrize("chunk", [0, -4, 2.5, True])
def test_validation_chunk_size(chunk):
    with pytest.raises(ValueError, match=r"chunk_size must be a positive int \(any C >= 1 is accepted; "
                                         r"default 64 // R = 32\)"):
        call(mamba3_mimo, make_inputs(), chunk_size=chunk)


def test_validation_state_impl_and_norm_weight():
    x = make_inputs()
    bad = zero_state(2, 2, 4, 8, 2, rank=3)
    with pytest.raises(ValueError, match=r"initial_state.k must have shape \[B, R, H, N\]"):
        call(mamba3_mimo, x, initial_state=bad)
    with pytest.raises(TypeError, match=r"impl='triton' needs q in float32/bfloat16/float16, got torch.float64"):
        call(mamba3_mimo, x, impl="triton", chunk_size=8)  # the kernels take no float64 (more: test_mamba3_mimo_triton)
    with pytest.raises(ValueError, match=r"impl must be one of"):
        call(mamba3_mimo, x, impl="fast")
    with pytest.raises(ValueError, match=r"outproj_norm_weight must have shape \[H, P\]"):
        call(mamba3_mimo, x, outproj_norm_weight=torch.ones(2, 5))
    xt = {n: (v if n in PARAMS else v[:, 0]) for n, v in x.items()}
    xt["mimo_o"] = torch.ones(2, 1, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"mimo_o must have shape \[H, R, P\].*dim 1: expected 2, got 1"):
        mamba3_mimo_step(*[xt[n] for n in NAMES], zero_state(2, 2, 4, 8, 2, rank=2))
