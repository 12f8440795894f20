"""Training fault trials: SIGKILL a tiny CPU training run at random steps, resume, compare.

    OMP_NUM_THREADS=1 python scripts/kill_trials.py --trials 20 --out /tmp/kill_trials

Each trial trains the same tiny model (shipped tiny corpus, 1 Mamba-3 layer) in a fresh folder:
the run is SIGKILLed once or twice at random steps (polled from metrics.jsonl, so a kill can land
mid-step or mid-save), then restarted with resume until it finishes. Every third trial also
flips bytes in the newest checkpoint's model.safetensors before resuming: the trainer must warn
naming that folder (sha256 mismatch) and resume from the previous complete checkpoint.
A trial passes when the final training loss and validation loss equal (bitwise) those of one
uninterrupted run. Prints one line per trial and a JSON summary (also written to --out).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

STEPS, EVERY = 12, 2
MODEL = {"preset": "tiny", "n_layer": 1, "d_model": 32, "d_intermediate": 64,
         "mixer_cfg": {"mamba3": {"d_state": 16, "headdim": 16, "expand": 2, "chunk_size": 16}}}

WORKER = r'''
import json, sys, pathlib, warnings
warnings.simplefilter("always")
from mamba3.train.config import TrainConfig
from mamba3.train.loop import main
summary = main(TrainConfig.from_dict(json.loads(sys.argv[1])), log=lambda *a: print(*a, flush=True))
pathlib.Path(sys.argv[2]).write_text(json.dumps(summary))
'''


def config(out_dir: Path) -> dict:
    return {"model": MODEL, "data": {"source": "tiny", "seq_len": 32},
            "train": {"steps": STEPS, "micro_batch": 4, "lr": 3e-3, "warmup_steps": 2, "seed": 0},
            "eval": {"every": 0, "batches": 2}, "checkpoint": {"every": EVERY, "keep": 3},
            "run": {"out_dir": str(out_dir), "progress": False, "sample_tokens": 0, "log_every": 1}}


def launch(work: Path, out_dir: Path, tag: str) -> tuple[subprocess.Popen, Path]:
    script = work / "worker.py"
    script.write_text(WORKER)
    summary = out_dir.parent / f"{out_dir.name}-{tag}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(out_dir.parent / f"{out_dir.name}-{tag}.log", "w")
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(config(out_dir)), str(summary)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    return proc, summary


def last_step(out_dir: Path) -> int:
    try:
        lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    steps = [json.loads(line).get("step", 0) for line in lines if line.strip().endswith("}")]
    return max(steps, default=0)


def run_to_end(work: Path, out_dir: Path, tag: str) -> dict:
    proc, summary = launch(work, out_dir, tag)
    if proc.wait(timeout=900) != 0:
        raise RuntimeError(f"run {tag} failed: see {out_dir.parent / (out_dir.name + '-' + tag + '.log')}")
    return json.loads(summary.read_text())


def kill_at(work: Path, out_dir: Path, tag: str, step: int) -> int:
    """Start (or resume) the run and SIGKILL it once metrics show ``step``; returns the step seen."""
    proc, _ = launch(work, out_dir, tag)
    while proc.poll() is None and last_step(out_dir) < step:
        time.sleep(0.02)
    seen = last_step(out_dir)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return seen


def flip_bytes(path: Path, rng: random.Random, n: int = 16) -> None:
    data = bytearray(path.read_bytes())
    for _ in range(n):
        i = rng.randrange(len(data) // 2, len(data))  # tensor payload, past the header
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/kill_trials")
    args = ap.parse_args()
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    t0 = time.time()
    ref = run_to_end(work, work / "reference", "full")
    want = (ref["losses"][-1], ref["val_loss"])
    print(f"reference: final loss {want[0]!r}, val loss {want[1]!r} ({time.time() - t0:.0f}s)", flush=True)
    results = []
    for trial in range(args.trials):
        out_dir = work / f"trial-{trial:02d}"
        kills, corrupted, warned = [], None, False
        for j in range(rng.choice([1, 2])):  # a second kill lands after the first one's step
            lo = min(kills[-1] + 1, STEPS - 1) if kills else 1
            kills.append(kill_at(work, out_dir, f"kill{j}", rng.randint(lo, STEPS - 1)))
        if trial % 3 == 2:  # corrupt the newest checkpoint: resume must skip it, naming it
            from mamba3.train import checkpoint as ckpt
            found = ckpt.complete_checkpoints(out_dir / "checkpoints")
            if found:
                corrupted = found[-1]
                flip_bytes(corrupted / "model.safetensors", rng)
        final = run_to_end(work, out_dir, "resume")
        log = (work / f"{out_dir.name}-resume.log").read_text()
        if corrupted is not None:
            warned = f"skipping corrupted checkpoint {corrupted}" in log
        got = (final["losses"][-1], final["val_loss"])
        ok = got == want and (corrupted is None or warned)
        results.append({"trial": trial, "killed_at_steps": kills, "resumed_from": final["resumed_from"],
                        "corrupted": str(corrupted) if corrupted else None, "warned": warned,
                        "final_loss": got[0], "val_loss": got[1], "ok": ok})
        print(f"trial {trial:2d}: killed at steps {kills}, corrupted {corrupted.name if corrupted else '-'}"
              f"{' (warned)' if warned else ''}, resumed from {Path(final['resumed_from']).name if final['resumed_from'] else 'scratch'}, "
              f"final loss {got[0]!r} {'OK' if ok else 'MISMATCH'}", flush=True)
    summary = {"trials": len(results), "survived": sum(r["ok"] for r in results),
               "corrupted_detected": sum(r["warned"] for r in results),
               "corrupted_trials": sum(r["corrupted"] is not None for r in results),
               "reference": {"final_loss": want[0], "val_loss": want[1]}, "seconds": round(time.time() - t0),
               "results": results}
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}), flush=True)
    return 0 if summary["survived"] == summary["trials"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
