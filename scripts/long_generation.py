"""Long decode: does a tiny Mamba-3 LM stay finite and exact over ~1M decode steps?

Two independent tracks consume the same random (teacher-forced) tokens:
  step track:    fp32 model, one ``model.step`` per token (the decode path; phase wrapped mod
                 2*pi, fp32 SSM state unless --state-dtype bfloat16)
  forward track: a float64 copy of the model, chunked forward in blocks of --block tokens that
                 continue through an InferenceCache (chunked prefill), never sharing state
Every --check-every tokens the last block's step logits are compared with the forward track's
logits for the same positions, and the two SSM states / phases are compared (phases modulo
2*pi). A third check restores a snapshot of the step track taken before the block and runs the
fp32 chunked forward over the block from it (step == forward from the same state).

Results (one row per checkpoint, written after each one so a partial run still reports
honestly how far it got) go to --out as JSON.

    python scripts/long_generation.py --tokens 1000000 --out benchmarks/results/long_generation.json
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import time

import torch

from mamba3.models import LanguageModel, ModelConfig


def tiny_config(vocab: int = 64) -> ModelConfig:
    return ModelConfig(d_model=16, n_layer=1, vocab_size=vocab, d_intermediate=0, mixer="mamba3",
                       initializer_range=0.1,
                       mixer_cfg={"mamba3": {"d_state": 16, "headdim": 8, "expand": 2, "chunk_size": 16}})


def wrapped_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| of two phases, modulo 2*pi."""
    d = torch.remainder(a.double() - b.double() + math.pi, 2 * math.pi) - math.pi
    return float(d.abs().max()) if d.numel() else 0.0


@torch.no_grad()
def run(tokens: int, check_every: int, block: int, seed: int = 0, state_dtype=None, out=None,
        log=print, max_minutes: float = float("inf")) -> dict:
    if check_every % block:
        raise ValueError(f"check_every={check_every} must be a multiple of block={block}")
    torch.manual_seed(seed)
    model = LanguageModel(tiny_config()).eval()
    ref = copy.deepcopy(model).double().eval()
    # larger dt than the init range so the phase moves fast (wraps ~every few tokens)
    for m in (model, ref):
        m.backbone.layers[0].mixer.dt_bias.fill_(0.5)
    gen = torch.Generator().manual_seed(seed + 1)
    V = model.config.vocab_size
    cache = model.allocate_inference_cache(1, 1, state_dtype=state_dtype)
    ref_cache = ref.allocate_inference_cache(1, 1)
    result = {"config": model.config.to_dict(), "tokens_requested": tokens, "check_every": check_every,
              "block": block, "state_dtype": str(state_dtype or torch.float32), "seed": seed,
              "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "checkpoints": [], "tokens_done": 0, "finite": True}
    t0 = time.time()
    done = 0
    while done < tokens:
        ids = torch.randint(0, V, (1, block), generator=gen)
        check = (done + block) % check_every == 0 or done + block >= tokens
        snap = [c.snapshot() for c in cache.layers] if check else None
        logits = torch.empty(block, V)
        for i in range(block):
            logits[i] = model.step(ids[:, i], cache)[0]
        ref_logits = ref(ids, cache=ref_cache).logits[0]
        done += block
        if check:
            finite = bool(torch.isfinite(logits).all()) and all(bool(torch.isfinite(t).all())
                                                                 for _, t in cache.layers[0].tensors())
            result["finite"] &= finite
            # step == fp32 chunked forward from the same (restored) state
            fresh = model.allocate_inference_cache(1, 1, state_dtype=state_dtype)
            for c, s in zip(fresh.layers, snap):
                c.restore(s)
            fwd = model(ids, cache=fresh).logits[0]
            lc, rc = cache.layers[0], ref_cache.layers[0]
            row = {"tokens": done, "elapsed_s": round(time.time() - t0, 1), "finite": finite,
                   "step_vs_fp64_forward_logits_max_abs": float((logits.double() - ref_logits).abs().max()),
                   "step_vs_fp32_forward_from_snapshot_max_abs": float((logits - fwd).abs().max()),
                   "ssm_state_max_abs_diff": float((lc.ssm.double() - rc.ssm).abs().max()),
                   "ssm_state_max_abs": float(rc.ssm.abs().max()),
                   "angle_max_wrapped_diff": wrapped_diff(lc.angle, rc.angle),
                   "angle_in_range": bool(((lc.angle >= 0) & (lc.angle <= 2 * math.pi)).all()),
                   "logit_scale": float(ref_logits.abs().max()),
                   "greedy_agreement": float((logits.argmax(-1) == ref_logits.argmax(-1)).double().mean())}
            result["checkpoints"].append(row)
            log(json.dumps(row))
        result["tokens_done"] = done
        result["steps_per_s"] = round(done / max(time.time() - t0, 1e-9), 1)
        if check and out:
            _write(out, result)
        if (time.time() - t0) / 60 > max_minutes:
            log(f"stopping after {done} tokens: --max-minutes {max_minutes} reached")
            break
    if out:
        _write(out, result)
    return result


def _write(path, result):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--check-every", type=int, default=100_000)
    ap.add_argument("--block", type=int, default=500)
    ap.add_argument("--state-dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--max-minutes", type=float, default=float("inf"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    run(a.tokens, a.check_every, a.block, a.seed, getattr(torch, a.state_dtype), a.out,
        max_minutes=a.max_minutes)


if __name__ == "__main__":
    main()
