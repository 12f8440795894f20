import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mamba3.models import LanguageModel
from mamba3.models.checkpoint import CheckpointError
from mamba3.models.convert import config_from_official, config_to_official, convert_official

from .conftest import tiny_config, tiny_model


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_bit_exact(model, tmp_path, dtype):
    torch.manual_seed(0)
    model = LanguageModel(model.config, dtype=dtype)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = LanguageModel.from_pretrained(tmp_path)
    assert _same(model, loaded) and loaded.config == model.config
    assert loaded.lm_head.weight is loaded.backbone.embedding.weight
    ids = torch.randint(0, 61, (2, 6))
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))  # tied: stored once


def test_load_with_dtype(tmp_path):
    model = tiny_model(dtype=torch.float32)
    model.save_pretrained(tmp_path)
    loaded = LanguageModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    w = loaded.backbone.layers[0].mixer.in_proj.weight
    assert w.dtype == torch.bfloat16
    assert torch.equal(w, model.backbone.layers[0].mixer.in_proj.weight.to(torch.bfloat16))


def _corrupt(tmp_path, fn):
    model = tiny_model(dtype=torch.float32)
    model.save_pretrained(tmp_path)
    f = str(tmp_path / "model.safetensors")
    sd = load_file(f)
    fn(sd)
    save_file(sd, f)


def test_missing_key_named(tmp_path):
    _corrupt(tmp_path, lambda sd: sd.pop("backbone.layers.1.mixer.dt_bias"))
    with pytest.raises(CheckpointError, match=r"missing keys \['backbone.layers.1.mixer.dt_bias'\]"):
        LanguageModel.from_pretrained(tmp_path)


def test_unexpected_key_named(tmp_path):
    _corrupt(tmp_path, lambda sd: sd.update({"backbone.layers.0.mixer.extra": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys \['backbone.layers.0.mixer.extra'\]"):
        LanguageModel.from_pretrained(tmp_path)
    assert LanguageModel.from_pretrained(tmp_path, strict=False) is not None


def test_wrong_shape_named(tmp_path):
    _corrupt(tmp_path, lambda sd: sd.update({"backbone.norm_f.weight": torch.ones(31)}))
    with pytest.raises(CheckpointError, match=r"key 'backbone.norm_f.weight' has shape \(31,\), the model expects \(32,\)"):
        LanguageModel.from_pretrained(tmp_path)


def test_mismatched_config(tmp_path):
    tiny_model(dtype=torch.float32).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["d_intermediate"] = 40
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"key 'backbone.layers.0.mlp.fc1.weight' has shape \(96, 32\)"):
        LanguageModel.from_pretrained(tmp_path)


def test_damaged_file(tmp_path):
    tiny_model(dtype=torch.float32).save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="model.safetensors"):
        LanguageModel.from_pretrained(tmp_path)
    f.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        LanguageModel.from_pretrained(tmp_path)
    f.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        LanguageModel.from_pretrained(tmp_path)


def test_official_named_state_dict_loads(tmp_path):
    """An official MambaLMHeadModel directory (MambaConfig JSON, lm_head.weight stored too,
    attention as MHA in_proj/out_proj) loads directly."""
    model = tiny_model("MMA", dtype=torch.float32)
    official = config_to_official(model.config)
    assert official["ssm_cfg"]["layer"] == "Mamba3" and official["attn_layer_idx"] == [2]
    (tmp_path / "config.json").write_text(json.dumps(official))
    sd = {k: v.clone() for k, v in model.state_dict().items()}  # includes lm_head.weight
    save_file(sd, str(tmp_path / "model.safetensors"))
    loaded = LanguageModel.from_pretrained(tmp_path)
    assert loaded.config.layer_mixers() == model.config.layer_mixers()
    assert _same(model, loaded)
    # the pickle-format variant through the converter (torch.load(weights_only=True))
    src = tmp_path / "bin"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(official))
    torch.save(sd, src / "pytorch_model.bin")
    converted = convert_official(src, tmp_path / "out")
    assert _same(model, converted) and _same(model, LanguageModel.from_pretrained(tmp_path / "out"))


def test_official_config_mapping():
    cfg = config_from_official({"d_model": 64, "d_intermediate": 0, "n_layer": 4, "vocab_size": 1000,
                                "ssm_cfg": {"layer": "Mamba2", "d_state": 64}, "attn_layer_idx": [1],
                                "attn_cfg": {"num_heads": 4, "rotary_emb_dim": 16}, "rms_norm": True,
                                "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8,
                                "tie_embeddings": True})
    assert cfg.layer_mixers() == ["mamba2", "attention", "mamba2", "mamba2"]
    assert cfg.mixer_cfg == {"mamba2": {"d_state": 64}, "attention": {"num_heads": 4, "rope": True}}
    with pytest.raises(ValueError, match="rms_norm=False"):
        config_from_official({"d_model": 8, "n_layer": 1, "vocab_size": 8, "rms_norm": False})
    with pytest.raises(ValueError, match="ssm_cfg.layer"):
        config_from_official({"d_model": 8, "n_layer": 1, "vocab_size": 8, "ssm_cfg": {"layer": "LSTM"}})


def test_untied_round_trip(tmp_path):
    torch.manual_seed(0)
    model = LanguageModel(tiny_config(tie_embeddings=False))
    model.save_pretrained(tmp_path)
    loaded = LanguageModel.from_pretrained(tmp_path)
    assert _same(model, loaded) and loaded.lm_head.weight is not loaded.backbone.embedding.weight
