"""Bad and odd input for every layer: constructors, forward, step, allocate_inference_cache.

Contract (see conftest): bad input -> ValueError/TypeError naming the argument; odd-but-valid
input (non-contiguous, expanded, T = 0 / 1) -> the same answer as the plain layout; NaN input
propagates (never silently turns finite) and is not blamed on the layer by detect_anomalies.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mamba3.debug import AnomalyError, detect_anomalies
from mamba3.layers import S4D, Attention, GatedDeltaNet, Mamba1, Mamba2, Mamba3

from .conftest import assert_close, expect_named_error

D = 16
LAYERS = {
    "mamba3": lambda **kw: Mamba3(D, **{"d_state": 8, "headdim": 8, "chunk_size": 4, **kw}),
    "mamba3_mimo": lambda **kw: Mamba3(D, **{"d_state": 8, "headdim": 8, "chunk_size": 4, "is_mimo": True,
                                             "mimo_rank": 2, **kw}),
    "mamba2": lambda **kw: Mamba2(D, **{"d_state": 8, "headdim": 8, "chunk_size": 4, **kw}),
    "mamba1": lambda **kw: Mamba1(D, **{"d_state": 4, "chunk_size": 4, **kw}),
    "gdn": lambda **kw: GatedDeltaNet(D, **{"head_dim": 8, "num_heads": 2, "chunk_size": 4, **kw}),
    "attention": lambda **kw: Attention(D, **{"num_heads": 2, **kw}),
    "s4d": lambda **kw: S4D(D, **{"d_state": 8, **kw}),
}
NAMES = list(LAYERS)


# Known gaps, left to the layer owners (strict xfail: each turns into a failure once fixed, so the
# list stays true). Counted in RELIABILITY.md.
KNOWN = {
    "attn_cache_size": "Attention cache of other head sizes: RuntimeError from index_copy",
}


def known(request, key):
    request.node.add_marker(pytest.mark.xfail(strict=True, reason=KNOWN[key]))


def make(name, **kw):
    torch.manual_seed(0)
    return LAYERS[name](dtype=torch.float64, **kw).eval()


def cache_for(layer, batch, max_seqlen=32):
    return layer.allocate_inference_cache(batch, max_seqlen)


# ------------------------------------------------------------------------------------------------
# Constructors.
BAD_CTOR = [
    ("mamba3", dict(d_state=7), "d_state"), ("mamba3", dict(headdim=5), "headdim"),
    ("mamba3", dict(ngroups=3), "ngroups"), ("mamba3", dict(rope_fraction=0.3), "rope_fraction"),
    ("mamba3", dict(chunk_size=0), "chunk_size"), ("mamba3", dict(rope="yarn"), "rope"),
    ("mamba3", dict(a_activation="relu"), "a_activation"), ("mamba3", dict(d_conv=-1), "d_conv"),
    ("mamba3", dict(expand=0), "expand"), ("mamba3", dict(headdim=8.0), "headdim"),
    ("mamba3", dict(d_state=True), "d_state"),
    ("mamba3", dict(d_conv=2.5), "d_conv"), ("mamba3", dict(dt_min=0.5, dt_max=0.1), "dt_min"),
    ("mamba3", dict(dt_min=-1.0), "dt_min"),
    ("mamba3_mimo", dict(mimo_rank=0), "mimo_rank"), ("mamba3_mimo", dict(mimo_rank=2.0), "mimo_rank"),
    ("mamba3_mimo", dict(mimo_rank=True), "mimo_rank"),
    ("mamba2", dict(headdim=5), "headdim"), ("mamba2", dict(ngroups=3), "ngroups"),
    ("mamba2", dict(A_init_range=(4, 1)), "A_init_range"), ("mamba2", dict(d_conv=0), "d_conv"),
    ("mamba2", dict(chunk_size=-1), "chunk_size"),
    ("mamba1", dict(dt_rank=0), "dt_rank"), ("mamba1", dict(dt_rank="big"), "dt_rank"),
    ("mamba1", dict(dt_init="zeros"), "dt_init"), ("mamba1", dict(d_conv=0), "d_conv"),
    ("gdn", dict(num_heads=0), "num_heads"), ("gdn", dict(num_v_heads=3), "num_v_heads"),
    ("gdn", dict(expand_v=0.3), "expand_v"), ("gdn", dict(mode="parallel"), "mode"),
    ("gdn", dict(conv_size=0), "conv_size"),
    ("attention", dict(num_heads=3), "num_heads"), ("attention", dict(num_kv_heads=3), "num_kv_heads"),
    ("attention", dict(window=0), "window"), ("attention", dict(head_dim=5), "head_dim"),
    ("attention", dict(num_heads=0), "num_heads"),
    ("s4d", dict(d_state=7), "d_state"), ("s4d", dict(init="xavier"), "init"),
    ("s4d", dict(dropout=1.5), "dropout"),
]


@pytest.mark.parametrize("name,kw,arg", BAD_CTOR, ids=[f"{n}-{a}-{i}" for i, (n, _, a) in enumerate(BAD_CTOR)])
def test_bad_constructor_argument_is_named(request, name, kw, arg):
    expect_named_error(lambda: LAYERS[name](**kw), arg)


@pytest.mark.parametrize("name", NAMES)
def test_bad_impl_named_at_first_forward(request, name):
    """impl is validated by name: by Mamba3's constructor, by the op at the first forward elsewhere."""
    if name.startswith("mamba3"):  # Mamba3 checks it in the constructor
        expect_named_error(lambda: make(name, impl="fast"), "impl")
        return
    layer = make(name, impl="fast")
    expect_named_error(lambda: layer(torch.randn(1, 3, D, dtype=torch.float64)), "impl")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("d_model", [0, -3, 2.5, "16", None, True])
def test_bad_d_model(name, d_model):
    ctor = {"mamba3": Mamba3, "mamba3_mimo": Mamba3, "mamba2": Mamba2, "mamba1": Mamba1, "gdn": GatedDeltaNet,
            "attention": Attention, "s4d": S4D}[name]
    kw = {"gdn": dict(head_dim=8, num_heads=2), "attention": dict(num_heads=2)}.get(name, {})
    expect_named_error(lambda: ctor(d_model, **kw), "hidden_size" if name == "gdn" else "d_model")


# ------------------------------------------------------------------------------------------------
# forward / step inputs.
def bad_inputs():
    x = torch.randn(2, 5, D, dtype=torch.float64)
    return {
        "rank2": x[:, 0], "rank4": x[None], "width": torch.randn(2, 5, D + 1, dtype=torch.float64),
        "int": torch.zeros(2, 5, D, dtype=torch.long), "bool": torch.zeros(2, 5, D, dtype=torch.bool),
        "list": x.tolist(), "numpy": x.numpy(), "meta": torch.empty(2, 5, D, dtype=torch.float64, device="meta"),
    }


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", list(bad_inputs()))
def test_bad_forward_input(request, name, case):
    layer = make(name)
    x = bad_inputs()[case]
    with pytest.raises((ValueError, TypeError)) as info:
        layer(x)
    msg = str(info.value)
    assert any(w in msg for w in ("u", "x", "input", "hidden")), msg


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", ["two_tokens", "width", "int", "list", "meta", "rank4"])
def test_bad_step_input(request, name, case):
    layer = make(name)
    cache = cache_for(layer, 2)
    x = {"two_tokens": torch.randn(2, 2, D, dtype=torch.float64),
         "width": torch.randn(2, D + 1, dtype=torch.float64), "int": torch.zeros(2, D, dtype=torch.long),
         "list": [[0.0] * D] * 2, "meta": torch.empty(2, D, dtype=torch.float64, device="meta"),
         "rank4": torch.randn(1, 2, 1, D, dtype=torch.float64)}[case]
    with pytest.raises((ValueError, TypeError)) as info:
        layer.step(x, cache)
    msg = str(info.value)
    assert any(w in msg for w in ("u", "x", "input", "hidden", "token")), msg


@pytest.mark.parametrize("name", NAMES)
def test_step_without_cache(request, name):
    layer = make(name)
    expect_named_error(lambda: layer.step(torch.randn(2, D, dtype=torch.float64), None), "cache")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("where", ["forward", "step"])
def test_cache_batch_mismatch(name, where):
    layer = make(name)
    cache = cache_for(layer, 3)
    if where == "forward":
        expect_named_error(lambda: layer(torch.randn(2, 4, D, dtype=torch.float64), cache=cache), "cache")
    else:
        expect_named_error(lambda: layer.step(torch.randn(2, D, dtype=torch.float64), cache), "cache")


@pytest.mark.parametrize("name", NAMES)
def test_cache_of_another_layer_type(request, name):
    """A cache allocated by a different mixer: a named error, not an AttributeError."""
    layer = make(name)
    other = make("s4d" if name != "s4d" else "mamba2")
    cache = cache_for(other, 2)
    expect_named_error(lambda: layer.step(torch.randn(2, D, dtype=torch.float64), cache), "cache")
    expect_named_error(lambda: layer(torch.randn(2, 3, D, dtype=torch.float64), cache=cache), "cache")


@pytest.mark.parametrize("name", NAMES)
def test_cache_of_a_differently_sized_layer(request, name):
    """Same class, other sizes (d_state / heads): a named error, not a broadcast or torch error."""
    if name == "attention":
        known(request, "attn_cache_size")
    layer = make(name)
    other_kw = {"mamba3": dict(d_state=4), "mamba3_mimo": dict(d_state=4), "mamba2": dict(d_state=4),
                "mamba1": dict(d_state=2), "gdn": dict(head_dim=4), "attention": dict(num_heads=4),
                "s4d": dict(d_state=4)}[name]
    cache = cache_for(make(name, **other_kw), 2)
    with pytest.raises((ValueError, TypeError)) as info:
        layer.step(torch.randn(2, D, dtype=torch.float64), cache)
    assert "cache" in str(info.value) or "state" in str(info.value), str(info.value)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("batch", [0, -1, 1.5, "2", None, True])
def test_bad_allocate_batch_size(request, name, batch):
    layer = make(name)
    if batch == 0:  # an empty cache is consistent (batch 0 forward is allowed); just no crash
        cache = cache_for(layer, 0)
        assert cache.batch_size == 0
        return
    expect_named_error(lambda: layer.allocate_inference_cache(batch, 32), "batch_size")


@pytest.mark.parametrize("max_seqlen", [None, 0, -5, 2.5])
def test_attention_cache_needs_max_seqlen(max_seqlen):
    expect_named_error(lambda: make("attention").allocate_inference_cache(2, max_seqlen), "max_seqlen")


def test_attention_cache_overflow_is_named():
    layer = make("attention")
    cache = layer.allocate_inference_cache(1, 4)
    layer(torch.randn(1, 4, D, dtype=torch.float64), cache=cache)
    expect_named_error(lambda: layer.step(torch.randn(1, D, dtype=torch.float64), cache), "overflow")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", ["batch2", "short_end", "float", "decreasing"])
def test_bad_cu_seqlens_at_layer(request, name, case):
    layer = make(name)
    x = torch.randn(2 if case == "batch2" else 1, 5, D, dtype=torch.float64)
    cu = {"batch2": torch.tensor([0, 2, 5]), "short_end": torch.tensor([0, 2, 4]),
          "float": torch.tensor([0.0, 5.0]), "decreasing": torch.tensor([0, 4, 3, 5])}[case]
    expect_named_error(lambda: layer(x, cu_seqlens=cu), "cu_seqlens")


# ------------------------------------------------------------------------------------------------
# Odd but valid.
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("layout", ["noncontig", "expanded"])
def test_strided_input_same_answer(name, layout):
    layer = make(name)
    x = torch.randn(2, 6, D, dtype=torch.float64)
    odd = x.transpose(0, 1).contiguous().transpose(0, 1) if layout == "noncontig" else x[:1].expand(2, 6, D)
    with torch.no_grad():
        assert_close(layer(odd), layer(odd.contiguous()), tol=1e-10)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("length", [0, 1])
def test_short_sequences_and_step(name, length):
    """T = 0 leaves the cache untouched; T = 1 forward == one step."""
    layer = make(name)
    x = torch.randn(2, length, D, dtype=torch.float64)
    c1, c2 = cache_for(layer, 2), cache_for(layer, 2)
    with torch.no_grad():
        y = layer(x, cache=c1)
        assert y.shape == x.shape
        if length == 1:
            assert_close(y[:, 0], layer.step(x[:, 0], c2), tol=1e-9)
        else:
            for (n, a), (_, b) in zip(c1.tensors(), c2.tensors()):
                assert torch.equal(a, b), f"T = 0 changed cache field {n}"


@pytest.mark.parametrize("name", NAMES)
def test_nan_input_propagates_not_blamed(request, name):
    """NaN in the input shows up in the output from its token on (never silently dropped) and
    detect_anomalies does not blame the layer for it (its input was already bad). Contract:
    propagation is chunk-granular, not token-granular: chunked/parallel forms multiply masked
    entries by 0 and 0 * NaN = NaN, so earlier tokens of the same chunk (and for attention /
    S4D's FFT the whole sequence) may turn NaN too. Garbage that looks finite never comes out."""
    layer = make(name)
    x = torch.randn(1, 6, D, dtype=torch.float64)
    x[0, 3, 0] = float("nan")
    with torch.no_grad(), detect_anomalies(layer):
        y = layer(x)
    assert not torch.isfinite(y[0, 3:]).any(), "a token at or after the NaN came out finite"


@pytest.mark.parametrize("name", NAMES)
def test_nonfinite_weight_is_named_by_detect_anomalies(name):
    layer = make(name)
    with torch.no_grad():
        [m for m in layer.modules() if isinstance(m, torch.nn.Linear)][-1].weight.fill_(float("inf"))
    with torch.no_grad(), pytest.raises(AnomalyError) as info:
        with detect_anomalies(layer):
            layer(torch.randn(1, 4, D, dtype=torch.float64))
    assert "proj" in str(info.value), str(info.value)  # names the sub-module (out_proj / o_proj)


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(NAMES), lengths=st.lists(st.integers(0, 4), min_size=1, max_size=4))
def test_hypothesis_packed_equals_separate(name, lengths):
    """Random packings (empty sequences included) == each sequence run alone."""
    layer = make(name)
    total = sum(lengths)
    x = torch.randn(1, total, D, dtype=torch.float64)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)
    with torch.no_grad():
        y = layer(x, cu_seqlens=cu)
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            assert_close(y[:, a:b], layer(x[:, a:b]), tol=1e-9)
