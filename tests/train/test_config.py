"""Run configs (errors name the field), CLI overrides, optimizer groups and lr schedules."""
import json
import math

import pytest

from mamba3.models import LanguageModel
from mamba3.cli import main as mamba3_main
from mamba3.train.cli import main as train_cli_main
from mamba3.train.config import ConfigError, OptimConfig, TrainConfig, load_config, parse_value
from mamba3.train.optim import lr_at, no_decay_names, param_groups

from .helpers import tiny_dict


@pytest.mark.parametrize("patch, message", [
    ({"train": {"lrr": 1.0}}, r"train\.lrr: unknown field"),
    ({"trian": {}}, r"trian: unknown section"),
    ({"train": {"lr": -1.0}}, r"train\.lr must be > 0"),
    ({"train": {"lr": "fast"}}, r"train\.lr must be float"),
    ({"train": {"steps": 0}}, r"train\.steps must be an int >= 1"),
    ({"train": {"micro_batch": 2.5}}, r"train\.micro_batch must be int"),
    ({"train": {"schedule": "linear"}}, r"train\.schedule must be one of"),
    ({"train": {"betas": [0.9]}}, r"train\.betas must be two numbers"),
    ({"train": {"parallel": "tp"}}, r"train\.parallel must be one of"),
    ({"train": {"min_lr_ratio": 2.0}}, r"train\.min_lr_ratio must be in \[0, 1\]"),
    ({"data": {"seq_len": 1}}, r"data\.seq_len must be an int >= 2"),
    ({"data": {"source": "/nonexistent"}}, r"data\.source must be 'tiny' or a built data folder"),
    ({"eval": {"batches": 0}}, r"eval\.batches"),
    ({"checkpoint": {"keep": 0}}, r"checkpoint\.keep"),
    ({"run": {"progress": 1}}, r"run\.progress must be bool"),
    ({"model": {"d_modle": 64}}, r"model\.d_modle: unknown model field"),
    ({"model": {"preset": "huge"}}, r"model\.preset: unknown preset 'huge'"),
    ({"model": {"n_layer": 0}}, r"model: n_layer must be an int >= 1"),
])
def test_bad_configs_rejected_with_field_named(tmp_path, patch, message):
    d = tiny_dict(tmp_path)
    for section, values in patch.items():
        d.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(d)


def test_toml_file_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\npreset = "tiny"\nn_layer = 1\n[train]\nsteps = 5\nlr = 1\n')
    cfg = load_config(str(path), [("train.lr", 1e-3), ("train.betas", [0.8, 0.9]), ("run.out_dir", "x")])
    assert cfg.train.steps == 5 and cfg.train.lr == 1e-3 and cfg.train.betas == [0.8, 0.9]
    assert cfg.model_config().n_layer == 1 and cfg.run.out_dir == "x"
    assert isinstance(load_config(str(path)).train.lr, float)  # int in TOML accepted for a float field
    with pytest.raises(ConfigError, match="overrides are <section>.<field>"):
        load_config(None, [("lr", 1.0)])


def test_cli_override_syntax(capsys):
    assert parse_value("1e-3") == 1e-3 and parse_value("true") is True and parse_value("cosine") == "cosine"
    assert parse_value("[0.9, 0.95]") == [0.9, 0.95] and parse_value("8") == 8
    assert mamba3_main(["train", "--config", "configs/tiny.toml", "--train.steps", "7", "--set", "eval.every=3",
                        "--model.n_layer=3", "--train.betas", "[0.8, 0.9]", "--print-config"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["train"]["steps"] == 7 and out["eval"]["every"] == 3 and out["model"]["n_layer"] == 3
    assert out["train"]["betas"] == [0.8, 0.9] and out["data"]["source"] == "tiny"
    assert train_cli_main(["--config", "configs/tiny.toml", "--set", "train.warmup=3"]) == 2
    assert "train.warmup: unknown field" in capsys.readouterr().err
    assert mamba3_main(["train", "--train.lr", "-1", "--print-config"]) == 2
    assert "train.lr must be > 0" in capsys.readouterr().err


def test_no_weight_decay_groups():
    model = LanguageModel(TrainConfig.from_dict(tiny_dict("x")).model_config())
    nd = no_decay_names(model)
    names = dict(model.named_parameters())
    for n, p in names.items():
        leaf = n.rsplit(".", 1)[-1]
        expect = (leaf in ("dt_bias", "D", "A_log") or n.endswith("bias") or "norm" in n or p.ndim < 2
                  or getattr(p, "_no_weight_decay", False))
        assert (n in nd) == expect, n
    assert "backbone.layers.0.mixer.dt_bias" in nd and "backbone.layers.0.mixer.D" in nd
    assert "backbone.layers.0.mixer.in_proj.weight" not in nd and "backbone.embedding.weight" not in nd
    decay, plain = param_groups((("module." + n, p) for n, p in names.items()), nd, 0.1)  # DDP prefix
    assert plain["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    assert len(decay["params"]) + len(plain["params"]) == len(names)
    assert len(plain["params"]) == len(nd)


def test_lr_schedules():
    cos = OptimConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cos) == pytest.approx(0.1) and lr_at(9, cos) == pytest.approx(1.0)
    assert lr_at(10, cos) == pytest.approx(1.0) and lr_at(99, cos) == pytest.approx(0.1)
    assert lr_at(int(10 + 89 / 2), cos) == pytest.approx(0.55, abs=0.02)
    lrs = [lr_at(s, cos) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    wsd = OptimConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    assert lr_at(50, wsd) == 1.0 and lr_at(79, wsd) == 1.0
    assert lr_at(80, wsd) == pytest.approx(0.95) and lr_at(99, wsd) == pytest.approx(0.0)
    assert not math.isnan(lr_at(0, OptimConfig(steps=1, warmup_steps=0)))
