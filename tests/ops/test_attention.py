"""Attention: SDPA vs float64 masked-softmax reference (MHA/GQA, window, cache masks, varlen), RoPE."""
import math

import pytest
import torch

from mamba3.ops.attention import apply_rope, attention

D64 = torch.float64


def make(B=2, T=6, S=None, H=4, Hkv=2, D=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    S = T if S is None else S
    r = lambda *s: torch.randn(*s, generator=gen, dtype=D64)
    return r(B, T, H, D), r(B, S, Hkv, D), r(B, S, Hkv, D)


@pytest.mark.parametrize("Hkv", [4, 2, 1])
@pytest.mark.parametrize("causal,window", [(True, None), (True, 3), (False, None), (False, 2)])
def test_sdpa_matches_reference(Hkv, causal, window):
    q, k, v = make(Hkv=Hkv)
    o_r = attention(q, k, v, causal=causal, window=window, impl="reference")
    o_s = attention(q, k, v, causal=causal, window=window)
    torch.testing.assert_close(o_s, o_r)


def test_reference_is_softmax_attention():
    """One head, causal: o_t = sum_{s<=t} softmax(q_t.k_s / sqrt(D)) v_s, written as a loop."""
    q, k, v = make(B=1, H=1, Hkv=1)
    o = attention(q, k, v, impl="reference")
    for t in range(6):
        w = torch.softmax(k[0, : t + 1, 0] @ q[0, t, 0] / math.sqrt(8), dim=0)
        torch.testing.assert_close(o[0, t, 0], w @ v[0, : t + 1, 0])


def test_window_one_returns_own_value():
    q, k, v = make(Hkv=4)
    torch.testing.assert_close(attention(q, k, v, window=1), v)


def test_decode_masks_match_full():
    """Queries at the end of a padded KV buffer (cache decode) equal the rows of a full forward."""
    q, k, v = make(T=7)
    full = attention(q, k, v, window=4, impl="reference")
    kbuf = torch.cat([k, torch.randn(2, 3, 2, 8, dtype=D64)], 1)   # garbage past the valid length
    vbuf = torch.cat([v, torch.randn(2, 3, 2, 8, dtype=D64)], 1)
    lens = torch.tensor([7, 7])
    for impl in ("reference", "sdpa"):
        o = attention(q[:, 5:], kbuf, vbuf, window=4, q_offset=torch.tensor([5, 5]), kv_lengths=lens, impl=impl)
        torch.testing.assert_close(o, full[:, 5:])
        o = attention(q[:, 5:], k, v, window=4, impl=impl)             # default: last T positions
        torch.testing.assert_close(o, full[:, 5:])


def test_per_row_lengths_and_empty_rows():
    q, k, v = make(T=1, S=5)
    lens = torch.tensor([0, 3])
    o_r = attention(q, k, v, q_offset=torch.tensor([0, 2]), kv_lengths=lens, impl="reference")
    o_s = attention(q, k, v, q_offset=torch.tensor([0, 2]), kv_lengths=lens)
    torch.testing.assert_close(o_s, o_r)
    assert torch.equal(o_r[0], torch.zeros_like(o_r[0]))               # sees no key -> 0
    ref = attention(q[1:], k[1:, :3], v[1:, :3], impl="reference")
    torch.testing.assert_close(o_r[1:], ref)


@pytest.mark.parametrize("impl", ["reference", "sdpa"])
def test_varlen_equals_per_sequence(impl):
    lengths = [3, 5, 1]
    q, k, v = make(B=1, T=9)
    cu = torch.tensor([0, 3, 8, 9])
    o = attention(q, k, v, cu_seqlens=cu, window=3, impl=impl)
    for a, n in zip(cu[:-1].tolist(), lengths):
        sl = lambda t: t[:, a:a + n]
        torch.testing.assert_close(o[:, a:a + n], attention(sl(q), sl(k), sl(v), window=3, impl="reference"))


def test_float32_sdpa_close_and_gradients():
    q, k, v = make()
    ins = [t.float().requires_grad_() for t in (q, k, v)]
    o = attention(*ins, window=3)
    torch.testing.assert_close(o.double(), attention(q, k, v, window=3, impl="reference"), rtol=1e-5, atol=1e-5)
    ins64 = [t.clone().requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda a, b, c: attention(a, b, c, window=3), ins64)


def test_rope_properties():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 5, 2, 8, generator=gen, dtype=D64)
    pos = torch.arange(5)
    y = apply_rope(x, pos)
    torch.testing.assert_close(y[:, 0], x[:, 0])                                  # position 0: identity
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))                    # rotation
    # channel 0 pairs with D/2 = 4 at frequency 1: angle = position
    c, s = torch.cos(pos.double()), torch.sin(pos.double())
    torch.testing.assert_close(y[0, :, :, 0], x[0, :, :, 0] * c[:, None] - x[0, :, :, 4] * s[:, None])
    # relative: <R(m) q, R(n) k> depends only on m - n
    q, k = torch.randn(1, 1, 1, 8, dtype=D64), torch.randn(1, 1, 1, 8, dtype=D64)
    dot = lambda m, n: (apply_rope(q, torch.tensor([m])) * apply_rope(k, torch.tensor([n]))).sum()
    torch.testing.assert_close(dot(7, 3), dot(14, 10))
    torch.testing.assert_close(apply_rope(x, pos[None].expand(1, 5)), y)           # [B, T] positions
    with pytest.raises(ValueError, match="even head dim"):
        apply_rope(x[..., :7], pos)


def test_validation_errors():
    q, k, v = make()
    with pytest.raises(ValueError, match=r"k must have shape \[B, S, Hkv, D\]"):
        attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="H=4 must be a multiple of .* Hkv=3"):
        attention(q, torch.randn(2, 6, 3, 8, dtype=D64), torch.randn(2, 6, 3, 8, dtype=D64))
    with pytest.raises(ValueError, match=r"v must have shape \[B, S, Hkv, Dv\]"):
        attention(q, k, v[:, :3])
    with pytest.raises(TypeError, match="q, k, v must share one dtype"):
        attention(q, k.float(), v)
    with pytest.raises(ValueError, match="window must be None or a positive int"):
        attention(q, k, v, window=0)
    with pytest.raises(ValueError, match=r"kv_lengths must lie in \[0, S=6\]"):
        attention(q, k, v, kv_lengths=torch.tensor([7, 1]))
    with pytest.raises(TypeError, match="kv_lengths must have dtype"):
        attention(q, k, v, kv_lengths=torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="q_offset must be >= 0"):
        attention(q, k, v, q_offset=-1)
    with pytest.raises(ValueError, match="cannot be combined with q_offset"):
        attention(q[:1], k[:1], v[:1], cu_seqlens=torch.tensor([0, 6]), q_offset=0)
    with pytest.raises(ValueError, match="with cu_seqlens the batch dimension must be 1"):
        attention(q, k, v, cu_seqlens=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="impl must be one of"):
        attention(q, k, v, impl="flash")
    with pytest.raises(TypeError, match="causal must be a bool"):
        attention(q, k, v, causal=1)


@pytest.mark.parametrize("impl", ["reference", "sdpa"])
def test_kv_start_masks_leading_keys(impl):
    q, k, v = make(T=2, S=6)
    start, lens = torch.tensor([2, 0]), torch.tensor([6, 4])
    o = attention(q, k, v, q_offset=torch.tensor([4, 2]), kv_lengths=lens, kv_start=start, impl=impl)
    torch.testing.assert_close(o[:1], attention(q[:1], k[:1, 2:], v[:1, 2:], impl="reference"))
    torch.testing.assert_close(o[1:], attention(q[1:], k[1:, :4], v[1:, :4], impl="reference"))
    with pytest.raises(ValueError, match=r"kv_start must lie in \[0, S=6\]"):
        attention(q, k, v, kv_start=torch.tensor([7, 0]))
