"""Training: TOML configs with overrides, AdamW + warmup/cosine/WSD, gradient accumulation, bf16
autocast, crash-safe step-N checkpoints with exact resume, torchrun DDP / FSDP2."""
from .config import ConfigError, TrainConfig, load_config
from .loop import main

__all__ = ["ConfigError", "TrainConfig", "load_config", "main"]
