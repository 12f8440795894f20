"""Mamba2 layer: official state-dict layout, step == forward, continuation, varlen, options."""
import pytest
import torch

from mamba3.layers.cache import LayerCache
from mamba3.layers.mamba2 import Mamba2, Mamba2Cache

F64 = torch.float64


def layer(**kw):
    torch.manual_seed(0)
    args = dict(d_model=16, d_state=8, headdim=4, ngroups=2, chunk_size=4)
    args.update(kw)
    m = Mamba2(**args).double()
    with torch.no_grad():  # non-trivial norm weight / D so that every parameter matters
        m.D.uniform_(0.5, 1.5)
        if m.rmsnorm:
            m.norm.weight.uniform_(0.5, 1.5)
    return m


def test_state_dict_matches_official_layout():
    m = Mamba2(d_model=64, d_state=16, headdim=16, ngroups=2)
    d_inner, H, G, N = 128, 8, 2, 16
    expected = {
        "dt_bias": (H,), "A_log": (H,), "D": (H,),
        "in_proj.weight": (2 * d_inner + 2 * G * N + H, 64),
        "conv1d.weight": (d_inner + 2 * G * N, 1, 4), "conv1d.bias": (d_inner + 2 * G * N,),
        "norm.weight": (d_inner,), "out_proj.weight": (64, d_inner),
    }
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == expected
    assert m.norm.group_size == d_inner // G and not m.norm.norm_before_gate
    A = torch.exp(m.A_log)
    assert bool(((A >= 1) & (A <= 16)).all())
    dt = torch.nn.functional.softplus(m.dt_bias)
    assert bool(((dt >= 1e-3 - 1e-6) & (dt <= 0.1 + 1e-6)).all())
    m2 = Mamba2(d_model=64, d_state=16, headdim=16, ngroups=2, D_has_hdim=True, rmsnorm=False, bias=True,
                conv_bias=False)
    keys = {k: tuple(v.shape) for k, v in m2.state_dict().items()}
    assert keys["D"] == (d_inner,) and "norm.weight" not in keys and "conv1d.bias" not in keys
    assert keys["in_proj.bias"] == (2 * d_inner + 2 * G * N + H,) and keys["out_proj.bias"] == (64,)
    m2.load_state_dict(Mamba2(d_model=64, d_state=16, headdim=16, ngroups=2, D_has_hdim=True, rmsnorm=False,
                              bias=True, conv_bias=False).state_dict(), strict=True)


@pytest.mark.parametrize("kw", [{}, dict(rmsnorm=False, D_has_hdim=True), dict(dt_limit=(0.05, 0.2)),
                                dict(norm_before_gate=True, ngroups=1)])
def test_step_loop_equals_forward(kw):
    m = layer(**kw)
    u = torch.randn(2, 11, 16, dtype=F64)
    y = m(u)
    cache = m.allocate_inference_cache(2)
    assert isinstance(cache, Mamba2Cache) and isinstance(cache, LayerCache)
    assert cache.conv.shape == (2, 32 + 2 * m.ngroups * 8, 3) and cache.ssm.shape == (2, 8, 4, 8)
    ys = torch.stack([m.step(u[:, t], cache) for t in range(11)], dim=1)
    torch.testing.assert_close(ys, y, rtol=1e-10, atol=1e-10)
    cache2 = m.allocate_inference_cache(2)
    m(u, cache=cache2)
    torch.testing.assert_close(cache2.ssm, cache.ssm, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(cache2.conv, cache.conv)


def test_step_accepts_three_dim_input():
    m = layer()
    u = torch.randn(2, 1, 16, dtype=F64)
    c1, c2 = m.allocate_inference_cache(2), m.allocate_inference_cache(2)
    out = m.step(u, c1)
    assert out.shape == (2, 1, 16)
    torch.testing.assert_close(out[:, 0], m.step(u[:, 0], c2))


@pytest.mark.parametrize("split", [2, 4, 8, 9])
def test_prefix_continuation_equals_whole(split):
    m = layer()
    u = torch.randn(2, 16, 16, dtype=F64)
    y = m(u)
    cache = m.allocate_inference_cache(2)
    y1 = m(u[:, :split], cache=cache)
    y2 = m(u[:, split:], cache=cache)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-10, atol=1e-10)
    # prefill then decode
    cache = m.allocate_inference_cache(2)
    y1 = m(u[:, :split], cache=cache)
    ys = [m.step(u[:, t], cache) for t in range(split, 16)]
    torch.testing.assert_close(torch.stack(ys, 1), y[:, split:], rtol=1e-10, atol=1e-10)


def test_varlen_equals_per_sequence_with_cache():
    m = layer()
    lengths = [5, 2, 9]
    cu = torch.tensor([0, 5, 7, 16], dtype=torch.int32)
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
    (dict(headdim=5), r"headdim=5 must divide d_inner"),
    (dict(ngroups=3), r"ngroups=3 must divide the number of heads"),
    (dict(d_state=0), r"d_state must be a positive int"),
    (dict(A_init_range=(0, 16)), r"A_init_range must satisfy"),
    (dict(d_ssm=16), r"d_ssm .* is not supported"),
    (dict(process_group=object()), r"tensor parallelism \(process_group\) is not supported"),
])
def test_constructor_errors(kw, match):
    args = dict(d_model=16, d_state=8, headdim=4)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        Mamba2(**args)


def test_input_errors():
    m = layer()
    with pytest.raises(ValueError, match=r"u must have shape \[B, T, d_model\]"):
        m(torch.randn(2, 3, 15, dtype=F64))
    cache = m.allocate_inference_cache(3)
    with pytest.raises(ValueError, match=r"cache holds batch 3 but the input \(number of sequences\) has batch 2"):
        m(torch.randn(2, 3, 16, dtype=F64), cache=cache)
    with pytest.raises(ValueError, match=r"u must have shape \[B, T, d_model\]"):
        m.step(torch.randn(3, 2, 16, dtype=F64), cache)


def test_matches_transformers_mamba2_mixer():
    """Cross-check against an independent implementation (same state-dict names and math)."""
    tf = pytest.importorskip("transformers", reason="transformers is an optional comparison, not a dependency")
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    torch.manual_seed(0)
    cfg = tf.Mamba2Config(hidden_size=32, state_size=8, expand=2, head_dim=8, num_heads=8, n_groups=2, chunk_size=8,
                          conv_kernel=4, use_bias=False, use_conv_bias=True)
    theirs = Mamba2Mixer(cfg, layer_idx=0).eval()
    ours = Mamba2(32, d_state=8, headdim=8, ngroups=2, chunk_size=8).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    u = torch.randn(2, 20, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(u), theirs(u), rtol=1e-4, atol=1e-5)


def test_bfloat16_layer_keeps_fp32_ssm_state():
    torch.manual_seed(0)
    m = Mamba2(16, d_state=8, headdim=4, chunk_size=4, dtype=torch.bfloat16)
    u = torch.randn(2, 9, 16, dtype=torch.bfloat16)
    y = m(u)
    cache = m.allocate_inference_cache(2)
    assert cache.ssm.dtype == torch.float32 and cache.conv.dtype == torch.bfloat16
    ys = torch.stack([m.step(u[:, t], cache) for t in range(9)], dim=1)
    assert y.dtype == ys.dtype == torch.bfloat16
    torch.testing.assert_close(ys.float(), y.float(), rtol=5e-2, atol=5e-2)


def test_positional_arguments_follow_official_order():
    m = Mamba2(16, 8, 3, None, 2, 4, None, 2)   # d_model, d_state, d_conv, conv_init, expand, headdim, d_ssm, ngroups
    assert (m.d_state, m.d_conv, m.headdim, m.ngroups) == (8, 3, 4, 2)


def test_triton_impl_matches_chunked():
    """impl='triton' (the Mamba-3 SISO kernels; Triton interpreter without CUDA) in the layer."""
    pytest.importorskip("triton", reason="triton is not installed")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m = layer(chunk_size=16).float().to(dev)
    u = torch.randn(2, 21, 16, device=dev)
    cache = m.allocate_inference_cache(2)
    y = m(u, cache=cache)
    m.impl = "triton"
    cache_t = m.allocate_inference_cache(2)
    torch.testing.assert_close(m(u, cache=cache_t), y, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cache_t.ssm, cache.ssm, rtol=1e-4, atol=1e-5)
