"""Host cost of the Triton launches of one SISO forward / forward + backward (config A), with
Triton's own launch path and with mamba3.ops.launch's cached launches, and with the launchers'
grid arithmetic through triton.cdiv / triton.next_power_of_2 (constexpr functions) instead of
mamba3.ops.utils' plain ones; outputs compared bitwise.

    python benchmarks/gpu_launch_cost.py --out $OUT/launch_cost.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import benchmarks.gpu_kernels as gk  # noqa: E402
from mamba3.ops import launch  # noqa: E402
from mamba3.ops.mamba3 import triton_siso_bwd, triton_siso_fwd  # noqa: E402
from mamba3.ops.utils import cdiv, next_pow2  # noqa: E402

HELPER_MODULES = (triton_siso_fwd, triton_siso_bwd)


def use_triton_helpers(flag):
    """The SISO launchers' cdiv / next_pow2: Triton's constexpr functions (flag) or ours."""
    for m in HELPER_MODULES:
        m.cdiv, m.next_pow2 = (triton.cdiv, triton.next_power_of_2) if flag else (cdiv, next_pow2)


@triton.jit
def _k32(X, Y, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17, a18, a19,
         a20, a21, a22, a23, a24, a25, a26, a27, a28, a29, B0: tl.constexpr, B1: tl.constexpr):
    pid = tl.program_id(0)
    tl.store(Y + pid, tl.load(X + pid) + a0 + a29)


def per_call_us(fn, n):
    """Host microseconds per call (n calls issued back to back, fewer than fill the launch queue)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    us = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return us


def micro():
    x = torch.zeros(1024, device="cuda")
    y = torch.zeros_like(x)
    ints = [3 + 17 * i for i in range(30)]
    fast = launch.FastLaunchKernel(_k32)
    out = dict(triton_us=per_call_us(lambda: _k32[(4,)](x, y, *ints, B0=16, B1=32), 500),
               cached_us=per_call_us(lambda: fast[(4,)](x, y, *ints, B0=16, B1=32), 500),
               torch_empty_us=per_call_us(lambda: torch.empty(8, 2048, 32, 64, device="cuda"), 500))
    print("32-argument kernel, 2 tensors:", out, flush=True)
    if os.environ.get("LAUNCH_PROFILE"):
        import cProfile
        import pstats
        for name, fn in (("triton", lambda: _k32[(4,)](x, y, *ints, B0=16, B1=32)),
                         ("cached", lambda: fast[(4,)](x, y, *ints, B0=16, B1=32))):
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(2000):
                fn()
            pr.disable()
            print(name)
            pstats.Stats(pr).sort_stats("tottime").print_stats(12)
    return out


def one_shape(B, T):
    xs, leaves, step = gk.siso_step(B, T, seed=1)

    def fwd():
        with torch.no_grad():
            return gk.mamba3_siso_triton(*(xs[n] for n in gk.NAMES), chunk_size=gk.CHUNK)[0]
    res, outs = {}, {}
    for enabled in (False, True, False, True):
        launch.ENABLED = enabled
        tag = "cached" if enabled else "triton"
        y = step()
        outs[tag] = [y] + [leaves[n].grad.clone() for n in gk.NAMES]
        outs[tag + "_fwd"] = fwd()
        for name, fn in (("fwdbwd", step), ("fwd", fwd)):
            res[f"{tag}_{name}_host_us"] = per_call_us(fn, 20)
            res[f"{tag}_{name}_ms"] = do_bench(fn, return_mode="median")
    launch.ENABLED = True
    for flag in (True, False, True, False):
        use_triton_helpers(flag)
        tag = "cached_triton_helpers" if flag else "cached_own_helpers"
        for name, fn in (("fwdbwd", step), ("fwd", fwd)):
            res[f"{tag}_{name}_host_us"] = per_call_us(fn, 20)
    use_triton_helpers(False)
    res["bitwise_equal"] = all(torch.equal(a, b) for a, b in zip(outs["cached"], outs["triton"])) and \
        torch.equal(outs["cached_fwd"], outs["triton_fwd"])
    print(B, T, res, flush=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8x2048,2x8192,1x16384")
    ap.add_argument("--out", default="launch_cost.json")
    a = ap.parse_args()
    out = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, micro=micro())
    for shape in a.shapes.split(","):
        B, T = (int(v) for v in shape.split("x"))
        out[shape] = one_shape(B, T)
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
