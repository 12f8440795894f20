import json

import pytest

from mamba3.models import MIXERS, PRESETS, ModelConfig, register_mixer, resolve_mixer
from mamba3.models.config import PATTERN_LETTERS


def test_json_round_trip(tmp_path):
    cfg = ModelConfig(d_model=64, n_layer=6, vocab_size=100, d_intermediate=96, layer_pattern="MMA",
                      mixer_cfg={"mamba3": {"d_state": 16}, "attention": {"num_heads": 2}})
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    cfg.to_json(str(tmp_path / "c.json"))
    assert ModelConfig.from_json(str(tmp_path / "c.json")) == cfg
    json.dumps(cfg.to_dict())


def test_layer_pattern_expansion():
    cfg = ModelConfig(n_layer=7, layer_pattern="MMA")
    assert cfg.layer_mixers() == ["mamba3", "mamba3", "attention"] * 2 + ["mamba3"]
    assert ModelConfig(n_layer=3, layer_pattern="12G").layer_mixers() == ["mamba1", "mamba2", "gdn"]
    assert ModelConfig(n_layer=2, mixer="mamba2").layer_mixers() == ["mamba2", "mamba2"]
    assert ModelConfig(n_layer=2, layer_pattern=["s4d", "attention"]).layer_mixers() == ["s4d", "attention"]


def test_padded_vocab():
    assert ModelConfig(vocab_size=50280).padded_vocab_size == 50288
    assert ModelConfig(vocab_size=50280, pad_vocab_size_multiple=128).padded_vocab_size == 50304
    assert ModelConfig(vocab_size=256).padded_vocab_size == 256


@pytest.mark.parametrize("kw, match", [
    (dict(d_model=0), "d_model"),
    (dict(n_layer=-1), "n_layer"),
    (dict(vocab_size=1.5), "vocab_size"),
    (dict(d_intermediate=-3), "d_intermediate"),
    (dict(norm_eps=0), "norm_eps"),
    (dict(initializer_range=-1.0), "initializer_range"),
    (dict(tie_embeddings="yes"), "tie_embeddings"),
    (dict(mixer="lstm"), "mixer: unknown mixer 'lstm'"),
    (dict(mixer_cfg={"lstm": {}}), "mixer_cfg: unknown mixer"),
    (dict(mixer_cfg={"mamba3": 3}), r"mixer_cfg\['mamba3'\]"),
    (dict(mixer_cfg={"mamba3": {"x": object()}}), "JSON-serialisable"),
    (dict(layer_pattern="MXA"), r"layer_pattern: unknown letters \['X'\]"),
    (dict(layer_pattern=""), "layer_pattern must not be empty"),
    (dict(n_layer=2, layer_pattern=["mamba3"]), "1 entries but n_layer = 2"),
    (dict(n_layer=1, layer_pattern=["nope"]), r"layer_pattern\[0\]: unknown mixer"),
    (dict(pad_vocab_size_multiple=0), "pad_vocab_size_multiple"),
])
def test_validation_names_field(kw, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kw)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown config keys \['d_modle'\]"):
        ModelConfig.from_dict({"d_modle": 3})


def test_presets_and_overrides():
    assert "tiny" in PRESETS and "mamba3-1.5b" in PRESETS
    cfg = ModelConfig.from_preset("mamba3-180m", vocab_size=50280)
    assert (cfg.d_model, cfg.n_layer, cfg.vocab_size, cfg.d_intermediate) == (768, 12, 50280, 1500)
    assert ModelConfig.from_preset("mamba3-mimo-1.5b").mixer_cfg["mamba3"]["mimo_rank"] == 4
    assert ModelConfig.from_preset("mamba3-hybrid-440m").layer_mixers().count("attention") == 4
    assert ModelConfig.from_preset("mamba3-hybrid-440m").mixer_cfg["attention"]["rope"] is False
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        ModelConfig.from_preset("nope")


def test_registry():
    assert resolve_mixer("mamba3").__name__ == "Mamba3"
    with pytest.raises(ValueError, match="unknown mixer"):
        resolve_mixer("nope")
    with pytest.raises(ValueError, match="package.module:ClassName"):
        register_mixer("x", "no_colon")
    register_mixer("mamba3_alias", "mamba3.layers.mamba3:Mamba3", letter="Z")
    try:
        assert ModelConfig(n_layer=2, layer_pattern="MZ").layer_mixers() == ["mamba3", "mamba3_alias"]
    finally:
        MIXERS.pop("mamba3_alias")
        PATTERN_LETTERS.pop("Z")
    register_mixer("broken", "mamba3.does_not_exist:X")
    try:
        with pytest.raises(ImportError, match="mixer 'broken' needs module"):
            resolve_mixer("broken")
    finally:
        MIXERS.pop("broken")
