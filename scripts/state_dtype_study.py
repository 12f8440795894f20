"""bf16 vs fp32 Mamba-3 decode state: logit error, greedy agreement and memory.

1. Train the "tiny" preset briefly on the shipped tiny corpus (byte tokens, a plain AdamW loop)
   so the state carries real signal (a random model's state is noise).
2. Greedy-generate --gen tokens from a validation prompt with an fp32 state and a bf16 state
   (free running: report the first position where the two token streams differ).
3. Teacher-force the fp32 stream through both states: per-token max |logit error|, mean error
   and argmax agreement over all --gen positions (the fair comparison: same inputs).
4. Decode-state bytes per sequence with each dtype for this model and the paper presets
   (caches allocated on the meta device: no memory used).

CPU only; decode *speed* of a bf16 state is a GPU question (memory traffic of the state read /
write in the Triton step kernel) and is measured separately on a GPU.

    python scripts/state_dtype_study.py --steps 300 --gen 4096 --out benchmarks/results/state_dtype.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from mamba3.models import LanguageModel, ModelConfig

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "..", "mamba3", "data", "tiny")


def load_bytes(split: str) -> torch.Tensor:
    with open(os.path.join(CORPUS, f"{split}.txt"), "rb") as f:
        return torch.tensor(list(f.read()), dtype=torch.long)


def train(model, data, steps, batch, seqlen, lr, log, max_minutes=float("inf")):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(0)
    model.train()
    losses, t0 = [], time.time()
    for s in range(steps):
        if (time.time() - t0) / 60 > max_minutes:
            log(f"training stopped at step {s}: --train-minutes {max_minutes} reached")
            break
        starts = torch.randint(0, data.numel() - seqlen - 1, (batch,), generator=gen)
        ids = torch.stack([data[i : i + seqlen] for i in starts])
        loss = model(ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if s % 50 == 0 or s == steps - 1:
            log(f"step {s} loss {loss.item():.3f}")
    model.eval()
    return losses


@torch.no_grad()
def val_loss(model, data, seqlen=256, n=16):
    ids = torch.stack([data[i * seqlen : (i + 1) * seqlen] for i in range(n)])
    return float(model(ids, labels=ids).loss)


@torch.no_grad()
def greedy(model, prompt, n, state_dtype):
    return model.generate(prompt[None], max_new_tokens=n, temperature=0, state_dtype=state_dtype).tokens[0]


@torch.no_grad()
def teacher_forced(model, prompt, tokens, state_dtype):
    """Logits [n, V] after each of prompt, prompt+tokens[:1], ... (fp32 output)."""
    cache = model.allocate_inference_cache(1, prompt.numel() + tokens.numel() + 1, state_dtype=state_dtype)
    out = [model(prompt[None], cache=cache, num_last_tokens=1).logits[0, -1].float()]
    for t in tokens[:-1]:
        out.append(model.step(t.view(1), cache)[0].float())
    return torch.stack(out)


def state_bytes(cfg: ModelConfig, state_dtype) -> int:
    model = LanguageModel(cfg, device="meta", init_weights=False)
    cache = model.allocate_inference_cache(1, 1, state_dtype=state_dtype, device="meta")
    return cache.nbytes()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--gen", type=int, default=4096)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--train-minutes", type=float, default=float("inf"))
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    log = lambda s: print(s, flush=True)
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny")
    model = LanguageModel(cfg)
    t0 = time.time()
    losses = train(model, load_bytes("train"), a.steps, a.batch, a.seqlen, a.lr, log, a.train_minutes)
    train_s = time.time() - t0
    val = load_bytes("val")
    vl = val_loss(model, val)
    log(f"val loss {vl:.3f} ({train_s:.0f} s training)")

    prompt = val[1000 : 1000 + a.prompt]
    t0 = time.time()
    g32 = greedy(model, prompt, a.gen, torch.float32)
    g16 = greedy(model, prompt, a.gen, torch.bfloat16)
    diff = (g32 != g16).nonzero()
    first_div = int(diff[0]) if diff.numel() else None
    lf32 = teacher_forced(model, prompt, g32, torch.float32)
    lf16 = teacher_forced(model, prompt, g32, torch.bfloat16)
    err = (lf16 - lf32).abs().amax(-1)                                   # [n] per-token max error
    agree = (lf16.argmax(-1) == lf32.argmax(-1)).double()
    top2 = lf32.topk(2, -1).values
    margin = top2[:, 0] - top2[:, 1]
    log(f"generation + teacher forcing {time.time() - t0:.0f} s")

    quarters = [err[i * a.gen // 4 : (i + 1) * a.gen // 4] for i in range(4)]
    res = {
        "model": {"preset": "tiny", "params": model.num_parameters(), "train_steps": len(losses), "batch": a.batch,
                  "seqlen": a.seqlen, "lr": a.lr, "final_train_loss": losses[-1], "val_loss_nats_per_byte": vl,
                  "train_seconds": round(train_s, 1)},
        "generated_tokens": a.gen, "prompt_tokens": a.prompt,
        "free_running_greedy": {"first_divergence": first_div,
                                "identical_fraction": float((g32 == g16).double().mean())},
        "teacher_forced": {
            "logit_max_abs_error": float(err.max()), "logit_mean_of_per_token_max_error": float(err.mean()),
            "logit_max_abs_error_by_quarter": [float(q.max()) for q in quarters],
            "logit_scale_mean_max_abs": float(lf32.abs().amax(-1).mean()),
            "greedy_token_agreement": float(agree.mean()),
            "disagreements": int((agree == 0).sum()),
            "disagreements_with_fp32_margin_above_0.1": int(((agree == 0) & (margin > 0.1)).sum()),
        },
        "state_bytes_per_sequence": {},
        "torch": torch.__version__, "machine": platform.machine(), "sample_fp32": None,
        "note": "CPU study; the decode-speed effect of a bf16 state is measured on GPU separately.",
    }
    for name in ("tiny", "mamba3-180m", "mamba3-1.5b", "mamba3-mimo-1.5b"):
        c = ModelConfig.from_preset(name)
        b32, b16 = state_bytes(c, torch.float32), state_bytes(c, torch.bfloat16)
        res["state_bytes_per_sequence"][name] = {"fp32_state": b32, "bf16_state": b16,
                                                 "saving": round(1 - b16 / b32, 4)}
    try:
        res["sample_fp32"] = bytes(int(t) for t in g32[:200] if t < 256).decode("utf-8", "replace")
    except Exception:
        pass
    print(json.dumps(res, indent=1))
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
