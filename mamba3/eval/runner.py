"""Training runner for the synthetic tasks (Mamba-3 Table 5b protocol, DATA.md section 4).

Protocol (Mamba-3 Appendix D, following Grazzi et al.): a causal LM over the task vocabulary is
trained with cross-entropy at the scored positions only; length curriculum with minimum length 3
and maximum length stepped 40 -> 160 (``stages``; the paper does not state the intermediate steps,
we use 40, 80, 120, 160), 10^4 steps per stage at batch 256; validation at length 256; 1 layer for
parity, 3 for the arithmetic tasks; d_state 64; a sweep of 8 learning rates log-spaced in
[1e-4, 1e-2] (and d_model in {32, 64}); the best validation accuracy is reported, as scaled accuracy
(metrics.scaled_accuracy; the formula is Grazzi's, its use by Mamba-3 is our best guess).

Every knob shrinks: ``steps_per_stage``, ``stages``, ``batch_size``, ``eval_examples`` and
``budget_seconds``, which times a few steps at the longest stage and cuts steps per stage so the
whole run fits. Runs write one JSON row each (``run_synthetic``) and a markdown table
(``markdown_table``). The MQAR / selective-copy / induction tasks train at one fixed length.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import nullcontext
from typing import Optional, Sequence

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
    eval_every: int = 0  # 0: validate at the end of each stage only
    seq_len: int = 256  # fixed length of the non-curriculum tasks
    num_kv_pairs: int = 16  # MQAR
    seed: int = 0
    device: str = "cpu"
    amp: str = "none"  # "bf16": autocast on CUDA
    budget_seconds: Optional[float] = None
    tie_embeddings: bool = False  # untied: the tied head makes the residual path predict the input token
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


def _val_set(cfg, make_batch):
    g = torch.Generator().manual_seed(10_000 + cfg.seed)
    lo = cfg.eval_len if cfg.eval_min_len is None else cfg.eval_min_len
    hi = cfg.eval_len if cfg.task in STATE_TASKS else cfg.seq_len
    bs = min(cfg.batch_size, 512)
    n = max(1, math.ceil(cfg.eval_examples / bs))
    return [make_batch(bs, lo, hi, g).to(cfg.device) for _ in range(n)]


def run_synthetic(cfg: SyntheticConfig, log=print) -> dict:
    """Train one model with the curriculum and return its JSON row."""
    vocab, chance, make_batch = task_info(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, vocab).to(cfg.device)
    n_params = sum(p.numel() for p in model.parameters())
    stages = list(cfg.stages) if cfg.task in STATE_TASKS else [cfg.seq_len]
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(cfg.seed)
    val = _val_set(cfg, make_batch)
    t0 = time.time()

    def train_step(step, total, max_len):
        lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, total))))
        for grp in opt.param_groups:
            grp["lr"] = lr
        batch = make_batch(cfg.batch_size, cfg.min_len, max_len, g).to(cfg.device)
        loss = _loss(model, batch, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss.detach())

    steps = cfg.steps_per_stage
    if cfg.budget_seconds is not None:  # time a few steps at the longest stage, then fit the budget
        n_probe = 5
        for i in range(2):  # untimed: CUDA / Triton warm-up and autotuning
            train_step(i, n_probe * 100, stages[-1])
        _sync(cfg)
        t = time.time()
        for i in range(n_probe):
            train_step(i, n_probe * 100, stages[-1])
        _sync(cfg)
        per_step = (time.time() - t) / n_probe
        t = time.time()
        evaluate(model, val, cfg)
        per_eval = time.time() - t
        left = cfg.budget_seconds - (time.time() - t0) - per_eval * len(stages)
        per = per_step + (per_eval / cfg.eval_every if cfg.eval_every else 0.0)
        steps = max(1, min(steps, int(left / (per * len(stages)))))
        torch.manual_seed(cfg.seed)  # restart from the same init and data as without a budget
        model = build_model(cfg, vocab).to(cfg.device)
        g.manual_seed(cfg.seed)
        opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
        log(f"budget {cfg.budget_seconds:.0f}s: {per_step * 1e3:.1f} ms/step -> {steps} steps per stage")
    total = steps * len(stages)
    best, history, step, loss = -1.0, [], 0, float("nan")
    for max_len in stages:
        for _ in range(steps):
            loss = train_step(step, total, max_len)
            step += 1
            if cfg.eval_every and step % cfg.eval_every == 0 and step % steps != 0:
                acc = evaluate(model, val, cfg)
                best = max(best, acc)
                history.append((step, max_len, round(acc, 5)))
        acc = evaluate(model, val, cfg)
        best = max(best, acc)
        history.append((step, max_len, round(acc, 5)))
        log(f"[{cfg.task} {cfg.mixer}/{cfg.variant} d={cfg.d_model} lr={cfg.lr:.2e}] stage max_len={max_len} "
            f"step {step} loss {loss:.4f} val acc@{cfg.eval_len} {acc:.4f}")
    return dict(task=cfg.task, mixer=cfg.mixer, variant=cfg.variant, d_model=cfg.d_model, n_layer=cfg.layers(),
                d_state=cfg.d_state, lr=cfg.lr, seed=cfg.seed, batch_size=cfg.batch_size, steps_per_stage=steps,
                stages=stages, eval_len=cfg.eval_len, params=n_params, final_acc=acc, best_acc=best,
                chance=chance, scaled_acc=scaled_accuracy(best, chance), final_loss=loss, history=history,
                seconds=round(time.time() - t0, 2), device=cfg.device, amp=cfg.amp)


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
    """Best run (by best validation accuracy) per (task, mixer, variant)."""
    best = {}
    for r in rows:
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
