"""Shared machinery of the robustness suite: tiny valid argument sets per op and mutations
that turn one argument bad (wrong rank, size, dtype, type, device, non-contiguous).

Contract checked everywhere: a bad argument raises ValueError/TypeError (or a subclass such as
CheckpointError / ConfigError / AnomalyError) whose message names the argument, before any
compute; an odd-but-valid argument (non-contiguous, expanded, length 0/1) gives the float64
reference answer.
"""
from __future__ import annotations

import re

import pytest
import torch

from mamba3.ops.mamba3.common import Mamba3State


def expect_named_error(fn, name: str, *, kinds=(ValueError, TypeError)):
    """fn() must raise one of ``kinds`` and the message must mention ``name``."""
    with pytest.raises(kinds) as info:
        fn()
    msg = str(info.value)
    assert re.search(re.escape(name), msg), f"error does not name {name!r}: {type(info.value).__name__}: {msg}"
    return info.value


# ------------------------------------------------------------------------------------------------
# Mutations of one tensor argument. Each returns a bad replacement or None (not applicable).
def _wrong_rank_more(t):
    return t.unsqueeze(0)


def _wrong_rank_less(t):
    return t.reshape(-1) if t.dim() > 1 else t.reshape(1, -1)


def _wrong_size(t):
    if t.dim() == 0:
        return None
    shape = list(t.shape)
    shape[-1] += 1
    return torch.zeros(shape, dtype=t.dtype)


def _int_dtype(t):
    return torch.zeros(t.shape, dtype=torch.int64) if t.is_floating_point() or t.is_complex() else None


def _float_dtype(t):  # for index tensors (cu_seqlens): floats are not offsets
    return None if t.is_floating_point() or t.is_complex() else t.to(torch.float32)


def _not_tensor(t):
    return t.tolist()


def _meta(t):
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


BAD_MUTATIONS = {"rank+1": _wrong_rank_more, "rank-1": _wrong_rank_less, "size": _wrong_size,
                 "int_dtype": _int_dtype, "float_index": _float_dtype, "list": _not_tensor, "meta": _meta}


def mutation_cases(factories: dict, skip: dict | None = None):
    """pytest params (op, arg, mutation) for every tensor argument of every op factory."""
    skip = skip or {}
    out = []
    for op, make in factories.items():
        args = make()
        for arg, val in args.items():
            if not isinstance(val, torch.Tensor):
                continue
            for mname, mut in BAD_MUTATIONS.items():
                if (arg, mname) in skip.get(op, ()):
                    continue
                if mut(val) is not None:
                    out.append(pytest.param(op, arg, mname, id=f"{op}-{arg}-{mname}"))
    return out


def state_tuple(st):
    return Mamba3State(*st) if isinstance(st, tuple) else st


def assert_close(a, b, tol=1e-9):
    torch.testing.assert_close(a.to(torch.float64), b.to(torch.float64), rtol=tol, atol=tol)
