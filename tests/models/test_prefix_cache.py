"""Prefix reuse: restored snapshots continue exactly; hit path == miss path; LRU byte budget."""
import pytest
import torch

from mamba3.models import LanguageModel, ModelConfig
from mamba3.models.prefix_cache import PrefixCache, prefill_with_prefix_cache, restore_row, snapshot_row
from mamba3.models.generation import prefill


def tiny(pattern=None):
    cfg = ModelConfig.from_preset("tiny")
    if pattern:
        cfg = ModelConfig.from_dict({**cfg.to_dict(), "layer_pattern": pattern,
                                     "mixer_cfg": {**cfg.mixer_cfg, "attention": {"num_heads": 2, "rope": True},
                                                   "mamba2": {"d_state": 16, "headdim": 16, "chunk_size": 8},
                                                   "gdn": {"head_dim": 16, "num_heads": 2}}})
    torch.manual_seed(0)
    return LanguageModel(cfg).eval()


@pytest.mark.parametrize("pattern", [None, "MA", "M2GA"])
def test_hit_path_equals_miss_path_and_recompute(pattern):
    model = tiny(pattern)
    shared = torch.randint(0, 256, (40,))
    a = torch.cat([shared, torch.randint(0, 256, (7,))])
    b = torch.cat([shared, torch.randint(0, 256, (11,))])
    pc = PrefixCache(block_size=16)
    cache = model.allocate_inference_cache(2, 80)
    logits_miss = prefill_with_prefix_cache(model, [a, b], cache, pc)
    assert pc.hits == 1 and pc.tokens_reused == 32     # b reused a's 32-token (2-block) prefix
    ref_cache = model.allocate_inference_cache(2, 80)
    ref = prefill(model, [a, b], ref_cache, mode="per_row")
    torch.testing.assert_close(logits_miss, ref, atol=1e-5, rtol=1e-5)
    # decoding continues identically from the reused state
    tok = ref.argmax(-1)
    torch.testing.assert_close(model.step(tok, cache), model.step(tok, ref_cache), atol=1e-5, rtol=1e-5)


def test_generate_tokens_identical_with_prefix_cache():
    model = tiny("MA")
    prompt = torch.randint(0, 256, (1, 50))
    pc = PrefixCache(block_size=16)
    cache = model.allocate_inference_cache(1, 70)
    prefill_with_prefix_cache(model, [prompt[0]], cache, pc)      # fills the cache
    cache2 = model.allocate_inference_cache(1, 70)
    l2 = prefill_with_prefix_cache(model, [prompt[0]], cache2, pc)  # hit
    assert pc.hits == 1
    ref = model(prompt).logits[:, -1]
    torch.testing.assert_close(l2, ref, atol=1e-5, rtol=1e-5)


def test_snapshot_restore_row_roundtrip():
    model = tiny("MA")
    ids = torch.randint(0, 256, (2, 20))
    cache = model.allocate_inference_cache(2, 40)
    model.hidden_states(ids, cache=cache)
    snap = snapshot_row(cache, 1)
    fresh = model.allocate_inference_cache(1, 40)
    restore_row(fresh, 0, snap)
    nxt = torch.randint(0, 256, (2,))
    torch.testing.assert_close(model.step(nxt[1:], fresh), model.step(nxt, cache)[1:], atol=1e-5, rtol=1e-5)


def test_lru_budget_and_validation():
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        PrefixCache(block_size=0)
    model = tiny()
    cache = model.allocate_inference_cache(1, 40)
    model.hidden_states(torch.randint(0, 256, (1, 8)), cache=cache)
    snap = snapshot_row(cache, 0)
    size = sum(t.numel() * t.element_size() for layer in snap["layers"] for t in layer.values())
    pc = PrefixCache(block_size=8, max_bytes=2 * size)
    seqs = [torch.randint(0, 256, (8,)) for _ in range(3)]
    for s in seqs:
        pc.insert(s, snap)
    assert len(pc) == 2 and pc.bytes <= 2 * size
    assert pc.lookup(torch.cat([seqs[0], seqs[0]]))[0] == 0    # evicted (least recently used)
    assert pc.lookup(torch.cat([seqs[2], seqs[0]]))[0] == 8
    with pytest.raises(ValueError, match="multiple of block_size=8"):
        pc.insert(torch.randint(0, 256, (5,)), snap)
