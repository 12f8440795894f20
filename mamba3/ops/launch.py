"""Cheaper repeat launches of Triton kernels.

``kernel[grid](*args, **kwargs)`` re-derives the argument specialisation on every call (dtype and
16-byte alignment of each tensor, divisibility of each integer), which with the 15-25 tensor
arguments of the Mamba-3 kernels costs tens of microseconds of host time per launch; a SISO
forward + backward issues a dozen of them, so at short sequences the host, not the GPU, sets
the pace. :func:`fast_launch` wraps a ``@triton.jit`` kernel: the first launch of each
specialisation goes through Triton as usual (compiling if needed) and its compiled kernel is
kept under a key built from the same facts Triton specialises on; later launches with that key
call the compiled kernel's launcher directly.

The key: for each tensor its dtype and whether its data pointer is 16-byte aligned; for each
integer whether it equals 1, whether it is divisible by 16 and whether it fits in 32 bits; for
each constexpr parameter its value; the device, num_warps and num_stages. Any launch that the
fast path cannot reproduce exactly (interpreter, a launch hook such as a profiler's, a callable
grid, a Triton without the expected launcher) takes Triton's own path.
"""
from __future__ import annotations

import functools
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
ENABLED = os.environ.get("MAMBA3_FAST_LAUNCH", "1") != "0"   # MAMBA3_FAST_LAUNCH=0: always Triton's path


def _spec(value):
    """What Triton's specialisation depends on for one non-constexpr argument."""
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value == 1, value % 16 == 0, -2 ** 31 <= value < 2 ** 31
    if isinstance(value, float):
        return float
    return value    # anything else (a dtype, a string): its value


class FastLaunchKernel:
    """A ``@triton.jit`` kernel with cached repeat launches (``kernel[grid](...)`` as usual).
    Attribute access other than launching falls through to the wrapped JITFunction (``jit``)."""

    def __init__(self, jit):
        self.jit = jit
        self._names = list(jit.arg_names)
        self._name_set = frozenset(self._names)
        self._constexpr = frozenset(jit.constexprs)
        self._defaults = {p.name: p.default for p in jit.params if p.has_default}
        self._cache = {}

    def __getattr__(self, name):
        return getattr(self.jit, name)

    def __getitem__(self, grid):
        return functools.partial(self._launch, grid)

    def _full_args(self, args, kwargs):
        """All parameters in signature order (positional, keyword, defaults), or None if some
        keyword is not a parameter (left to Triton, which names the error)."""
        if len(args) > len(self._names) or not self._name_set.issuperset(kwargs):
            return None
        full = list(args)
        for name in self._names[len(args):]:
            if name in kwargs:
                full.append(kwargs[name])
            elif name in self._defaults:
                full.append(self._defaults[name])
            else:
                return None
        return full

    def _key(self, full, options):
        key = [options, _device()]
        append, constexpr = key.append, self._constexpr
        for i, value in enumerate(full):
            kind = type(value)
            if i in constexpr:
                append(value)
            elif kind is int:       # the common cases inline: this runs for every argument of every launch
                append((value == 1, value % 16 == 0, -2147483648 <= value < 2147483648))
            elif kind is torch.Tensor:
                append((value.dtype, value.data_ptr() % 16 == 0))
            else:
                append(_spec(value))
        return tuple(key)

    def _launch(self, grid, *args, **kwargs):
        if not ENABLED or callable(grid) or _hooks_active():
            return self.jit[grid](*args, **kwargs)
        options = (kwargs.pop("num_warps", None), kwargs.pop("num_stages", None))
        full = self._full_args(args, kwargs)
        if full is None:
            return self.jit[grid](*args, **kwargs, **_given(options))
        key = self._key(full, options)
        compiled = self._cache.get(key)
        if compiled is None:
            compiled = self.jit[grid](*args, **kwargs, **_given(options))
            if _direct_launch_supported(compiled):
                self._cache[key] = compiled
            return compiled
        g0, g1, g2 = (tuple(grid) + (1, 1))[:3]
        stream = _stream(key[1])
        compiled.run(g0, g1, g2, stream, compiled.function, compiled.packed_metadata, None, None, None, *full)
        return compiled


def _device() -> int:
    return torch.cuda.current_device()


def _stream(device: int) -> int:
    return torch._C._cuda_getCurrentRawStream(device)   # what Triton's own launch path uses


def _given(options):
    num_warps, num_stages = options
    out = {}
    if num_warps is not None:
        out["num_warps"] = num_warps
    if num_stages is not None:
        out["num_stages"] = num_stages
    return out


def _hooks_active() -> bool:
    """Whether a launch hook is set (a profiler's): those launches take Triton's path."""
    try:
        from triton import knobs
        hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    except Exception:   # a Triton without knobs: its own path
        return True
    return any(h is not None and bool(getattr(h, "calls", True)) for h in hooks)   # 3.6: an empty HookChain


def _direct_launch_supported(compiled) -> bool:
    return all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata"))


def fast_launch(jit):
    """Decorator (above ``@triton.jit``): cached launches on the GPU; the kernel itself under the
    interpreter (TRITON_INTERPRET=1), where there is no compiled kernel to keep."""
    return jit if INTERPRET else FastLaunchKernel(jit)
