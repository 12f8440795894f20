"""S4D layer: protocol (forward / cache continuation / step / varlen), init, validation."""
import math

import pytest
import torch

from mamba3.layers import S4D, LayerCache, S4DCache
from mamba3.ops.s4d import legs_diagonal


def layer(init="legs", d=6, n=8, seed=0, **kw):
    torch.manual_seed(seed)
    m = S4D(d, d_state=n, init=init, dt_min=1e-2, dt_max=0.5, dtype=torch.float64, **kw)
    with torch.no_grad():   # move away from the symmetric init so the test can see mistakes
        m.A_imag.add_(torch.randn_like(m.A_imag))
    return m


def x_in(B=2, T=17, d=6, seed=1):
    return torch.randn(B, T, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_forward_shape_and_reference_impl_agrees():
    m = layer()
    x = x_in()
    y = m(x)
    assert y.shape == x.shape and y.dtype == torch.float64
    m.impl = "reference"
    torch.testing.assert_close(m(x), y, atol=1e-12, rtol=0)


def test_cache_is_layer_cache_with_batch_first():
    m = layer()
    c = m.allocate_inference_cache(3)
    assert isinstance(c, S4DCache) and isinstance(c, LayerCache)
    assert c.state.shape == (3, 6, 4, 2) and c.state.dtype == torch.float64 and c.batch_size == 3
    m32 = S4D(4, d_state=6)
    c32 = m32.allocate_inference_cache(2, 100)
    assert c32.state.shape == (2, 4, 3, 2) and c32.state.dtype == torch.float32


def test_step_loop_equals_forward():
    m = layer()
    x = x_in()
    y = m(x)
    c = m.allocate_inference_cache(2)
    ys = [m.step(x[:, t], c) if t % 2 else m.step(x[:, t : t + 1], c)[:, 0] for t in range(x.shape[1])]
    torch.testing.assert_close(torch.stack(ys, 1), y, atol=1e-12, rtol=0)


@pytest.mark.parametrize("split", [1, 9])
def test_prefix_then_continuation_and_step_equal_whole(split):
    m = layer(init="inv")
    x = x_in(T=14)
    y = m(x)
    c = m.allocate_inference_cache(2)
    y1 = m(x[:, :split], cache=c)
    c2 = c.clone()
    y2 = m(x[:, split:], cache=c)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, atol=1e-12, rtol=0)
    ys = [m.step(x[:, t], c2) for t in range(split, 14)]
    torch.testing.assert_close(torch.stack(ys, 1), y[:, split:], atol=1e-12, rtol=0)
    torch.testing.assert_close(c2.state, c.state, atol=1e-12, rtol=0)


def test_varlen_equals_per_sequence_with_cache_rows():
    m = layer(init="lin")
    lens = [4, 7, 2]
    seqs = [x_in(B=1, T=n, seed=10 + i) for i, n in enumerate(lens)]
    cu = torch.tensor([0, 4, 11, 13])
    c = m.allocate_inference_cache(3)
    c.state.normal_()
    start = c.state.clone()
    y = m(torch.cat(seqs, 1), cache=c, cu_seqlens=cu)
    for i, (s, n) in enumerate(zip([0, 4, 11], lens)):
        ci = m.allocate_inference_cache(1)
        ci.state.copy_(start[i : i + 1])
        yi = m(seqs[i], cache=ci)
        torch.testing.assert_close(y[:, s : s + n], yi, atol=1e-12, rtol=0)
        torch.testing.assert_close(c.state[i : i + 1], ci.state, atol=1e-12, rtol=0)


@pytest.mark.parametrize("init", ["legs", "lin", "inv", "real", "random"])
def test_init_and_gradients_reach_every_parameter(init):
    torch.manual_seed(0)
    m = S4D(4, d_state=8, init=init)
    if init == "legs":
        torch.testing.assert_close(m.A_imag.detach(), legs_diagonal(8).imag.float().expand(4, -1))
    if init == "real":
        torch.testing.assert_close(-torch.exp(m.log_A_real.detach()), -torch.arange(1.0, 5.0).expand(4, -1))
    assert m.log_dt.min() >= math.log(1e-3) - 1e-6 and m.log_dt.max() <= math.log(1e-1) + 1e-6
    m(torch.randn(2, 9, 4)).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert all(getattr(p, "_no_weight_decay", False) for p in m.ssm_parameters())


def test_bfloat16_layer_runs_with_fp32_ssm():
    torch.manual_seed(0)
    m = S4D(4, d_state=4, dtype=torch.bfloat16)
    assert m.log_dt.dtype == torch.float32 and m.out_proj.weight.dtype == torch.bfloat16
    x = torch.randn(1, 5, 4, dtype=torch.bfloat16)
    y = m(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    c = m.allocate_inference_cache(1)
    assert c.state.dtype == torch.float32
    torch.testing.assert_close(m.step(x[:, 0], c).float(), y[:, 0].float(), atol=2e-2, rtol=2e-2)


def test_validation_errors():
    with pytest.raises(ValueError, match="d_state must be an even int >= 2"):
        S4D(4, d_state=5)
    with pytest.raises(ValueError, match="init must be one of"):
        S4D(4, init="hippo")
    with pytest.raises(ValueError, match="d_model must be a positive int"):
        S4D(0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        S4D(4, dropout=1.0)
    m = layer()
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, d_model\]"):
        m(x_in(d=5))
    with pytest.raises(ValueError, match="cache holds batch 3 but the input"):
        m(x_in(), cache=m.allocate_inference_cache(3))
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, d_model\]"):
        m.step(x_in(T=2), m.allocate_inference_cache(2))
    with pytest.raises(ValueError, match="cache holds batch 1 but the input has batch 2"):
        m.step(x_in(T=1), m.allocate_inference_cache(1))
