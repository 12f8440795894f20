"""Checkpoints: ``config.json`` + ``model.safetensors`` (never pickle).

Loading checks every key before copying anything: a missing key, an unexpected key, a wrong
shape or an unreadable tensor raises ``CheckpointError`` naming the key (and the file).
With tied embeddings ``lm_head.weight`` is not written (it is the embedding); when a file has it
anyway (official checkpoints do) it must have the embedding's shape and is ignored.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .config import ModelConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TIED_KEY = "lm_head.weight"
EMBED_KEY = "backbone.embedding.weight"


class CheckpointError(ValueError):
    """A checkpoint does not match the model (the message names the key)."""


def save_pretrained(model, save_directory, extra_config: Optional[dict] = None) -> None:
    """Write ``model`` (a LanguageModel) as config.json + model.safetensors into a directory."""
    from safetensors.torch import save_file
    d = Path(save_directory)
    d.mkdir(parents=True, exist_ok=True)
    # model_type / architectures let transformers' Auto classes open the directory (models.hf).
    cfg = {**model.config.to_dict(), "model_type": "mamba3_lm", "architectures": ["Mamba3ForCausalLM"]}
    if extra_config:
        cfg.update(extra_config)
    with open(d / CONFIG_NAME, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    sd = state_dict_for_saving(model)
    save_file(sd, str(d / WEIGHTS_NAME), metadata={"format": "pt", "library": "mamba3"})


def state_dict_for_saving(model) -> dict[str, Tensor]:
    """Contiguous CPU-independent copy of the state dict, without the tied ``lm_head.weight``."""
    sd = model.state_dict()
    if model.config.tie_embeddings:
        sd.pop(TIED_KEY, None)
    return {k: v.detach().contiguous() for k, v in sd.items()}


def read_config(path) -> ModelConfig:
    """ModelConfig from a directory's config.json (ours, or an official MambaConfig)."""
    p = Path(path)
    f = p / CONFIG_NAME if p.is_dir() else p
    if not f.exists():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {p}")
    try:
        with open(f) as fh:
            d = json.load(fh)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: config is not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{f}: config must be a JSON object, got {type(d).__name__}")
    if d.pop("model_type", None) == "mamba3_lm":  # may also hold transformers' own keys
        fields = set(ModelConfig().to_dict())
        d = {k: v for k, v in d.items() if k in fields}
    d.pop("architectures", None)
    if "ssm_cfg" in d or "attn_layer_idx" in d:
        from .convert import config_from_official
        return config_from_official(d)
    return ModelConfig.from_dict(d)


def read_safetensors(file) -> dict[str, Tensor]:
    """All tensors of a safetensors file (CPU); errors name the file and the unreadable key."""
    from safetensors import safe_open
    file = str(file)
    if not os.path.exists(file):
        raise FileNotFoundError(f"checkpoint weights not found: {file}")
    try:
        handle = safe_open(file, framework="pt", device="cpu")
    except Exception as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from e
    out = {}
    with handle as h:
        for k in h.keys():
            try:
                out[k] = h.get_tensor(k)
            except Exception as e:
                raise CheckpointError(f"{file}: tensor {k!r} cannot be read ({e})") from e
    return out


def check_state_dict(model, sd: dict[str, Tensor], source: str = "checkpoint", strict: bool = True) -> dict:
    """Validate ``sd`` against ``model`` and return the dict to load (tied head dropped).

    Raises CheckpointError listing missing keys, unexpected keys (strict) and wrong shapes."""
    expected = model.state_dict()
    tied = model.config.tie_embeddings
    sd = dict(sd)
    if tied and TIED_KEY in sd:
        head = sd.pop(TIED_KEY)
        if EMBED_KEY in sd and tuple(head.shape) != tuple(sd[EMBED_KEY].shape):
            raise CheckpointError(f"{source}: key {TIED_KEY!r} has shape {tuple(head.shape)} but the tied "
                                  f"embedding {EMBED_KEY!r} has {tuple(sd[EMBED_KEY].shape)}")
    want = set(expected) - ({TIED_KEY} if tied else set())
    missing = sorted(want - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected and strict:
        problems.append(f"unexpected keys {unexpected}")
    for k in sorted(set(sd) & want):
        if tuple(sd[k].shape) != tuple(expected[k].shape):
            problems.append(f"key {k!r} has shape {tuple(sd[k].shape)}, the model expects {tuple(expected[k].shape)}")
        elif sd[k].is_floating_point() != expected[k].is_floating_point():
            problems.append(f"key {k!r} has dtype {sd[k].dtype}, the model expects {expected[k].dtype}")
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems))
    return {k: v for k, v in sd.items() if k in want}


def load_state_dict_checked(model, sd: dict[str, Tensor], source: str = "checkpoint", strict: bool = True) -> None:
    """Check then copy ``sd`` into ``model`` (values cast to each parameter's dtype/device)."""
    sd = check_state_dict(model, sd, source, strict)
    with torch.no_grad():
        model.load_state_dict(sd, strict=False)
    model.tie_weights()


def load_pretrained(path, device=None, dtype=None, strict: bool = True):
    """LanguageModel from a directory with config.json + model.safetensors. ``dtype`` None: the
    dtype the weights were saved in (read from the embedding)."""
    from .lm import LanguageModel
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"model directory not found: {p}")
    config = read_config(p)
    weights = p / WEIGHTS_NAME
    sd = read_safetensors(weights)
    if "ssm_cfg" in json.loads((p / CONFIG_NAME).read_text()):
        from .convert import state_dict_from_official
        sd = state_dict_from_official(sd, config)
    if dtype is None and EMBED_KEY in sd and sd[EMBED_KEY].is_floating_point():
        dtype = sd[EMBED_KEY].dtype  # the dtype the model was saved in
    model = LanguageModel(config, device=device, dtype=dtype, init_weights=False)
    load_state_dict_checked(model, sd, source=str(weights), strict=strict)
    return model.eval()
