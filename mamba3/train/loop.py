"""The training loop: ``main(config)`` trains, validates, checkpoints, resumes and samples.

One optimizer step = ``grad_accum`` micro-steps on every rank; the global batch is the
``micro_batch * grad_accum * world`` consecutive samples after the run's data position (one
integer, saved in each checkpoint), so a resumed or re-sharded run sees exactly the same windows.
On CPU in float32 a resumed run reproduces the uninterrupted run's losses bit for bit.
"""
from __future__ import annotations

import contextlib
import random
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from ..data.loader import ArrayStream, WindowSampler, rank_indices
from ..data.shards import TokenShards, read_manifest
from ..data.tokenize import get_codec, tiny_tokens
from ..models import LanguageModel
from . import checkpoint as ckpt
from . import parallelize as par
from .config import ConfigError, DataConfig, TrainConfig
from .metrics import MetricsLog, perplexity, plot_loss
from .optim import build_optimizer, lr_at, no_decay_names, set_lr


def load_data(cfg: DataConfig):
    """(train stream, val stream, codec) for the shipped tiny corpus or a built data folder."""
    if cfg.source == "tiny":
        streams = [ArrayStream(tiny_tokens(split)) for split in ("train", "val")]
        return streams[0], streams[1], get_codec("byte")
    folder = Path(cfg.source)
    tok = read_manifest(folder)["tokenizer"]
    codec = get_codec(str(folder / tok["file"]) if "file" in tok else "byte")
    sources = cfg.sources or None
    return TokenShards(folder, "train", sources), TokenShards(folder, "val", sources), codec


def autocast_context(dtype: str, device: torch.device):
    """bf16 autocast on CUDA by default; float32 (no autocast) on CPU by default."""
    use_bf16 = dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(model, sampler: WindowSampler, batches: int, micro_batch: int, info: par.DistInfo, autocast) -> float:
    """Mean loss over fixed windows from the start of the validation stream (all ranks)."""
    model.eval()
    total = torch.zeros((), device=info.device)
    for j in range(batches):
        x = sampler.batch(rank_indices(0, micro_batch, j, info.rank, info.world)).to(info.device)
        with autocast():
            total += model(x, labels=x).loss.float()
    model.train()
    return par.all_reduce_mean(total / batches, info).item()


def main(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict:
    """Train as configured; returns a summary (losses per step, final validation loss, paths)."""
    info = par.init_distributed(cfg.train.device)
    try:
        return _train(cfg, info, log if info.is_main else (lambda *_: None))
    finally:
        par.destroy()


def _train(cfg: TrainConfig, info: par.DistInfo, log) -> dict:
    t, mode = cfg.train, par.resolve_mode(cfg.train.parallel, info)
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    mcfg = cfg.model_config()
    train_stream, val_stream, codec = load_data(cfg.data)
    if codec.vocab_size > mcfg.vocab_size:
        raise ConfigError(f"model.vocab_size = {mcfg.vocab_size} is smaller than the tokenizer's {codec.vocab_size}")

    model = LanguageModel(mcfg, device=info.device)
    no_decay = no_decay_names(model)
    n_params = sum(p.numel() for p in model.parameters())
    model = par.parallelize(model, mode, info, t.compile)
    optimizer = build_optimizer(model, no_decay, t, info.device)

    out_dir, global_batch = Path(cfg.run.out_dir), t.micro_batch * t.grad_accum * info.world
    ck_root = out_dir / "checkpoints"
    start, samples, resumed = 0, 0, None
    if cfg.checkpoint.resume and (folder := ckpt.latest(ck_root)) is not None:
        msd, osd, rng, meta = ckpt.load(folder)
        par.load_full_state(model, optimizer, msd, osd, mode)
        ckpt.set_rng_state(rng, meta["rng"])
        start, samples, resumed = meta["step"], meta["samples"], folder
        log(f"resumed from {folder} (step {start}, {samples:,} samples seen)")
    log(f"model {n_params / 1e6:.2f}M parameters, {mode} on {info.world} x {info.device.type}, "
        f"global batch {global_batch} x {cfg.data.seq_len} tokens, {len(train_stream):,} train tokens")

    sampler = WindowSampler(train_stream, cfg.data.seq_len, seed=t.seed)
    val_sampler = WindowSampler(val_stream, cfg.data.seq_len, shuffle=False)
    autocast = autocast_context(t.dtype, info.device)
    metrics = MetricsLog(out_dir, resume_step=start if resumed else None, enabled=info.is_main)
    losses, val_loss = [], None
    tokens_per_step = global_batch * cfg.data.seq_len
    bar = _progress(t.steps, start, cfg.run.progress and info.is_main)
    t0, tokens_done = time.perf_counter(), 0

    model.train()
    for step in range(start, t.steps):
        lr = lr_at(step, t)
        set_lr(optimizer, lr)
        loss_sum = torch.zeros((), device=info.device)
        for k in range(t.grad_accum):
            x = sampler.batch(rank_indices(samples, t.micro_batch, k, info.rank, info.world)).to(info.device)
            with par.grad_sync(model, mode, sync=k == t.grad_accum - 1), autocast():
                loss = model(x, labels=x).loss
                (loss / t.grad_accum).backward()
            loss_sum += loss.detach().float()
        samples += global_batch
        grad_norm = None
        if t.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP DTensor
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # One host sync per step: the loss is logged every step (needed for the resume tests anyway).
        loss_val = par.all_reduce_mean(loss_sum / t.grad_accum, info).item()
        losses.append(loss_val)
        tokens_done += tokens_per_step
        tok_s = tokens_done / max(time.perf_counter() - t0, 1e-9)
        done = step + 1
        if done % cfg.run.log_every == 0 or done == t.steps or done == start + 1:
            rec = {"step": done, "loss": loss_val, "lr": lr, "tokens": samples * cfg.data.seq_len, "tok_per_s": tok_s}
            if grad_norm is not None:
                rec["grad_norm"] = float(grad_norm)
            metrics.write(rec)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_val:.3f}", lr=f"{lr:.1e}", tok_s=f"{tok_s:,.0f}")

        if (cfg.eval.every and done % cfg.eval.every == 0) or done == t.steps:
            val_loss = evaluate(model, val_sampler, cfg.eval.batches, t.micro_batch, info, autocast)
            metrics.write({"step": done, "val_loss": val_loss, "val_ppl": perplexity(val_loss)})
            msg = f"step {done}: train loss {loss_val:.4f}, val loss {val_loss:.4f} (ppl {perplexity(val_loss):.2f})"
            (log if bar.disable else bar.write)(msg)
        if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or done == t.steps:
            _save(model, optimizer, mode, info, ck_root, done, samples, cfg)
    bar.close()

    summary = {"losses": losses, "start_step": start, "val_loss": val_loss, "samples": samples,
               "out_dir": str(out_dir), "resumed_from": str(resumed) if resumed else None}
    if info.is_main and start < t.steps:
        plot_loss(metrics.path, out_dir / "loss.png", title=f"{mcfg.mixer} {n_params / 1e6:.2f}M")
        log(f"metrics: {metrics.path}, loss curve: {out_dir / 'loss.png'}")
    final = _final_model(model, optimizer, mode, mcfg, info)
    if info.is_main:
        final.save_pretrained(out_dir / "final")
        tok_file = Path(cfg.data.source) / "tokenizer.json"
        if cfg.data.source != "tiny" and tok_file.is_file():  # so `mamba3 generate --model final` decodes
            shutil.copyfile(tok_file, out_dir / "final" / "tokenizer.json")
        log(f"model saved to {out_dir / 'final'}")
        if cfg.run.sample_tokens > 0:
            summary["sample"] = sample(final, codec, cfg)
            log(f"sample:\n{cfg.run.sample_prompt}{summary['sample']}")
    par.barrier(info)
    return summary


def _save(model, optimizer, mode, info, root: Path, step: int, samples: int, cfg: TrainConfig) -> None:
    msd, osd = par.full_state(model, optimizer, mode)  # collective under FSDP
    if info.is_main:
        meta = {"samples": samples, "world": info.world, "config": cfg.to_dict()}
        ckpt.save(root, step, msd, osd, meta, keep=cfg.checkpoint.keep)
    par.barrier(info)


def _final_model(model, optimizer, mode: str, mcfg, info: par.DistInfo):
    """A plain single-device model with the trained weights (under FSDP gathered onto rank 0;
    None on the other ranks)."""
    if mode != "fsdp":
        return par.unwrap(model)
    msd, _ = par.full_state(model, optimizer, mode)
    if not info.is_main:
        return None
    plain = LanguageModel(mcfg, init_weights=False)
    ckpt.load_model_state(plain, msd)
    return plain


@torch.no_grad()
def sample(model: LanguageModel, codec, cfg: TrainConfig) -> str:
    """Text generated after ``run.sample_prompt`` (seeded, so reproducible)."""
    model.eval()
    ids = torch.as_tensor(codec.encode(cfg.run.sample_prompt), dtype=torch.long, device=model.device)[None]
    out = model.generate(ids, max_new_tokens=cfg.run.sample_tokens, temperature=cfg.run.sample_temperature,
                         top_k=cfg.run.sample_top_k, seed=cfg.train.seed)
    return codec.decode(out.tokens[0, : int(out.num_generated[0])].tolist())


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)

