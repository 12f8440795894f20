"""Language model: embedding -> n_layer x [pre-norm mixer + residual, pre-norm SwiGLU + residual]
-> final RMSNorm -> LM head tied to the embedding (SPEC sections 7 and 11).

Parameter names follow the official ``MambaLMHeadModel`` (backbone.embedding, backbone.layers.{i}
.{norm, mixer, norm2, mlp.fc1, mlp.fc2}, backbone.norm_f, lm_head) so its checkpoints load.
The residual stream is kept in fp32 (``residual_in_fp32``); each norm casts to the model dtype.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..layers.mlp import GatedMLP
from ..layers.norm import RMSNorm, rms_norm_cast
from .cache import InferenceCache
from .config import ModelConfig, resolve_mixer

IGNORE_INDEX = -100
# Output projections of residual branches; re-scaled at init by 1/sqrt(n_residuals * n_layer).
_RESIDUAL_OUT = ("out_proj", "o_proj", "fc2")


@dataclasses.dataclass
class LMOutput:
    """logits [B, T, vocab_size] (or [B, num_last_tokens, V]); loss: scalar mean CE or None."""

    logits: Tensor
    loss: Optional[Tensor] = None


def default_mixer_kwargs(name: str, config: ModelConfig) -> dict:
    """Constructor kwargs of a mixer from ``config.mixer_cfg`` plus the defaults it needs."""
    kw = config.mixer_kwargs(name)
    if name == "attention" and "num_heads" not in kw:
        kw["num_heads"] = max(1, config.d_model // 64)
    return kw


class Block(nn.Module):
    """Pre-norm mixer + residual, then (if ``mlp``) pre-norm SwiGLU + residual."""

    def __init__(self, mixer: nn.Module, d_model: int, d_intermediate: int, eps: float, residual_in_fp32: bool,
                 device=None, dtype=None):
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.norm = RMSNorm(d_model, eps=eps, device=device, dtype=dtype)
        self.mixer = mixer
        if d_intermediate > 0:
            self.norm2 = RMSNorm(d_model, eps=eps, device=device, dtype=dtype)
            self.mlp = GatedMLP(d_model, d_intermediate, device=device, dtype=dtype)
        else:
            self.norm2 = self.mlp = None

    def _branch_in(self, norm: RMSNorm, h: Tensor) -> Tensor:
        """The branch input in the model dtype, as plain ops (``forward`` uses :func:`_norm_in`)."""
        return norm(h).to(norm.weight.dtype)

    def forward(self, h: Tensor, cache=None, cu_seqlens: Optional[Tensor] = None) -> Tensor:
        """h: residual stream [B, T, D] (fp32 when residual_in_fp32). Casts are folded into the
        norm's scale and the residual add: each pass over [B, T, D] is a kernel of its own."""
        h = _residual_add(h, self.mixer(_norm_in(self.norm, h), cache=cache, cu_seqlens=cu_seqlens))
        if self.mlp is not None:
            h = _residual_add(h, self.mlp(_norm_in(self.norm2, h)))
        return h

    def step(self, h: Tensor, cache) -> Tensor:
        """h: [B, D] one decode token (the values of ``forward``)."""
        h = _residual_add(h, self.mixer.step(_norm_in(self.norm, h), cache))
        if self.mlp is not None:
            h = _residual_add(h, self.mlp(_norm_in(self.norm2, h)))
        return h


def _norm_in(norm: RMSNorm, h: Tensor) -> Tensor:
    """``norm(h).to(norm.weight.dtype)`` in two kernels (fused F.rms_norm, then scale and cast)."""
    return rms_norm_cast(h, norm.weight, norm.eps, norm.weight.dtype)


def _residual_add(h: Tensor, y: Tensor) -> Tensor:
    """``h + y.to(h.dtype)``, one promoting add when that is the same (e.g. fp32 + bf16)."""
    return h + y if torch.promote_types(h.dtype, y.dtype) == h.dtype else h + y.to(h.dtype)


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__()
        fk = dict(device=device, dtype=dtype)
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model, **fk)
        layers = []
        for i, name in enumerate(config.layer_mixers()):
            cls = resolve_mixer(name)
            mixer = cls(config.d_model, layer_idx=i, **default_mixer_kwargs(name, config), **fk)
            layers.append(Block(mixer, config.d_model, config.d_intermediate, config.norm_eps,
                                config.residual_in_fp32, **fk))
        self.layers = nn.ModuleList(layers)
        self.norm_f = RMSNorm(config.d_model, eps=config.norm_eps, **fk)


class LanguageModel(nn.Module):
    """Causal LM over any registered mixers (pure or hybrid stacks).

    Example:
        >>> model = LanguageModel(ModelConfig.from_preset("tiny"))
        >>> out = model(torch.randint(0, 257, (2, 16)), labels=torch.randint(0, 257, (2, 16)))
        >>> out.logits.shape, out.loss.ndim
        (torch.Size([2, 16, 257]), 0)
    """

    def __init__(self, config: ModelConfig, device=None, dtype=None, *, init_weights: bool = True):
        super().__init__()
        if isinstance(config, dict):
            config = ModelConfig.from_dict(config)
        self.config = config
        self.backbone = Backbone(config, device=device, dtype=dtype)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False, device=device, dtype=dtype)
        if init_weights:
            self.reset_parameters()
        self.tie_weights()

    # ------------------------------------------------------------------------------------------
    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """SPEC section 11: Linear and embedding weights ~ N(0, initializer_range), Linear biases 0;
        residual output projections (out_proj / o_proj / fc2) divided by sqrt(n_residuals * n_layer)
        with n_residuals = 2 when blocks have an MLP, else 1 (as upstream). Mixer-specific
        parameters (dt_bias, A, biases, conv) keep the mixer's own initialisation."""
        cfg = self.config
        std = cfg.initializer_range
        n_res = 2 if cfg.d_intermediate > 0 else 1
        nn.init.normal_(self.backbone.embedding.weight, std=std)
        for name, mod in self.named_modules():
            if isinstance(mod, nn.Linear) and mod is not self.lm_head:
                s = std / math.sqrt(n_res * cfg.n_layer) if name.split(".")[-1] in _RESIDUAL_OUT else std
                nn.init.normal_(mod.weight, std=s)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)

    @property
    def device(self) -> torch.device:
        return self.backbone.embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.embedding.weight.dtype

    # ------------------------------------------------------------------------------------------
    def _check_ids(self, input_ids: Tensor, ndim: int) -> None:
        if not isinstance(input_ids, Tensor) or input_ids.dim() != ndim or input_ids.dtype not in (
                torch.int64, torch.int32):
            want = "[B, T]" if ndim == 2 else "[B]"
            got = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
            dt = getattr(input_ids, "dtype", None)
            raise ValueError(f"input_ids must be an integer tensor {want}, got shape {got} dtype {dt}")
        # Range check on forward/prefill only (one host sync); step() skips it to keep decode sync-free.
        if ndim == 2 and input_ids.numel() and not torch.compiler.is_compiling() and not (
                input_ids.is_cuda and torch.cuda.is_current_stream_capturing()):
            lo, hi = (int(v) for v in torch.aminmax(input_ids))
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"input_ids must lie in [0, vocab_size={self.config.vocab_size}), "
                                 f"got values in [{lo}, {hi}]")

    def logits_from_hidden(self, h: Tensor) -> Tensor:
        x = _norm_in(self.backbone.norm_f, h).to(self.lm_head.weight.dtype)
        return self.lm_head(x)[..., : self.config.vocab_size]

    def hidden_states(self, input_ids: Tensor, cache: Optional[InferenceCache] = None,
                      cu_seqlens: Optional[Tensor] = None) -> Tensor:
        """Residual stream after the last block (before norm_f): [B, T, D] (fp32 if residual_in_fp32)."""
        self._check_ids(input_ids, 2)
        if cu_seqlens is not None and input_ids.shape[0] != 1:
            raise ValueError(f"with cu_seqlens input_ids must be [1, total], got {tuple(input_ids.shape)}")
        if cache is not None:
            cache.check_batch(input_ids.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1,
                              "input (number of sequences)")
        h = self.backbone.embedding(input_ids)
        if self.config.residual_in_fp32:
            h = h.float() if h.dtype != torch.float64 else h
        for i, block in enumerate(self.backbone.layers):
            h = block(h, cache=None if cache is None else cache.layers[i], cu_seqlens=cu_seqlens)
        if cache is not None:
            if cu_seqlens is None:
                cache.advance(input_ids.shape[1])
            else:
                cache.lengths.add_((cu_seqlens[1:] - cu_seqlens[:-1]).to(cache.lengths))
        return h

    def forward(self, input_ids: Tensor, labels: Optional[Tensor] = None, cache: Optional[InferenceCache] = None,
                cu_seqlens: Optional[Tensor] = None, num_last_tokens: int = 0) -> LMOutput:
        """input_ids [B, T] -> LMOutput(logits [B, T, vocab_size], loss).

        labels [B, T]: loss = mean cross-entropy of logits[:, t] against labels[:, t + 1]
        (entries -100 ignored; with ``cu_seqlens`` no target crosses a sequence boundary).
        cache: continue from / update an InferenceCache (one row per sequence; with cu_seqlens
        B = 1 and the cache has one row per packed sequence). num_last_tokens > 0: only the last
        positions' logits (prefill).
        """
        h = self.hidden_states(input_ids, cache=cache, cu_seqlens=cu_seqlens)
        if num_last_tokens > 0:
            h = h[:, -num_last_tokens:]
        logits = self.logits_from_hidden(h)
        loss = None
        if labels is not None:
            if num_last_tokens > 0:
                raise ValueError("labels cannot be combined with num_last_tokens")
            loss = lm_loss(logits, labels, cu_seqlens)
        return LMOutput(logits=logits, loss=loss)

    def step(self, input_ids: Tensor, cache: InferenceCache) -> Tensor:
        """One decode token per row: input_ids [B] (or [B, 1]) -> logits [B, vocab_size]."""
        if input_ids.dim() == 2 and input_ids.shape[1] == 1:
            input_ids = input_ids[:, 0]
        self._check_ids(input_ids, 1)
        cache.check_batch(input_ids.shape[0])
        h = self.backbone.embedding(input_ids)
        if self.config.residual_in_fp32:
            h = h.float() if h.dtype != torch.float64 else h
        for i, block in enumerate(self.backbone.layers):
            h = block.step(h, cache.layers[i])
        cache.advance(1)
        return self.logits_from_hidden(h)

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, *, dtype=None,
                                 state_dtype=None, device=None) -> InferenceCache:
        """Preallocate every layer's decode state (KV caches sized to ``max_seqlen``).

        state_dtype: SSM-state dtype for mixers that accept it (default fp32)."""
        device = self.device if device is None else device
        layers = []
        for block in self.backbone.layers:
            kw = dict(device=device, dtype=dtype)
            if state_dtype is not None:
                kw["state_dtype"] = state_dtype
            try:
                layers.append(block.mixer.allocate_inference_cache(batch_size, max_seqlen, **kw))
            except TypeError:
                if "state_dtype" not in kw:
                    raise
                kw.pop("state_dtype")  # mixer without an SSM state (e.g. attention)
                layers.append(block.mixer.allocate_inference_cache(batch_size, max_seqlen, **kw))
        lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        return InferenceCache(layers, lengths, max_seqlen)

    def generate(self, input_ids, max_new_tokens: int = 32, **kwargs):
        """See ``mamba3.models.generation.generate``."""
        from .generation import generate
        return generate(self, input_ids, max_new_tokens, **kwargs)

    # ------------------------------------------------------------------------------------------
    def num_parameters(self, by_component: bool = False, exclude_embeddings: bool = False):
        """Total parameter count (tied weights once), or a dict by component when by_component:
        embedding, lm_head (0 when tied), final_norm, norms, mlp, mixer:<name> per mixer type, total."""
        seen, parts = set(), {}

        def add(key, p):
            if id(p) in seen:
                return
            seen.add(id(p))
            parts[key] = parts.get(key, 0) + p.numel()

        add("embedding", self.backbone.embedding.weight)
        for name, block in zip(self.config.layer_mixers(), self.backbone.layers):
            for p in block.mixer.parameters():
                add(f"mixer:{name}", p)
            for p in block.norm.parameters():
                add("norms", p)
            if block.mlp is not None:
                for p in block.mlp.parameters():
                    add("mlp", p)
                for p in block.norm2.parameters():
                    add("norms", p)
        add("norms", self.backbone.norm_f.weight)
        parts.setdefault("lm_head", 0)
        add("lm_head", self.lm_head.weight)
        total = sum(parts.values())
        if exclude_embeddings:
            total -= parts["embedding"] + parts["lm_head"]
        if not by_component:
            return total
        parts["total"] = total
        return parts

    # ------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write config.json and model.safetensors (no pickle)."""
        from .checkpoint import save_pretrained
        save_pretrained(self, save_directory)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device=None, dtype=None, strict: bool = True) -> "LanguageModel":
        """Load a directory written by ``save_pretrained`` (or an official checkpoint converted by
        ``mamba3.models.convert``)."""
        from .checkpoint import load_pretrained
        return load_pretrained(path, device=device, dtype=dtype, strict=strict)


def lm_loss(logits: Tensor, labels: Tensor, cu_seqlens: Optional[Tensor] = None) -> Tensor:
    """Mean next-token cross-entropy (at least fp32): logits[:, t] vs labels[:, t + 1], -100 ignored."""
    if not isinstance(labels, Tensor) or labels.dtype not in (torch.int64, torch.int32, torch.uint8):
        raise TypeError(f"labels must be an integer tensor [B, T], got {getattr(labels, 'dtype', type(labels).__name__)}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must be [B, T] = {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
    target = labels[:, 1:].clone()
    if cu_seqlens is not None:
        starts = cu_seqlens[1:-1].long()
        starts = starts[(starts > 0) & (starts < labels.shape[1])]
        target[:, starts - 1] = IGNORE_INDEX  # the first token of a sequence has no predictor
    lg = logits[:, :-1]
    lg = lg.float() if lg.dtype in (torch.float16, torch.bfloat16) else lg
    return F.cross_entropy(lg.reshape(-1, logits.shape[-1]), target.reshape(-1),
                           ignore_index=IGNORE_INDEX)
