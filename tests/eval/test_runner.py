"""Synthetic-task runner: config plumbing, budget, table, CLI, and a tiny parity run."""
import json
import time

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


def test_budget_mode_keeps_its_deadline():
    """Budget mode trains until the deadline (stages follow the elapsed time) and still validates."""
    cfg = SyntheticConfig(task="parity", d_model=16, d_state=8, headdim=8, batch_size=4, steps_per_stage=10 ** 6,
                          stages=(4, 6), eval_len=8, eval_examples=4, test_examples=4, budget_seconds=3.0)
    row = run_synthetic(cfg, log=lambda s: None)
    assert row["seconds"] < 3.0 + 1.0, row["seconds"]
    assert all(n > 0 for n in row["stage_steps"]) and row["stage_steps"][0] < 10 ** 6
    assert row["history"][-1][1] == 6 and row["test_acc"] is not None
    late = run_synthetic(cfg, log=lambda s: None, deadline=time.time() - 1)  # already past: no step, a row
    assert late["stage_steps"] == [0, 0] and len(late["history"]) == 1


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


def test_budget_run_equals_plain_run_when_steps_bind():
    """With a budget that the step cap reaches first, the run is the plain step schedule."""
    kw = dict(task="parity", d_model=16, d_state=8, headdim=8, batch_size=4, stages=(4, 6), eval_len=8,
              eval_examples=4, warmup_steps=1, steps_per_stage=3, evals_per_stage=3)
    a = run_synthetic(SyntheticConfig(**kw, budget_seconds=600.0), log=lambda s: None)
    b = run_synthetic(SyntheticConfig(**kw), log=lambda s: None)
    assert a["history"] == b["history"] and a["final_loss"] == pytest.approx(b["final_loss"])
    assert [h[0] for h in b["history"]] == [1, 2, 3, 4, 5, 6] and b["stage_steps"] == [3, 3]


def test_stop_at_acc_ends_training_at_the_first_validation_that_reaches_it():
    cfg = SyntheticConfig(task="parity", d_model=16, d_state=8, headdim=8, batch_size=4, stages=(4, 6), eval_len=8,
                          eval_examples=4, steps_per_stage=5, evals_per_stage=5, stop_at_acc=0.0)
    row = run_synthetic(cfg, log=lambda s: None)
    assert row["stage_steps"] == [1, 0] and [h[0] for h in row["history"]] == [1, 1] and row["stopped_at_acc"]


def test_dt_range_reaches_the_mixers_with_dt():
    assert mixer_kwargs(SyntheticConfig(dt_range=(0.1, 1.0)))["dt_max"] == 1.0
    assert mixer_kwargs(SyntheticConfig(mixer="mamba2", dt_range=(0.1, 1.0)))["dt_min"] == 0.1
    assert "dt_min" not in mixer_kwargs(SyntheticConfig(mixer="gdn", dt_range=(0.1, 1.0)))


def _load_table5b():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_table5b.py"
    spec = importlib.util.spec_from_file_location("gpu_table5b", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_table5b_smoke_in_process(tmp_path):
    """benchmarks/gpu_table5b.py: the GPU job list, configs and table, on two tiny CPU cells."""
    t5b = _load_table5b()
    full = t5b.job_list(t5b.parser().parse_args(["--out-dir", str(tmp_path)]))
    assert len(full) == 30 and len({j["name"] for j in full}) == 30
    args = t5b.parser().parse_args(["--out-dir", str(tmp_path), "--smoke", "--device", "cpu", "--lrs", "1e-2",
                                    "--tasks", "parity,modular_brackets", "--rows", "mamba3/no_rope,gdn/default"])
    jobs = t5b.job_list(args)
    assert [j["name"] for j in jobs][:2] == ["parity-mamba3-no_rope-lr1e-02", "parity-gdn-default-lr1e-02"]
    rows = [t5b.run_job(j, args, time.time() + 60, str(tmp_path), log=lambda s: None) for j in jobs[::3]]
    assert all("error" not in r for r in rows), rows
    assert rows[0]["mixer_kwargs"]["dt_max"] == 1.0 and rows[0]["test_acc"] is not None
    md = t5b.table(rows, jobs)
    assert "| Mamba-3, no RoPE |" in md and "missing / 0.72" in md  # modular_brackets mamba3/no_rope not run
    assert len(list((tmp_path / "rows").glob("*.json"))) == 2


def test_gpu_table5b_full_configs():
    """The configs the GPU run builds (not run here): the paper's protocol with the script's settings."""
    t5b = _load_table5b()
    args = t5b.parser().parse_args(["--out-dir", "x", "--device", "cuda"])
    jobs = t5b.job_list(args)
    cfgs = {j["name"]: t5b.job_config(j, args) for j in jobs}
    c = cfgs["parity-mamba3-default-lr3e-03"]
    assert (c.d_model, c.d_state, c.headdim, c.batch_size, c.layers()) == (64, 64, 16, 256, 1)
    assert tuple(c.stages) == (40, 80, 120, 160) and c.eval_len == 256 and c.min_len == 3
    assert c.stop_at_acc == 1.0 and c.device == "cuda" and c.amp == "none" and c.test_examples == 8192
    assert mixer_kwargs(c)["dt_min"] == 0.1 and "rope" not in mixer_kwargs(c)  # the layer's default: data RoPE
    assert cfgs["modular_brackets-gdn-default-lr1e-03"].layers() == 3
    assert mixer_kwargs(cfgs["parity-gdn-default-lr1e-03"])["allow_neg_eigval"] is True
    assert mixer_kwargs(cfgs["modular-mamba3-no_rope-lr3e-03"])["rope"] == "none"
    assert mixer_kwargs(cfgs["modular-mamba2-default-lr3e-03"])["dt_max"] == 1.0
    assert sorted({c.lr for c in cfgs.values()}) == [1e-3, 3e-3]


def test_gpu_table5b_smoke_command(tmp_path):
    """The parent process: one subprocess per run, rows, JSONL and table written within the budget."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_table5b.py"), "--smoke", "--out-dir", str(out),
                        "--budget-s", "90", "--tasks", "modular", "--rows", "mamba3/default", "--lrs", "1e-2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 of 1 rows" in r.stdout and (out / "t5b_table.md").exists()
    row = json.loads((out / "t5b_rows.jsonl").read_text())
    assert row["task"] == "modular" and row["n_layer"] == 3 and row["device"] == "cpu"
    # --collect: the table of rows from earlier calls (e.g. one call per task), running nothing
    merged = tmp_path / "merged"
    rc = _load_table5b().main(["--collect", str(out), "--out-dir", str(merged), "--device", "cpu"])
    assert rc == 0 and "1 of 30 rows" in (merged / "t5b_table.md").read_text()
    assert "missing / 100.00" in (merged / "t5b_table.md").read_text()  # parity Mamba-3 not run


def test_prefetch_gives_the_sequential_batches_across_stage_changes():
    """The threaded prefetcher hands out exactly the batches a plain loop would make from the same
    generator, also when the curriculum length changes (the prefetched batch is then dropped)."""
    from mamba3.eval.runner import _Prefetch, task_info
    _, _, make = task_info(SyntheticConfig(task="modular"))
    plan = [7, 7, 7, 11, 11, 15, 15, 15]
    g = torch.Generator().manual_seed(3)
    pf = _Prefetch(lambda n: make(4, 3, n, g), "cpu", threaded=True)
    got = [pf.next(n) for n in plan]
    pf.close()
    g2 = torch.Generator().manual_seed(3)
    want, made = [], None
    for i, n in enumerate(plan):  # the plain equivalent: a batch made ahead with the previous length
        if made is None or made[0] != n:
            made = (n, make(4, 3, n, g2))
        want.append(made[1])
        made = (n, make(4, 3, n, g2))
    for a, b in zip(got, want):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)


def test_matmul_precision_is_set_for_the_run_and_restored():
    before = torch.get_float32_matmul_precision()
    seen = []
    cfg = SyntheticConfig(task="parity", d_model=16, d_state=8, headdim=8, batch_size=4, steps_per_stage=1,
                          stages=(5,), eval_len=7, eval_examples=4, matmul_precision="high")
    import mamba3.eval.runner as runner
    orig = runner._run_synthetic
    try:
        runner._run_synthetic = lambda c, log, d: seen.append(torch.get_float32_matmul_precision()) or {}
        runner.run_synthetic(cfg)
    finally:
        runner._run_synthetic = orig
    assert seen == ["high"] and torch.get_float32_matmul_precision() == before
    with pytest.raises(ValueError, match="matmul_precision"):
        runner.run_synthetic(SyntheticConfig(matmul_precision="tf32"))


def test_paused_and_resumed_run_continues_where_it_stopped(tmp_path):
    """A run paused at once (pause_after_seconds=0) saves a checkpoint and a partial row; resuming
    in steps reaches the full step count with the same stage steps as an uninterrupted run."""
    kw = dict(task="parity", d_model=16, d_state=8, headdim=8, batch_size=8, steps_per_stage=3, stages=(5, 7),
              eval_len=9, eval_examples=8, warmup_steps=2)
    full = run_synthetic(SyntheticConfig(**kw), log=lambda *a: None)
    ck = str(tmp_path / "run.pt")
    partial = run_synthetic(SyntheticConfig(**kw, checkpoint=ck, pause_after_seconds=0.0), log=lambda *a: None)
    assert partial["partial"] and partial["step"] == 0
    done = run_synthetic(SyntheticConfig(**kw, checkpoint=ck), log=lambda *a: None)
    assert done["stage_steps"] == full["stage_steps"] == [3, 3] and done["resumed_from"] == 0
    with pytest.raises(ValueError, match="another run"):
        run_synthetic(SyntheticConfig(**{**kw, "lr": 5e-3}, checkpoint=ck), log=lambda *a: None)
    with pytest.raises(ValueError, match="checkpoint"):
        run_synthetic(SyntheticConfig(**kw, pause_after_seconds=1.0))
    with pytest.raises(ValueError, match="step schedule"):
        run_synthetic(SyntheticConfig(**kw, checkpoint=ck, budget_seconds=5.0))


def test_resume_mid_run_matches_uninterrupted_weights(tmp_path, monkeypatch):
    """Pausing after k steps and resuming gives the uninterrupted run's final weights (the same
    batches: the prefetch is off on CPU, so the saved generator state is exact)."""
    import mamba3.eval.runner as runner
    kw = dict(task="parity", d_model=16, d_state=8, headdim=8, batch_size=8, steps_per_stage=4, stages=(5, 7),
              eval_len=9, eval_examples=8, warmup_steps=2, lr=3e-3)
    states = []
    orig = runner.evaluate

    def capture(model, val, cfg):
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        return orig(model, val, cfg)
    monkeypatch.setattr(runner, "evaluate", capture)
    run_synthetic(SyntheticConfig(**kw), log=lambda *a: None)
    want = states[-1]
    # a clock that advances one second per call: the pause comes after a few steps
    ck = str(tmp_path / "mid.pt")
    clock = iter(range(10**6))
    monkeypatch.setattr(runner.time, "time", lambda: float(next(clock)))
    part = run_synthetic(SyntheticConfig(**kw, checkpoint=ck, pause_after_seconds=4.0), log=lambda *a: None)
    monkeypatch.setattr(runner.time, "time", __import__("time").time)
    assert part["partial"] and 0 < part["step"] < 8
    states.clear()
    run_synthetic(SyntheticConfig(**kw, checkpoint=ck), log=lambda *a: None)
    for k in want:
        torch.testing.assert_close(states[-1][k], want[k], rtol=1e-5, atol=1e-6)
