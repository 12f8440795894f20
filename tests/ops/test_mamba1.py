"""Mamba-1 selective scan op: chunked vs float64 token loop, step, continuation, varlen,
fast decays (chunk shortening), validation."""
import pytest
import torch

from mamba3.ops.mamba1 import selective_scan, selective_scan_step
from mamba3.ops.mamba1.chunked import LOG_RANGE, safe_chunk

F64 = torch.float64


def make(Bs=2, T=13, Dm=6, N=4, dtype=F64, seed=0, gate=True, rate=2.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    u, B, C, D = r(Bs, T, Dm), r(Bs, T, N), r(Bs, T, N), r(Dm)
    delta = torch.rand(Bs, T, Dm, generator=g, dtype=dtype) * 0.5 + 0.05
    A = -(torch.rand(Dm, N, generator=g, dtype=dtype) * rate + 0.1)
    z = r(Bs, T, Dm) if gate else None
    return u, delta, A, B, C, D, z


@pytest.mark.parametrize("chunk", [1, 4, 5, 64])
@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("grad", [False, True], ids=["inference-path", "autograd-path"])
def test_chunked_matches_reference(chunk, gate, grad):
    u, delta, A, B, C, D, z = make(gate=gate)
    s0 = torch.randn(2, 6, 4, dtype=F64)
    if grad:  # the chunked form has an all-chunks autograd path and a chunk-by-chunk in-place one
        u.requires_grad_()
    yr, sr = selective_scan(u, delta, A, B, C, D, z, initial_state=s0, return_final_state=True, impl="reference")
    yc, sc = selective_scan(u, delta, A, B, C, D, z, initial_state=s0, return_final_state=True, chunk_size=chunk)
    torch.testing.assert_close(yc, yr, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sc, sr, rtol=1e-10, atol=1e-10)


def test_fast_decay_shortens_chunk_and_stays_exact():
    """|delta A| up to ~45 per token: a 32-token chunk would overflow exp(-l) in fp32."""
    u, delta, A, B, C, D, z = make(T=40, rate=60.0)
    delta = delta * 1.5
    assert safe_chunk(delta.float(), A.float(), 32, torch.float32) < 32
    assert safe_chunk(delta, A, 8, F64) == 8
    yr, sr = selective_scan(u, delta, A, B, C, D, z, return_final_state=True, impl="reference")
    y32, s32 = selective_scan(*(t.float() for t in (u, delta, A, B, C, D, z)), return_final_state=True,
                              chunk_size=32)
    assert torch.isfinite(y32).all() and torch.isfinite(s32).all()
    torch.testing.assert_close(y32.double(), yr, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s32.double(), sr, rtol=1e-4, atol=1e-4)


def test_safe_chunk_bound():
    delta = torch.full((1, 4, 2), 2.0)
    A = -torch.full((2, 3), 10.0)
    L = safe_chunk(delta, A, 64, torch.float32)
    assert L * 20.0 <= LOG_RANGE[torch.float32] < (L + 1) * 20.0


def test_gradcheck_chunked():
    u, delta, A, B, C, D, z = make(Bs=1, T=6, Dm=3, N=2)
    s0 = torch.randn(1, 3, 2, dtype=F64)
    inputs = [t.clone().requires_grad_() for t in (u, delta, A, B, C, D, z, s0)]

    def f(u, delta, A, B, C, D, z, s0):
        return selective_scan(u, delta, A, B, C, D, z, initial_state=s0, return_final_state=True, chunk_size=4)

    assert torch.autograd.gradcheck(f, inputs)


def test_step_loop_matches_forward():
    u, delta, A, B, C, D, z = make()
    y, s = selective_scan(u, delta, A, B, C, D, z, return_final_state=True, chunk_size=4)
    state = torch.zeros(2, 6, 4, dtype=F64)
    ys = torch.stack([selective_scan_step(u[:, t], delta[:, t], A, B[:, t], C[:, t], D, z[:, t], state)
                      for t in range(u.shape[1])], dim=1)
    torch.testing.assert_close(ys, y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, s, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("split", [1, 4, 8, 11])
def test_prefix_continuation_equals_whole(split):
    u, delta, A, B, C, D, z = make(T=16)
    y, s = selective_scan(u, delta, A, B, C, D, z, return_final_state=True, chunk_size=4)
    a = lambda t: t[:, :split]
    b = lambda t: t[:, split:]
    y1, s1 = selective_scan(a(u), a(delta), A, a(B), a(C), D, a(z), return_final_state=True, chunk_size=4)
    y2, s2 = selective_scan(b(u), b(delta), A, b(B), b(C), D, b(z), initial_state=s1, return_final_state=True,
                            chunk_size=4)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s2, s, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_varlen_equals_per_sequence(impl):
    lengths = [5, 0, 9, 3]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int64)
    u, delta, A, B, C, D, z = make(Bs=1, T=sum(lengths))
    s0 = torch.randn(len(lengths), 6, 4, dtype=F64)
    y, s = selective_scan(u, delta, A, B, C, D, z, initial_state=s0, return_final_state=True, cu_seqlens=cu,
                          chunk_size=4, impl=impl)
    for i, n in enumerate(lengths):
        a0 = int(cu[i])
        sl = lambda t: t[:, a0 : a0 + n]
        yi, si = selective_scan(sl(u), sl(delta), A, sl(B), sl(C), D, sl(z), initial_state=s0[i : i + 1],
                                return_final_state=True, impl="reference")
        torch.testing.assert_close(y[:, a0 : a0 + n], yi, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(s[i : i + 1], si, rtol=1e-10, atol=1e-10)


def test_empty_sequence_passes_state_through():
    u, delta, A, B, C, D, z = make(T=0)
    s0 = torch.randn(2, 6, 4, dtype=F64)
    for impl in ("reference", "chunked"):
        y, s = selective_scan(u, delta, A, B, C, D, z, initial_state=s0, return_final_state=True, impl=impl)
        assert y.shape == (2, 0, 6)
        torch.testing.assert_close(s, s0)


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda a: a.update(u=a["u"][..., None]), ValueError, r"u must have 3 dims \[B, T, D\]"),
    (lambda a: a.update(delta=a["delta"][:, :-1]), ValueError, r"delta must have shape \[B, T, D\]"),
    (lambda a: a.update(A=a["A"][:-1]), ValueError, r"A must have shape \[D, N\]"),
    (lambda a: a.update(B=a["B"][..., :-1]), ValueError, r"B must have shape \[B, T, N\]"),
    (lambda a: a.update(C=a["C"][:1]), ValueError, r"C must have shape \[B, T, N\]"),
    (lambda a: a.update(D=torch.ones(5, dtype=F64)), ValueError, r"D must have shape \[D\]"),
    (lambda a: a.update(z=a["z"][..., :-1]), ValueError, r"z must have shape \[B, T, D\]"),
    (lambda a: a.update(u=a["u"].int()), TypeError, r"u must have dtype in"),
    (lambda a: a.update(initial_state=torch.zeros(2, 6, 3, dtype=F64)), ValueError,
     r"initial_state must have shape \[B, D, N\]"),
    (lambda a: a.update(chunk_size=-1), ValueError, r"chunk_size must be a positive int"),
    (lambda a: a.update(impl="cuda"), ValueError, r"impl must be one of"),
    (lambda a: a.update(cu_seqlens=torch.tensor([0, 13], dtype=torch.float32)), TypeError,
     r"cu_seqlens must be int32 or int64"),
])
def test_validation_errors(mutate, exc, match):
    u, delta, A, B, C, D, z = make()
    a = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, initial_state=None, chunk_size=4, impl="auto",
             cu_seqlens=None)
    mutate(a)
    with pytest.raises(exc, match=match):
        selective_scan(a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"], initial_state=a["initial_state"],
                       chunk_size=a["chunk_size"], impl=a["impl"], cu_seqlens=a["cu_seqlens"])


def test_step_validation_errors():
    u, delta, A, B, C, D, z = make()
    state = torch.zeros(2, 6, 4, dtype=F64)
    with pytest.raises(ValueError, match=r"state must have shape \[B, D, N\]"):
        selective_scan_step(u[:, 0], delta[:, 0], A, B[:, 0], C[:, 0], D, z[:, 0], state[:1])
    with pytest.raises(ValueError, match=r"B must have shape \[B, N\]"):
        selective_scan_step(u[:, 0], delta[:, 0], A, B[:, 0, :-1], C[:, 0], D, z[:, 0], state)
