"""Optional transformers integration: ``AutoModelForCausalLM.from_pretrained(dir)`` on a directory
written by ``LanguageModel.save_pretrained`` (its config.json carries ``model_type``), then
``.generate`` through transformers' GenerationMixin with this library's fixed-size cache.

Importing this module registers the classes with AutoConfig / AutoModelForCausalLM; it needs
``transformers`` (extra ``hf``) and raises ImportError with that hint otherwise. Parameter names are
the same as ``LanguageModel``'s (backbone.*, lm_head.weight), so one checkpoint serves both.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn as nn

try:
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
    from transformers.utils import ModelOutput
    try:
        from transformers import PretrainedConfig
    except ImportError:  # renamed in newer releases
        from transformers import PreTrainedConfig as PretrainedConfig
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("mamba3.models.hf needs transformers: pip install 'mamba3[hf]'") from e

from .cache import InferenceCache
from .config import ModelConfig
from .generation import prefill, split_prompts
from .lm import Backbone, LanguageModel

MODEL_TYPE = "mamba3_lm"
_FIELDS = [f.name for f in dataclasses.fields(ModelConfig)]


class Mamba3LMConfig(PretrainedConfig):
    """transformers view of ``ModelConfig`` (same field names, flat)."""

    model_type = MODEL_TYPE
    # generic names transformers reads in places (generation, resizing)
    attribute_map = {"hidden_size": "d_model", "num_hidden_layers": "n_layer"}

    def __init__(self, **kwargs):
        base = ModelConfig().to_dict()
        ours = {k: kwargs.pop(k) for k in list(kwargs) if k in base}
        cfg = ModelConfig.from_dict({**base, **ours})  # validates
        for k, v in cfg.to_dict().items():
            setattr(self, k, v)
        kwargs.setdefault("tie_word_embeddings", cfg.tie_embeddings)
        super().__init__(**kwargs)

    def to_model_config(self) -> ModelConfig:
        return ModelConfig.from_dict({k: getattr(self, k) for k in _FIELDS})


@dataclasses.dataclass
class Mamba3CausalLMOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    cache_params: Optional[object] = None


class Mamba3ForCausalLM(PreTrainedModel, GenerationMixin):
    """transformers wrapper with the exact module tree of ``LanguageModel``."""

    config_class = Mamba3LMConfig
    base_model_prefix = "backbone"
    main_input_name = "input_ids"
    _is_stateful = True
    _supports_cache_class = False
    _no_split_modules = ["Block"]

    def __init__(self, config: Mamba3LMConfig):
        super().__init__(config)
        self.m3_config = config.to_model_config()
        self.backbone = Backbone(self.m3_config)
        self.lm_head = nn.Linear(self.m3_config.d_model, self.m3_config.padded_vocab_size, bias=False)
        if self.m3_config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight
        self._m3_extra_len = 2048
        self.post_init()

    # tying: transformers >= 5 wants a {target: source} dict, 4.x a list of tied keys
    _tied_weights_keys = ({"lm_head.weight": "backbone.embedding.weight"}
                          if int(transformers.__version__.split(".")[0]) >= 5 else ["lm_head.weight"])

    def _init_weights(self, module):
        """No-op: the mixers initialise themselves at construction; checkpoints supply the rest
        (use ``from_language_model`` for a freshly initialised model with the SPEC init)."""

    def get_input_embeddings(self):
        return self.backbone.embedding

    def set_input_embeddings(self, value):
        self.backbone.embedding = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    # The LanguageModel methods only touch backbone / lm_head / config: reuse them on this tree.
    def _lm_view(self) -> LanguageModel:
        view = LanguageModel.__new__(LanguageModel)
        nn.Module.__init__(view)
        view.config = self.m3_config
        view.backbone, view.lm_head = self.backbone, self.lm_head
        return view

    @classmethod
    def from_language_model(cls, model: LanguageModel) -> "Mamba3ForCausalLM":
        hf = cls(Mamba3LMConfig(**model.config.to_dict()))
        hf.load_state_dict(model.state_dict(), strict=False)
        return hf

    def generate(self, *args, **kwargs):
        # The attention KV cache is preallocated: remember how many tokens will be added.
        gc = kwargs.get("generation_config") or self.generation_config
        self._m3_extra_len = kwargs.get("max_new_tokens") or getattr(gc, "max_new_tokens", None) or \
            getattr(gc, "max_length", None) or 2048
        return super().generate(*args, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, cache_params=None, use_cache=True,
                                      **kwargs):
        if not isinstance(cache_params, InferenceCache):
            cache_params = None  # transformers may hand in its own (empty) cache object
        if cache_params is not None:
            return {"input_ids": input_ids[:, -1:], "cache_params": cache_params, "use_cache": True}
        return {"input_ids": input_ids, "attention_mask": attention_mask, "cache_params": None,
                "use_cache": use_cache}

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        model_kwargs["cache_params"] = outputs.cache_params
        return model_kwargs

    def forward(self, input_ids=None, attention_mask=None, labels=None, cache_params=None, use_cache=None,
                return_dict=None, **kwargs):
        """Training / scoring: full logits (and loss with labels). Generation: with ``use_cache``
        the first call prefills an InferenceCache (padding from ``attention_mask`` never enters the
        state) and returns last-position logits [B, 1, V]; later calls decode one token each."""
        lm = self._lm_view()
        if not isinstance(cache_params, InferenceCache):
            cache_params = None
        if cache_params is not None:
            logits = lm.step(input_ids[:, -1], cache_params)[:, None]
            return Mamba3CausalLMOutput(logits=logits, cache_params=cache_params)
        if use_cache and labels is None:
            prompts = split_prompts(input_ids, attention_mask)
            T = max(p.numel() for p in prompts)
            cache = lm.allocate_inference_cache(len(prompts), T + int(self._m3_extra_len) + 1)
            logits = prefill(lm, prompts, cache)[:, None]
            return Mamba3CausalLMOutput(logits=logits, cache_params=cache)
        out = lm(input_ids, labels=labels)
        return Mamba3CausalLMOutput(loss=out.loss, logits=out.logits)


def register() -> None:
    """Register with AutoConfig / AutoModelForCausalLM (idempotent)."""
    try:
        AutoConfig.register(MODEL_TYPE, Mamba3LMConfig)
    except ValueError:
        pass
    try:
        AutoModelForCausalLM.register(Mamba3LMConfig, Mamba3ForCausalLM)
    except ValueError:
        pass


register()

__all__ = ["Mamba3LMConfig", "Mamba3ForCausalLM", "Mamba3CausalLMOutput", "MODEL_TYPE", "register"]
