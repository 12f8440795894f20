"""SISO forward (and with --train fwd+bwd) under settings of mamba3/ops/mamba3/triton_siso_fwd.py
(or triton_siso_bwd.py / triton_siso.py, for names only they have) against the defaults, config A, bf16, by CUDA graph,
the settings alternated ``--rounds`` times;
outputs (and gradients) compared with the defaults' before timing.

    python benchmarks/gpu_fwd_ab.py --set INFER_CORE_CHUNK=None --out $OUT/ab.json
    python benchmarks/gpu_fwd_ab.py --set STATE_CHUNK_MULT=2 --set INFER_CORE_CHUNK=16 --train --out $OUT/ab.json

Each ``--set NAME=VALUE[;NAME=VALUE...]`` (Python literals) is one variant; "default" is the module
as it stands.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys

import torch
from triton.testing import do_bench_cudagraph

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import benchmarks.gpu_kernels as gk  # noqa: E402
import mamba3.ops.mamba3.triton_siso as ts  # noqa: E402
import mamba3.ops.mamba3.triton_siso_bwd as bw  # noqa: E402
import mamba3.ops.mamba3.triton_siso_fwd as fw  # noqa: E402


fwd = gk.siso_fwd


def owner(name: str):
    """The module that holds setting ``name`` (the forward's first)."""
    for mod in (fw, bw, ts):
        if hasattr(mod, name):
            return mod
    raise AttributeError(f"no setting {name} in triton_siso_fwd / triton_siso_bwd / triton_siso")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="8x2048,2x8192,1x16384")
    ap.add_argument("--set", action="append", default=[], help="NAME=VALUE, one variant each")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--out", default="gpu_fwd_ab.json")
    a = ap.parse_args()
    variants = {"default": None}
    for item in a.set:
        pairs = [part.split("=", 1) for part in item.split(";")]
        for name, _ in pairs:
            owner(name)                                    # an existing setting
        variants[item] = [(name, ast.literal_eval(value)) for name, value in pairs]
    res = gk.versions()
    for shape in a.shapes.split(","):
        B, T = map(int, shape.split("x"))
        xs = gk.inputs(B, T)
        _, leaves, step = gk.siso_step(B, T, seed=5)
        row = {}
        with torch.no_grad():
            y0, f0 = fwd(xs)
        step()
        g0 = [leaves[n].grad.clone() for n in gk.NAMES]
        for _ in range(a.rounds):
            for key, setting in variants.items():
                old = [(name, getattr(owner(name), name)) for name, _ in setting or []]
                for name, value in setting or []:
                    setattr(owner(name), name, value)
                with torch.no_grad():
                    y, f = fwd(xs)
                    row["rel_" + key] = max(gk.rel(y, y0), gk.rel(f.ssm, f0.ssm))
                    row.setdefault("fwd_" + key, []).append(do_bench_cudagraph(lambda: fwd(xs), return_mode="median"))
                if a.train:
                    step()
                    row["grad_rel_" + key] = max(gk.rel(leaves[n].grad, g) for n, g in zip(gk.NAMES, g0))
                    row.setdefault("fwdbwd_" + key, []).append(do_bench_cudagraph(step, return_mode="median"))
                for name, value in old:
                    setattr(owner(name), name, value)
        res[shape] = row
        print(shape, json.dumps(row), flush=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", a.out)
    bad = {(s, k): v for s, r in res.items() if isinstance(r, dict) for k, v in r.items() if "rel_" in k and v >= 1e-2}
    assert not bad, f"variants disagree with the defaults: {bad}"


if __name__ == "__main__":
    main()
