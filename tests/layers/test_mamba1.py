"""Mamba1 layer: official state-dict layout and init, step == forward, continuation, varlen."""
import math

import pytest
import torch

from mamba3.layers.cache import LayerCache
from mamba3.layers.mamba1 import Mamba1, Mamba1Cache

F64 = torch.float64


def layer(**kw):
    torch.manual_seed(0)
    args = dict(d_model=16, d_state=4, chunk_size=4)
    args.update(kw)
    m = Mamba1(**args).double()
    with torch.no_grad():
        m.D.uniform_(0.5, 1.5)
    return m


def test_state_dict_matches_official_layout_and_init():
    m = Mamba1(d_model=40)
    Di, N, R = 80, 16, math.ceil(40 / 16)
    expected = {
        "A_log": (Di, N), "D": (Di,), "in_proj.weight": (2 * Di, 40), "conv1d.weight": (Di, 1, 4),
        "conv1d.bias": (Di,), "x_proj.weight": (R + 2 * N, Di), "dt_proj.weight": (Di, R),
        "dt_proj.bias": (Di,), "out_proj.weight": (40, Di),
    }
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == expected
    torch.testing.assert_close(m.A_log, torch.log(torch.arange(1, N + 1).float()).repeat(Di, 1))
    assert m.A_log.dtype == torch.float32 and m.D.dtype == torch.float32
    dt = torch.nn.functional.softplus(m.dt_proj.bias)
    assert bool(((dt >= 1e-3 - 1e-6) & (dt <= 0.1 + 1e-6)).all())
    assert float(m.dt_proj.weight.detach().abs().max()) <= R ** -0.5
    c = Mamba1(d_model=40, dt_init="constant", dt_rank=3, bias=True)
    torch.testing.assert_close(c.dt_proj.weight, torch.full((Di, 3), 3 ** -0.5))
    assert c.in_proj.bias.shape == (2 * Di,) and c.out_proj.bias.shape == (40,)


def test_step_loop_equals_forward():
    m = layer()
    u = torch.randn(2, 11, 16, dtype=F64)
    y = m(u)
    cache = m.allocate_inference_cache(2)
    assert isinstance(cache, Mamba1Cache) and isinstance(cache, LayerCache)
    assert cache.conv.shape == (2, 32, 3) and cache.ssm.shape == (2, 32, 4) and cache.ssm.dtype == F64
    ys = torch.stack([m.step(u[:, t], cache) for t in range(11)], dim=1)
    torch.testing.assert_close(ys, y, rtol=1e-10, atol=1e-10)
    cache2 = m.allocate_inference_cache(2)
    m(u, cache=cache2)
    torch.testing.assert_close(cache2.ssm, cache.ssm, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(cache2.conv, cache.conv)
    assert m.step(u[:, :1], cache).shape == (2, 1, 16)


@pytest.mark.parametrize("split", [1, 4, 8, 10])
def test_prefix_continuation_equals_whole(split):
    m = layer()
    u = torch.randn(2, 16, 16, dtype=F64)
    y = m(u)
    cache = m.allocate_inference_cache(2)
    y1 = m(u[:, :split], cache=cache)
    y2 = m(u[:, split:], cache=cache)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-10, atol=1e-10)
    cache = m.allocate_inference_cache(2)
    m(u[:, :split], cache=cache)
    ys = [m.step(u[:, t], cache) for t in range(split, 16)]
    torch.testing.assert_close(torch.stack(ys, 1), y[:, split:], rtol=1e-10, atol=1e-10)


def test_varlen_equals_per_sequence_with_cache():
    m = layer()
    lengths = [6, 1, 9]
    cu = torch.tensor([0, 6, 7, 16], dtype=torch.int64)
    u = torch.randn(1, 16, 16, dtype=F64)
    cache = m.allocate_inference_cache(3)
    y = m(u, cache=cache, cu_seqlens=cu)
    for i, n in enumerate(lengths):
        a = int(cu[i])
        ci = m.allocate_inference_cache(1)
        torch.testing.assert_close(y[:, a : a + n], m(u[:, a : a + n], cache=ci), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(cache.ssm[i : i + 1], ci.ssm, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(cache.conv[i : i + 1], ci.conv)


def test_reference_impl_matches_chunked_and_grads_flow():
    m = layer()
    u = torch.randn(2, 9, 16, dtype=F64, requires_grad=True)
    y = m(u)
    m.impl = "reference"
    torch.testing.assert_close(m(u), y, rtol=1e-10, atol=1e-10)
    m.impl = "auto"
    y.square().sum().backward()
    assert torch.isfinite(u.grad).all()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_float32_layer_close_to_float64():
    m = layer()
    u = torch.randn(2, 20, 16, dtype=F64)
    y64 = m(u)
    y32 = m.float()(u.float())
    torch.testing.assert_close(y32.double(), y64, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kw,match", [
    (dict(dt_rank=0), r"dt_rank must be 'auto' or a positive int"),
    (dict(dt_init="normal"), r"dt_init must be 'random' or 'constant'"),
    (dict(d_conv=0), r"d_conv must be a positive int"),
])
def test_constructor_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        Mamba1(d_model=16, **kw)


def test_input_errors():
    m = layer()
    with pytest.raises(ValueError, match=r"u must have shape \[B, T, d_model\]"):
        m(torch.randn(2, 3, 8, dtype=F64))
    cache = m.allocate_inference_cache(2)
    with pytest.raises(ValueError, match=r"cache holds batch 2 but the input has batch 1"):
        m.step(torch.randn(1, 16, dtype=F64), cache)


def test_matches_transformers_mamba_mixer():
    """Cross-check against an independent implementation (same state-dict names and math)."""
    tf = pytest.importorskip("transformers", reason="transformers is an optional comparison, not a dependency")
    from transformers.models.mamba.modeling_mamba import MambaMixer

    torch.manual_seed(0)
    cfg = tf.MambaConfig(hidden_size=32, state_size=8, expand=2, conv_kernel=4, use_bias=False, use_conv_bias=True)
    theirs = MambaMixer(cfg, layer_idx=0).eval()
    ours = Mamba1(32, d_state=8).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    u = torch.randn(2, 20, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(u), theirs(u), rtol=1e-4, atol=1e-5)


def test_bfloat16_layer_keeps_fp32_ssm_state():
    torch.manual_seed(0)
    m = Mamba1(16, d_state=4, dtype=torch.bfloat16)
    u = torch.randn(2, 9, 16, dtype=torch.bfloat16)
    y = m(u)
    cache = m.allocate_inference_cache(2)
    assert cache.ssm.dtype == torch.float32 and cache.conv.dtype == torch.bfloat16
    ys = torch.stack([m.step(u[:, t], cache) for t in range(9)], dim=1)
    assert y.dtype == ys.dtype == torch.bfloat16
    torch.testing.assert_close(ys.float(), y.float(), rtol=5e-2, atol=5e-2)
