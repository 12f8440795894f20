"""The fast inference path equals the plain model (CPU, tiny model, greedy)."""
import pytest
import torch

from mamba3.bench.e2e import fast_generate, run_config
from mamba3.models import LanguageModel, ModelConfig


@pytest.mark.parametrize("pattern", [None, "MMA"])
def test_fast_path_greedy_tokens_equal_generate(pattern):
    cfg = ModelConfig.from_preset("tiny")
    if pattern:
        cfg = ModelConfig.from_dict({**cfg.to_dict(), "layer_pattern": pattern,
                                     "mixer_cfg": {**cfg.mixer_cfg, "attention": {"num_heads": 2, "rope": False}}})
    torch.manual_seed(0)
    model = LanguageModel(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (3, 21))
    fast = fast_generate(model, prompt, 12, prefill_chunk=8)   # prefill in 3 slices through the cache
    ref = model.generate(prompt, max_new_tokens=12, temperature=0).tokens
    assert torch.equal(fast["tokens"], ref)
    # logits of the sliced prefill equal one full forward
    cache = model.allocate_inference_cache(3, 40)
    from mamba3.bench.e2e import prefill
    torch.testing.assert_close(prefill(model, prompt, cache, 8), model(prompt).logits[:, -1], atol=1e-4, rtol=1e-4)


def test_run_config_reports_rows_on_cpu():
    row = run_config("tiny", 16, batch=2, reps=1, device="cpu", dtype=torch.float32, prefill_chunk=8)
    assert row["prefill_tok_s"] > 0 and row["decode_ms_per_step"] > 0 and not row["extrapolated"]
    assert row["cache_bytes"] > 0
