"""AdamW with weight-decay groups, and the learning-rate schedules (pure functions of the step).

No weight decay for: parameters marked ``p._no_weight_decay = True`` by their layer (dt_bias, D),
names ending in ``A_log``, ``dt_bias``, ``D``, ``bias`` / ``_bias``, norm weights (``norm`` in the
module path), and every parameter with fewer than 2 dimensions. Embeddings are decayed (they are
tied to the LM head, a weight matrix like the others).

The schedule is computed from the step each time, so resuming needs no scheduler state.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn

from .config import OptimConfig

_NO_DECAY_SUFFIXES = ("A_log", "dt_bias", ".D", "bias", ".A")


def no_decay_names(model: nn.Module) -> set[str]:
    """Names (as ``model.named_parameters()`` gives them) of the parameters without weight decay.
    Call on the unwrapped model: the ``_no_weight_decay`` marks do not survive FSDP sharding."""
    out = set()
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if (getattr(p, "_no_weight_decay", False) or p.ndim < 2 or name.endswith(_NO_DECAY_SUFFIXES)
                or leaf in ("D", "A") or "norm" in name.rsplit(".", 1)[0].rsplit(".", 1)[-1]):
            out.add(name)
    return out


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], no_decay: set[str], weight_decay: float):
    """Two AdamW groups; names are compared after stripping a DDP ``module.`` prefix."""
    decay, plain = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        (plain if name.removeprefix("module.") in no_decay else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, no_decay: set[str], cfg: OptimConfig, device: torch.device):
    """AdamW (fused on CUDA) over ``model``'s parameters (possibly wrapped / sharded)."""
    groups = param_groups(model.named_parameters(), no_decay, cfg.weight_decay)
    kw = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kw)


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup to ``lr``, then cosine to
    ``lr * min_lr_ratio`` at the last step, or (wsd) constant then linear decay over the last
    ``decay_fraction`` of the steps."""
    lo = cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        span = max(1, cfg.steps - 1 - cfg.warmup_steps)
        t = min(1.0, (step - cfg.warmup_steps) / span)
        return lo + (cfg.lr - lo) * 0.5 * (1.0 + math.cos(math.pi * t))
    decay_steps = max(1, round(cfg.decay_fraction * cfg.steps))
    start = max(cfg.warmup_steps, cfg.steps - decay_steps)
    if step < start:
        return cfg.lr
    t = min(1.0, (step - start + 1) / max(1, cfg.steps - start))
    return cfg.lr + (lo - cfg.lr) * t


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
