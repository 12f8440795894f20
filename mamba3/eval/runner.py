"""Training runner for the synthetic tasks (Mamba-3 Table 5b protocol, DATA.md section 4).

Protocol (Mamba-3 Appendix D, following Grazzi et al.): a causal LM over the task vocabulary is
trained with cross-entropy at the scored positions only; length curriculum with minimum length 3
and maximum length stepped 40 -> 160 (``stages``; the paper does not state the intermediate steps,
we use 40, 80, 120, 160), 10^4 steps per stage at batch 256; validation at length 256; 1 layer for
parity, 3 for the arithmetic tasks; d_state 64; a sweep of 8 learning rates log-spaced in
[1e-4, 1e-2] (and d_model in {32, 64}); the best validation accuracy is reported, as scaled accuracy
(metrics.scaled_accuracy; the formula is Grazzi's, its use by Mamba-3 is our best guess).

Every knob shrinks: ``steps_per_stage``, ``stages``, ``batch_size``, ``eval_examples``. With a
time budget (``budget_seconds``, or an absolute ``deadline`` passed to ``run_synthetic``) a run
trains until the budget, less a reserve for its last validation, is used: the curriculum stage and
the learning rate follow the elapsed time, ``steps_per_stage`` caps each stage, and the row is
always returned in time. Runs write one JSON row each (``run_synthetic``) and a markdown table
(``markdown_table``). The MQAR / selective-copy / induction tasks train at one fixed length.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .synthetic import (IGNORE_INDEX, STATE_TASKS, induction_batch, masked_correct, mqar_batch, scaled_accuracy,
                        selective_copy_batch)

# mixer -> variant -> extra constructor kwargs (on top of the per-mixer base below)
VARIANTS = {
    "mamba3": {"default": {}, "rope_fixed": {"rope": "fixed"}, "no_rope": {"rope": "none"},
               "mimo": {"is_mimo": True, "mimo_rank": 4}},
    "mamba2": {"default": {}},
    "gdn": {"default": {"allow_neg_eigval": True}, "eig01": {"allow_neg_eigval": False}},
    "attention": {"default": {}},
    "mamba1": {"default": {}},
}
DT_MIXERS = ("mamba3", "mamba2", "mamba1")  # mixers with a dt_min / dt_max initialisation range
OTHER_TASKS = {"mqar": 8192, "mqar_mamba2": 8192, "selective_copy": 16, "induction": 16}
ALL_TASKS = tuple(STATE_TASKS) + tuple(OTHER_TASKS)


@dataclasses.dataclass
class SyntheticConfig:
    task: str = "parity"
    mixer: str = "mamba3"
    variant: str = "default"
    d_model: int = 64
    n_layer: Optional[int] = None  # None: 1 for parity, 3 for the arithmetic tasks, 2 otherwise
    d_state: int = 64
    headdim: int = 16
    d_intermediate: int = 0
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    batch_size: int = 256
    steps_per_stage: int = 10_000
    min_len: int = 3
    stages: Sequence[int] = (40, 80, 120, 160)
    eval_len: int = 256
    eval_min_len: Optional[int] = None  # None: eval_len (all examples have length eval_len)
    eval_examples: int = 8192
    test_examples: int = 0  # > 0: the best-validation checkpoint is also scored on this many fresh examples
    eval_every: int = 0  # 0: validate at the end of each stage only
    evals_per_stage: int = 1  # also validate at fractions k / evals_per_stage of each stage (budget-proof)
    seq_len: int = 256  # fixed length of the non-curriculum tasks
    num_kv_pairs: int = 16  # MQAR
    seed: int = 0
    device: str = "cpu"
    amp: str = "none"  # "bf16": autocast on CUDA
    # torch.set_float32_matmul_precision for the run: "highest" (full fp32 dots), or "high" (tf32 in
    # the projections and in the Triton SSD kernels' dots, about 5x faster kernels; angles stay fp32)
    matmul_precision: str = "highest"
    budget_seconds: Optional[float] = None
    stop_at_acc: Optional[float] = None  # end training once a validation reaches this accuracy (e.g. 1.0)
    # resumable runs (step schedule only): save everything to `checkpoint` after `pause_after_seconds`
    # of this process and return a row with partial=True; a later call with the same path resumes
    checkpoint: Optional[str] = None
    pause_after_seconds: Optional[float] = None
    tie_embeddings: bool = False  # untied: the tied head makes the residual path predict the input token
    # dt initialisation range of the mixers that have one (DT_MIXERS); None: the mixer's default
    # [1e-3, 0.1]. (0.1, 1.0) starts the rotary phase dt * pi * tanh(angle) large enough to learn
    # parity in hundreds rather than thousands of steps (EVALUATION.md, Table 5b).
    dt_range: Optional[Tuple[float, float]] = None
    mixer_overrides: dict = dataclasses.field(default_factory=dict)

    def layers(self) -> int:
        if self.n_layer is not None:
            return self.n_layer
        return 1 if self.task == "parity" else 3 if self.task.startswith("modular") else 2


def task_info(cfg: SyntheticConfig):
    """(vocab_size, chance, make_batch(batch_size, min_len, max_len, generator))."""
    if cfg.task in STATE_TASKS:
        fn, vocab, chance = STATE_TASKS[cfg.task]
        return vocab, chance, lambda b, lo, hi, g: fn(b, lo, hi, generator=g)
    if cfg.task in ("mqar", "mqar_mamba2"):
        rnq = cfg.task == "mqar_mamba2"
        v = OTHER_TASKS[cfg.task]
        return v, 1.0 / (v // 2), lambda b, lo, hi, g: mqar_batch(b, hi, cfg.num_kv_pairs, v,
                                                                    random_non_queries=rnq, generator=g)
    if cfg.task == "selective_copy":
        return 16, 1.0 / 14, lambda b, lo, hi, g: selective_copy_batch(b, hi, 16, 16, generator=g)
    if cfg.task == "induction":
        return 16, 1.0 / 15, lambda b, lo, hi, g: induction_batch(b, hi, 16, generator=g)
    raise ValueError(f"unknown task {cfg.task!r}; known: {ALL_TASKS}")


def mixer_kwargs(cfg: SyntheticConfig) -> dict:
    if cfg.mixer not in VARIANTS:
        raise ValueError(f"unknown mixer {cfg.mixer!r}; known: {sorted(VARIANTS)}")
    if cfg.variant not in VARIANTS[cfg.mixer]:
        raise ValueError(f"mixer {cfg.mixer!r} has variants {sorted(VARIANTS[cfg.mixer])}, got {cfg.variant!r}")
    d_inner = 2 * cfg.d_model
    if cfg.mixer in ("mamba3", "mamba2"):
        kw = dict(d_state=cfg.d_state, headdim=min(cfg.headdim, d_inner), expand=2, chunk_size=64)
    elif cfg.mixer == "gdn":
        hd = max(8, cfg.headdim)
        kw = dict(num_heads=max(1, cfg.d_model // hd), head_dim=hd, expand_v=2)
    elif cfg.mixer == "attention":
        kw = dict(num_heads=max(1, cfg.d_model // max(8, cfg.headdim)))
    else:
        kw = dict(d_state=min(cfg.d_state, 16))
    if cfg.dt_range is not None and cfg.mixer in DT_MIXERS:
        kw.update(dt_min=float(cfg.dt_range[0]), dt_max=float(cfg.dt_range[1]))
    kw.update(VARIANTS[cfg.mixer][cfg.variant])
    kw.update(cfg.mixer_overrides)
    return kw


def build_model(cfg: SyntheticConfig, vocab_size: int):
    from ..models import LanguageModel, ModelConfig
    mc = ModelConfig(d_model=cfg.d_model, n_layer=cfg.layers(), vocab_size=vocab_size,
                     d_intermediate=cfg.d_intermediate, mixer=cfg.mixer,
                     mixer_cfg={cfg.mixer: mixer_kwargs(cfg)}, pad_vocab_size_multiple=8,
                     tie_embeddings=cfg.tie_embeddings)
    return LanguageModel(mc)


def _param_groups(model, wd: float):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.dim() < 2 or getattr(p, "_no_weight_decay", False) or "embedding" in n
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def _autocast(cfg: SyntheticConfig):
    if cfg.amp == "bf16" and cfg.device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _sync(cfg):
    if cfg.device.startswith("cuda"):
        torch.cuda.synchronize()


def _loss(model, batch, cfg):
    with _autocast(cfg):
        logits = model(batch.input_ids).logits
    return F.cross_entropy(logits.float().flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE_INDEX)


@torch.no_grad()
def evaluate(model, val_batches, cfg) -> float:
    """Accuracy over the scored positions of the fixed validation batches."""
    model.eval()
    correct = total = 0
    for b in val_batches:
        with _autocast(cfg):
            logits = model(b.input_ids).logits
        c, m = masked_correct(logits.float(), b.labels)
        correct += int(c.sum())
        total += int(m.sum())
    model.train()
    return correct / max(total, 1)


def _val_set(cfg, make_batch, n_examples: int, seed_offset: int):
    g = torch.Generator().manual_seed(seed_offset + cfg.seed)
    lo = cfg.eval_len if cfg.eval_min_len is None else cfg.eval_min_len
    hi = cfg.eval_len if cfg.task in STATE_TASKS else cfg.seq_len
    bs = min(cfg.batch_size, 512)
    n = max(1, math.ceil(n_examples / bs))
    return [make_batch(bs, lo, hi, g).to(cfg.device) for _ in range(n)]


class _Schedule:
    """Progress p in [0, 1] = the larger of the step fraction (steps_per_stage per stage) and the
    time fraction (budget mode); the stage is floor(p * n_stages), the learning rate a linear warm-up
    (in steps) times a cosine from 1 to 0.1 over p. Without a budget this is the plain step schedule."""

    def __init__(self, cfg: SyntheticConfig, n_stages: int, train_seconds: Optional[float]):
        self.cfg, self.n, self.train_seconds = cfg, n_stages, train_seconds
        self.total = cfg.steps_per_stage * n_stages
        self.t_start = time.time()

    def progress(self, step: int) -> float:
        p = step / max(1, self.total)
        if self.train_seconds is not None:
            p = max(p, (time.time() - self.t_start) / max(self.train_seconds, 1e-9))
        return min(1.0, p)

    def stage(self, p: float) -> int:
        return min(self.n - 1, int(p * self.n))

    def lr(self, step: int, p: float) -> float:
        warm = min(1.0, (step + 1) / max(1, self.cfg.warmup_steps))
        return self.cfg.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def _resume_key(cfg: SyntheticConfig) -> dict:
    """The settings a checkpoint must share with the run that resumes it."""
    keep = ("task", "mixer", "variant", "d_model", "n_layer", "d_state", "headdim", "lr", "batch_size",
            "steps_per_stage", "stages", "seed", "dt_range", "matmul_precision")
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items() if k in keep}


class _Prefetch:
    """Makes the next training batch in a worker thread while the current step runs (the vectorised
    generators' CPU ops release the GIL): on a GPU the data would otherwise cost ~1/3 of a step of
    these small models. Batches come out in the order the generator made them (one worker, the next
    one asked for only after the previous one is taken), so a seeded run stays reproducible."""

    def __init__(self, make, device, threaded: Optional[bool] = None):
        self.make, self.device = make, torch.device(device)
        threaded = self.device.type == "cuda" if threaded is None else threaded
        self.pool = ThreadPoolExecutor(max_workers=1) if threaded else None
        self.pending = None  # (max_len, future)

    def _make(self, max_len):
        b = self.make(max_len)
        return b.pin_memory() if self.device.type == "cuda" else b

    def next(self, max_len: int):
        if self.pool is None:
            return self._make(max_len).to(self.device)
        b = None if self.pending is None else self.pending[1].result()  # the generator is free after this
        if b is None or self.pending[0] != max_len:  # first call, or a new curriculum stage
            b = self._make(max_len)
        self.pending = (max_len, self.pool.submit(self._make, max_len))
        return b.to(self.device, non_blocking=True)

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def run_synthetic(cfg: SyntheticConfig, log=print, deadline: Optional[float] = None) -> dict:
    """Train one model with the curriculum and return its JSON row.

    Budget mode (``cfg.budget_seconds`` and/or ``deadline``, an absolute ``time.time()``): the run
    returns its row by min(start + budget_seconds, deadline). Training time is what is left after
    set-up and a reserve for the last validation and the test pass; curriculum stages and the
    learning-rate schedule then follow the elapsed time (``_Schedule``), capped by steps_per_stage.
    The row reports best validation accuracy (the paper's rule) and, with ``test_examples``, the
    accuracy of that best checkpoint on a separate test set.
    """
    if cfg.matmul_precision not in ("highest", "high", "medium"):
        raise ValueError(f"matmul_precision must be 'highest', 'high' or 'medium', got {cfg.matmul_precision!r}")
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(cfg.matmul_precision)
    try:
        return _run_synthetic(cfg, log, deadline)
    finally:
        torch.set_float32_matmul_precision(previous)


def _run_synthetic(cfg: SyntheticConfig, log, deadline: Optional[float]) -> dict:
    t0 = time.time()
    vocab, chance, make_batch = task_info(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, vocab).to(cfg.device)
    n_params = sum(p.numel() for p in model.parameters())
    stages = list(cfg.stages) if cfg.task in STATE_TASKS else [cfg.seq_len]
    fused = dict(fused=True) if cfg.device.startswith("cuda") else {}  # one optimizer kernel: launch-bound models
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), **fused)
    g = torch.Generator().manual_seed(cfg.seed)
    val = _val_set(cfg, make_batch, cfg.eval_examples, 10_000)
    test = _val_set(cfg, make_batch, cfg.test_examples, 20_000) if cfg.test_examples else []

    end = None
    if cfg.budget_seconds is not None:
        end = t0 + cfg.budget_seconds
    if deadline is not None:
        end = deadline if end is None else min(end, deadline)
    train_seconds = None
    if cfg.checkpoint and end is not None:
        raise ValueError("checkpoint / pause_after_seconds need the step schedule: drop budget_seconds / deadline")
    if cfg.pause_after_seconds is not None and not cfg.checkpoint:
        raise ValueError("pause_after_seconds needs a checkpoint path")
    if end is not None:
        # one untimed validation batch (CUDA / Triton compilation of the eval shapes), one timed
        tb = time.time()
        evaluate(model, val[:1], cfg)
        _sync(cfg)
        t = time.time()
        evaluate(model, val[:1], cfg)
        _sync(cfg)
        per_batch = max(time.time() - t, 1e-4)
        # an untimed forward + backward (kernel compilation), no optimizer step, own data
        wb = make_batch(cfg.batch_size, cfg.min_len, stages[0], torch.Generator().manual_seed(1)).to(cfg.device)
        _loss(model, wb, cfg).backward()
        opt.zero_grad(set_to_none=True)
        _sync(cfg)
        # reserve: the last validation + the test pass, with a margin for contention
        reserve = 3.0 * per_batch * (len(val) + len(test)) + 0.02 * (end - t0) + 1.0
        train_seconds = max(0.0, end - time.time() - reserve)
        log(f"budget: {end - t0:.0f}s, eval set-up {time.time() - tb:.1f}s, {train_seconds:.0f}s to train")
    sched = _Schedule(cfg, len(stages), train_seconds)

    batches = _Prefetch(lambda max_len: make_batch(cfg.batch_size, cfg.min_len, max_len, g), cfg.device)

    def train_step(step, max_len):
        p = sched.progress(step)
        for grp in opt.param_groups:
            grp["lr"] = sched.lr(step, p)
        batch = batches.next(max_len)
        loss = _loss(model, batch, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.detach()

    best, best_state, history, stage_steps = -1.0, None, [], [0] * len(stages)

    def validate(step, stage, loss, what="val"):
        nonlocal best, best_state
        acc = evaluate(model, val, cfg)
        if acc > best:
            best = acc
            if test:
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        history.append((step, stages[stage], round(acc, 5)))
        log(f"[{cfg.task} {cfg.mixer}/{cfg.variant} d={cfg.d_model} lr={cfg.lr:.2e}] {what} max_len={stages[stage]} "
            f"step {step} loss {float(loss):.4f} val acc@{cfg.eval_len} {acc:.4f} ({time.time() - t0:.0f}s)")
        return acc

    step, loss, acc, stage = 0, float("nan"), float("nan"), 0
    n_marks, marks_done = len(stages) * max(1, cfg.evals_per_stage), 0  # extra validations at p = k / n_marks
    resumed_from = None
    if cfg.checkpoint and os.path.exists(cfg.checkpoint):
        ck = torch.load(cfg.checkpoint, map_location="cpu", weights_only=False)  # generator state stays on CPU
        if ck["config"] != _resume_key(cfg):
            raise ValueError(f"checkpoint {cfg.checkpoint} is of another run: {ck['config']} != {_resume_key(cfg)}")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        g.set_state(ck["generator"])
        step, stage, loss, marks_done = ck["step"], ck["stage"], ck["loss"], ck["marks_done"]
        best, best_state, history, stage_steps = ck["best"], ck["best_state"], ck["history"], ck["stage_steps"]
        resumed_from = step
        log(f"resumed {cfg.checkpoint} at step {step} (best {best:.4f})")
    while True:
        p = sched.progress(step)
        if p >= 1.0 or (cfg.stop_at_acc is not None and best >= cfg.stop_at_acc):
            break
        if cfg.pause_after_seconds is not None and time.time() - t0 >= cfg.pause_after_seconds:
            batches.close()
            torch.save(dict(config=_resume_key(cfg), model=model.state_dict(), optimizer=opt.state_dict(),
                            generator=g.get_state(), step=step, stage=stage, loss=float(loss), marks_done=marks_done,
                            best=best, best_state=best_state, history=history, stage_steps=stage_steps),
                       cfg.checkpoint + ".tmp")
            os.replace(cfg.checkpoint + ".tmp", cfg.checkpoint)
            log(f"paused at step {step} of {sched.total}; saved {cfg.checkpoint}")
            return dict(task=cfg.task, mixer=cfg.mixer, variant=cfg.variant, lr=cfg.lr, seed=cfg.seed, partial=True,
                        step=step, total_steps=sched.total, stage_steps=stage_steps, best_acc=best,
                        scaled_acc=scaled_accuracy(best, chance) if best >= 0 else None, history=history,
                        resumed_from=resumed_from, seconds=round(time.time() - t0, 2))
        s = sched.stage(p)
        if s != stage:  # stage end
            validate(step, stage, loss, "stage end")
            stage = s
        loss = train_step(step, stages[stage])
        step += 1
        stage_steps[stage] += 1
        p = sched.progress(step)
        mark = int(p * n_marks + 1e-9)
        due, marks_done = mark > marks_done, max(mark, marks_done)
        if p >= 1.0 or sched.stage(p) != stage:
            continue  # the stage-end validation comes next
        if due or (cfg.eval_every and step % cfg.eval_every == 0):
            validate(step, stage, loss)
    batches.close()
    loss = float(loss)
    acc = validate(step, stage, loss, "final")
    test_acc = None
    if test:
        model.load_state_dict(best_state)
        test_acc = evaluate(model, test, cfg)
    steps_per_stage = stage_steps[0] if len(set(stage_steps)) == 1 else round(sum(stage_steps) / len(stages))
    return dict(task=cfg.task, mixer=cfg.mixer, variant=cfg.variant, d_model=cfg.d_model, n_layer=cfg.layers(),
                d_state=cfg.d_state, lr=cfg.lr, seed=cfg.seed, batch_size=cfg.batch_size,
                steps_per_stage=steps_per_stage, stage_steps=stage_steps, stages=stages, eval_len=cfg.eval_len,
                params=n_params, final_acc=acc, best_acc=best, chance=chance,
                scaled_acc=scaled_accuracy(best, chance), test_acc=test_acc,
                test_scaled_acc=None if test_acc is None else scaled_accuracy(test_acc, chance),
                final_loss=loss, history=history, seconds=round(time.time() - t0, 2), device=cfg.device,
                amp=cfg.amp, matmul_precision=cfg.matmul_precision, mixer_kwargs=mixer_kwargs(cfg), budget_seconds=cfg.budget_seconds,
                stopped_at_acc=cfg.stop_at_acc is not None and best >= cfg.stop_at_acc, resumed_from=resumed_from)


def lr_grid(n: int = 8, lo: float = 1e-4, hi: float = 1e-2) -> list:
    """n learning rates log-spaced in [lo, hi] (the paper's sweep: 8 in [1e-4, 1e-2])."""
    if n == 1:
        return [math.sqrt(lo * hi)]
    return [float(lo * (hi / lo) ** (i / (n - 1))) for i in range(n)]


def sweep(base: SyntheticConfig, lrs: Sequence[float], d_models: Sequence[int], out: Optional[str] = None,
          log=print) -> list:
    """Run every (d_model, lr); the budget (if any) is split evenly. Appends JSON rows to ``out``."""
    runs = [(d, lr) for d in d_models for lr in lrs]
    rows = []
    for d, lr in runs:
        budget = None if base.budget_seconds is None else base.budget_seconds / len(runs)
        row = run_synthetic(dataclasses.replace(base, d_model=d, lr=lr, budget_seconds=budget), log=log)
        rows.append(row)
        if out:
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
    return rows


def best_rows(rows: Sequence[dict]) -> list:
    """Best run (by best validation accuracy) per (task, mixer, variant); paused (partial) rows are
    left out."""
    best = {}
    for r in rows:
        if r.get("partial"):
            continue
        k = (r["task"], r["mixer"], r["variant"])
        if k not in best or r["best_acc"] > best[k]["best_acc"]:
            best[k] = r
    return list(best.values())


def markdown_table(rows: Sequence[dict]) -> str:
    """One line per (task, mixer, variant): the best run's scaled accuracy (%) and its settings."""
    lines = ["| task | mixer | variant | d_model | layers | lr | steps/stage | stages | eval len | acc % "
             "| scaled acc % |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(best_rows(rows), key=lambda r: (r["task"], r["mixer"], r["variant"])):
        lines.append(f"| {r['task']} | {r['mixer']} | {r['variant']} | {r['d_model']} | {r['n_layer']} | "
                     f"{r['lr']:.2e} | {r['steps_per_stage']} | {'-'.join(map(str, r['stages']))} | "
                     f"{r['eval_len']} | {100 * r['best_acc']:.2f} | {100 * r['scaled_acc']:.2f} |")
    return "\n".join(lines)
