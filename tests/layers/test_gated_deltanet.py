"""GatedDeltaNet layer: fla-compatible parameters, spec forward, step / continuation / varlen."""
import pytest
import torch
import torch.nn.functional as F

from mamba3.layers.gated_deltanet import GatedDeltaNet, GatedDeltaNetCache

D64 = torch.float64


def layer(**kw):
    torch.manual_seed(0)
    cfg = dict(head_dim=8, num_heads=2, num_v_heads=4, expand_v=1.5, dtype=D64)
    cfg.update(kw)
    return GatedDeltaNet(32, **cfg)


def inputs(B=2, T=9, seed=1):
    return torch.randn(B, T, 32, generator=torch.Generator().manual_seed(seed), dtype=D64)


def test_state_dict_matches_fla_names_and_shapes():
    m = GatedDeltaNet(64, head_dim=16, num_heads=2, layer_idx=3)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "q_proj.weight": (32, 64), "k_proj.weight": (32, 64), "v_proj.weight": (64, 64),
        "a_proj.weight": (2, 64), "b_proj.weight": (2, 64), "g_proj.weight": (64, 64), "o_proj.weight": (64, 64),
        "q_conv1d.weight": (32, 1, 4), "k_conv1d.weight": (32, 1, 4), "v_conv1d.weight": (64, 1, 4),
        "A_log": (2,), "dt_bias": (2,), "o_norm.weight": (32,)}
    assert m.head_v_dim == 32 and m.layer_idx == 3
    A = m.A_log.exp()
    assert bool(((A > 0) & (A <= 16)).all())
    dt = F.softplus(m.dt_bias)
    assert bool(((dt >= 1e-4 - 1e-7) & (dt <= 0.1 + 1e-6)).all())
    keys = set(GatedDeltaNet(64, head_dim=16, num_heads=2, use_gate=False, use_short_conv=False,
                             conv_bias=True).state_dict())
    assert "g_proj.weight" not in keys and "q_conv1d.weight" not in keys and "o_norm.weight" in keys
    assert "q_conv1d.bias" in GatedDeltaNet(64, head_dim=16, num_heads=2, conv_bias=True).state_dict()


def manual_forward(m, x):
    """The layer written out from SPEC section 11 with a token loop."""
    B, T, _ = x.shape
    conv = lambda u, mod: F.silu(F.conv1d(F.pad(u.transpose(1, 2), (m.conv_size - 1, 0)), mod.weight,
                                          groups=u.shape[-1]).transpose(1, 2))
    q = conv(m.q_proj(x), m.q_conv1d).unflatten(-1, (m.num_heads, m.head_k_dim))
    k = conv(m.k_proj(x), m.k_conv1d).unflatten(-1, (m.num_heads, m.head_k_dim))
    v = conv(m.v_proj(x), m.v_conv1d).unflatten(-1, (m.num_v_heads, m.head_v_dim))
    l2 = lambda u: u / torch.sqrt(u.pow(2).sum(-1, keepdim=True) + 1e-6)   # fla's l2norm eps
    q, k = l2(q), l2(k)
    rep = m.num_v_heads // m.num_heads
    q, k = q.repeat_interleave(rep, 2), k.repeat_interleave(rep, 2)
    alpha = torch.exp(-m.A_log.exp() * F.softplus(m.a_proj(x) + m.dt_bias))
    beta = torch.sigmoid(m.b_proj(x)) * (2.0 if m.allow_neg_eigval else 1.0)
    S = torch.zeros(B, m.num_v_heads, m.head_v_dim, m.head_k_dim, dtype=x.dtype)
    eye = torch.eye(m.head_k_dim, dtype=x.dtype)
    outs = []
    for t in range(T):
        kt, bt = k[:, t], beta[:, t, :, None, None]
        S = alpha[:, t, :, None, None] * S @ (eye - bt * kt[..., :, None] * kt[..., None, :]) \
            + bt * v[:, t, ..., None] * kt[..., None, :]
        outs.append((S @ (q[:, t, ..., None] * m.head_k_dim ** -0.5))[..., 0])
    o = torch.stack(outs, 1)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + m.norm_eps) * m.o_norm.weight
    o = o * F.silu(m.g_proj(x).unflatten(-1, (m.num_v_heads, m.head_v_dim)))
    return m.o_proj(o.flatten(-2))


@pytest.mark.parametrize("neg", [False, True])
def test_forward_matches_spec(neg):
    m = layer(allow_neg_eigval=neg)
    x = inputs()
    torch.testing.assert_close(m(x), manual_forward(m, x))


def test_modes_and_impls_agree():
    x = inputs(T=11)
    ref = layer(mode="fused_recurrent")(x)
    torch.testing.assert_close(layer(chunk_size=4)(x), ref)
    torch.testing.assert_close(layer(impl="reference")(x), ref)


def test_step_loop_equals_forward():
    m = layer(allow_neg_eigval=True)
    x = inputs(T=6)
    full = m(x)
    cache = m.allocate_inference_cache(2)
    assert isinstance(cache, GatedDeltaNetCache) and cache.ssm.dtype == D64
    outs = [m.step(x[:, t] if t % 2 else x[:, t:t + 1], cache) for t in range(6)]
    outs = [o if o.dim() == 3 else o.unsqueeze(1) for o in outs]
    torch.testing.assert_close(torch.cat(outs, 1), full)


def test_prefix_plus_continuation_equals_whole():
    m = layer(chunk_size=4)
    x = inputs(T=13)
    full = m(x)
    cache = m.allocate_inference_cache(2)
    y1 = m(x[:, :5], cache=cache)
    y2 = m(x[:, 5:11], cache=cache)
    y3 = m.step(x[:, 11], cache)
    y4 = m(x[:, 12:], cache=cache)
    torch.testing.assert_close(torch.cat([y1, y2, y3[:, None], y4], 1), full)


def test_varlen_equals_per_sequence():
    m = layer(chunk_size=4)
    lengths = [4, 1, 7]
    x = inputs(B=1, T=12)
    cu = torch.tensor([0, 4, 5, 12])
    cache = m.allocate_inference_cache(3)
    y = m(x, cache=cache, cu_seqlens=cu)
    nxt = inputs(B=3, T=1, seed=5)
    z = m.step(nxt[:, 0], cache)
    for i, (a, n) in enumerate(zip(cu[:-1].tolist(), lengths)):
        c = m.allocate_inference_cache(1)
        torch.testing.assert_close(y[:, a:a + n], m(x[:, a:a + n], cache=c))
        torch.testing.assert_close(z[i:i + 1], m.step(nxt[i, 0][None], c))


def test_no_gate_no_conv_runs_and_backward():
    m = layer(use_gate=False, use_short_conv=False, dtype=torch.float32)
    x = inputs().float().requires_grad_()
    y = m(x)
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(m.A_log.grad).all()
    cache = m.allocate_inference_cache(2)
    assert cache.conv_q is None
    torch.testing.assert_close(m.step(x[:, 0].detach(), cache), y[:, 0].detach(), rtol=1e-5, atol=1e-5)


def test_validation_errors():
    with pytest.raises(ValueError, match="num_v_heads=3 must be a multiple of num_heads=2"):
        GatedDeltaNet(32, head_dim=8, num_heads=2, num_v_heads=3)
    with pytest.raises(ValueError, match="mode must be one of"):
        GatedDeltaNet(32, head_dim=8, num_heads=2, mode="parallel")
    with pytest.raises(ValueError, match="expand_v=0.3 times head_dim=8 must be a positive integer"):
        GatedDeltaNet(32, head_dim=8, num_heads=2, expand_v=0.3)
    with pytest.raises(ValueError, match="hidden_size must be a positive int"):
        GatedDeltaNet(0)
    m = layer()
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, hidden_size\]"):
        m(torch.randn(2, 3, 16, dtype=D64))
    with pytest.raises(ValueError, match="cache holds batch 3 but the input"):
        m(inputs(), cache=m.allocate_inference_cache(3))
    with pytest.raises(ValueError, match=r"x must have shape \[B, T, hidden_size\]"):
        m.step(inputs(T=2), m.allocate_inference_cache(2))
