"""S4D op: FFT convolution vs float64 token loop, step, continuation, varlen, inits, validation."""
import math

import pytest
import torch

from mamba3.ops.s4d import (cexpm1, causal_fft_conv, hippo_legs, legs_diagonal, s4d, s4d_conv, s4d_init,
                            s4d_init_log_dt, s4d_kernel, s4d_reference, s4d_step)

PARAMS = ("log_dt", "log_A_real", "A_imag", "C", "D")


def make(B=2, T=29, H=3, N=4, init="legs", dtype=torch.float64, seed=0, state=False):
    g = torch.Generator().manual_seed(seed)
    la, ai = s4d_init(init, H, 2 * N, generator=g, dtype=dtype)
    x = dict(u=torch.randn(B, T, H, generator=g, dtype=dtype),
             log_dt=s4d_init_log_dt(H, 1e-2, 3e-1, generator=g, dtype=dtype),
             log_A_real=la + 0.1 * torch.randn(H, N, generator=g, dtype=dtype),
             A_imag=ai + torch.randn(H, N, generator=g, dtype=dtype),
             C=torch.randn(H, N, 2, generator=g, dtype=dtype), D=torch.randn(H, generator=g, dtype=dtype))
    if state:
        x["initial_state"] = torch.randn(B, H, N, 2, generator=g, dtype=dtype)
    return x


def run(fn, x, **kw):
    extra = {"initial_state": x["initial_state"]} if "initial_state" in x else {}
    return fn(x["u"], *[x[n] for n in PARAMS], **extra, **kw)


@pytest.mark.parametrize("init", ["legs", "lin", "inv", "real", "random"])
@pytest.mark.parametrize("state", [False, True])
def test_conv_matches_reference_fp64(init, state):
    x = make(init=init, state=state)
    y_ref, h_ref = run(s4d_reference, x, return_final_state=True)
    y, h = run(s4d_conv, x, return_final_state=True)
    scale = y_ref.abs().max()
    torch.testing.assert_close(y / scale, y_ref / scale, atol=1e-12, rtol=0)
    torch.testing.assert_close(h, h_ref, atol=1e-11 * h_ref.abs().max().item(), rtol=0)
    assert h.dtype == torch.complex128


def test_complex_C_equals_real_pair_form():
    x = make(T=6, state=True)
    y1, h1 = run(s4d, x, return_final_state=True)
    y2, h2 = run(s4d, dict(x, C=torch.view_as_complex(x["C"]),
                           initial_state=torch.view_as_complex(x["initial_state"])), return_final_state=True)
    torch.testing.assert_close(y1, y2, atol=0, rtol=0)
    torch.testing.assert_close(h1, h2, atol=0, rtol=0)


def test_auto_dispatch_is_conv_and_D_optional():
    x = make(T=8)
    x["D"] = None
    y_auto, _ = run(s4d, x)
    y_conv, _ = run(s4d_conv, x)
    y_ref, _ = run(s4d, x, impl="reference")
    torch.testing.assert_close(y_auto, y_conv, atol=0, rtol=0)
    torch.testing.assert_close(y_auto, y_ref, atol=1e-12, rtol=0)


def test_conv_fp32_close_to_fp64_reference_long_small_dt():
    x = make(B=1, T=300, H=4, N=8, dtype=torch.float32, seed=3)
    x["log_dt"] = torch.tensor([math.log(1e-3), math.log(1e-2), math.log(1e-1), math.log(1.0)])
    y, _ = run(s4d, x)
    y_ref, _ = run(s4d_reference, {k: v.double() for k, v in x.items()})
    assert y.dtype == torch.float32
    rel = (y.double() - y_ref).norm() / y_ref.norm()
    assert rel < 1e-5, rel


def test_kernel_is_impulse_response_and_fft_conv_is_direct():
    x = make(B=1, T=20, seed=4)
    x["D"] = None
    imp = torch.zeros(1, 20, 3, dtype=torch.float64)
    imp[:, 0] = 1.0
    y, _ = s4d_reference(imp, *[x[n] for n in PARAMS])
    K = s4d_kernel(*[x[n] for n in PARAMS[:4]], 20)
    torch.testing.assert_close(K, y[0].T, atol=1e-13, rtol=0)
    u = x["u"][:1, :20]
    direct = torch.stack([sum(K[:, t - s] * u[0, s] for s in range(t + 1)) for t in range(20)])
    torch.testing.assert_close(causal_fft_conv(u, K)[0], direct, atol=1e-12, rtol=0)


def test_cexpm1_accurate_for_tiny_arguments():
    z = torch.tensor([1e-7 + 1e-6j, -3e-4 + 2e-3j, -0.5 + 3.0j, -1e-5 - 7e-6j], dtype=torch.complex64)
    exact = torch.exp(z.to(torch.complex128)) - 1   # fine in float64 at these magnitudes
    got = cexpm1(z).to(torch.complex128)
    assert ((got - exact).abs() / exact.abs()).max() < 1e-6


def test_gradients_conv_match_reference():
    x = make(B=2, T=13, state=True, seed=5)
    leaves = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    grads = []
    for fn in (s4d_reference, s4d_conv):
        y, h = run(fn, leaves, return_final_state=True)
        w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
        loss = (y * w).sum() + (h.real * 0.3 - h.imag * 0.7).sum()
        grads.append(torch.autograd.grad(loss, list(leaves.values())))
    for name, a, b in zip(leaves, *grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9, msg=name)


@pytest.mark.parametrize("fn", [s4d_conv, s4d_reference])
def test_gradcheck_tiny(fn):
    x = make(B=1, T=5, H=2, N=2, state=True, seed=6)
    names = list(x)

    def f(*tensors):
        d = dict(zip(names, tensors))
        y, h = run(fn, d, return_final_state=True)
        return y, torch.view_as_real(h)

    assert torch.autograd.gradcheck(f, tuple(v.clone().requires_grad_(True) for v in x.values()))


@pytest.mark.parametrize("complex_state", [False, True])
def test_step_loop_matches_forward(complex_state):
    x = make(B=2, T=11, state=True, seed=7)
    y_ref, h_ref = run(s4d, x, return_final_state=True)
    state = x["initial_state"].clone()
    if complex_state:
        state = torch.view_as_complex(state).clone()
    ptr = state.data_ptr()
    ys = [s4d_step(x["u"][:, t], *[x[n] for n in PARAMS], state) for t in range(11)]
    torch.testing.assert_close(torch.stack(ys, 1), y_ref, atol=1e-12, rtol=0)
    got = state if complex_state else torch.view_as_complex(state)
    torch.testing.assert_close(got, h_ref, atol=1e-12, rtol=0)
    assert state.data_ptr() == ptr


@pytest.mark.parametrize("split", [0, 1, 12, 29])
def test_prefix_then_continuation_equals_whole(split):
    x = make(T=29, state=True, seed=8)
    y_all, h_all = run(s4d, x, return_final_state=True)
    p = dict(x, u=x["u"][:, :split])
    y1, h1 = run(s4d, p, return_final_state=True)
    c = dict(x, u=x["u"][:, split:], initial_state=h1)
    y2, h2 = run(s4d, c, return_final_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_all, atol=1e-12, rtol=0)
    torch.testing.assert_close(h2, h_all, atol=1e-12, rtol=0)


@pytest.mark.parametrize("impl", ["conv", "reference"])
def test_varlen_equals_per_sequence(impl):
    lens = [5, 0, 9, 3]
    x = make(B=1, T=sum(lens), state=True, seed=9)
    init = torch.randn(len(lens), 3, 4, dtype=torch.complex128)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)))
    y, h = s4d(x["u"], *[x[n] for n in PARAMS], initial_state=init, return_final_state=True, cu_seqlens=cu,
               impl=impl)
    s = 0
    for i, n in enumerate(lens):
        yi, hi = s4d_reference(x["u"][:, s : s + n], *[x[k] for k in PARAMS], initial_state=init[i : i + 1],
                               return_final_state=True)
        torch.testing.assert_close(y[:, s : s + n], yi, atol=1e-12, rtol=0)
        torch.testing.assert_close(h[i : i + 1], hi, atol=1e-12, rtol=0)
        s += n


# ---- initialisations -------------------------------------------------------------------------
def test_hippo_legs_matrix_entries():
    A = hippo_legs(4)
    assert A[1, 1] == -2 and A[0, 1] == 0 and A[3, 3] == -4
    assert torch.isclose(A[2, 1], torch.tensor(-math.sqrt(15.0), dtype=torch.float64))


@pytest.mark.parametrize("N", [2, 8, 64])
def test_legs_spectrum_is_normal_part_eigenvalues(N):
    A = hippo_legs(N)
    P = torch.sqrt(torch.arange(N, dtype=torch.float64) + 0.5)
    full = torch.linalg.eigvals(A + torch.outer(P, P))          # general solver, independent path
    upper = full[full.imag > 0]
    upper = upper[torch.argsort(upper.imag)]
    lam = legs_diagonal(N)
    assert lam.shape == (N // 2,)
    torch.testing.assert_close(lam, upper, atol=1e-8 * N, rtol=1e-8)
    la, ai = s4d_init("legs", 3, N, dtype=torch.float64)
    torch.testing.assert_close(-torch.exp(la), torch.full((3, N // 2), -0.5, dtype=torch.float64))
    torch.testing.assert_close(ai, lam.imag.expand(3, -1))


def test_lin_inv_real_spectra():
    H, N = 2, 16
    n = torch.arange(N // 2, dtype=torch.float64)
    for init, re, im in (("lin", 0.5 + 0 * n, math.pi * n),
                         ("inv", 0.5 + 0 * n, N / math.pi * (N / (2 * n + 1) - 1)),
                         ("real", n + 1, 0 * n)):
        la, ai = s4d_init(init, H, N, dtype=torch.float64)
        assert la.shape == ai.shape == (H, N // 2)
        torch.testing.assert_close(torch.exp(la), re.expand(H, -1), msg=init)
        torch.testing.assert_close(ai, im.expand(H, -1), msg=init)


def test_random_init_is_seeded_and_per_channel():
    a = s4d_init("random", 4, 32, generator=torch.Generator().manual_seed(0))
    b = s4d_init("random", 4, 32, generator=torch.Generator().manual_seed(0))
    c = s4d_init("random", 4, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0][0], a[0][1])
    assert a[1].abs().max() < 6          # low frequencies only, unlike the HiPPO-derived inits


def test_log_dt_range():
    ld = s4d_init_log_dt(1000, 1e-3, 1e-1, generator=torch.Generator().manual_seed(0))
    assert ld.min() >= math.log(1e-3) and ld.max() <= math.log(1e-1)
    assert ld.max() - ld.min() > 0.95 * (math.log(1e-1) - math.log(1e-3))


# ---- validation ------------------------------------------------------------------------------
def test_validation_errors():
    x = make(T=4)
    P = [x[n] for n in PARAMS]
    with pytest.raises(ValueError, match="impl must be one of"):
        s4d(x["u"], *P, impl="triton")
    with pytest.raises(ValueError, match=r"u must have 3 dims \[B, T, H\]"):
        s4d(x["u"][0], *P)
    with pytest.raises(ValueError, match=r"log_dt must have shape \[H\]"):
        s4d(x["u"], x["log_dt"][:2], *P[1:])
    with pytest.raises(ValueError, match=r"A_imag must have shape \[H, N\]"):
        s4d(x["u"], P[0], P[1], P[2][:, :3], *P[3:])
    with pytest.raises(ValueError, match=r"C must have shape \[H, N, re/im\]"):
        s4d(x["u"], *P[:3], torch.randn(3, 4, 3, dtype=torch.float64), P[4])
    with pytest.raises(TypeError, match="C must have dtype in"):
        s4d(x["u"], *P[:3], torch.ones(3, 4, 2, dtype=torch.int64), P[4])
    with pytest.raises(ValueError, match=r"C must have shape \[H, N\]"):
        s4d(x["u"], *P[:3], torch.ones(3, 5, dtype=torch.complex128), P[4])
    with pytest.raises(ValueError, match=r"D must have shape \[H\]"):
        s4d(x["u"], *P[:4], torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"initial_state must have shape \[B, H, N\]"):
        s4d(x["u"], *P, initial_state=torch.zeros(2, 3, 5, dtype=torch.complex64))
    with pytest.raises(TypeError, match="initial_state must have dtype in"):
        s4d(x["u"], *P, initial_state=torch.zeros(2, 3, 4, 2, dtype=torch.float16))
    with pytest.raises(ValueError, match="with cu_seqlens the batch dimension must be 1"):
        s4d(x["u"], *P, cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"initial_state must have shape \[num_seqs, H, N\]"):
        s4d(x["u"][:1], *P, cu_seqlens=torch.tensor([0, 1, 4]), initial_state=torch.zeros(1, 3, 4, dtype=torch.complex128))


def test_step_validation_errors():
    x = make(T=1)
    P = [x[n] for n in PARAMS]
    st = torch.zeros(2, 3, 4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"u must have 2 dims \[B, H\]"):
        s4d_step(x["u"], *P, st)
    with pytest.raises(ValueError, match=r"state must have shape \[B, H, N, re/im\]"):
        s4d_step(x["u"][:, 0], *P, st[:1])
    with pytest.raises(TypeError, match="state must be a torch.Tensor"):
        s4d_step(x["u"][:, 0], *P, None)
    with pytest.raises(ValueError, match="impl must be one of"):
        s4d_step(x["u"][:, 0], *P, st, impl="conv")


def test_init_validation_errors():
    with pytest.raises(ValueError, match="init must be one of"):
        s4d_init("hippo", 2, 8)
    with pytest.raises(ValueError, match="d_state must be an even int >= 2"):
        s4d_init("lin", 2, 7)
    with pytest.raises(ValueError, match="need 0 < dt_min <= dt_max"):
        s4d_init_log_dt(2, 1e-1, 1e-3)
