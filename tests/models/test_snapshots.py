"""Decode-state snapshots: restoring one resumes exactly, for every mixer and a hybrid stack;
generate(prefix_cache=...) reuses a shared prefix and yields the same tokens."""
import pytest
import torch

from mamba3.models import LanguageModel, ModelConfig, resolve_mixer
from mamba3.models.generation import generate
from mamba3.models.prefix_cache import PrefixCache, restore_row, snapshot_row

D = 16
MIXERS = {
    "mamba3": ("mamba3", dict(d_state=8, headdim=8, chunk_size=4)),
    "mamba3_conv_fixed_rope": ("mamba3", dict(d_state=8, headdim=8, chunk_size=4, d_conv=4, rope="fixed")),
    "mamba3_mimo": ("mamba3", dict(d_state=8, headdim=8, chunk_size=4, is_mimo=True, mimo_rank=2)),
    "mamba2": ("mamba2", dict(d_state=8, headdim=8, chunk_size=4)),
    "mamba1": ("mamba1", dict(d_state=4)),
    "gdn": ("gdn", dict(head_dim=8, num_heads=2, chunk_size=4)),
    "attention": ("attention", dict(num_heads=2)),
    "attention_rope_window_ring": ("attention", dict(num_heads=2, window=3)),
    "s4d": ("s4d", dict(d_state=4)),
}


def make(name, seed=0):
    kind, kw = MIXERS[name]
    torch.manual_seed(seed)
    return resolve_mixer(kind)(D, dtype=torch.float64, **kw).eval()


def continue_from(layer, cache, x_fwd, x_steps):
    """A chunked continuation then a few decode steps: the outputs, concatenated."""
    outs = [layer(x_fwd, cache=cache)]
    outs += [layer.step(x_steps[:, i], cache)[:, None] for i in range(x_steps.shape[1])]
    return torch.cat(outs, 1)


@pytest.mark.parametrize("name", list(MIXERS))
@torch.no_grad()
def test_layer_snapshot_restore_equals_recompute(name):
    layer = make(name)
    torch.manual_seed(1)
    prefix, x_fwd, x_steps = torch.randn(2, 7, D, dtype=torch.float64), torch.randn(2, 5, D, dtype=torch.float64), \
        torch.randn(2, 4, D, dtype=torch.float64)
    max_len = 7 + 5 + 4
    cache = layer.allocate_inference_cache(2, max_len)
    layer(prefix[:, :3], cache=cache)       # prefix in two pieces (a chunked prefill), then one step
    layer(prefix[:, 3:6], cache=cache)
    layer.step(prefix[:, 6], cache)
    snap = cache.snapshot()
    ref = continue_from(layer, cache, x_fwd, x_steps)

    # restored into the same (now advanced) cache
    cache.restore(snap)
    torch.testing.assert_close(continue_from(layer, cache, x_fwd, x_steps), ref, rtol=0, atol=0)
    # restored into a fresh cache
    fresh = layer.allocate_inference_cache(2, max_len)
    fresh.restore(snap)
    torch.testing.assert_close(continue_from(layer, fresh, x_fwd, x_steps), ref, rtol=0, atol=0)
    # recomputing the prefix in one forward agrees (to rounding: a different chunking)
    again = layer.allocate_inference_cache(2, max_len)
    layer(prefix, cache=again)
    torch.testing.assert_close(continue_from(layer, again, x_fwd, x_steps), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(MIXERS))
@torch.no_grad()
def test_layer_snapshot_one_row_into_another_cache(name):
    """Row 1 of a batch-2 cache, snapshotted (to CPU) and restored into row 0 of a batch-3 cache."""
    layer = make(name)
    torch.manual_seed(2)
    prefix = torch.randn(2, 6, D, dtype=torch.float64)
    x_fwd, x_steps = torch.randn(1, 3, D, dtype=torch.float64), torch.randn(1, 2, D, dtype=torch.float64)
    cache = layer.allocate_inference_cache(2, 12)
    layer(prefix, cache=cache)
    snap = cache.snapshot(rows=[1], to_cpu=True)
    solo = layer.allocate_inference_cache(1, 12)
    layer(prefix[1:], cache=solo)
    ref = continue_from(layer, solo, x_fwd, x_steps)
    big = layer.allocate_inference_cache(3, 20)         # larger KV capacity than the source
    big.restore(snap, rows=[0])
    view = type(big)(**{f: (getattr(big, f)[:1] if isinstance(getattr(big, f), torch.Tensor) else getattr(big, f))
                        for f in big.__dataclass_fields__})
    if name == "attention_rope_window_ring":  # the ring holds `window` slots whatever max_seqlen is
        assert view.ring and view.slots == 3
    torch.testing.assert_close(continue_from(layer, view, x_fwd, x_steps), ref, rtol=1e-12, atol=1e-12)


def test_snapshot_of_ring_after_wrap_and_attention_copies_only_written_kv():
    layer = make("attention_rope_window_ring")
    cache = layer.allocate_inference_cache(1, 32)
    with torch.no_grad():
        layer(torch.randn(1, 10, D, dtype=torch.float64), cache=cache)   # wraps the 3-slot ring 3 times
    assert cache.snapshot()["k"].shape[1] == 3
    full = make("attention").allocate_inference_cache(1, 32)
    with torch.no_grad():
        make("attention")(torch.randn(1, 5, D, dtype=torch.float64), cache=full)
    assert full.snapshot()["k"].shape[1] == 5


def hybrid(pattern="M2A1GSM"):
    cfg = ModelConfig(d_model=32, n_layer=len(pattern), vocab_size=61, d_intermediate=48, layer_pattern=pattern,
                      initializer_range=0.3, mixer_cfg={
                          "mamba3": dict(d_state=8, headdim=16, chunk_size=4),
                          "mamba2": dict(d_state=8, headdim=16, chunk_size=4),
                          "mamba1": dict(d_state=4), "gdn": dict(head_dim=16, num_heads=2, chunk_size=4),
                          "attention": dict(num_heads=2, rope=True, window=5), "s4d": dict(d_state=4)})
    torch.manual_seed(0)
    return LanguageModel(cfg, dtype=torch.float64).eval()


@torch.no_grad()
def greedy_from(model, cache, first, n):
    out, tok = [], first
    for _ in range(n):
        logits = model.step(tok, cache)
        tok = logits.argmax(-1)
        out.append(logits)
    return torch.stack(out, 1)


@torch.no_grad()
def test_hybrid_stack_row_snapshot_equals_recompute():
    model = hybrid()
    torch.manual_seed(3)
    ids = torch.randint(0, 61, (2, 13))
    cache = model.allocate_inference_cache(2, 40)
    model.hidden_states(ids, cache=cache)
    snap = snapshot_row(cache, 1)
    # continue row 1 in a fresh batch-1 cache from the snapshot vs recomputing its prefix
    a = model.allocate_inference_cache(1, 40)
    restore_row(a, 0, snap)
    b = model.allocate_inference_cache(1, 40)
    model.hidden_states(ids[1:], cache=b)
    assert int(a.lengths[0]) == 13
    first = torch.tensor([5])
    la, lb = greedy_from(model, a, first, 12), greedy_from(model, b, first, 12)
    torch.testing.assert_close(la, lb, rtol=1e-10, atol=1e-10)
    assert torch.equal(la.argmax(-1), lb.argmax(-1))
    # the full forward over prefix + the greedy tokens gives the same last logits
    toks = torch.cat([ids[1:], first[None], lb.argmax(-1)[:, :-1]], 1)
    torch.testing.assert_close(model(toks).logits[:, -12:], lb, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("pattern", [None, "MA", "M2A1GS"])
def test_generate_with_prefix_cache_hits_and_matches(pattern):
    model = hybrid(pattern) if pattern else hybrid("MMM")
    torch.manual_seed(4)
    shared = torch.randint(0, 61, (40,))
    first = torch.cat([shared, torch.randint(0, 61, (5,))])
    second = torch.cat([shared, torch.randint(0, 61, (9,))])
    pc = PrefixCache(block_size=8)
    kw = dict(max_new_tokens=10, temperature=0)
    out1 = generate(model, [first], prefix_cache=pc, **kw)
    assert pc.hits == 0 and len(pc) == 1                       # the 40-token prefix was stored
    out2 = generate(model, [second], prefix_cache=pc, **kw)
    assert pc.hits == 1 and pc.tokens_reused == 40
    ref1, ref2 = generate(model, [first], **kw), generate(model, [second], **kw)
    assert torch.equal(out1.tokens, ref1.tokens) and torch.equal(out2.tokens, ref2.tokens)
    # a batch of both (rows of different lengths) also matches, reusing the prefix twice
    both = generate(model, [first, second], prefix_cache=pc, **kw)
    assert pc.hits == 3
    assert torch.equal(both.tokens, torch.cat([ref1.tokens, ref2.tokens]))
