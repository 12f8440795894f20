"""Mamba-3 Table 5b (state tracking) in one call on one GPU: 5 rows x 3 tasks x a learning-rate
sweep, run as concurrent single-thread subprocesses under one wall-clock budget.

    PYTHONPATH=$PWD python benchmarks/gpu_table5b.py --out-dir $OUT --budget-s 480
    PYTHONPATH=$PWD python benchmarks/gpu_table5b.py --smoke --out-dir /tmp/t5b     # CPU, 1-2 min

Protocol (DATA.md 4.1-4.3, runner.py): curriculum min length 3, max 40 -> 80 -> 120 -> 160; 1 layer
for parity, 3 for arithmetic; d_model 64, d_state 64, batch 256; validation on fresh examples of
length 256; the best validation accuracy of a run is kept (the paper's rule) and its checkpoint is
also scored on a separate test set. Each run trains until its deadline: stages and the cosine
learning rate follow the elapsed time (runner._Schedule), so a slower GPU gets fewer steps, never a
late row. Every run writes its JSON row (rows/<name>.json, also when it fails); the parent writes
all rows to t5b_rows.jsonl, the table (best learning rate per cell) to t5b_table.md, and prints it.
Processes that still run at the budget's end are killed and listed as missing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback

ROWS = (("Mamba-3", "mamba3", "default"), ("Mamba-3, standard RoPE", "mamba3", "rope_fixed"),
        ("Mamba-3, no RoPE", "mamba3", "no_rope"), ("Mamba-2", "mamba2", "default"),
        ("GDN [-1,1]", "gdn", "default"))
TASKS = ("parity", "modular", "modular_brackets")
PAPER = {  # Mamba-3 Table 5b, scaled accuracy %
    ("mamba3", "default"): (100.00, 98.51, 87.75), ("mamba3", "rope_fixed"): (1.56, 20.70, 2.62),
    ("mamba3", "no_rope"): (2.27, 1.49, 0.72), ("mamba2", "default"): (0.90, 47.81, 0.88),
    ("gdn", "default"): (100.00, 99.25, 93.50)}
# two of the paper's sweep range [1e-4, 1e-2]: on CPU (batch 256, d_state 64) parity was learned at
# 3e-3 within 450 steps and not at 1e-2 within 350; Grazzi et al. train the arithmetic tasks at 1e-3
DEFAULT_LRS = {"parity": (1e-3, 3e-3), "modular": (1e-3, 3e-3), "modular_brackets": (1e-3, 3e-3)}


def job_list(args) -> list:
    lrs = None if not args.lrs else [float(x) for x in args.lrs.split(",")]
    tasks = args.tasks.split(",")
    rows = [r for r in ROWS if not args.rows or f"{r[1]}/{r[2]}" in args.rows.split(",")]
    jobs = []
    for task in tasks:
        for _, mixer, variant in rows:
            for lr in (lrs or DEFAULT_LRS[task]):
                jobs.append(dict(task=task, mixer=mixer, variant=variant, lr=lr,
                                 name=f"{task}-{mixer}-{variant}-lr{lr:.0e}"))
    return jobs


def job_config(job: dict, args):
    from mamba3.eval.runner import SyntheticConfig
    dt = None if args.dt_range == "default" else tuple(float(x) for x in args.dt_range.split(","))
    if args.smoke:
        return SyntheticConfig(task=job["task"], mixer=job["mixer"], variant=job["variant"], lr=job["lr"],
                               d_model=16, d_state=8, headdim=8, batch_size=8, steps_per_stage=3, stages=(5, 7),
                               eval_len=9, eval_examples=16, test_examples=16, evals_per_stage=2, warmup_steps=2,
                               device=args.device, amp=args.amp, dt_range=dt, stop_at_acc=1.0)
    return SyntheticConfig(task=job["task"], mixer=job["mixer"], variant=job["variant"], lr=job["lr"],
                           d_model=args.d_model, d_state=64, headdim=16, batch_size=args.batch_size,
                           steps_per_stage=args.max_steps_per_stage, stages=(40, 80, 120, 160), eval_len=256,
                           eval_examples=args.eval_examples, test_examples=args.test_examples,
                           evals_per_stage=args.evals_per_stage, warmup_steps=args.warmup_steps,
                           device=args.device, amp=args.amp, dt_range=dt, seed=args.seed,
                           matmul_precision=args.matmul_precision, stop_at_acc=None if args.no_early_stop else 1.0)


def run_job(job: dict, args, deadline: float, out_dir: str, log=print) -> dict:
    """One run in this process; its row (or an error row) goes to out_dir/rows/<name>.json."""
    import torch
    torch.set_num_threads(1)
    t0 = time.time()
    try:
        from mamba3.eval.runner import run_synthetic
        row = run_synthetic(job_config(job, args), log=log, deadline=deadline)
    except Exception as e:  # a failed run still leaves a row, so the table names it
        log(traceback.format_exc())
        row = dict(task=job["task"], mixer=job["mixer"], variant=job["variant"], lr=job["lr"],
                   error=f"{type(e).__name__}: {e}", seconds=round(time.time() - t0, 2))
    row["name"] = job["name"]
    row["torch"] = torch.__version__
    if args.device.startswith("cuda"):
        from mamba3.ops.mamba3.interface import triton_available
        row["gpu"] = torch.cuda.get_device_name()
        row["triton_kernels"] = triton_available(torch.device(args.device))
    os.makedirs(os.path.join(out_dir, "rows"), exist_ok=True)
    path = os.path.join(out_dir, "rows", job["name"] + ".json")
    with open(path + ".tmp", "w") as f:
        json.dump(row, f)
    os.replace(path + ".tmp", path)
    return row


def table(rows: list, jobs: list) -> str:
    """Best learning rate per cell (by best validation accuracy); paper values alongside."""
    head = "| model | " + " | ".join(f"{t} (ours / paper)" for t in TASKS) + " |"
    lines = [head, "|---|" + "---|" * len(TASKS)]
    detail = ["", "| cell | best lr | scaled acc % (best val) | scaled acc % (test, best ckpt) | "
              "steps per stage | lrs run: scaled val % | seconds |", "|---|---|---|---|---|---|---|"]
    for label, mixer, variant in ROWS:
        cells = []
        for ti, task in enumerate(TASKS):
            mine = [r for r in rows if (r["task"], r["mixer"], r["variant"]) == (task, mixer, variant)]
            wanted = [j for j in jobs if (j["task"], j["mixer"], j["variant"]) == (task, mixer, variant)]
            if not wanted:
                cells.append("-")
                continue
            ok = [r for r in mine if "error" not in r]
            paper = PAPER[(mixer, variant)][ti]
            if not ok:
                why = "error" if mine else "missing"
                cells.append(f"{why} / {paper:.2f}")
                detail.append(f"| {task} {label} | - | {why} | - | - | "
                              f"{len(mine)} of {len(wanted)} rows | - |")
                continue
            best = max(ok, key=lambda r: r["best_acc"])
            cells.append(f"{100 * best['scaled_acc']:.2f} / {paper:.2f}")
            test = best.get("test_scaled_acc")
            sweep = ", ".join(f"{r['lr']:.0e}: {100 * r['scaled_acc']:.1f}" for r in sorted(ok, key=lambda r: r["lr"]))
            missing = len(wanted) - len(ok)
            if missing:
                sweep += f" ({missing} missing/failed)"
            detail.append(f"| {task} {label} | {best['lr']:.0e} | {100 * best['scaled_acc']:.2f} | "
                          f"{'-' if test is None else f'{100 * test:.2f}'} | "
                          f"{'-'.join(map(str, best.get('stage_steps', [])))} | {sweep} | {best['seconds']:.0f} |")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines + detail)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall clock of the whole command")
    ap.add_argument("--max-procs", type=int, default=32, help="concurrent runs; more jobs run in waves")
    ap.add_argument("--lrs", default=None, help="comma-separated, for every task (default: 1e-3,3e-3)")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--rows", default=None, help="e.g. mamba3/default,mamba2/default (default: all 5)")
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--max-steps-per-stage", type=int, default=10_000, help="cap (paper: 10^4)")
    ap.add_argument("--warmup-steps", type=int, default=100)
    ap.add_argument("--eval-examples", type=int, default=4096)
    ap.add_argument("--test-examples", type=int, default=8192)
    ap.add_argument("--evals-per-stage", type=int, default=4)
    ap.add_argument("--dt-range", default="0.1,1.0", help="'lo,hi' dt init of mamba3/mamba2, or 'default'")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-early-stop", action="store_true",
                    help="keep training after a validation at 100%% (default: stop, freeing the GPU for the rest)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--amp", choices=("none", "bf16"), default="none")
    ap.add_argument("--matmul-precision", choices=("highest", "high"), default="highest",
                    help="fp32 dots: full precision, or tf32 (about 5x faster SSD kernels)")
    ap.add_argument("--smoke", action="store_true", help="tiny models, a few steps per cell (CPU check)")
    ap.add_argument("--collect", default=None, metavar="DIR,DIR",
                    help="run nothing: table of the rows already in these --out-dirs (e.g. one call per task)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)    # internal: one job as JSON
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke and not args.lrs:
        args.lrs = "1e-2"
    if args.worker:
        run_job(json.loads(args.worker), args, args.deadline, args.out_dir)
        return 0

    t0 = time.time()
    os.makedirs(os.path.join(args.out_dir, "logs"), exist_ok=True)
    jobs = job_list(args)
    if args.collect:
        return write_outputs(args, jobs, collect_rows(args.collect.split(",")), t0, [])
    for job in jobs:  # no stale rows from an earlier call into the same folder
        stale = os.path.join(args.out_dir, "rows", job["name"] + ".json")
        if os.path.exists(stale):
            os.remove(stale)
    waves = max(1, math.ceil(len(jobs) / args.max_procs))
    # runs return their rows by their deadline; a run still alive at its kill time (a few seconds
    # before the budget's end, enough to collect and write) is stopped and listed as missing
    slack = max(10.0, 0.04 * args.budget_s)
    end = t0 + args.budget_s - slack
    print(f"{len(jobs)} runs, {waves} wave(s), device {args.device}, budget {args.budget_s:.0f}s", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.dirname(here), env.get("PYTHONPATH")) if p)
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    killed = []
    for w in range(waves):
        wave = jobs[w * args.max_procs:(w + 1) * args.max_procs]
        deadline = t0 + (end - t0) * (w + 1) / waves
        kill_at = deadline + (slack - 3.0 if w == waves - 1 else 0.5 * slack / waves)
        procs = []
        for job in wave:
            log = open(os.path.join(args.out_dir, "logs", job["name"] + ".log"), "w")
            cmd = [sys.executable, os.path.abspath(__file__), *passthrough, "--device", args.device,
                   "--worker", json.dumps(job), "--deadline", repr(deadline)]
            procs.append((job, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        while any(p.poll() is None for _, p, _ in procs) and time.time() < kill_at:
            time.sleep(0.5)
        for job, p, log in procs:
            if p.poll() is None:  # past its deadline: stop this child (by its own handle)
                p.kill()
                p.wait()
                killed.append(job["name"])
            log.close()
    rows = []
    for job in jobs:
        path = os.path.join(args.out_dir, "rows", job["name"] + ".json")
        if os.path.exists(path):
            with open(path) as f:
                rows.append(json.load(f))
    return write_outputs(args, jobs, rows, t0, killed)


def collect_rows(dirs: list) -> list:
    rows = []
    for d in dirs:
        folder = os.path.join(d, "rows")
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            if name.endswith(".json"):
                with open(os.path.join(folder, name)) as f:
                    rows.append(json.load(f))
    return rows


def write_outputs(args, jobs: list, rows: list, t0: float, killed: list) -> int:
    """t5b_rows.jsonl, t5b_table.md (table + a note), printed too. Exit status 1 if a run failed."""
    with open(os.path.join(args.out_dir, "t5b_rows.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    md = table(rows, jobs)
    errors = [f"{r['name']}: {r['error']}" for r in rows if "error" in r]
    note = (f"\n\n{len(rows)} of {len(jobs)} rows in {time.time() - t0:.0f}s (budget {args.budget_s:.0f}s); "
            f"device {rows[0].get('device', args.device) if rows else args.device}"
            f"{' (' + rows[0]['gpu'] + ')' if rows and 'gpu' in rows[0] else ''}, "
            f"torch {rows[0]['torch'] if rows else '?'}, amp {args.amp}, fp32 matmul precision {args.matmul_precision}, "
            f"dt init {args.dt_range}"
            + (f"; killed: {', '.join(killed)}" if killed else "")
            + ("".join(f"\n- {e}" for e in errors)))
    with open(os.path.join(args.out_dir, "t5b_table.md"), "w") as f:
        f.write(md + note + "\n")
    print(md + note, flush=True)
    return 0 if rows and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
