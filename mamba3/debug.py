"""Opt-in numerics checks.

    with mamba3.debug.detect_anomalies(model):
        loss = model(ids, labels=ids).loss

Inside the block every module's inputs and outputs are checked for NaN/Inf. The first module
whose inputs are finite but whose output is not raises :class:`AnomalyError`, naming the module
path (e.g. ``backbone.layers.3.mixer``), its class, and which output tensor went bad; the op
entry points in ``mamba3.ops`` report the op name the same way (see :func:`check_op`). Costs a
device sync per module: for debugging only.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional

import torch
import torch.nn as nn
from torch import Tensor

_state = threading.local()


class AnomalyError(ValueError):
    """A NaN or Inf appeared; the message names where (module path / op name) and which tensor."""


def enabled() -> bool:
    return getattr(_state, "depth", 0) > 0


def _flatten(obj, prefix: str) -> Iterator[tuple[str, Tensor]]:
    if isinstance(obj, Tensor):
        yield prefix, obj
    elif isinstance(obj, (list, tuple)):
        for i, o in enumerate(obj):
            yield from _flatten(o, f"{prefix}[{i}]")
    elif isinstance(obj, dict):
        for k, o in obj.items():
            yield from _flatten(o, f"{prefix}[{k!r}]")
    elif hasattr(obj, "__dataclass_fields__"):
        for k in obj.__dataclass_fields__:
            yield from _flatten(getattr(obj, k), f"{prefix}.{k}")


def first_nonfinite(obj, prefix: str) -> Optional[str]:
    """Name of the first floating tensor in ``obj`` holding NaN/Inf, else None."""
    for name, t in _flatten(obj, prefix):
        if t.is_floating_point() or t.is_complex():
            if not bool(torch.isfinite(t).all()):
                kind = "NaN" if bool(torch.isnan(t).any()) else "Inf"
                return f"{name} (shape {tuple(t.shape)}, {kind})"
    return None


def check_op(op_name: str, inputs, outputs) -> None:
    """Called by op entry points when anomaly mode is on: raise if an op turned finite inputs
    into a non-finite output."""
    if not enabled():
        return
    if first_nonfinite(inputs, "input") is not None:
        return  # the producer of that input was already reported by a module or op hook
    bad = first_nonfinite(outputs, "output")
    if bad is not None:
        where = getattr(_state, "module", None)
        raise AnomalyError(f"NaN/Inf first appeared in op {op_name}" + (f" inside {where}" if where else "") +
                           f": {bad}")


@contextlib.contextmanager
def detect_anomalies(model: Optional[nn.Module] = None):
    """Check every module's (and op's) inputs and outputs for NaN/Inf inside the block.

    ``model`` (optional) gives the modules their dotted names in messages; without it the class
    names (and ``layer_idx`` where present) are used.
    """
    names = {} if model is None else {id(m): (n or "<root>") for n, m in model.named_modules()}

    def label(mod):
        if id(mod) in names:
            return f"{names[id(mod)]} ({type(mod).__name__})"
        idx = getattr(mod, "layer_idx", None)
        return type(mod).__name__ + ("" if idx is None else f"[layer_idx={idx}]")

    def pre(mod, args, kwargs=None):
        stack = getattr(_state, "stack", [])
        stack.append(label(mod))
        _state.stack, _state.module = stack, stack[-1]

    def post(mod, args, output, kwargs=None):
        stack = _state.stack
        here = stack.pop()
        _state.module = stack[-1] if stack else None
        if first_nonfinite((args, kwargs or {}), "input") is None:
            bad = first_nonfinite(output, "output")
            if bad is not None:
                raise AnomalyError(f"NaN/Inf first appeared in module {here}: {bad}")

    _state.depth = getattr(_state, "depth", 0) + 1
    h1 = nn.modules.module.register_module_forward_pre_hook(pre)
    h2 = nn.modules.module.register_module_forward_hook(post)
    try:
        yield
    finally:
        h1.remove()
        h2.remove()
        _state.depth -= 1
        _state.stack, _state.module = [], None
