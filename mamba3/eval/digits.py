"""Sequential 8x8 digits: S4D (HiPPO-LegS init vs random init) vs Mamba-3 vs GRU.

The S4 line's claim (Gu et al. 2021, 2022): a diagonal/structured SSM trained from a random
state matrix does poorly on pixel-by-pixel image classification, and HiPPO initialisation
fixes it. Here each 8x8 image of ``sklearn.datasets.load_digits`` (1797 images, 10 classes) is
read as a 64-step sequence of pixel intensities; every model is the same residual stack
(Linear(1, d) encoder, n x [LayerNorm -> mixer -> + residual], LayerNorm, mean-pool or last-token
readout, Linear(d, 10)) with its width chosen to match one parameter budget. Same optimiser
(AdamW, cosine decay), epochs and batches for all; S4D's SSM parameters use the S4 recipe
(lr <= 1e-3, no weight decay), and every parameter marked ``_no_weight_decay`` gets none.

    python -m mamba3.eval.digits                    # the table in EVALUATION.md
    python -m mamba3.eval.digits --epochs 2 --seeds 0 --models s4d-legs gru   # quick look

Needs scikit-learn only for the data (``pip install scikit-learn`` or the ``eval`` extra).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import Mamba3, S4D

MODELS = ("s4d-legs", "s4d-random", "s4d-inv", "s4d-lin", "s4d-real", "mamba3", "gru")


# ---- data ----------------------------------------------------------------------------------
def load_digits_sequences(split_seed: int = 0, test_fraction: float = 0.2):
    """(x_train [n, 64, 1], y_train, x_test, y_test): pixels in row-major order, standardised
    with the training mean/std; a fixed random split from ``split_seed``."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).unsqueeze(-1)                 # [1797, 64, 1]
    y = torch.tensor(d.target, dtype=torch.long)
    return _split(x, y, split_seed, test_fraction)


def synthetic_sequences(n: int = 200, T: int = 64, classes: int = 10, seed: int = 0, test_fraction: float = 0.25):
    """A tiny sklearn-free stand-in for tests: class c is a noisy sinusoid of c + 1 periods per
    sequence, with a random phase."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(classes, (n,), generator=g)
    t = torch.arange(T, dtype=torch.float32)
    phase = 2 * math.pi * torch.rand(n, 1, generator=g)
    x = torch.sin(2 * math.pi * (y[:, None] + 1) * t / T + phase) + 0.3 * torch.randn(n, T, generator=g)
    return _split(x.unsqueeze(-1), y, seed, test_fraction)


def _split(x, y, seed, test_fraction):
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    te, tr = perm[:n_test], perm[n_test:]
    mean, std = x[tr].mean(), x[tr].std()
    x = (x - mean) / std
    return x[tr], y[tr], x[te], y[te]


# ---- models --------------------------------------------------------------------------------
class _GRUMixer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.gru = nn.GRU(d, d, batch_first=True)

    def forward(self, x):
        return self.gru(x)[0]


def make_mixer(kind: str, d: int, d_state: int, layer_idx: int) -> nn.Module:
    if kind.startswith("s4d-"):
        return S4D(d, d_state=d_state, init=kind[4:], layer_idx=layer_idx)
    if kind == "mamba3":
        return Mamba3(d, d_state=d_state, expand=2, headdim=8, layer_idx=layer_idx, chunk_size=64)
    if kind == "gru":
        return _GRUMixer(d)
    raise ValueError(f"model must be one of {list(MODELS)}, got {kind!r}")


class SeqClassifier(nn.Module):
    """Linear(in, d) -> n x (x + mixer(LayerNorm(x))) -> LayerNorm -> pool -> Linear(d, classes)."""

    def __init__(self, kind: str, d: int, n_layers: int, d_state: int, classes: int = 10, d_in: int = 1,
                 readout: str = "mean", dropout: float = 0.0):
        super().__init__()
        if readout not in ("mean", "last"):
            raise ValueError(f"readout must be 'mean' or 'last', got {readout!r}")
        self.readout = readout
        self.encoder = nn.Linear(d_in, d)
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(n_layers))
        self.mixers = nn.ModuleList(make_mixer(kind, d, d_state, i) for i in range(n_layers))
        self.drop = nn.Dropout(dropout)
        self.norm_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.encoder(x)
        for norm, mixer in zip(self.norms, self.mixers):
            h = h + self.drop(mixer(norm(h)))
        h = self.norm_f(h)
        return self.head(h.mean(1) if self.readout == "mean" else h[:, -1])


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def width_for_budget(kind: str, budget: int, n_layers: int, d_state: int, readout: str = "mean") -> int:
    """The width (a multiple of 4) whose parameter count is closest to ``budget``."""
    best = None
    for d in range(4, 513, 4):
        count = n_params(SeqClassifier(kind, d, n_layers, d_state, readout=readout))
        if best is None or abs(count - budget) < abs(best[1] - budget):
            best = (d, count)
        if count > budget:
            break
    return best[0]


# ---- training ------------------------------------------------------------------------------
@dataclass
class Config:
    models: tuple = ("s4d-legs", "s4d-random", "mamba3", "gru")
    seeds: tuple = (0, 1, 2)
    budget: int = 30000
    n_layers: int = 2
    s4d_state: int = 64
    mamba3_state: int = 16
    epochs: int = 20
    batch_size: int = 64
    lr: float = 5e-3
    ssm_lr: float = 1e-3
    weight_decay: float = 0.05
    readout: str = "mean"
    split_seed: int = 0


@dataclass
class Result:
    model: str
    seed: int
    width: int
    params: int
    test_acc: float
    train_acc: float
    seconds: float
    curve: list = field(default_factory=list)


def _param_groups(model: nn.Module, cfg: Config):
    ssm = {id(p) for m in model.modules() if isinstance(m, S4D) for p in m.ssm_parameters()}
    groups = {"decay": [], "no_decay": [], "ssm": []}
    for p in model.parameters():
        key = "ssm" if id(p) in ssm else "no_decay" if (getattr(p, "_no_weight_decay", False) or p.dim() < 2) else "decay"
        groups[key].append(p)
    return [dict(params=groups["decay"], weight_decay=cfg.weight_decay),
            dict(params=groups["no_decay"], weight_decay=0.0),
            dict(params=groups["ssm"], weight_decay=0.0, lr=min(cfg.lr, cfg.ssm_lr))]


@torch.no_grad()
def accuracy(model: nn.Module, x, y, batch_size: int = 512) -> float:
    model.eval()
    correct = sum((model(x[i : i + batch_size]).argmax(-1) == y[i : i + batch_size]).sum().item()
                  for i in range(0, len(y), batch_size))
    return correct / max(len(y), 1)


def train_one(kind: str, seed: int, data, cfg: Config) -> Result:
    xtr, ytr, xte, yte = data
    d_state = cfg.s4d_state if kind.startswith("s4d") else cfg.mamba3_state
    width = width_for_budget(kind, cfg.budget, cfg.n_layers, d_state, cfg.readout)
    torch.manual_seed(seed)
    model = SeqClassifier(kind, width, cfg.n_layers, d_state, classes=int(ytr.max()) + 1, d_in=xtr.shape[-1],
                          readout=cfg.readout)
    opt = torch.optim.AdamW(_param_groups(model, cfg), lr=cfg.lr)
    steps = cfg.epochs * math.ceil(len(ytr) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    g = torch.Generator().manual_seed(seed)
    t0, curve = time.time(), []
    for _ in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(ytr), generator=g)
        for i in range(0, len(ytr), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
        curve.append(round(accuracy(model, xte, yte), 4))
    return Result(kind, seed, width, n_params(model), curve[-1] if curve else accuracy(model, xte, yte),
                  accuracy(model, xtr, ytr), time.time() - t0, curve)


def run(cfg: Config, data=None, log=print) -> list[Result]:
    data = load_digits_sequences(cfg.split_seed) if data is None else data
    results = []
    for kind in cfg.models:
        for seed in cfg.seeds:
            r = train_one(kind, seed, data, cfg)
            log(f"{kind:11s} seed {seed}  width {r.width:3d}  params {r.params:6d}  test {r.test_acc:.4f}  "
                f"train {r.train_acc:.4f}  ({r.seconds:.0f}s)")
            results.append(r)
    return results


def table(results: list[Result]) -> str:
    """Markdown: one row per model, mean +- std over seeds."""
    rows = ["| model | width | params | test acc (mean ± std) | train acc | per-seed test acc |",
            "|---|---|---|---|---|---|"]
    for kind in dict.fromkeys(r.model for r in results):
        rs = [r for r in results if r.model == kind]
        acc = torch.tensor([r.test_acc for r in rs], dtype=torch.float64)
        std = acc.std().item() if len(rs) > 1 else 0.0
        tr = sum(r.train_acc for r in rs) / len(rs)
        rows.append(f"| {kind} | {rs[0].width} | {rs[0].params} | {100 * acc.mean():.1f} ± {100 * std:.1f} | "
                    f"{100 * tr:.1f} | {', '.join(f'{100 * r.test_acc:.1f}' for r in rs)} |")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    c = Config()
    p.add_argument("--models", nargs="+", default=list(c.models), choices=MODELS)
    p.add_argument("--seeds", nargs="+", type=int, default=list(c.seeds))
    for name in ("budget", "n_layers", "s4d_state", "mamba3_state", "epochs", "batch_size", "split_seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(c, name))
    for name in ("lr", "ssm_lr", "weight_decay"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(c, name))
    p.add_argument("--readout", choices=("mean", "last"), default=c.readout)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--data", choices=("digits", "synthetic"), default="digits",
                   help="synthetic: the tiny sklearn-free stand-in (smoke tests)")
    p.add_argument("--json", default=None, help="write per-run results here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = Config(models=tuple(a.models), seeds=tuple(a.seeds), **{k: getattr(a, k) for k in (
        "budget", "n_layers", "s4d_state", "mamba3_state", "epochs", "batch_size", "lr", "ssm_lr", "weight_decay",
        "readout", "split_seed")})
    results = run(cfg, data=synthetic_sequences() if a.data == "synthetic" else None)
    print(table(results))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"config": cfg.__dict__, "results": [r.__dict__ for r in results]}, f, indent=1)


if __name__ == "__main__":
    main()
