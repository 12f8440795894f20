"""Synthetic-task runner: config plumbing, budget, table, CLI, and a tiny parity run."""
import json

import pytest
import torch

from mamba3.eval import cli as eval_cli
from mamba3.eval.runner import (SyntheticConfig, best_rows, build_model, lr_grid, markdown_table, mixer_kwargs,
                                run_synthetic, task_info)


def test_lr_grid_matches_paper_sweep():
    g = lr_grid(8)
    assert len(g) == 8 and g[0] == pytest.approx(1e-4) and g[-1] == pytest.approx(1e-2)
    ratios = [b / a for a, b in zip(g, g[1:])]
    assert max(ratios) == pytest.approx(min(ratios))


def test_variants_and_layers():
    assert mixer_kwargs(SyntheticConfig(variant="rope_fixed"))["rope"] == "fixed"
    assert mixer_kwargs(SyntheticConfig(variant="no_rope"))["rope"] == "none"
    assert mixer_kwargs(SyntheticConfig(mixer="gdn"))["allow_neg_eigval"] is True
    assert SyntheticConfig(task="parity").layers() == 1
    assert SyntheticConfig(task="modular_brackets").layers() == 3
    with pytest.raises(ValueError, match="variants"):
        mixer_kwargs(SyntheticConfig(variant="nope"))
    with pytest.raises(ValueError, match="unknown task"):
        task_info(SyntheticConfig(task="sorting"))


@pytest.mark.parametrize("mixer", ["mamba3", "mamba2", "gdn", "attention"])
def test_each_mixer_builds_and_steps(mixer):
    cfg = SyntheticConfig(task="modular", mixer=mixer, d_model=16, d_state=8, headdim=8, n_layer=1, batch_size=4,
                          steps_per_stage=2, stages=(5, 7), eval_len=9, eval_examples=4, warmup_steps=1)
    row = run_synthetic(cfg, log=lambda s: None)
    assert row["steps_per_stage"] == 2 and len(row["history"]) == 2
    assert 0.0 <= row["best_acc"] <= 1.0 and row["chance"] == 0.2
    assert row["scaled_acc"] == pytest.approx((row["best_acc"] - 0.2) / 0.8)


@pytest.mark.parametrize("task", ["mqar", "selective_copy", "induction", "modular_brackets"])
def test_other_tasks_run(task):
    cfg = SyntheticConfig(task=task, d_model=16, d_state=8, headdim=8, batch_size=2, steps_per_stage=1, stages=(6,),
                          eval_len=8, eval_examples=2, seq_len=32, num_kv_pairs=4, warmup_steps=1)
    row = run_synthetic(cfg, log=lambda s: None)
    assert row["steps_per_stage"] == 1


def test_budget_shrinks_steps():
    cfg = SyntheticConfig(task="parity", d_model=16, d_state=8, headdim=8, batch_size=4, steps_per_stage=10_000,
                          stages=(4, 6), eval_len=8, eval_examples=4, budget_seconds=2.0)
    row = run_synthetic(cfg, log=lambda s: None)
    assert 1 <= row["steps_per_stage"] < 10_000 and row["seconds"] < 30


def test_table_keeps_best_run():
    rows = [dict(task="parity", mixer="mamba3", variant="default", d_model=32, n_layer=1, lr=lr, steps_per_stage=5,
                 stages=[40, 80], eval_len=256, best_acc=acc, scaled_acc=2 * acc - 1) for lr, acc in
            ((1e-3, 0.6), (1e-2, 0.95))]
    assert best_rows(rows)[0]["lr"] == 1e-2
    t = markdown_table(rows)
    assert t.count("\n") == 2 and "| 95.00 | 90.00 |" in t and "40-80" in t


def test_cli_synthetic_writes_rows(tmp_path):
    out, table = tmp_path / "r.jsonl", tmp_path / "t.md"
    rc = eval_cli.main(["eval", "synthetic", "--task", "parity", "--d-model", "16,32", "--d-state", "8",
                        "--headdim", "8", "--lr-sweep", "2", "--steps", "1", "--stages", "4,6", "--eval-len", "8",
                        "--eval-examples", "4", "--batch-size", "4", "--mixer-kw", "dt_max=0.5",
                        "--out", str(out), "--table", str(table)])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and {r["d_model"] for r in rows} == {16, 32}
    assert sorted({r["lr"] for r in rows}) == pytest.approx([1e-4, 1e-2])
    assert table.read_text().count("| parity | mamba3 | default |") == 1


def test_untied_head_by_default():
    model = build_model(SyntheticConfig(d_model=16, d_state=8, headdim=8), 3)
    assert model.lm_head.weight.data_ptr() != model.backbone.embedding.weight.data_ptr()


# The tiny seeded parity run of EVALUATION.md: 1 layer, d_model 32, curriculum 8 -> 16 -> 32 (150 steps
# each, batch 64), validated at length 48 (longer than any training example). dt is initialised in
# [0.1, 1] (mixer default [0.001, 0.1]) so that a few hundred steps suffice; "best validation accuracy"
# as in the paper. About 15-20 s each on one idle CPU core.
PARITY = dict(task="parity", d_model=32, headdim=16, d_state=16, batch_size=64, steps_per_stage=150,
              stages=(8, 16, 32), eval_len=48, eval_examples=256, eval_every=50, lr=1e-2, warmup_steps=20, seed=0,
              mixer_overrides={"dt_min": 0.1, "dt_max": 1.0})


def test_parity_mamba3_extrapolates_beyond_training_length():
    torch.set_num_threads(1)
    row = run_synthetic(SyntheticConfig(**PARITY), log=lambda s: None)
    assert max(row["stages"]) < row["eval_len"]
    assert row["best_acc"] > 0.9, row["history"]


def test_parity_without_rope_stays_at_chance():
    """Control (Mamba-3 Table 5b, "without RoPE"): real decays only cannot track parity."""
    torch.set_num_threads(1)
    row = run_synthetic(SyntheticConfig(**PARITY, variant="no_rope"), log=lambda s: None)
    assert row["best_acc"] < 0.75, row["history"]


def test_compare_equal_params_and_rows(tmp_path):
    from mamba3.eval.compare import ARCH_NAMES, CompareConfig, compare, markdown
    cfg = CompareConfig(d_model=32, n_layer=6, d_intermediate=64, d_state=8, headdim=16, seq_len=16, batch_size=2,
                        steps=2, val_tokens=64)
    out = tmp_path / "c.jsonl"
    rows = compare(cfg, out=str(out), log=lambda s: None)
    assert [r["arch"] for r in rows] == list(ARCH_NAMES)
    ref = rows[0]["params"]
    for r in rows:
        assert abs(r["params"] - ref) / ref < 0.05, r
        assert r["tokens"] == 2 * 2 * 16 and r["val_ppl"] > 1 and "bits_per_byte" in r
    assert len(out.read_text().splitlines()) == 6
    assert markdown(rows).count("\n") == 7


def test_budget_run_equals_plain_run_with_same_steps():
    kw = dict(task="parity", d_model=16, d_state=8, headdim=8, batch_size=4, stages=(4, 6), eval_len=8,
              eval_examples=4, warmup_steps=1)
    a = run_synthetic(SyntheticConfig(**kw, steps_per_stage=10_000, budget_seconds=1.0), log=lambda s: None)
    b = run_synthetic(SyntheticConfig(**kw, steps_per_stage=a["steps_per_stage"]), log=lambda s: None)
    assert a["history"] == b["history"] and a["final_loss"] == pytest.approx(b["final_loss"])
