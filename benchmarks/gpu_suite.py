"""One GPU call for the model-level numbers: end-to-end latency (issue 10), training throughput
(issue 8) and the state-dtype speed/memory trade (issue 13).

    python benchmarks/gpu_suite.py --sections e2e,train,state --out $OUT [--budget 540]

Each section writes its JSON under --out as soon as it finishes; the whole run keeps inside
--budget seconds (later configs are skipped and listed as such).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from mamba3.bench.e2e import run_config
from mamba3.models import LanguageModel, ModelConfig

H100_DENSE_BF16 = 989e12   # spec sheet
H100_MEASURED_BF16 = 798e12  # PERF.md section 1 (8192^3 matmul on our H100)


def _dump(out, name, obj):
    with open(os.path.join(out, name), "w") as f:
        json.dump(obj, f, indent=1)


def train_throughput(preset: str, batch: int, seqlen: int, steps: int = 8) -> dict:
    from mamba3.train.config import OptimConfig
    from mamba3.train.optim import build_optimizer, no_decay_names
    cfg = ModelConfig.from_preset(preset)
    torch.manual_seed(0)
    model = LanguageModel(cfg, device="cuda")
    opt = build_optimizer(model, no_decay_names(model), OptimConfig(lr=3e-4), torch.device("cuda"))
    ids = torch.randint(0, cfg.vocab_size, (batch, seqlen), device="cuda")
    torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    n_params = sum(p.numel() for p in model.parameters())
    tok_s = batch * seqlen / dt
    flops_tok = 6 * n_params
    if cfg.mixer == "attention" or "A" in (cfg.layer_pattern or ""):
        n_attn = sum(1 for b in model.backbone.layers if type(b.mixer).__name__ == "Attention")
        flops_tok += 6 * n_attn * seqlen * cfg.d_model  # causal QK^T and PV, fwd+bwd, averaged
    del model, opt
    return dict(preset=preset, batch=batch, seqlen=seqlen, params=n_params, step_ms=dt * 1e3, tok_s=tok_s,
                mfu_vs_989=flops_tok * tok_s / H100_DENSE_BF16, mfu_vs_measured_798=flops_tok * tok_s / H100_MEASURED_BF16,
                peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30, final_loss=float(loss))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default="e2e,train,state")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--budget", type=float, default=540)
    ap.add_argument("--e2e-presets", default="mamba3-1.5b,mamba2-1.5b,mamba3-mimo-1.5b,gdn-1.5b,transformer-1.5b")
    ap.add_argument("--e2e-lengths", default="512,2048")
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--prefill-chunk", type=int, default=1024)
    ap.add_argument("--train-presets", default="mamba3-180m,mamba3-mimo-180m,mamba2-180m,transformer-180m")
    args = ap.parse_args()
    t_start = time.perf_counter()
    left = lambda: args.budget - (time.perf_counter() - t_start)
    meta = dict(gpu=torch.cuda.get_device_name(0), torch=torch.__version__,
                triton=__import__("triton").__version__)
    for section in args.sections.split(","):
        {"e2e": run_e2e, "state": run_state, "train": run_train}[section](args, meta, left)
    print(f"done in {time.perf_counter() - t_start:.0f}s")


def run_e2e(args, meta, left):
    rows = []
    for preset in args.e2e_presets.split(","):
        for n in [int(x) for x in args.e2e_lengths.split(",")]:
            if left() < 60:
                rows.append(dict(preset=preset, n=n, skipped="time budget"))
                continue
            try:
                row = run_config(preset, n, batch=128, decode_steps=args.decode_steps, reps=2,
                                 prefill_chunk=args.prefill_chunk,
                                 config=ModelConfig.from_preset(preset, vocab_size=50280))
            except Exception as e:  # OOM (transformer KV at large n) or a kernel failure: record it
                row = dict(preset=preset, n=n, error=f"{type(e).__name__}: {str(e)[:200]}")
            torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
            _dump(args.out, "e2e.json", dict(meta=meta, batch=128, rows=rows))


def run_state(args, meta, left):
    rows = []
    for sd in (torch.float32, torch.bfloat16):
        if left() < 60:
            break
        try:
            row = run_config("mamba3-1.5b", 512, batch=128, decode_steps=args.decode_steps, reps=2, state_dtype=sd,
                             config=ModelConfig.from_preset("mamba3-1.5b", vocab_size=50280))
        except Exception as e:
            row = dict(state_dtype=str(sd), error=f"{type(e).__name__}: {str(e)[:200]}")
        torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
        _dump(args.out, "state_dtype_gpu.json", dict(meta=meta, rows=rows))


def run_train(args, meta, left):
    rows = []
    for preset in args.train_presets.split(","):
        if left() < 45:
            rows.append(dict(preset=preset, skipped="time budget"))
            continue
        try:
            row = train_throughput(preset, batch=8, seqlen=2048)
        except Exception as e:
            row = dict(preset=preset, error=f"{type(e).__name__}: {str(e)[:200]}")
        torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
        _dump(args.out, "train_throughput.json", dict(meta=meta, rows=rows))


if __name__ == "__main__":
    main()
