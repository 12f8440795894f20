"""Autoregressive generation with a fixed-size inference cache.

Prefill runs the prompt through ``forward`` with a cache; decoding calls ``step`` once per token.
Prompts of different lengths never see padding: they are packed (``cu_seqlens``, one cache row
per sequence, the default) or prefilled one row at a time into views of the cache rows. SSM
layers' memory is constant in the generated length; attention KV caches are preallocated to
prompt + max_new_tokens. The decode step can be captured in a CUDA graph (``use_cuda_graph``).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from .cache import InferenceCache


@dataclasses.dataclass
class GenerationOutput:
    """tokens [B, n]: generated ids (rows that hit eos are padded with ``pad_token_id`` after it);
    num_generated [B]: tokens produced per row (eos included); prompts: the prompts as given;
    scores: per-step processed logits [B, V] when ``output_scores``."""

    tokens: Tensor
    num_generated: Tensor
    prompts: list
    scores: Optional[list] = None

    def sequences(self) -> list[Tensor]:
        """Prompt + generated tokens of every row (1-D tensors, eos included, no padding)."""
        return [torch.cat([p.to(self.tokens.device), self.tokens[i, : int(self.num_generated[i])]])
                for i, p in enumerate(self.prompts)]


def split_prompts(input_ids, attention_mask: Optional[Tensor] = None,
                  prompt_lengths: Optional[Sequence[int]] = None) -> list[Tensor]:
    """Prompts as a list of 1-D tensors from: [B, T] ids (all length T), [B, T] + attention_mask
    (1 = token, left or right padding), [B, T] + prompt_lengths (right padding), or a list of
    sequences."""
    if isinstance(input_ids, (list, tuple)):
        prompts = [torch.as_tensor(p, dtype=torch.long).reshape(-1) for p in input_ids]
    else:
        if not isinstance(input_ids, Tensor) or input_ids.dim() not in (1, 2):
            raise ValueError("input_ids must be [B, T] ids, [T] ids or a list of sequences")
        ids = input_ids if input_ids.dim() == 2 else input_ids[None]
        if attention_mask is not None and prompt_lengths is not None:
            raise ValueError("give attention_mask or prompt_lengths, not both")
        if attention_mask is not None:
            if attention_mask.shape != ids.shape:
                raise ValueError(f"attention_mask must be {tuple(ids.shape)}, got {tuple(attention_mask.shape)}")
            prompts = []
            for i in range(ids.shape[0]):
                pos = attention_mask[i].nonzero().flatten()
                if pos.numel() and pos[-1] - pos[0] + 1 != pos.numel():
                    raise ValueError(f"attention_mask row {i} is not one contiguous run of 1s")
                prompts.append(ids[i, pos])
        elif prompt_lengths is not None:
            lens = [int(n) for n in prompt_lengths]
            if len(lens) != ids.shape[0] or any(n > ids.shape[1] for n in lens):
                raise ValueError(f"prompt_lengths {lens} do not fit input_ids {tuple(ids.shape)}")
            prompts = [ids[i, :n] for i, n in enumerate(lens)]
        else:
            prompts = list(ids)
    if not prompts:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        if p.numel() == 0:
            raise ValueError(f"prompt {i} is empty (every prompt needs at least one token)")
    return prompts


@torch.no_grad()
def prefill(model, prompts: list[Tensor], cache: InferenceCache, mode: str = "varlen") -> Tensor:
    """Run the prompts into ``cache`` (fresh rows); returns the last-position logits [B, V]."""
    dev = model.device
    lens = [p.numel() for p in prompts]
    if len(set(lens)) == 1:
        h = model.hidden_states(torch.stack(prompts).to(dev), cache=cache)
        return model.logits_from_hidden(h[:, -1])
    if mode == "varlen":
        packed = torch.cat(prompts).to(dev)[None]
        cu = torch.tensor([0] + lens, device=dev).cumsum(0).to(torch.int32)
        h = model.hidden_states(packed, cache=cache, cu_seqlens=cu)
        return model.logits_from_hidden(h[0, (cu[1:] - 1).long()])
    if mode == "per_row":
        out = [model.logits_from_hidden(model.hidden_states(p.to(dev)[None], cache=cache.rows(i))[:, -1])
               for i, p in enumerate(prompts)]
        return torch.cat(out)
    raise ValueError(f"prefill mode must be 'varlen' or 'per_row', got {mode!r}")


def process_logits(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                   top_p: Optional[float] = None, repetition_penalty: float = 1.0,
                   seen: Optional[Tensor] = None) -> Tensor:
    """Repetition penalty (CTRL: positive logits / p, negative x p, over ``seen`` [B, V] bool),
    temperature, top-k and nucleus (top-p) filtering. Returns >= fp32 logits, filtered = -inf."""
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if repetition_penalty != 1.0 and seen is not None:
        pen = torch.where(x > 0, x / repetition_penalty, x * repetition_penalty)
        x = torch.where(seen, pen, x)
    if temperature > 0 and temperature != 1.0:
        x = x / temperature
    if top_k is not None and 0 < top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sx, idx = torch.sort(x, dim=-1, descending=True)
        cum = sx.softmax(-1).cumsum(-1)
        drop = cum - sx.softmax(-1) >= top_p  # keep the smallest prefix whose mass reaches top_p
        x = x.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return x


def sample(x: Tensor, greedy: bool, generator: Optional[torch.Generator]) -> Tensor:
    if greedy:
        return x.argmax(-1)
    return torch.multinomial(x.softmax(-1), 1, generator=generator)[:, 0]


class _GraphStep:
    """CUDA-graph replay of ``model.step`` on fixed input / cache buffers."""

    def __init__(self, model, cache: InferenceCache, tok: Tensor):
        if tok.device.type != "cuda":
            raise ValueError("use_cuda_graph=True needs the model on a CUDA device "
                             f"(model is on {tok.device}); use use_cuda_graph=False on CPU")
        self.tok = tok.clone()
        backup = cache.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up (autotuning, allocator) outside the graph
                model.step(self.tok, cache)
        torch.cuda.current_stream().wait_stream(side)
        cache.copy_(backup)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.logits = model.step(self.tok, cache)
        except RuntimeError as e:
            cache.copy_(backup)
            raise RuntimeError("use_cuda_graph: the decode step could not be captured (a layer reads device "
                               "values on the host during step, e.g. a KV cache checking its length); "
                               f"use use_cuda_graph=False. Cause: {e}") from e
        cache.copy_(backup)  # capture does not run kernels, but keep the state exact regardless

    def __call__(self, tok: Tensor) -> Tensor:
        self.tok.copy_(tok)
        self.graph.replay()
        return self.logits


@torch.no_grad()
def generate(model, input_ids: Union[Tensor, list], max_new_tokens: int = 32, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, repetition_penalty: float = 1.0,
             eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None, streamer=None,
             callback: Optional[Callable] = None, seed: Optional[int] = None,
             attention_mask: Optional[Tensor] = None, prompt_lengths: Optional[Sequence[int]] = None,
             use_cuda_graph: bool = False, prefill_mode: str = "varlen", cache_dtype=None, state_dtype=None,
             output_scores: bool = False, prefix_cache=None) -> GenerationOutput:
    """Generate up to ``max_new_tokens`` per prompt.

    input_ids: [B, T] (equal prompts), [B, T] with ``attention_mask`` / ``prompt_lengths``, or a
        list of 1-D sequences of any lengths.
    temperature 0 (or top_k=1) is greedy. repetition_penalty > 1 discourages tokens already in
        the prompt or output. seed: a private torch.Generator (reproducible, global RNG untouched).
    streamer: object with ``put(tokens [B])`` and ``end()`` (transformers' streamer protocol);
        callback(step, tokens [B]) -> True stops early. Rows stop at ``eos_token_id``.
    prefill_mode: "varlen" (pack prompts with cu_seqlens) or "per_row" (one prompt at a time).
    prefix_cache: a ``mamba3.models.prefix_cache.PrefixCache``: prompts sharing a block-aligned
        prefix with an earlier request restore its snapshot and prefill only the rest (row by row).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    if use_cuda_graph and model.device.type != "cuda":
        raise ValueError(f"use_cuda_graph=True needs the model on a CUDA device (model is on {model.device}); "
                         "use use_cuda_graph=False on CPU")
    prompts = split_prompts(input_ids, attention_mask, prompt_lengths)
    dev, B, V = model.device, len(prompts), model.config.vocab_size
    max_seqlen = max(p.numel() for p in prompts) + max_new_tokens
    cache = model.allocate_inference_cache(B, max_seqlen, dtype=cache_dtype, state_dtype=state_dtype)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=dev)
        generator.manual_seed(seed)
    greedy = temperature == 0 or top_k == 1
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(B, V, dtype=torch.bool, device=dev)
        for i, p in enumerate(prompts):
            seen[i, p.to(dev).clamp(0, V - 1)] = True
    pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    tokens = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=dev)
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    num = torch.zeros(B, dtype=torch.long, device=dev)
    scores = [] if output_scores else None

    was_training = model.training
    model.eval()
    try:
        if prefix_cache is None:
            logits = prefill(model, prompts, cache, prefill_mode)
        else:
            from .prefix_cache import prefill_with_prefix_cache
            logits = prefill_with_prefix_cache(model, prompts, cache, prefix_cache)
        step_fn = None
        for t in range(max_new_tokens):
            x = process_logits(logits, temperature, top_k, top_p, repetition_penalty, seen)
            if scores is not None:
                scores.append(x)
            tok = sample(x, greedy, generator)
            tok = torch.where(finished, torch.full_like(tok, pad), tok)
            tokens[:, t] = tok
            num += (~finished).long()
            if seen is not None:
                seen[torch.arange(B, device=dev), tok.clamp(0, V - 1)] |= ~finished
            if streamer is not None:
                streamer.put(tok.cpu())
            if eos_token_id is not None:
                finished |= tok == eos_token_id
            stop = callback(t, tok) if callback is not None else False
            if t == max_new_tokens - 1 or stop or (eos_token_id is not None and bool(finished.all())):
                tokens = tokens[:, : t + 1]
                break
            if use_cuda_graph:
                step_fn = step_fn or _GraphStep(model, cache, tok)
                logits = step_fn(tok)
            else:
                logits = model.step(tok, cache)
    finally:
        model.train(was_training)
        if streamer is not None:
            streamer.end()
    return GenerationOutput(tokens=tokens, num_generated=num, prompts=prompts, scores=scores)
