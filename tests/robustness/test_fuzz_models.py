"""Bad input for model configs and LanguageModel forward / step / generate / caches."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mamba3.models import LanguageModel, ModelConfig

from .conftest import expect_named_error

M3 = {"d_state": 8, "headdim": 8, "expand": 2, "chunk_size": 4}


def cfg(**kw):
    base = dict(d_model=16, n_layer=2, vocab_size=40, mixer_cfg={"mamba3": dict(M3),
                                                                 "attention": {"num_heads": 2}})
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LanguageModel(cfg(layer_pattern="MA"), dtype=torch.float64).eval()


BAD_CONFIG = [
    (dict(d_model=0), "d_model"), (dict(d_model=-8), "d_model"), (dict(d_model=16.0), "d_model"),
    (dict(d_model=True), "d_model"), (dict(d_model="16"), "d_model"), (dict(n_layer=0), "n_layer"),
    (dict(vocab_size=0), "vocab_size"), (dict(vocab_size=2 ** 0.5), "vocab_size"),
    (dict(d_intermediate=-1), "d_intermediate"), (dict(pad_vocab_size_multiple=0), "pad_vocab_size_multiple"),
    (dict(norm_eps=0.0), "norm_eps"), (dict(norm_eps=float("nan")), "norm_eps"),
    (dict(initializer_range=-1.0), "initializer_range"), (dict(tie_embeddings="yes"), "tie_embeddings"),
    (dict(residual_in_fp32=1), "residual_in_fp32"), (dict(mixer="mamba9"), "mixer"),
    (dict(mixer_cfg=[1, 2]), "mixer_cfg"), (dict(mixer_cfg={"mamba9": {}}), "mixer_cfg"),
    (dict(mixer_cfg={"mamba3": 3}), "mixer_cfg"), (dict(mixer_cfg={"mamba3": {"x": object()}}), "mixer_cfg"),
    (dict(layer_pattern=""), "layer_pattern"), (dict(layer_pattern="MQ"), "layer_pattern"),
    (dict(layer_pattern=["mamba3"]), "layer_pattern"), (dict(layer_pattern=["mamba3", "mamba9"]), "layer_pattern"),
    (dict(layer_pattern=3), "layer_pattern"),
]


@pytest.mark.parametrize("kw,arg", BAD_CONFIG, ids=[f"{a}-{i}" for i, (_, a) in enumerate(BAD_CONFIG)])
def test_bad_model_config(kw, arg):
    expect_named_error(lambda: cfg(**kw), arg)


@pytest.mark.parametrize("key", ["d_modle", "layers", "ssm_config", ""])
def test_unknown_config_key(key):
    d = cfg().to_dict()
    d[key] = 1
    expect_named_error(lambda: ModelConfig.from_dict(d), key if key else "unknown")


@pytest.mark.parametrize("bad", [None, [1, 2], "d_model=16", 3])
def test_config_from_non_dict(bad):
    expect_named_error(lambda: ModelConfig.from_dict(bad), "config")


@pytest.mark.parametrize("mixer_kw,arg", [({"headdim": 5}, "headdim"), ({"d_state": 7}, "d_state"),
                                          ({"ngroups": 3}, "ngroups"), ({"bogus": 1}, "bogus")])
def test_impossible_mixer_sizes_named_at_construction(mixer_kw, arg):
    c = cfg(mixer_cfg={"mamba3": {**M3, **mixer_kw}})
    expect_named_error(lambda: LanguageModel(c), arg)


def test_preset_unknown_name():
    expect_named_error(lambda: ModelConfig.from_preset("mamba3-99b"), "preset")


# ------------------------------------------------------------------------------------------------
IDS_BAD = {
    "float": torch.zeros(2, 5), "rank1": torch.zeros(5, dtype=torch.long), "rank3": torch.zeros(2, 5, 1, dtype=torch.long),
    "list": [[1, 2, 3]], "bool": torch.zeros(2, 5, dtype=torch.bool),
}


@pytest.mark.parametrize("case", list(IDS_BAD))
def test_bad_input_ids_forward(model, case):
    expect_named_error(lambda: model(IDS_BAD[case]), "input_ids")


@pytest.mark.parametrize("bad_id", [40, 47, 10 ** 6, -1])
def test_out_of_range_token_ids(model, bad_id):
    """ids >= vocab_size (even inside the padded embedding) or < 0: a named error, not an
    IndexError from the embedding or silent garbage from a padding row (checked on forward /
    prefill; step() skips the check to keep decode free of host syncs)."""
    ids = torch.tensor([[1, 2, bad_id]])
    expect_named_error(lambda: model(ids), "input_ids")


@pytest.mark.parametrize("case", ["shape", "float"])
def test_bad_labels(model, case):
    ids = torch.randint(0, 40, (2, 5))
    labels = ids[:, :4] if case == "shape" else ids.double()
    expect_named_error(lambda: model(ids, labels=labels), "labels")


def test_labels_with_num_last_tokens(model):
    ids = torch.randint(0, 40, (2, 5))
    expect_named_error(lambda: model(ids, labels=ids, num_last_tokens=1), "labels")


@pytest.mark.parametrize("case", ["batch2", "short_end", "float"])
def test_bad_cu_seqlens_model(model, case):
    ids = torch.randint(0, 40, (2 if case == "batch2" else 1, 6))
    cu = {"batch2": torch.tensor([0, 6]), "short_end": torch.tensor([0, 2, 5]), "float": torch.tensor([0.0, 6.0])}[case]
    expect_named_error(lambda: model(ids, cu_seqlens=cu), "cu_seqlens")


def test_cache_batch_mismatch_model(model):
    cache = model.allocate_inference_cache(3, 16)
    expect_named_error(lambda: model(torch.randint(0, 40, (2, 4)), cache=cache), "cache")
    expect_named_error(lambda: model.step(torch.randint(0, 40, (2,)), cache), "cache")


@pytest.mark.parametrize("case", ["two_tokens", "float", "rank3"])
def test_bad_step_ids(model, case):
    cache = model.allocate_inference_cache(2, 16)
    ids = {"two_tokens": torch.zeros(2, 2, dtype=torch.long), "float": torch.zeros(2),
           "rank3": torch.zeros(2, 1, 1, dtype=torch.long)}[case]
    expect_named_error(lambda: model.step(ids, cache), "input_ids")


def test_empty_and_single_token(model):
    with torch.no_grad():
        assert model(torch.zeros(2, 0, dtype=torch.long)).logits.shape == (2, 0, 40)
        one = model(torch.tensor([[3]])).logits[0, -1]
        cache = model.allocate_inference_cache(1, 4)
        torch.testing.assert_close(model.step(torch.tensor([3]), cache)[0], one)


GEN_BAD = [({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": -3}, "max_new_tokens"),
           ({"temperature": -1.0}, "temperature"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
           ({"use_cuda_graph": True}, "use_cuda_graph")]


@pytest.mark.parametrize("kw,arg", GEN_BAD, ids=[a for _, a in GEN_BAD])
def test_bad_generate_options(model, kw, arg):
    expect_named_error(lambda: model.generate(torch.tensor([[1, 2]]), **kw), arg)


@pytest.mark.parametrize("prompt,arg", [([], "prompt"), ([torch.tensor([], dtype=torch.long)], "prompt"),
                                        (torch.zeros(1, 3), "input_ids"), ("hello", "input_ids")])
def test_bad_generate_prompts(model, prompt, arg):
    with pytest.raises((ValueError, TypeError)) as info:
        model.generate(prompt, max_new_tokens=2)
    assert arg in str(info.value) or "prompt" in str(info.value), str(info.value)


def test_generate_attention_mask_mismatch(model):
    expect_named_error(lambda: model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2,
                                              attention_mask=torch.ones(1, 2)), "attention_mask")


@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(d_model=st.integers(-2, 40), n_layer=st.integers(-1, 3), vocab=st.integers(-1, 70),
       headdim=st.sampled_from([1, 3, 4, 8, 16]), d_state=st.integers(1, 9))
def test_hypothesis_config_builds_or_names_error(d_model, n_layer, vocab, headdim, d_state):
    """Random sizes: either a model that runs a forward, or a ValueError/TypeError with a message."""
    try:
        c = ModelConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab,
                        mixer_cfg={"mamba3": {"d_state": d_state, "headdim": headdim, "chunk_size": 4}})
        m = LanguageModel(c)
    except (ValueError, TypeError) as e:
        assert str(e)
        return
    with torch.no_grad():
        out = m(torch.randint(0, vocab, (1, 3))).logits
    assert out.shape == (1, 3, vocab) and torch.isfinite(out).all()
