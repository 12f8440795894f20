"""Training checkpoints: ``<root>/step-<N>/`` with model.safetensors, optimizer.safetensors,
rng.safetensors and meta.json.

Crash safety: a checkpoint is written into ``.step-<N>.tmp`` and renamed to ``step-<N>`` only after
every file (meta.json last) is written and fsynced; ``latest`` accepts only folders with a
readable meta.json. A process killed mid-save therefore leaves the previous checkpoint as the
newest complete one, and the stale temporary folder is removed by the next save.

Formats (all world-size independent, so a run may resume on a different number of ranks):
- model: the full (unsharded) state dict, tied ``lm_head.weight`` omitted;
- optimizer: ``{"state": {param_name: {key: tensor}}, "param_groups": [...]}`` (the layout of
  ``torch.distributed.checkpoint.state_dict`` full state dicts), tensors flattened to
  ``state/<param_name>/<key>``, groups in meta.json;
- rng: torch CPU (and CUDA) generator states; Python's ``random`` state in meta.json.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from ..data.sources import sha256_file

META = "meta.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


# ---------------------------------------------------------------------------------------------
# State dicts of single-device (or DDP-unwrapped) models and optimizers.
def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by name, each tensor once (tied aliases dropped), on CPU."""
    out, seen = {}, set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = t.detach().to("cpu", copy=True).contiguous()
    return out


def load_model_state(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Load ``model_state`` output; only tied aliases may be missing."""
    missing, unexpected = model.load_state_dict(sd, strict=False)
    canonical = set(model_state_names(model))
    bad = [k for k in missing if k in canonical]
    if bad or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {bad[:5]}, unexpected {unexpected[:5]}")


def model_state_names(model: nn.Module) -> list[str]:
    names, seen = [], set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            names.append(name)
    return names


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Optimizer state keyed by parameter name (see module docstring)."""
    names = {id(p): n for n, p in model.named_parameters()}
    sd = optimizer.state_dict()
    index_to_name = {}
    for group, sgroup in zip(optimizer.param_groups, sd["param_groups"]):
        for p, idx in zip(group["params"], sgroup["params"]):
            index_to_name[idx] = names[id(p)]
    state = {index_to_name[i]: {k: v.detach().to("cpu", copy=True) if torch.is_tensor(v) else v for k, v in s.items()}
             for i, s in sd["state"].items()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index_to_name[i] for i in g["params"]]}
              for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, osd: dict) -> None:
    names = {id(p): n for n, p in model.named_parameters()}
    name_to_index, idx = {}, 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            name_to_index[names[id(p)]] = idx
            idx += 1
    groups = [{**g, "params": [name_to_index[n] for n in g["params"]]} for g in osd["param_groups"]]
    state = {name_to_index[n]: s for n, s in osd["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ---------------------------------------------------------------------------------------------
# RNG.
def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    state = random.getstate()
    return tensors, {"python": [state[0], list(state[1]), state[2]]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    v, s, g = meta["python"]
    random.setstate((v, tuple(s), g))


# ---------------------------------------------------------------------------------------------
# Folders.
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save(root: Path, step: int, model_sd: dict, optim_sd: dict, meta: dict, keep: Optional[int] = None) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically; delete all but the ``keep`` newest."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    for stale in root.glob(".step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    rng_tensors, rng_meta = rng_state()
    _write_tensors(tmp / "model.safetensors", model_sd)
    flat = {f"state/{n}/{k}": v for n, s in optim_sd["state"].items() for k, v in s.items() if torch.is_tensor(v)}
    scalars = {n: {k: v for k, v in s.items() if not torch.is_tensor(v)} for n, s in optim_sd["state"].items()}
    _write_tensors(tmp / "optimizer.safetensors", flat)
    _write_tensors(tmp / "rng.safetensors", rng_tensors)
    meta = {**meta, "step": step, "rng": rng_meta, "optimizer": {"param_groups": optim_sd["param_groups"],
                                                               "scalars": scalars},
            "sha256": {name: sha256_file(tmp / name) for name in TENSOR_FILES}}
    with open(tmp / META, "w") as f:  # last: its presence marks the folder complete
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    if keep is not None:
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete ``step-N`` folders under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir() and (d / META).is_file():
            try:
                json.loads((d / META).read_text())
            except (OSError, json.JSONDecodeError):
                continue
            out.append((int(m.group(1)), d))
    return [d for _, d in sorted(out)]


TENSOR_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")




def verify(folder: Path) -> Optional[str]:
    """None if every tensor file matches the sha256 recorded in meta.json (checkpoints written
    before checksums existed are accepted), else what is wrong."""
    folder = Path(folder)
    sums = json.loads((folder / META).read_text()).get("sha256")
    if sums is None:
        return None
    for name, want in sums.items():
        if not (folder / name).is_file():
            return f"{name} is missing"
        if sha256_file(folder / name) != want:
            return f"{name} does not match its sha256 in {META} (corrupted)"
    return None


def latest(root: Path) -> Optional[Path]:
    """Newest complete checkpoint whose files pass :func:`verify`; corrupted ones are skipped
    with a warning naming them."""
    for folder in reversed(complete_checkpoints(root)):
        problem = verify(folder)
        if problem is None:
            return folder
        warnings.warn(f"skipping corrupted checkpoint {folder}: {problem}", RuntimeWarning, stacklevel=2)
    return None


def load(folder: Path) -> tuple[dict, dict, dict[str, torch.Tensor], dict]:
    """(model_sd, optim_sd, rng_tensors, meta) of a checkpoint folder (tensors on CPU)."""
    folder = Path(folder)
    meta = json.loads((folder / META).read_text())
    model_sd = load_file(str(folder / "model.safetensors"))
    flat = load_file(str(folder / "optimizer.safetensors"))
    state: dict[str, dict] = {n: dict(s) for n, s in meta["optimizer"]["scalars"].items()}
    for key, v in flat.items():
        _, rest = key.split("/", 1)
        name, k = rest.rsplit("/", 1)
        state.setdefault(name, {})[k] = v
    optim_sd = {"state": state, "param_groups": meta["optimizer"]["param_groups"]}
    return model_sd, optim_sd, load_file(str(folder / "rng.safetensors")), meta
