"""Shared tiny configs for the trainer tests."""
import copy
import json
import os
import subprocess
import sys

from mamba3.train.config import TrainConfig

TINY_MODEL = {"preset": "tiny", "n_layer": 1, "d_model": 32, "d_intermediate": 64,
              "mixer_cfg": {"mamba3": {"d_state": 16, "headdim": 16, "expand": 2, "chunk_size": 16}}}


def tiny_dict(out_dir, **sections) -> dict:
    d = {"model": copy.deepcopy(TINY_MODEL),
         "data": {"source": "tiny", "seq_len": 32},
         "train": {"steps": 6, "micro_batch": 4, "lr": 3e-3, "warmup_steps": 2, "seed": 0},
         "eval": {"every": 0, "batches": 2},
         "checkpoint": {"every": 3, "keep": 3},
         "run": {"out_dir": str(out_dir), "progress": False, "sample_tokens": 0, "log_every": 1}}
    for name, values in sections.items():
        d.setdefault(name, {}).update(values)
    return d


def tiny_config(out_dir, **sections) -> TrainConfig:
    return TrainConfig.from_dict(tiny_dict(out_dir, **sections))


WORKER = r'''
import json, os, sys, time, pathlib
import mamba3.train.checkpoint as ck
from mamba3.train.config import TrainConfig
from mamba3.train.loop import main

cfg_json, out_json, stall_step = sys.argv[1], sys.argv[2], int(sys.argv[3])
if stall_step:  # test hook: hang inside save of checkpoint `stall_step`, after the model file
    write = ck._write_tensors
    def slow(path, tensors):
        write(path, tensors)
        if path.name == "model.safetensors" and path.parent.name == f".step-{stall_step:08d}.tmp":
            pathlib.Path(out_json + ".saving").write_text("1")
            time.sleep(600)
    ck._write_tensors = slow
summary = main(TrainConfig.from_dict(json.loads(cfg_json)), log=lambda *_: None)
if int(os.environ.get("RANK", "0")) == 0:
    pathlib.Path(out_json).write_text(json.dumps(summary))
'''


def worker_command(tmp_path, cfg: dict, out_json, nproc: int = 1, stall_step: int = 0) -> list:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    args = [str(script), json.dumps(cfg), str(out_json), str(stall_step)]
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def run_worker(tmp_path, cfg: dict, nproc: int = 1, timeout: int = 300) -> dict:
    out = tmp_path / f"summary-{nproc}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(worker_command(tmp_path, cfg, out, nproc), env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(out.read_text())
