"""Launch-setting sweep of the SISO backward-side kernels, then a checked fwd / fwd+bwd timing beside
the official kernels and a per-kernel profile.

    python benchmarks/gpu_prep_sweep.py --official .official --out $OUT/gpu_prep_sweep.json
    python benchmarks/gpu_prep_sweep.py --no-sweep ...     # the current settings: check and time only

Swept alone on config A at the first shape: the preparation kernels (prep_qk, prep_bwd) over rows
per program (= the phase block) and warps, the chunk backward over its state-column block. The
fastest settings are kept; gpu_kernels.py's check (ours vs the fp32 chunked path, rel. error <
1e-2) runs before each shape's timing, which also compares the q/k gradient hand-off in bf16 / fp32.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import benchmarks.gpu_kernels as gk  # noqa: E402
import mamba3.ops.mamba3.triton_siso as ts  # noqa: E402
import mamba3.ops.mamba3.triton_siso_bwd as bw  # noqa: E402
import mamba3.ops.mamba3.triton_siso_fwd as fw  # noqa: E402

ROWS = (8, 16)
WARPS = (1, 4)
COLS = ((128, 8), (64, 8), (64, 4), (32, 4))   # chunk backward (state columns per step, warps)
PROGRAMS = (1, 4096)   # prep_bwd: target programs (1: one program per group's heads)
def sweep(B, T, res):
    """Time each launch setting alone: the preparation kernels over (rows, warps) (the phase blocks
    follow the rows), the chunk backward over its state-column block."""
    xs = gk.inputs(B, T, seed=3)
    dQ = torch.randn(B, T, gk.H, gk.N, device="cuda", dtype=torch.bfloat16)
    dK = torch.randn_like(dQ)
    dskip = torch.randn(B, T, gk.H, device="cuda")
    row = {}
    w0 = (fw.PREP_NUM_WARPS, bw.PREP_BWD_NUM_WARPS)
    for rows in ROWS:
        th0, _ = fw.chunk_start_phases(xs["dt"], xs["angles"], None, rows)
        for nw in WARPS:
            fw.PREP_NUM_WARPS = bw.PREP_BWD_NUM_WARPS = nw
            row[f"prep_qk_r{rows}_w{nw}"] = do_bench(lambda: fw.prep_qk(
                xs["q"], xs["k"], xs["dt"], xs["trap"], xs["q_bias"], xs["k_bias"], xs["angles"], xs["D"], th0, rows,
                torch.bfloat16), return_mode="median")
            row[f"prep_bwd_r{rows}_w{nw}"] = do_bench(lambda: bw.prep_bwd(
                xs["q"], xs["k"], xs["q_bias"], xs["k_bias"], xs["dt"], xs["trap"], xs["angles"], th0, rows, rows, dQ,
                dK, dskip), return_mode="median")
    fw.PREP_NUM_WARPS, bw.PREP_BWD_NUM_WARPS = w0
    th0, _ = fw.chunk_start_phases(xs["dt"], xs["angles"], None, fw.PREP_ROWS)
    br = min(bw.PREP_BWD_ROWS, fw.PREP_ROWS)
    p0 = bw.PREP_BWD_PROGRAMS
    for target in PROGRAMS:
        bw.PREP_BWD_PROGRAMS = target
        row[f"prep_bwd_programs{target}"] = do_bench(lambda: bw.prep_bwd(
            xs["q"], xs["k"], xs["q_bias"], xs["k_bias"], xs["dt"], xs["trap"], xs["angles"], th0, fw.PREP_ROWS, br,
            dQ, dK, dskip), return_mode="median")
    bw.PREP_BWD_PROGRAMS = p0
    Q, K = dQ.clone(), dK.clone()
    dy = torch.randn(B, T, gk.H, gk.P, device="cuda", dtype=torch.bfloat16)
    _, states, dec, _ = fw.ssd_core_fwd(Q, K, xs["v"], xs["dA"], None, gk.CHUNK)
    cols0, nw0 = bw.BWD_COLS, bw.BWD_NUM_WARPS
    for cols, nw in COLS:
        bw.BWD_COLS, bw.BWD_NUM_WARPS = cols, nw
        row[f"chunk_bwd_cols{cols}_w{nw}"] = do_bench(lambda: bw.ssd_core_bwd(
            Q, K, xs["v"], xs["dA"], dy, states, dec, None, gk.CHUNK, skip=dskip, dv_dtype=torch.bfloat16,
            dqk_dtype=torch.bfloat16), return_mode="median")
    bw.BWD_COLS, bw.BWD_NUM_WARPS = cols0, nw0
    res["sweep"][f"{B}x{T}"] = row
    print(f"sweep {B}x{T}: " + " ".join(f"{k}={v:.4f}" for k, v in row.items()), flush=True)
    return row


def choose(row):
    """Fastest rows (qk + bwd together at each kernel's best warps), then each kernel's warps."""
    def best_w(kind, rows):
        return min(WARPS, key=lambda w: row[f"{kind}_r{rows}_w{w}"])
    total = {r: row[f"prep_qk_r{r}_w{best_w('prep_qk', r)}"] + row[f"prep_bwd_r{r}_w{best_w('prep_bwd', r)}"]
             for r in ROWS}
    rows = min(total, key=total.get)
    fw.PREP_ROWS = rows
    fw.PREP_NUM_WARPS, bw.PREP_BWD_NUM_WARPS = best_w("prep_qk", rows), best_w("prep_bwd", rows)
    bw.BWD_COLS, bw.BWD_NUM_WARPS = min(COLS, key=lambda c: row[f"chunk_bwd_cols{c[0]}_w{c[1]}"])
    bw.PREP_BWD_PROGRAMS = min(PROGRAMS, key=lambda p: row[f"prep_bwd_programs{p}"])
    return settings()


def settings():
    """The launch settings the kernels run with now."""
    return dict(prep_rows=fw.PREP_ROWS, prep_qk_warps=fw.PREP_NUM_WARPS, prep_bwd_warps=bw.PREP_BWD_NUM_WARPS,
                bwd_cols=bw.BWD_COLS, bwd_warps=bw.BWD_NUM_WARPS, prep_bwd_programs=bw.PREP_BWD_PROGRAMS)


def graph_ms(fn):
    """GPU time of fn alone: replayed from a CUDA graph (None if it cannot be captured)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return do_bench(graph.replay, return_mode="median")
    except Exception as e:  # noqa: BLE001 - report, keep timing
        print("graph capture failed:", repr(e)[:200])
        return None


def time_shape(B, T, off, row):
    xs = gk.inputs(B, T, seed=1)
    leaves = {n: x.clone().requires_grad_(True) for n, x in xs.items()}
    dy = torch.randn(B, T, gk.H, gk.P, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        row["ours_fwd"] = do_bench(lambda: gk.mamba3_siso_triton(*(xs[n] for n in gk.NAMES), chunk_size=gk.CHUNK),
                                   return_mode="median")
    for flag in (True, False):
        ts.QK_GRADS_16BIT = flag
        row[f"ours_fwdbwd_qk16_{flag}"] = do_bench(
            lambda: gk.mamba3_siso_triton(*(leaves[n] for n in gk.NAMES), chunk_size=gk.CHUNK)[0].backward(dy),
            grad_to_none=list(leaves.values()), return_mode="median")
    ts.QK_GRADS_16BIT = True
    row["ours_fwdbwd"] = row["ours_fwdbwd_qk16_True"]
    def fwdbwd():
        for x in leaves.values():
            x.grad = None
        gk.mamba3_siso_triton(*(leaves[n] for n in gk.NAMES), chunk_size=gk.CHUNK)[0].backward(dy)
    torch.cuda.synchronize()
    t0 = time.perf_counter()          # host time to issue a fwd+bwd (the GPU idles if it exceeds the GPU time)
    for _ in range(10):
        fwdbwd()
    row["host_issue_fwdbwd_ms"] = (time.perf_counter() - t0) * 1e2
    torch.cuda.synchronize()
    row["ours_fwdbwd_graph"] = graph_ms(fwdbwd)   # GPU time alone
    with torch.no_grad():
        row["ours_fwd_graph"] = graph_ms(lambda: gk.mamba3_siso_triton(*(xs[n] for n in gk.NAMES),
                                                                       chunk_size=gk.CHUNK))
    if off is not None:
        oa = gk.official_args(xs)
        with torch.no_grad():
            row["official_fwd"] = do_bench(lambda: off.combined(*oa, chunk_size=gk.CHUNK), return_mode="median")
            row["official_fwd_graph"] = graph_ms(lambda: off.combined(*oa, chunk_size=gk.CHUNK))
        ol = [a.clone().requires_grad_(True) for a in oa]
        row["official_fwdbwd"] = do_bench(lambda: off.combined(*ol, chunk_size=gk.CHUNK).backward(dy),
                                          grad_to_none=ol, return_mode="median")
        row["speedup_fwd"] = row["official_fwd"] / row["ours_fwd"]
        row["speedup_fwdbwd"] = row["official_fwdbwd"] / row["ours_fwdbwd"]
        if row["official_fwd_graph"] and row["ours_fwd_graph"]:
            row["speedup_fwd_graph"] = row["official_fwd_graph"] / row["ours_fwd_graph"]
        if row["ours_fwdbwd_graph"]:
            row["speedup_fwdbwd_graph"] = row["official_fwdbwd"] / row["ours_fwdbwd_graph"]
    print(f"time {B}x{T}: " + " ".join(f"{k}={v:.3f}" for k, v in row.items() if v is not None), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--official", default=".official")
    ap.add_argument("--out", default="benchmarks/results/gpu_prep_sweep.json")
    ap.add_argument("--shapes", default="8x2048,2x8192,1x16384")
    ap.add_argument("--no-sweep", action="store_true", help="keep the modules' launch settings; check and time only")
    args = ap.parse_args()
    off = gk.import_official(args.official)
    res = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               sweep={}, check={}, prefill={}, chosen={})
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    res["chosen"] = settings() if args.no_sweep else choose(sweep(*shapes[0], res))
    print("chosen", res["chosen"], flush=True)
    for B, T in shapes:
        if gk.check_prefill(B, T, off, res):
            row = res["prefill"].setdefault(f"{B}x{T}", {})
            gk.guarded(time_shape, B, T, off, row)
            gk.guarded(gk.profile, B, T, res)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
