"""End-to-end trainer on the shipped tiny corpus: learning, exact resume, crash-safe checkpoints."""
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

from mamba3.models import LanguageModel
from mamba3.train import checkpoint as ckpt
from mamba3.train.loop import main

from .helpers import tiny_config, tiny_dict, worker_command

quiet = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """6 uninterrupted steps, checkpoints at 3 and 6."""
    out = tmp_path_factory.mktemp("ref")
    return out, main(tiny_config(out), **quiet)


def test_loss_decreases_and_artifacts(tmp_path):
    cfg = tiny_config(tmp_path, train={"steps": 30, "lr": 1e-2, "warmup_steps": 3, "grad_accum": 2},
                      eval={"every": 15}, run={"sample_tokens": 12, "log_every": 5})
    s = main(cfg, **quiet)
    first, last = s["losses"][0], sum(s["losses"][-5:]) / 5
    assert first > 5.0 and last < first - 1.0, s["losses"]
    assert s["val_loss"] < first - 1.0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 5, 10, 15, 20, 25, 30]
    assert [r["step"] for r in records if "val_loss" in r] == [15, 30]
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert isinstance(s["sample"], str)
    model = LanguageModel.from_pretrained(tmp_path / "final")
    x = torch.randint(0, 256, (1, 8))
    assert torch.isfinite(model(x, labels=x).loss)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path / "checkpoints")] == [
        "step-00000024", "step-00000027", "step-00000030"]  # keep = 3


def test_resume_is_bitwise_exact(tmp_path, reference):
    ref_dir, ref = reference
    assert len(ref["losses"]) == 6
    run = tmp_path / "run"
    shutil.copytree(ref_dir, run)
    shutil.rmtree(run / "checkpoints" / "step-00000006")  # as if the run had stopped after step 3
    s = main(tiny_config(run), **quiet)
    assert s["start_step"] == 3 and s["resumed_from"].endswith("step-00000003")
    assert s["losses"] == ref["losses"][3:]  # exact float equality
    msd_a = ckpt.load(ref_dir / "checkpoints" / "step-00000006")[0]
    msd_b = ckpt.load(run / "checkpoints" / "step-00000006")[0]
    assert all(torch.equal(msd_a[k], msd_b[k]) for k in msd_a)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]  # metrics past the checkpoint dropped, then re-written


def test_sigkill_during_save_keeps_last_good_checkpoint(tmp_path, reference):
    _, ref = reference
    run = tmp_path / "run"
    marker = tmp_path / "summary.json.saving"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(worker_command(tmp_path, tiny_dict(run), tmp_path / "summary.json", stall_step=6),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "worker never reached the save of step 6"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    root = run / "checkpoints"
    assert (root / ".step-00000006.tmp" / "model.safetensors").exists()  # killed mid-save
    assert not (root / ".step-00000006.tmp" / "meta.json").exists()
    assert ckpt.latest(root).name == "step-00000003"
    s = main(tiny_config(run), **quiet)
    assert s["start_step"] == 3 and s["losses"] == ref["losses"][3:]
    assert not list(root.glob(".step-*"))  # the stale temporary folder is cleaned up
    assert ckpt.latest(root).name == "step-00000006"


def test_incomplete_folder_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step-00000009").mkdir(parents=True)  # no meta.json: not complete
    (root / "step-00000004").mkdir()
    (root / "step-00000004" / "meta.json").write_text("{truncated")
    assert ckpt.latest(root) is None


def test_bf16_autocast_close_to_fp32(tmp_path, reference):
    """The GPU default (bf16 autocast) exercised on CPU: same trajectory within bf16 precision."""
    _, ref = reference
    s = main(tiny_config(tmp_path, train={"steps": 6, "dtype": "bfloat16"}, checkpoint={"every": 0}), **quiet)
    assert s["losses"] != ref["losses"]  # autocast really ran in bf16
    for a, b in zip(s["losses"], ref["losses"]):
        assert abs(a - b) < 0.02 * b, (s["losses"], ref["losses"])
