"""Smoke test of the sequential-digits experiment on a tiny synthetic stand-in (no sklearn)."""
import json

import pytest
import torch

from mamba3.eval.digits import (Config, SeqClassifier, main, n_params, run, synthetic_sequences, table,
                                width_for_budget)

KINDS = ("s4d-legs", "s4d-random", "mamba3", "gru")


def test_widths_match_the_parameter_budget():
    for kind in KINDS:
        d = width_for_budget(kind, 4000, 1, 8)
        count = n_params(SeqClassifier(kind, d, 1, 8))
        assert abs(count - 4000) / 4000 < 0.35, (kind, d, count)


def test_run_trains_every_model_and_tabulates():
    data = synthetic_sequences(n=64, T=16, classes=4)
    cfg = Config(models=KINDS, seeds=(0,), budget=3000, n_layers=1, s4d_state=8, mamba3_state=8, epochs=1,
                 batch_size=16)
    results = run(cfg, data=data, log=lambda *_: None)
    assert [r.model for r in results] == list(KINDS)
    for r in results:
        assert 0.0 <= r.test_acc <= 1.0 and len(r.curve) == 1 and r.params > 0
    t = table(results)
    assert t.count("\n") == 1 + len(KINDS) and "s4d-legs" in t


def test_s4d_legs_learns_the_synthetic_task():
    data = synthetic_sequences(n=160, T=32, classes=4, seed=1)
    cfg = Config(models=("s4d-legs",), seeds=(0,), budget=3000, n_layers=1, s4d_state=8, epochs=8,
                 batch_size=16, lr=1e-2, ssm_lr=1e-2)
    (r,) = run(cfg, data=data, log=lambda *_: None)
    assert r.test_acc > 0.6, r      # chance is 0.25


def test_cli_on_synthetic_data(tmp_path, capsys):
    out = tmp_path / "r.json"
    main(["--data", "synthetic", "--models", "gru", "--seeds", "0", "--epochs", "1", "--budget", "2000",
          "--n-layers", "1", "--json", str(out)])
    assert "| gru |" in capsys.readouterr().out
    assert json.loads(out.read_text())["results"][0]["model"] == "gru"


def test_bad_model_and_readout_rejected():
    with pytest.raises(ValueError, match="model must be one of"):
        SeqClassifier("lstm", 8, 1, 8)
    with pytest.raises(ValueError, match="readout must be 'mean' or 'last'"):
        SeqClassifier("gru", 8, 1, 8, readout="max")
