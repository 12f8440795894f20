"""Mamba-3 SISO op: chunked vs float64 reference, step, continuation, varlen, validation."""
import math

import pytest
import torch

from mamba3.ops.mamba3 import (Mamba3State, mamba3_siso, mamba3_siso_chunked, mamba3_siso_reference,
                               mamba3_siso_step)

NAMES = ("q", "k", "v", "dA", "dt", "trap", "q_bias", "k_bias", "angles", "D", "z")


def make_inputs(B=2, T=37, G=2, H=4, N=16, P=8, S=4, dtype=torch.float64, per_head_angles=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    dt = torch.nn.functional.softplus(r(B, T, H) - 1.0)
    A = -(torch.rand(H, generator=g, dtype=dtype) + 0.5)
    angles = r(B, T, H, S) if per_head_angles else r(B, T, S)
    return dict(q=r(B, T, G, N), k=r(B, T, G, N), v=r(B, T, H, P), dA=dt * A, dt=dt, trap=r(B, T, H),
                q_bias=r(H, N), k_bias=r(H, N), angles=angles, D=r(H), z=r(B, T, H, P))


def call(fn, x, **kw):
    return fn(*[x[n] for n in NAMES], **kw)


def slice_t(x, a, b):
    return {n: (t[:, a:b] if n not in ("q_bias", "k_bias", "D") else t) for n, t in x.items()}


def assert_state_close(s1, s2, atol=1e-10):
    for name, a, b in zip(Mamba3State._fields, s1, s2):
        torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=0, msg=f"state.{name}")


@pytest.mark.parametrize("chunk", [1, 8, 16, 64])
@pytest.mark.parametrize("per_head_angles", [False, True])
def test_chunked_matches_reference_fp64(chunk, per_head_angles):
    x = make_inputs(per_head_angles=per_head_angles)
    y_ref, s_ref = call(mamba3_siso_reference, x, return_final_state=True)
    y, s = call(mamba3_siso_chunked, x, return_final_state=True, chunk_size=chunk)
    torch.testing.assert_close(y, y_ref, atol=1e-11, rtol=0)
    assert_state_close(s, s_ref)


def test_chunked_matches_reference_fp32_relative():
    x = make_inputs(T=70, dtype=torch.float32, seed=1)
    x64 = {n: t.double() for n, t in x.items()}
    y_ref, _ = call(mamba3_siso_reference, x64)
    y, _ = call(mamba3_siso_chunked, x, chunk_size=16)
    rel = (y.double() - y_ref).norm() / y_ref.norm()
    assert rel < 1e-4, rel


def test_without_optional_inputs_and_single_group():
    x = make_inputs(G=1)
    x["D"], x["z"] = None, None
    y_ref, _ = call(mamba3_siso_reference, x)
    y, _ = call(mamba3_siso_chunked, x, chunk_size=8)
    torch.testing.assert_close(y, y_ref, atol=1e-11, rtol=0)


def test_no_rotation_angles_empty():
    x = make_inputs(S=0)
    y_ref, s_ref = call(mamba3_siso_reference, x, return_final_state=True)
    y, s = call(mamba3_siso_chunked, x, chunk_size=8, return_final_state=True)
    torch.testing.assert_close(y, y_ref, atol=1e-11, rtol=0)
    assert s.angle.shape == (2, 4, 0)


def test_gradcheck_every_input():
    x = make_inputs(B=1, T=7, G=1, H=2, N=4, P=2, S=2, seed=3)
    init = Mamba3State(*(t.requires_grad_() for t in (torch.rand(1, 2, 2, dtype=torch.float64),
                                                        torch.randn(1, 2, 2, 4, dtype=torch.float64),
                                                        torch.randn(1, 2, 4, dtype=torch.float64),
                                                        torch.randn(1, 2, 2, dtype=torch.float64))))
    leaves = [x[n].requires_grad_() for n in NAMES]

    def f(*args):
        xs, st = args[: len(NAMES)], Mamba3State(*args[len(NAMES):])
        y, fin = mamba3_siso_chunked(*xs, initial_state=st, return_final_state=True, chunk_size=3)
        return y, fin.ssm, fin.k, fin.v

    assert torch.autograd.gradcheck(f, (*leaves, *init), eps=1e-6, atol=1e-6)


def test_gradients_match_reference():
    x = make_inputs(T=19, seed=4)
    grads = []
    for fn in (mamba3_siso_reference, mamba3_siso_chunked):
        xs = {n: t.clone().requires_grad_() for n, t in x.items()}
        y, _ = call(fn, xs, chunk_size=8)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        grads.append({n: t.grad for n, t in xs.items()})
    for n in NAMES:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-9, rtol=0, msg=f"grad of {n}")


@pytest.mark.parametrize("split", [1, 8, 13, 16, 36])
def test_prefix_then_continuation_equals_whole(split):
    x = make_inputs(T=37)
    y_all, s_all = call(mamba3_siso_chunked, x, return_final_state=True, chunk_size=8)
    y1, s1 = call(mamba3_siso_chunked, slice_t(x, 0, split), return_final_state=True, chunk_size=8)
    y2, s2 = call(mamba3_siso_chunked, slice_t(x, split, 37), initial_state=s1, return_final_state=True, chunk_size=8)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_all, atol=1e-11, rtol=0)
    assert_state_close(s2, s_all)


def test_step_loop_equals_forward():
    x = make_inputs(T=21)
    y_all, s_all = call(mamba3_siso_chunked, x, return_final_state=True, chunk_size=8)
    B, T, H, P = x["v"].shape
    state = Mamba3State(torch.zeros(B, H, 4, dtype=torch.float64), torch.zeros(B, H, P, 16, dtype=torch.float64),
                        torch.zeros(B, H, 16, dtype=torch.float64), torch.zeros(B, H, P, dtype=torch.float64))
    ys = [mamba3_siso_step(*[x[n] if n in ("q_bias", "k_bias", "D") else x[n][:, t] for n in NAMES], state)
          for t in range(T)]
    torch.testing.assert_close(torch.stack(ys, 1), y_all, atol=1e-11, rtol=0)
    assert_state_close(state, s_all)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("with_init", [False, True])
def test_varlen_equals_per_sequence(impl, with_init):
    lengths = [5, 0, 17, 9]
    total = sum(lengths)
    x = make_inputs(B=1, T=total, seed=5)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    inits = [call(mamba3_siso_chunked, make_inputs(B=1, T=3, seed=10 + i), return_final_state=True)[1]
             for i in range(len(lengths))]
    init = Mamba3State(*(torch.cat(p, 0) for p in zip(*inits))) if with_init else None
    y, s = call(mamba3_siso, x, cu_seqlens=cu, initial_state=init, return_final_state=True, impl=impl, chunk_size=8)
    start = 0
    for i, n in enumerate(lengths):
        yi, si = call(mamba3_siso_reference, slice_t(x, start, start + n), return_final_state=True,
                      initial_state=None if init is None else Mamba3State(*(t[i : i + 1] for t in init)))
        torch.testing.assert_close(y[:, start : start + n], yi, atol=1e-11, rtol=0)
        assert_state_close(Mamba3State(*(t[i : i + 1] for t in s)), si)
        start += n


def test_long_sequence_phase_is_wrapped_and_accurate():
    x = make_inputs(B=1, T=600, G=1, H=1, N=4, P=2, S=2, dtype=torch.float32, seed=6)
    x["dt"] = torch.full_like(x["dt"], 0.9)
    x["dA"] = -0.01 * x["dt"]
    _, s = call(mamba3_siso_chunked, x, return_final_state=True)
    x64 = {n: t.double() for n, t in x.items()}
    _, s64 = call(mamba3_siso_reference, x64, return_final_state=True)
    assert float(s.angle.max()) < 2 * math.pi and float(s.angle.min()) >= 0
    d = torch.remainder(s.angle.double() - s64.angle + math.pi, 2 * math.pi) - math.pi
    assert d.abs().max() < 1e-3


def test_empty_sequence_returns_initial_state():
    x = make_inputs(T=0)
    _, s0 = call(mamba3_siso_chunked, make_inputs(T=5), return_final_state=True)
    y, s = call(mamba3_siso_chunked, x, initial_state=s0, return_final_state=True)
    assert y.shape == (2, 0, 4, 8)
    assert_state_close(s, s0)


def test_dispatch_auto_on_cpu_is_chunked():
    x = make_inputs(T=9)
    torch.testing.assert_close(call(mamba3_siso, x)[0], call(mamba3_siso_chunked, x)[0])


# ---------------------------------------------------------------- validation
def _bad(**changes):
    x = make_inputs(T=6)
    x.update(changes)
    return x


@pytest.mark.parametrize("changes,exc,match", [
    (dict(v=torch.randn(2, 6, 4)), ValueError, r"v must have 4 dims \[B, T, H, P\]"),
    (dict(q=torch.randn(2, 6, 3, 16, dtype=torch.float64)), ValueError, r"G=3 .* must divide the number of heads H=4"),
    (dict(k=torch.randn(2, 6, 2, 8, dtype=torch.float64)), ValueError, r"k must have shape \[B, T, G, N\]"),
    (dict(dt=torch.randn(2, 5, 4, dtype=torch.float64)), ValueError, r"dt must have shape \[B, T, H\]"),
    (dict(q_bias=torch.randn(4, 8, dtype=torch.float64)), ValueError, r"q_bias must have shape \[H, N\]"),
    (dict(angles=torch.randn(2, 6, 9, dtype=torch.float64)), ValueError, r"S=9 rotary angles but d_state N=16"),
    (dict(D=torch.randn(3, dtype=torch.float64)), ValueError, r"D must have shape \[H\]"),
    (dict(z=torch.randn(2, 6, 4, 7, dtype=torch.float64)), ValueError, r"z must have shape \[B, T, H, P\]"),
    (dict(v=torch.randint(0, 3, (2, 6, 4, 8))), TypeError, r"v must have dtype in"),
    (dict(angles=[1.0]), TypeError, r"angles must be a torch.Tensor"),
])
def test_validation_errors(changes, exc, match):
    with pytest.raises(exc, match=match):
        call(mamba3_siso, _bad(**changes))


def test_validation_cu_seqlens_and_state_and_impl():
    x = make_inputs(B=1, T=6)
    with pytest.raises(ValueError, match="must start at 0 and end at the packed length 6"):
        call(mamba3_siso, x, cu_seqlens=torch.tensor([0, 3, 5]))
    with pytest.raises(TypeError, match="cu_seqlens must be int32 or int64"):
        call(mamba3_siso, x, cu_seqlens=torch.tensor([0.0, 6.0]))
    with pytest.raises(ValueError, match="non-decreasing"):
        call(mamba3_siso, x, cu_seqlens=torch.tensor([0, 4, 2, 6]))
    with pytest.raises(ValueError, match="batch dimension must be 1"):
        call(mamba3_siso, make_inputs(B=2, T=6), cu_seqlens=torch.tensor([0, 6]))
    bad_state = Mamba3State(torch.zeros(1, 4, 4), torch.zeros(1, 4, 8, 15), torch.zeros(1, 4, 16), torch.zeros(1, 4, 8))
    with pytest.raises(ValueError, match=r"initial_state.ssm must have shape \[B, H, P, N\]"):
        call(mamba3_siso, x, initial_state=bad_state)
    with pytest.raises(ValueError, match="impl must be one of"):
        call(mamba3_siso, x, impl="cuda")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        call(mamba3_siso, x, chunk_size=0)
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors"):
        call(mamba3_siso, x, impl="triton")


def test_triton_fits_prunes_configs_over_the_device_shared_memory():
    from mamba3.ops.mamba3.interface import triton_fits
    kb = 1024
    # bf16 forward fits a 99 KB part; the fp32 backward at the default sizes needs an H100-class part
    assert triton_fits(64, 128, 64, torch.bfloat16, backward=False, smem_limit=99 * kb)
    assert not triton_fits(64, 128, 64, torch.float32, backward=True, smem_limit=99 * kb)
    assert triton_fits(64, 128, 64, torch.float32, backward=True, smem_limit=227 * kb)
    assert triton_fits(16, 128, 64, torch.float32, backward=True, smem_limit=99 * kb)  # smaller chunk fits
