"""GPU check + timing of the Triton MIMO decode step (issue 7 / 10) at the 1.5B layer shape.

    PYTHONPATH=$PWD python benchmarks/gpu_mimo_step.py --out $OUT/gpu_mimo_step.json

B=128, H=64, P=64, N=128, R=4, G=1, bf16 inputs: three tokens through the kernel and through the
PyTorch reference step from the same state (relative errors of the output and every state
field), then ``do_bench_cudagraph`` medians of one layer's step for both, fp32 and bf16 state,
with and without the out-proj norm; floor = state read + write at 3.0 TB/s.

Keys: triton_us is the default launch (P split 4 without the norm, single kernel with it);
triton_us_w{2,8} the single kernel (p_blocks=1) at those warps; without the norm also the P
split: triton_us_p{1,2,4} (default warps), triton_us_p{2,4}_w{1,2,4}, and out_err_p* /
state_err_p* (worst state field) of three tokens at each p_blocks; best_us / best_key: the
fastest of all timed launches. The tensor-core form: dot_{tf32,ieee}_{out,state}_err and
triton_us_dot_{prec}_p{1,2,4}_w{1,2,4} (ieee only with the fp32 state; p1 only with the norm).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mamba3.ops.mamba3 import Mamba3State  # noqa: E402
from mamba3.ops.mamba3.mimo_interface import mamba3_mimo_step  # noqa: E402
from mamba3.ops.mamba3.triton_mimo_step import mamba3_mimo_step_triton  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args_ = ap.parse_args()
    B, H, P, N, R, G, S, dev, bf = 128, 64, 64, 128, 4, 1, 32, "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    r = lambda *s, dt=torch.float32: torch.randn(*s, device=dev, generator=g).to(dt)  # noqa: E731
    dt = torch.rand(B, H, device=dev, generator=g) * 0.1 + 0.01
    ones = torch.ones(H, R, P, device=dev)
    args = [r(B, R, G, N, dt=bf), r(B, R, G, N, dt=bf), r(B, H, P, dt=bf), -dt * 0.5, dt, r(B, H), 1 + 0.1 * r(H, R, N),
            1 + 0.1 * r(H, R, N), r(B, S), ones / R + 0.1 * r(H, R, P), ones + 0.1 * r(H, R, P),
            ones / R + 0.1 * r(H, R, P), r(H), r(B, H, P, dt=bf)]
    w = 1 + 0.1 * r(H, P)
    rel = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm())  # noqa: E731
    res = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, rows=[])
    for sd in (torch.float32, torch.bfloat16):
        for nw in (None, w):
            st = Mamba3State(3 * r(B, H, S), (0.5 * r(B, H, P, N)).to(sd), r(B, R, H, N, dt=bf), r(B, H, P, dt=bf))
            st0 = Mamba3State(*(t.clone() for t in st))
            ref_st = Mamba3State(*(t.clone() for t in st))
            ref_st = ref_st._replace(ssm=ref_st.ssm.float())
            for _ in range(3):
                out = mamba3_mimo_step(*args, st, impl="triton", outproj_norm_weight=nw)
                ref, ref_st = mamba3_mimo_step(*args, ref_st, impl="reference", outproj_norm_weight=nw), ref_st
            row = dict(state=str(sd), norm=nw is not None, out_err=rel(out, ref),
                       **{f"{n}_err": rel(a, b) for n, a, b in zip(st._fields, st, ref_st)})
            if nw is None:   # the P split (the norm always runs the single kernel)
                for pb in (1, 2, 4):
                    st_p = Mamba3State(*(t.clone() for t in st0))
                    for _ in range(3):
                        out_p = mamba3_mimo_step_triton(*args, st_p, None, 1e-5, p_blocks=pb)
                    row[f"out_err_p{pb}"] = rel(out_p, ref)
                    row[f"state_err_p{pb}"] = max(rel(a, b) for a, b in zip(st_p, ref_st))
            row["triton_us"] = 1e3 * triton.testing.do_bench_cudagraph(
                lambda: mamba3_mimo_step(*args, st, impl="triton", outproj_norm_weight=nw), return_mode="median")
            for nwarps in (2, 8):
                row[f"triton_us_w{nwarps}"] = 1e3 * triton.testing.do_bench_cudagraph(
                    lambda: mamba3_mimo_step_triton(*args, st, nw, 1e-5, num_warps=nwarps, p_blocks=1),
                    return_mode="median")
            if nw is None:
                for pb in (1, 2, 4):
                    row[f"triton_us_p{pb}"] = 1e3 * triton.testing.do_bench_cudagraph(
                        lambda: mamba3_mimo_step_triton(*args, st, None, 1e-5, p_blocks=pb), return_mode="median")
                for pb in (2, 4):
                    for nwarps in (1, 2, 4):
                        row[f"triton_us_p{pb}_w{nwarps}"] = 1e3 * triton.testing.do_bench_cudagraph(
                            lambda: mamba3_mimo_step_triton(*args, st, None, 1e-5, num_warps=nwarps, p_blocks=pb),
                            return_mode="median")
            # the tensor-core form (dot=True): errors of three tokens and timings per launch shape
            precs = ["tf32"] + (["ieee"] if sd == torch.float32 else [])
            for prec in precs:
                st_d = Mamba3State(*(t.clone() for t in st0))
                for _ in range(3):
                    out_d = mamba3_mimo_step_triton(*args, st_d, nw, 1e-5, dot=True, dot_precision=prec)
                row[f"dot_{prec}_out_err"] = rel(out_d, ref)
                row[f"dot_{prec}_state_err"] = max(rel(a, b) for a, b in zip(st_d, ref_st))
                for pb in ((1, 2, 4) if nw is None else (1,)):
                    for nwarps in (1, 2, 4):
                        row[f"triton_us_dot_{prec}_p{pb}_w{nwarps}"] = 1e3 * triton.testing.do_bench_cudagraph(
                            lambda: mamba3_mimo_step_triton(*args, st, nw, 1e-5, num_warps=nwarps, p_blocks=pb,
                                                            dot=True, dot_precision=prec), return_mode="median")
            timed = {key: us for key, us in row.items() if key.startswith("triton_us")}
            row["best_key"] = min(timed, key=timed.get)
            row["best_us"] = timed[row["best_key"]]
            row["reference_us"] = 1e3 * triton.testing.do_bench_cudagraph(
                lambda: mamba3_mimo_step(*args, ref_st, impl="reference", outproj_norm_weight=nw),
                return_mode="median")
            row["floor_us"] = 2 * st.ssm.nbytes / 3.0e12 * 1e6
            row["pct_floor"] = 100 * row["floor_us"] / row["triton_us"]
            row["x24_ms"] = 24 * row["triton_us"] / 1e3
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
    if args_.out:
        with open(args_.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
