"""Gated delta rule: chunked vs float64 token loop, step, continuation, varlen, validation."""
import pytest
import torch
import torch.nn.functional as F

from mamba3.ops.gated_delta import gated_delta_rule, gated_delta_rule_step

D64 = torch.float64


def make(B=2, T=13, H=2, HV=2, K=4, V=3, beta_max=1.0, seed=0, dtype=D64):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)
    q = r(B, T, H, K)
    k = F.normalize(r(B, T, H, K), dim=-1)
    v = r(B, T, HV, V)
    g = -torch.rand(B, T, HV, generator=gen, dtype=dtype)
    beta = torch.rand(B, T, HV, generator=gen, dtype=dtype) * beta_max
    return q, k, v, g, beta


@pytest.mark.parametrize("T,chunk,HV,beta_max", [(13, 4, 2, 1.0), (16, 8, 4, 2.0), (5, 64, 2, 1.0), (1, 4, 2, 2.0)])
def test_chunked_matches_reference(T, chunk, HV, beta_max):
    q, k, v, g, beta = make(T=T, HV=HV, beta_max=beta_max)
    s0 = torch.randn(2, HV, 3, 4, dtype=D64)
    o_r, s_r = gated_delta_rule(q, k, v, g, beta, initial_state=s0, return_final_state=True, impl="reference")
    o_c, s_c = gated_delta_rule(q, k, v, g, beta, initial_state=s0, return_final_state=True, chunk_size=chunk)
    torch.testing.assert_close(o_c, o_r, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s_c, s_r, rtol=1e-10, atol=1e-10)


def test_reference_matches_explicit_householder_form():
    """S_t = a S (I - b k k^T) + b v k^T written with matrices, one head."""
    q, k, v, g, beta = make(B=1, T=6, H=1, HV=1, beta_max=2.0)
    S = torch.zeros(3, 4, dtype=D64)
    outs = []
    for t in range(6):
        kt = k[0, t, 0]
        S = torch.exp(g[0, t, 0]) * S @ (torch.eye(4, dtype=D64) - beta[0, t, 0] * torch.outer(kt, kt)) \
            + beta[0, t, 0] * torch.outer(v[0, t, 0], kt)
        outs.append(S @ (q[0, t, 0] * 0.5))
    o, _ = gated_delta_rule(q, k, v, g, beta, impl="reference")
    torch.testing.assert_close(o[0, :, 0], torch.stack(outs))


def test_gradcheck_chunked():
    q, k, v, g, beta = make(B=1, T=5, H=1, HV=2, K=3, V=2, beta_max=2.0)
    s0 = torch.randn(1, 2, 2, 3, dtype=D64)
    ins = [t.clone().requires_grad_() for t in (q, k, v, g, beta, s0)]

    def f(q, k, v, g, beta, s0):
        o, s = gated_delta_rule(q, k, v, g, beta, initial_state=s0, return_final_state=True, chunk_size=2)
        return o, s
    assert torch.autograd.gradcheck(f, ins)


def test_chunked_gradients_match_reference():
    q, k, v, g, beta = make(T=9, HV=4)
    grads = []
    for impl in ("reference", "chunked"):
        ins = [t.clone().requires_grad_() for t in (q, k, v, g, beta)]
        o, s = gated_delta_rule(*ins, return_final_state=True, impl=impl, chunk_size=4)
        (o.sin().sum() + s.cos().sum()).backward()
        grads.append([t.grad for t in ins])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_step_loop_equals_forward():
    q, k, v, g, beta = make(T=7, HV=4, beta_max=2.0)
    o, s = gated_delta_rule(q, k, v, g, beta, return_final_state=True, chunk_size=4)
    state = torch.zeros(2, 4, 3, 4, dtype=D64)
    steps = [gated_delta_rule_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state) for t in range(7)]
    torch.testing.assert_close(torch.stack(steps, 1), o)
    torch.testing.assert_close(state, s)


def test_prefix_plus_continuation_equals_whole():
    q, k, v, g, beta = make(T=11)
    o, s = gated_delta_rule(q, k, v, g, beta, return_final_state=True, chunk_size=4)
    a = [t[:, :6] for t in (q, k, v, g, beta)]
    b = [t[:, 6:] for t in (q, k, v, g, beta)]
    o1, s1 = gated_delta_rule(*a, return_final_state=True, chunk_size=4)
    o2, s2 = gated_delta_rule(*b, initial_state=s1, return_final_state=True, chunk_size=4)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o)
    torch.testing.assert_close(s2, s)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_varlen_equals_per_sequence(impl):
    lengths = [3, 0, 6, 1]
    q, k, v, g, beta = make(B=1, T=sum(lengths), HV=4)
    cu = torch.tensor([0, 3, 3, 9, 10])
    s0 = torch.randn(4, 4, 3, 4, dtype=D64)
    o, s = gated_delta_rule(q, k, v, g, beta, initial_state=s0, return_final_state=True, cu_seqlens=cu,
                            chunk_size=4, impl=impl)
    for i, (a, n) in enumerate(zip(cu[:-1].tolist(), lengths)):
        sl = [t[:, a:a + n] for t in (q, k, v, g, beta)]
        oi, si = gated_delta_rule(*sl, initial_state=s0[i:i + 1], return_final_state=True, impl="reference")
        torch.testing.assert_close(o[:, a:a + n], oi)
        torch.testing.assert_close(s[i:i + 1], si)


def test_float32_close_to_float64():
    q, k, v, g, beta = make(T=70, K=8, V=8)
    o64, _ = gated_delta_rule(q, k, v, g, beta, impl="reference")
    o32, _ = gated_delta_rule(*(t.float() for t in (q, k, v, g, beta)))
    assert o32.dtype == torch.float32
    torch.testing.assert_close(o32.double(), o64, rtol=1e-4, atol=1e-4)


def test_negative_eigenvalue_beta_flips_state():
    """beta = 2, g = 0: I - 2kk^T is a reflection; applying it twice with v = 0 restores S."""
    k = F.normalize(torch.randn(1, 2, 1, 4, dtype=D64), dim=-1)
    k[:, 1] = k[:, 0]
    z = torch.zeros(1, 2, 1, dtype=D64)
    s0 = torch.randn(1, 1, 3, 4, dtype=D64)
    _, s = gated_delta_rule(torch.zeros_like(k), k, torch.zeros(1, 2, 1, 3, dtype=D64), z, z + 2.0,
                            initial_state=s0, return_final_state=True, chunk_size=2)
    torch.testing.assert_close(s, s0)


def test_validation_errors():
    q, k, v, g, beta = make()
    with pytest.raises(ValueError, match=r"k must have shape \[B, T, H, K\]"):
        gated_delta_rule(q, k[:, :, :, :2], v, g, beta)
    with pytest.raises(ValueError, match="HV=3 .* must be a multiple of .* H=2"):
        gated_delta_rule(q, k, torch.randn(2, 13, 3, 3, dtype=D64), g[..., :1].expand(2, 13, 3), beta)
    with pytest.raises(ValueError, match=r"g must have shape \[B, T, HV\]"):
        gated_delta_rule(q, k, v, g[:, :5], beta)
    with pytest.raises(ValueError, match=r"beta must have 3 dims"):
        gated_delta_rule(q, k, v, g, beta[..., None])
    with pytest.raises(ValueError, match="initial_state must have shape"):
        gated_delta_rule(q, k, v, g, beta, initial_state=torch.zeros(2, 2, 4, 3, dtype=D64))
    with pytest.raises(ValueError, match="scale must be None or a positive float"):
        gated_delta_rule(q, k, v, g, beta, scale=-1.0)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        gated_delta_rule(q, k, v, g, beta, chunk_size=0)
    with pytest.raises(ValueError, match="impl must be one of"):
        gated_delta_rule(q, k, v, g, beta, impl="triton")
    with pytest.raises(ValueError, match="with cu_seqlens the batch dimension must be 1"):
        gated_delta_rule(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 13]))
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        gated_delta_rule(q.numpy(), k, v, g, beta)
    with pytest.raises(ValueError, match=r"state must have shape \[B, HV, V, K\]"):
        gated_delta_rule_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], torch.zeros(2, 2, 4, 4))
