"""Training configuration: plain dataclasses read from TOML, with command-line overrides.

A run is ``TrainConfig`` with sections ``model``, ``data``, ``train``, ``eval``, ``checkpoint``,
``run``. ``[model]`` is ``preset`` plus any ``ModelConfig`` field, which overrides the preset.
Unknown keys are rejected and every error names the field (``train.lr must be > 0``).

Overrides: ``--set train.lr=1e-3`` or ``--train.lr 1e-3``; values are parsed as TOML
(``true``, ``[0.9, 0.95]``, ``"cosine"``) and fall back to a bare string.
"""
from __future__ import annotations

import dataclasses
import tomllib
import typing
from pathlib import Path
from typing import Any, Optional


class ConfigError(ValueError):
    """A bad configuration value; the message starts with the dotted field name."""


@dataclasses.dataclass
class DataConfig:
    source: str = "tiny"        # "tiny" (shipped corpus, byte tokenizer) or a `mamba3 data build` folder
    sources: list = dataclasses.field(default_factory=list)  # subset of a folder's sources ([] = all)
    seq_len: int = 128          # tokens per training window (labels are the same window, shifted in the loss)

    def validate(self):
        _positive("data.seq_len", self.seq_len, 2)
        if self.source != "tiny" and not (Path(self.source) / "manifest.json").exists():
            raise ConfigError(f"data.source must be 'tiny' or a built data folder; {self.source!r} has no manifest.json")


@dataclasses.dataclass
class OptimConfig:
    steps: int = 200            # optimizer steps
    micro_batch: int = 8        # sequences per rank per micro-step
    grad_accum: int = 1         # micro-steps per optimizer step; global batch = micro_batch * grad_accum * world
    lr: float = 3e-3
    min_lr_ratio: float = 0.1   # final lr = lr * min_lr_ratio
    warmup_steps: int = 20
    schedule: str = "cosine"    # "cosine" | "wsd" (warmup-stable-decay, linear decay over decay_fraction)
    decay_fraction: float = 0.2
    weight_decay: float = 0.1   # not applied to biases, norms, A_log, dt_bias, D (optim.no_decay_names)
    betas: list = dataclasses.field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0      # max global grad norm (0 = off)
    seed: int = 0               # model init and data order
    device: str = "auto"        # "auto" | "cpu" | "cuda"
    dtype: str = "auto"         # autocast: "auto" (bf16 on CUDA, fp32 on CPU) | "float32" | "bfloat16"
    compile: bool = False       # torch.compile each block
    parallel: str = "auto"      # "auto" (ddp under torchrun with >1 rank) | "none" | "ddp" | "fsdp"

    def validate(self):
        for name in ("steps", "micro_batch", "grad_accum"):
            _positive(f"train.{name}", getattr(self, name), 1)
        _positive("train.warmup_steps", self.warmup_steps, 0)
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        for name in ("min_lr_ratio", "decay_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"train.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not self.eps > 0:
            raise ConfigError(f"train.eps must be > 0, got {self.eps}")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {self.betas}")
        _choice("train.schedule", self.schedule, ("cosine", "wsd"))
        _choice("train.device", self.device, ("auto", "cpu", "cuda"))
        _choice("train.dtype", self.dtype, ("auto", "float32", "bfloat16"))
        _choice("train.parallel", self.parallel, ("auto", "none", "ddp", "fsdp"))


@dataclasses.dataclass
class EvalConfig:
    every: int = 50             # validate every N steps and at the end (0 = only at the end)
    batches: int = 4            # validation micro-batches per rank (fixed windows from the start of val)

    def validate(self):
        _positive("eval.every", self.every, 0)
        _positive("eval.batches", self.batches, 1)


@dataclasses.dataclass
class CheckpointConfig:
    every: int = 100            # save every N steps and at the end (0 = only at the end)
    keep: int = 2               # complete step-N folders kept (older ones deleted)
    resume: bool = True         # continue from the newest complete checkpoint in run.out_dir

    def validate(self):
        _positive("checkpoint.every", self.every, 0)
        _positive("checkpoint.keep", self.keep, 1)


@dataclasses.dataclass
class RunConfig:
    out_dir: str = "runs/tiny"  # checkpoints/, metrics.jsonl, loss.png, final/
    log_every: int = 10
    progress: bool = True       # tqdm bar (rank 0)
    sample_prompt: str = "The state of the Union is"
    sample_tokens: int = 200    # generated after training (0 = none)
    sample_temperature: float = 0.8
    sample_top_k: int = 40

    def validate(self):
        _positive("run.log_every", self.log_every, 1)
        _positive("run.sample_tokens", self.sample_tokens, 0)


SECTIONS = {"data": DataConfig, "train": OptimConfig, "eval": EvalConfig, "checkpoint": CheckpointConfig,
            "run": RunConfig}


@dataclasses.dataclass
class TrainConfig:
    model: dict = dataclasses.field(default_factory=lambda: {"preset": "tiny"})
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)

    def validate(self) -> "TrainConfig":
        for name in SECTIONS:
            getattr(self, name).validate()
        self.model_config()
        return self

    def model_config(self):
        """The ``ModelConfig``: the preset with the other ``[model]`` keys overriding it."""
        from ..models import ModelConfig

        d = dict(self.model)
        preset = d.pop("preset", "tiny")
        try:
            base = ModelConfig.from_preset(preset).to_dict()
        except ValueError as e:
            raise ConfigError(f"model.preset: {e}") from e
        unknown = sorted(set(d) - set(base))
        if unknown:
            raise ConfigError(f"model.{unknown[0]}: unknown model field; known: {sorted(base)}")
        try:
            return ModelConfig.from_dict({**base, **d})
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model: {e}") from e

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        unknown = sorted(set(d) - {"model", *SECTIONS})
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown section; known: {['model', *SECTIONS]}")
        kwargs: dict[str, Any] = {"model": dict(d.get("model", {"preset": "tiny"}))}
        for name, section in SECTIONS.items():
            kwargs[name] = _section(name, section, d.get(name, {}))
        return cls(**kwargs).validate()


def _section(prefix: str, cls, values: dict):
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix} must be a table, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, v in values.items():
        if key not in fields:
            raise ConfigError(f"{prefix}.{key}: unknown field; known: {sorted(fields)}")
        want = hints[key]
        if want is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        ok = isinstance(v, want) and not (want is int and isinstance(v, bool))
        if not ok:
            raise ConfigError(f"{prefix}.{key} must be {want.__name__}, got {v!r}")
        out[key] = v
    return cls(**out)


def parse_value(text: str) -> Any:
    """A TOML value (number, bool, string, array), else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(d: dict, overrides: list[tuple[str, Any]]) -> dict:
    """Set dotted keys (``train.lr``) in a nested dict; returns ``d``."""
    for key, value in overrides:
        parts = key.split(".")
        if len(parts) != 2:
            raise ConfigError(f"{key}: overrides are <section>.<field>, e.g. train.lr=1e-3")
        d.setdefault(parts[0], {})
        if not isinstance(d[parts[0]], dict):
            raise ConfigError(f"{parts[0]} must be a table")
        d[parts[0]][parts[1]] = value
    return d


def load_config(path: Optional[str] = None, overrides: Optional[list[tuple[str, Any]]] = None) -> TrainConfig:
    """TOML file (optional) + overrides -> validated ``TrainConfig``."""
    d: dict = {}
    if path is not None:
        with open(path, "rb") as f:
            d = tomllib.load(f)
    return TrainConfig.from_dict(apply_overrides(d, overrides or []))


def _positive(name: str, v, lo: int) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise ConfigError(f"{name} must be an int >= {lo}, got {v!r}")


def _choice(name: str, v, options) -> None:
    if v not in options:
        raise ConfigError(f"{name} must be one of {list(options)}, got {v!r}")
