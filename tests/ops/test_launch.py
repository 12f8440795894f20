"""mamba3.ops.launch: the cached-launch key matches Triton's specialisation, and repeat launches
reach the compiled kernel with every parameter in signature order (no GPU: the Triton launch
and the compiled kernel are stand-ins that record their calls)."""
import itertools

import pytest
import torch
import triton.language as tl
from triton.runtime.jit import JITFunction

from mamba3.ops import launch
from mamba3.ops.launch import FastLaunchKernel, _spec


def _triton_spec(value):
    native = pytest.importorskip("triton._C.libtriton", reason="compares with the compiled Triton's own "
                                 "specialiser, which this triton build lacks").native_specialize_impl
    from triton.backends.compiler import BaseBackend
    return native(BaseBackend, value, False, True, True)


def test_key_separates_what_triton_specialises_on():
    """Equal keys must mean equal Triton specialisations (else a cached kernel compiled for an
    aligned pointer or a multiple of 16 would be reused where Triton would recompile)."""
    base = torch.zeros(64, dtype=torch.bfloat16)
    values = [base, base[1:], base[8:], base[3:], torch.zeros(4), torch.zeros(4, dtype=torch.float16),
              0, 1, 2, 15, 16, 17, 32, -16, -1, 2 ** 31 - 16, 2 ** 31, 2 ** 33, 2 ** 33 + 1, 0.5, 1.0, True, False, None]
    for a, b in itertools.combinations(values, 2):
        try:
            ta, tb = _triton_spec(a), _triton_spec(b)
        except Exception:   # a Triton whose specialiser differs: nothing to compare with
            pytest.skip("this Triton's native_specialize_impl takes other arguments")
        if _spec(a) == _spec(b) and type(a) is type(b):
            assert ta == tb, (a, b)


def _toy_kernel(X, Y, n, scale, BLOCK: tl.constexpr, FLAG: tl.constexpr = False):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + i, tl.load(X + i, mask=i < n) * scale, mask=i < n)


class _Compiled:
    function, packed_metadata = "fn", "meta"

    def __init__(self):
        self.launches = []

    def run(self, *args):
        self.launches.append(args)


@pytest.fixture
def toy(monkeypatch):
    """The toy kernel wrapped, with Triton's launch replaced by a recorder (one compiled kernel
    per distinct Triton launch) and the CUDA device / stream queries stubbed."""
    jit = JITFunction(_toy_kernel)   # compiled-mode object even when the suite runs the interpreter
    calls = []

    def run(*args, grid, warmup, **kwargs):
        calls.append((grid, args, kwargs))
        return _Compiled()
    monkeypatch.setattr(jit, "run", run)
    monkeypatch.setattr(launch, "_device", lambda: 0)
    monkeypatch.setattr(launch, "_stream", lambda device: 1234)
    monkeypatch.setattr(launch, "_hooks_active", lambda: False)
    monkeypatch.setattr(launch, "ENABLED", True)
    return FastLaunchKernel(jit), calls


def test_repeat_launch_goes_direct_with_all_parameters(toy):
    kernel, calls = toy
    x, y = torch.zeros(64), torch.zeros(64)
    first = kernel[(4,)](x, y, 48, 2.0, BLOCK=16, num_warps=2)
    assert len(calls) == 1 and calls[0][2] == dict(BLOCK=16, num_warps=2)
    second = kernel[(4, 2)](x, y, 64, 3.0, BLOCK=16, num_warps=2)   # same specialisation: 48, 64 both % 16
    assert second is first and len(calls) == 1
    (launch_args,) = first.launches
    assert launch_args[:9] == (4, 2, 1, 1234, "fn", "meta", None, None, None)
    assert launch_args[9:] == (x, y, 64, 3.0, 16, False)   # the FLAG default filled in, in order


@pytest.mark.parametrize("change", ["misaligned", "dtype", "int_not_16", "int_one", "constexpr", "warps", "default"])
def test_a_new_specialisation_takes_triton_path(toy, change):
    kernel, calls = toy
    x, y = torch.zeros(64), torch.zeros(64)
    kernel[(4,)](x, y, 48, 2.0, BLOCK=16, num_warps=2)
    args, kw = [x, y, 48, 2.0], dict(BLOCK=16, num_warps=2)
    if change == "misaligned":
        args[0] = x[1:]
    elif change == "dtype":
        args[1] = y.half()
    elif change == "int_not_16":
        args[2] = 47
    elif change == "int_one":
        args[2] = 1
    elif change == "constexpr":
        kw["BLOCK"] = 32
    elif change == "warps":
        kw["num_warps"] = 4
    else:
        kw["FLAG"] = True
    kernel[(4,)](*args, **kw)
    assert len(calls) == 2


def test_unknown_keyword_and_hooks_fall_back(toy, monkeypatch):
    kernel, calls = toy
    x, y = torch.zeros(64), torch.zeros(64)
    kernel[(4,)](x, y, 48, 2.0, BLOCK=16, NOT_A_PARAM=1)   # Triton's path names the mistake
    kernel[(4,)](x, y, 48, 2.0, BLOCK=16, NOT_A_PARAM=1)
    assert len(calls) == 2
    monkeypatch.setattr(launch, "_hooks_active", lambda: True)   # a profiler's launch hook
    kernel[(4,)](x, y, 48, 2.0, BLOCK=16)
    kernel[(4,)](x, y, 48, 2.0, BLOCK=16)
    assert len(calls) == 4
