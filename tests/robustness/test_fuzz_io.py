"""Bad files and arguments: save/load (truncated / tampered safetensors and config.json,
mismatched state dicts), training checkpoints (corruption detected by sha256), trainer config,
data builder config and the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch

from mamba3.data.build import BuildConfig
from mamba3.models import LanguageModel, ModelConfig
from mamba3.models.checkpoint import CheckpointError, load_state_dict_checked
from mamba3.train import checkpoint as ckpt
from mamba3.train.config import ConfigError, TrainConfig, apply_overrides

from .conftest import expect_named_error

CFG = dict(d_model=16, n_layer=1, vocab_size=40, mixer_cfg={"mamba3": {"d_state": 8, "headdim": 8, "chunk_size": 4}})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    m = LanguageModel(ModelConfig(**CFG)).eval()
    d = tmp_path_factory.mktemp("model")
    m.save_pretrained(d)
    return m, d


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_roundtrip(saved, tmp_path):
    m, d = saved
    m2 = LanguageModel.from_pretrained(d)
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("keep", [0, 7, 8, 100, "half", "minus1"])
def test_truncated_weights(saved, tmp_path, keep):
    _, d = saved
    d2 = _copy(d, tmp_path / "m")
    w = d2 / "model.safetensors"
    data = w.read_bytes()
    n = {"half": len(data) // 2, "minus1": len(data) - 1}.get(keep, keep)
    w.write_bytes(data[:n])
    expect_named_error(lambda: LanguageModel.from_pretrained(d2), "model.safetensors", kinds=(CheckpointError,))


@pytest.mark.parametrize("where", ["header_len", "header_json"])
def test_tampered_header(saved, tmp_path, where):
    _, d = saved
    d2 = _copy(d, tmp_path / "m")
    w = d2 / "model.safetensors"
    data = bytearray(w.read_bytes())
    if where == "header_len":
        data[0:8] = (10 ** 12).to_bytes(8, "little")
    else:
        data[10] ^= 0xFF
        data[11] ^= 0xFF
    w.write_bytes(bytes(data))
    expect_named_error(lambda: LanguageModel.from_pretrained(d2), "model.safetensors", kinds=(CheckpointError,))


def test_tampered_payload_is_not_detected(saved, tmp_path):
    """Documented gap: model.safetensors carries no checksum, so flipped payload bytes load
    silently (training checkpoints do carry sha256s, see test_training_checkpoint_corruption)."""
    m, d = saved
    d2 = _copy(d, tmp_path / "m")
    w = d2 / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0xFF
    w.write_bytes(bytes(data))
    m2 = LanguageModel.from_pretrained(d2)
    assert any(not torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))


CONFIG_EDITS = {
    "invalid_json": ("{not json", (CheckpointError,), "config.json"),
    "not_a_dict": ("[1, 2, 3]", (CheckpointError,), "config.json"),
    # with model_type "mamba3_lm" unknown keys are dropped (transformers writes its own keys);
    # without it they are errors:
    "unknown_key": ({"d_modle": 16, "model_type": None}, (ValueError,), "d_modle"),
    "bad_value": ({"d_model": -16}, (ValueError,), "d_model"),
    "wrong_type": ({"n_layer": "one"}, (ValueError,), "n_layer"),
    "other_size": ({"d_model": 32}, (CheckpointError,), "shape"),
    "more_layers": ({"n_layer": 2}, (CheckpointError,), "missing"),
    "other_mixer": ({"mixer": "attention"}, (CheckpointError,), "keys"),
    "bad_mixer_cfg": ({"mixer_cfg": {"mamba3": {"headdim": 5}}}, (ValueError,), "headdim"),
}


@pytest.mark.parametrize("case", list(CONFIG_EDITS))
def test_tampered_config_json(saved, tmp_path, case):
    _, d = saved
    d2 = _copy(d, tmp_path / "m")
    edit, kinds, name = CONFIG_EDITS[case]
    f = d2 / "config.json"
    if isinstance(edit, str):
        f.write_text(edit)
    else:
        new = {**json.loads(f.read_text()), **edit}
        f.write_text(json.dumps({k: v for k, v in new.items() if v is not None}))
    expect_named_error(lambda: LanguageModel.from_pretrained(d2), name, kinds=kinds)


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "dir"])
def test_missing_files(saved, tmp_path, missing):
    _, d = saved
    d2 = _copy(d, tmp_path / "m")
    target = tmp_path / "nope" if missing == "dir" else d2
    if missing != "dir":
        (d2 / missing).unlink()
    with pytest.raises(FileNotFoundError) as info:
        LanguageModel.from_pretrained(target)
    assert (missing if missing != "dir" else "nope") in str(info.value)


@pytest.mark.parametrize("case", ["missing", "unexpected", "shape", "int_dtype", "tied_head_shape"])
def test_mismatched_state_dict(saved, case):
    m, _ = saved
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    key = "backbone.layers.0.mixer.D"
    if case == "missing":
        sd.pop(key)
    elif case == "unexpected":
        sd["backbone.layers.7.mixer.D"] = sd[key]
        key = "backbone.layers.7"
    elif case == "shape":
        sd[key] = torch.zeros(3)
    elif case == "int_dtype":
        sd[key] = sd[key].long()
    else:
        sd["lm_head.weight"] = torch.zeros(3, 16)
        key = "lm_head.weight"
    expect_named_error(lambda: load_state_dict_checked(m, sd), key, kinds=(CheckpointError,))


# ------------------------------------------------------------------------------------------------
# Training checkpoints: sha256 in meta.json; latest() skips a corrupted one, naming it.
def _train_ckpt(root, step):
    torch.manual_seed(step)
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    return ckpt.save(root, step, ckpt.model_state(m), ckpt.optimizer_state(m, opt), {"samples": step})


@pytest.mark.parametrize("target", ["model.safetensors", "optimizer.safetensors", "rng.safetensors"])
@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_training_checkpoint_corruption(tmp_path, target, damage):
    _train_ckpt(tmp_path, 1)
    bad = _train_ckpt(tmp_path, 2)
    assert ckpt.verify(bad) is None and ckpt.latest(tmp_path) == bad
    f = bad / target
    if damage == "flip":
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    elif damage == "truncate":
        f.write_bytes(f.read_bytes()[:-3])
    else:
        f.unlink()
    with pytest.warns(RuntimeWarning, match=f"skipping corrupted checkpoint .*step-00000002.*{target}"):
        assert ckpt.latest(tmp_path).name == "step-00000001"


def test_all_checkpoints_corrupted_means_start_over(tmp_path):
    f = _train_ckpt(tmp_path, 1) / "model.safetensors"
    f.write_bytes(b"\0" * 10)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert ckpt.latest(tmp_path) is None
    assert any("step-00000001" in str(x.message) for x in w)


def test_checkpoint_without_checksums_still_loads(tmp_path):
    """Checkpoints written before sha256s were recorded are accepted as they are."""
    d = _train_ckpt(tmp_path, 1)
    meta = json.loads((d / "meta.json").read_text())
    meta.pop("sha256")
    (d / "meta.json").write_text(json.dumps(meta))
    assert ckpt.latest(tmp_path) == d


# ------------------------------------------------------------------------------------------------
# Trainer config.
def _tc(**sections):
    d = {"model": {"preset": "tiny"}, "run": {"progress": False}}
    for k, v in sections.items():
        d.setdefault(k, {}).update(v) if isinstance(v, dict) else d.__setitem__(k, v)
    return d


BAD_TRAIN = [
    (dict(bogus={"x": 1}), "bogus"), (dict(train={"lrr": 1e-3}), "train.lrr"), (dict(train={"lr": -1.0}), "train.lr"),
    (dict(train={"lr": 0.0}), "train.lr"), (dict(train={"steps": 0}), "train.steps"),
    (dict(train={"steps": 2.5}), "train.steps"), (dict(train={"micro_batch": "8"}), "train.micro_batch"),
    (dict(train={"betas": [0.9]}), "train.betas"), (dict(train={"betas": [0.9, 1.5]}), "train.betas"),
    (dict(train={"eps": 0.0}), "train.eps"), (dict(train={"schedule": "linear"}), "schedule"),
    (dict(train={"device": "tpu"}), "device"), (dict(train={"dtype": "fp8"}), "dtype"),
    (dict(train={"parallel": "tp"}), "parallel"), (dict(train={"warmup_steps": -1}), "train.warmup_steps"),
    (dict(data={"seq_len": 1}), "data.seq_len"), (dict(data={"source": "/nonexistent/folder"}), "data.source"),
    (dict(checkpoint={"every": -1}), "checkpoint.every"), (dict(run={"log_every": 0}), "run.log_every"),
    (dict(model={"preset": "nope"}), "model.preset"), (dict(model={"d_modle": 3}), "model.d_modle"),
    (dict(model={"d_model": 0}), "model"), (dict(train=[1, 2]), "train"),
]


@pytest.mark.parametrize("sections,name", BAD_TRAIN, ids=[f"{n}-{i}" for i, (_, n) in enumerate(BAD_TRAIN)])
def test_bad_train_config(sections, name):
    expect_named_error(lambda: TrainConfig.from_dict(_tc(**sections)).validate(), name, kinds=(ConfigError,))


@pytest.mark.parametrize("key", ["lr", "train", ".lr", "train.lr.x"])
def test_bad_override_keys(key):
    with pytest.raises(ConfigError):
        TrainConfig.from_dict(apply_overrides(_tc(), [(key, 1.0)])).validate()


# ------------------------------------------------------------------------------------------------
# Data builder config.
@pytest.mark.parametrize("kw,name", [(dict(val_fraction=0.0), "val_fraction"), (dict(val_fraction=1.0), "val_fraction"),
                                     (dict(val_fraction=-0.5), "val_fraction"), (dict(sources=()), "sources"),
                                     (dict(sources=("wikipedia-2099",)), "sources")])
def test_bad_build_config(kw, name):
    expect_named_error(lambda: BuildConfig(**kw), name)


# ------------------------------------------------------------------------------------------------
# CLI: argument errors exit with code 2 and a message, never a traceback.
@pytest.mark.parametrize("argv", [["generate", "--max-new-tokens", "many"], ["generate", "--temperature", "hot"],
                                  ["generate", "--dtype", "float8"], ["nope"], [],
                                  ["train", "--set"], ["train", "--train.lr"]])
def test_cli_argument_errors(argv, capsys):
    from mamba3.cli import main
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("argv,needle", [(["train", "--set", "train.lr"], "--set"),
                                         (["train", "--set", "train.lr=-1"], "train.lr"),
                                         (["train", "--set", "bogus.x=1"], "bogus")])
def test_cli_train_config_errors(argv, needle, capsys):
    from mamba3.cli import main
    rc = main(argv)
    assert rc == 2
    assert needle in capsys.readouterr().err


def test_cli_generate_missing_model_is_a_message(tmp_path):
    """A missing model directory: exit code != 0 and one line naming it, not a traceback."""
    res = subprocess.run([sys.executable, "-m", "mamba3.cli", "generate", "--model", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "nope" in res.stderr
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
