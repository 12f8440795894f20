"""Attention layer: spec forward, KV-cache decode / continuation (RoPE, NoPE, window, GQA), varlen."""
import math

import pytest
import torch
import torch.nn.functional as F

from mamba3.layers.attention import Attention, AttentionCache

D64 = torch.float64


def layer(**kw):
    torch.manual_seed(0)
    cfg = dict(num_heads=4, num_kv_heads=2, dtype=D64)
    cfg.update(kw)
    return Attention(32, **cfg)


def inputs(B=2, T=9, seed=1):
    return torch.randn(B, T, 32, generator=torch.Generator().manual_seed(seed), dtype=D64)


def test_parameters_and_cache_layout():
    m = Attention(64, num_heads=8, num_kv_heads=2, qkv_bias=True, layer_idx=1)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {"in_proj.weight": (8 * (8 + 4), 64), "in_proj.bias": (96,), "out_proj.weight": (64, 64)}
    assert set(Attention(64, num_heads=4).state_dict()) == {"in_proj.weight", "out_proj.weight"}
    c = m.allocate_inference_cache(3, 16)
    assert isinstance(c, AttentionCache) and c.k.shape == (3, 16, 2, 8) and c.seqlen.dtype == torch.long
    with pytest.raises(ValueError, match="needs max_seqlen"):
        m.allocate_inference_cache(3)


def manual_forward(m, x):
    """Loop over query positions: RoPE'd q/k (halves), GQA by head // group, softmax over the window."""
    B, T, _ = x.shape
    H, Hkv, D = m.num_heads, m.num_kv_heads, m.head_dim
    q, k, v = m.in_proj(x).split([H * D, Hkv * D, Hkv * D], -1)
    q, k, v = q.unflatten(-1, (H, D)), k.unflatten(-1, (Hkv, D)), v.unflatten(-1, (Hkv, D))
    if m.rope:
        inv = m.rope_base ** (-torch.arange(0, D // 2, dtype=D64) * 2 / D)
        ang = torch.arange(T, dtype=D64)[:, None] * inv
        rot = lambda t: torch.cat([t[..., :D // 2] * ang.cos()[:, None] - t[..., D // 2:] * ang.sin()[:, None],
                                   t[..., D // 2:] * ang.cos()[:, None] + t[..., :D // 2] * ang.sin()[:, None]], -1)
        q, k = rot(q), rot(k)
    out = torch.zeros(B, T, H, D, dtype=D64)
    for t in range(T):
        lo = 0 if m.window is None else max(0, t - m.window + 1)
        for h in range(H):
            kv = h // (H // Hkv)
            w = torch.softmax(torch.einsum("bd,bsd->bs", q[:, t, h], k[:, lo:t + 1, kv]) / math.sqrt(D), -1)
            out[:, t, h] = torch.einsum("bs,bsd->bd", w, v[:, lo:t + 1, kv])
    return m.out_proj(out.flatten(-2))


@pytest.mark.parametrize("kw", [dict(), dict(rope=False), dict(window=3), dict(num_kv_heads=1, window=2),
                                dict(num_kv_heads=4, rope=False, window=4)])
def test_forward_matches_spec(kw):
    m = layer(**kw)
    x = inputs()
    torch.testing.assert_close(m(x), manual_forward(m, x))
    torch.testing.assert_close(layer(impl="reference", **kw)(x), m(x))


@pytest.mark.parametrize("kw", [dict(), dict(rope=False), dict(window=3)])
def test_step_loop_and_continuation_equal_forward(kw):
    m = layer(**kw)
    x = inputs(T=10)
    full = m(x)
    cache = m.allocate_inference_cache(2, 12)
    steps = torch.stack([m.step(x[:, t], cache) for t in range(10)], 1)
    torch.testing.assert_close(steps, full)
    assert cache.seqlen.tolist() == [10, 10]
    cache.reset()
    parts = [m(x[:, :4], cache=cache), m(x[:, 4:5], cache=cache), m.step(x[:, 5:6], cache), m(x[:, 6:], cache=cache)]
    torch.testing.assert_close(torch.cat(parts, 1), full)


def test_varlen_with_and_without_cache_equals_per_sequence():
    m = layer(window=4)
    lengths = [3, 6, 1]
    cu = torch.tensor([0, 3, 9, 10])
    x = inputs(B=1, T=10)
    y = m(x, cu_seqlens=cu)
    cache = m.allocate_inference_cache(3, 8)
    yc = m(x, cache=cache, cu_seqlens=cu)                  # rows reach different lengths
    assert cache.seqlen.tolist() == lengths
    nxt = inputs(B=3, T=2, seed=7)
    z = torch.stack([m.step(nxt[:, t], cache) for t in range(2)], 1)
    for i, (a, n) in enumerate(zip(cu[:-1].tolist(), lengths)):
        whole = m(torch.cat([x[:, a:a + n], nxt[i:i + 1]], 1))
        torch.testing.assert_close(y[:, a:a + n], whole[:, :n])
        torch.testing.assert_close(yc[:, a:a + n], whole[:, :n])
        torch.testing.assert_close(z[i:i + 1], whole[:, n:])


def test_float32_backward():
    m = layer(dtype=torch.float32, window=3)
    x = inputs().float().requires_grad_()
    m(x).square().mean().backward()
    assert torch.isfinite(x.grad).all() and m.in_proj.weight.grad.abs().sum() > 0


def test_validation_errors():
    with pytest.raises(ValueError, match="num_kv_heads=3 must be a positive divisor of num_heads=4"):
        Attention(32, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="num_heads=5 must divide d_model=32"):
        Attention(32, num_heads=5)
    with pytest.raises(ValueError, match="rope needs an even head_dim"):
        Attention(32, num_heads=4, head_dim=7)
    with pytest.raises(ValueError, match="window must be None or a positive int"):
        Attention(32, num_heads=4, window=0)
    m = layer()
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, d_model\]"):
        m(torch.randn(2, 3, 16, dtype=D64))
    cache = m.allocate_inference_cache(2, 4)
    with pytest.raises(ValueError, match="cache holds batch 2 but the input"):
        m(inputs(B=3), cache=cache)
    with pytest.raises(ValueError, match="KV cache overflow"):
        m(inputs(T=5), cache=cache)
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, d_model\]"):
        m.step(inputs(T=2), cache)


@pytest.mark.parametrize("window", [None, 3, 20])
def test_graph_capture_path_matches(monkeypatch, window):
    """The sync-free step used under CUDA-graph capture (whole buffer, mask only) equals forward."""
    import mamba3.layers.attention as mod
    monkeypatch.setattr(mod, "_capturing", lambda device: True)
    m = layer(window=window)
    x = inputs(T=6)
    full = m(x)
    cache = m.allocate_inference_cache(2, 9)
    m(x[:, :2], cache=cache)
    steps = torch.stack([m.step(x[:, t], cache) for t in range(2, 6)], 1)
    torch.testing.assert_close(steps, full[:, 2:])


def test_step_overflow_error():
    m = layer()
    cache = m.allocate_inference_cache(2, 2)
    m.step(inputs(T=1)[:, 0], cache)
    m.step(inputs(T=1)[:, 0], cache)
    with pytest.raises(ValueError, match="KV cache overflow: rows at lengths \\[2, 2\\] cannot take another token"):
        m.step(inputs(T=1)[:, 0], cache)


def test_ring_cache_for_sliding_window():
    """window < max_seqlen: the cache keeps `window` slots; prefill chunks longer than the window,
    ragged continuations and decode far past the ring size all equal the full forward."""
    m = layer(window=3, num_kv_heads=1)
    x = inputs(T=17)
    full = m(x)
    cache = m.allocate_inference_cache(2, 64)
    assert cache.ring and cache.k.shape == (2, 3, 1, 8)
    parts = [m(x[:, :7], cache=cache), m(x[:, 7:8], cache=cache), m(x[:, 8:10], cache=cache)]
    parts += [m.step(x[:, t:t + 1], cache) for t in range(10, 17)]
    torch.testing.assert_close(torch.cat(parts, 1), full)
    assert cache.seqlen.tolist() == [17, 17]
    # ragged rows through cu_seqlens: row 0 gets 5 tokens, row 1 gets 1, then decode together
    cache.reset()
    cu = torch.tensor([0, 5, 6])
    y = m(torch.cat([x[:1, :5], x[1:, :1]], 1), cache=cache, cu_seqlens=cu)
    z = torch.stack([m.step(x[:, 6 + t], cache) for t in range(4)], 1)
    torch.testing.assert_close(y[:, :5], full[:1, :5])
    torch.testing.assert_close(y[:, 5:], full[1:, :1])
    torch.testing.assert_close(z[0], m(torch.cat([x[0, :5], x[0, 6:10]])[None])[0, 5:])
    torch.testing.assert_close(z[1], m(torch.cat([x[1, :1], x[1, 6:10]])[None])[0, 1:])


def test_window_not_shorter_than_cache_uses_full_buffer():
    m = layer(window=6)
    cache = m.allocate_inference_cache(2, 6)
    assert not cache.ring and cache.k.shape[1] == 6
    x = inputs(T=6)
    parts = [m(x[:, :2], cache=cache)] + [m.step(x[:, t], cache)[:, None] for t in range(2, 6)]
    torch.testing.assert_close(torch.cat(parts, 1), m(x))
