"""Official ``mamba_ssm`` checkpoints (MambaLMHeadModel) -> this library.

The official config (``MambaConfig``: d_model, d_intermediate, n_layer, vocab_size, ssm_cfg with
``layer`` = "Mamba1" | "Mamba2" | "Mamba3", attn_layer_idx, attn_cfg, rms_norm, residual_in_fp32,
fused_add_norm, pad_vocab_size_multiple, tie_embeddings) maps onto ``ModelConfig``; parameter
names are the same by design, so the state dict needs no renaming except for attention layers
whose layout differs (``attention_key_map``).

Command line: ``python -m mamba3.models.convert SRC_DIR DST_DIR`` reads SRC_DIR/config.json and
SRC_DIR/model.safetensors (or pytorch_model.bin through ``torch.load(weights_only=True)``, which
refuses arbitrary pickled objects) and writes config.json + model.safetensors.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import Tensor

from .config import ModelConfig

_LAYER_NAMES = {"Mamba1": "mamba1", "Mamba2": "mamba2", "Mamba3": "mamba3"}
# Official config keys with no effect on this implementation.
_IGNORED = {"fused_add_norm", "model_type", "architectures", "torch_dtype", "transformers_version"}


def config_from_official(d: dict) -> ModelConfig:
    """Official MambaConfig dict -> ModelConfig. Raises ValueError on features not supported."""
    d = dict(d)
    for k in _IGNORED:
        d.pop(k, None)
    if not d.pop("rms_norm", True):
        raise ValueError("rms_norm=False (LayerNorm) official models are not supported")
    ssm_cfg = dict(d.pop("ssm_cfg", {}) or {})
    layer = ssm_cfg.pop("layer", "Mamba1")
    if layer not in _LAYER_NAMES:
        raise ValueError(f"ssm_cfg.layer must be one of {sorted(_LAYER_NAMES)}, got {layer!r}")
    mixer = _LAYER_NAMES[layer]
    attn_idx = list(d.pop("attn_layer_idx", []) or [])
    attn_cfg = dict(d.pop("attn_cfg", {}) or {})
    n_layer = d["n_layer"]
    mixer_cfg = {mixer: ssm_cfg}
    pattern = None
    if attn_idx:
        pattern = ["attention" if i in attn_idx else mixer for i in range(n_layer)]
        a = {"num_heads": attn_cfg.pop("num_heads")}
        if attn_cfg.get("num_heads_kv") is not None:
            a["num_kv_heads"] = attn_cfg.pop("num_heads_kv")
        if attn_cfg.get("head_dim") is not None:
            a["head_dim"] = attn_cfg.pop("head_dim")
        a["rope"] = bool(attn_cfg.pop("rotary_emb_dim", 0))
        mixer_cfg["attention"] = a
    return ModelConfig(d_model=d.pop("d_model"), n_layer=d.pop("n_layer"), vocab_size=d.pop("vocab_size"),
                       d_intermediate=d.pop("d_intermediate", 0), layer_pattern=pattern, mixer=mixer,
                       mixer_cfg=mixer_cfg, tie_embeddings=d.pop("tie_embeddings", True),
                       pad_vocab_size_multiple=d.pop("pad_vocab_size_multiple", 8),
                       residual_in_fp32=d.pop("residual_in_fp32", True))


def config_to_official(config: ModelConfig) -> dict:
    """ModelConfig -> official MambaConfig dict (pure or attention-hybrid Mamba stacks only)."""
    mixers = config.layer_mixers()
    ssm = sorted(set(m for m in mixers if m != "attention"))
    if len(ssm) != 1 or ssm[0] not in _LAYER_NAMES.values():
        raise ValueError(f"only one Mamba mixer (plus attention) maps to the official format, got {ssm}")
    layer = {v: k for k, v in _LAYER_NAMES.items()}[ssm[0]]
    out = dict(d_model=config.d_model, d_intermediate=config.d_intermediate, n_layer=config.n_layer,
               vocab_size=config.vocab_size, ssm_cfg={"layer": layer, **config.mixer_kwargs(ssm[0])},
               attn_layer_idx=[i for i, m in enumerate(mixers) if m == "attention"], attn_cfg={},
               rms_norm=True, residual_in_fp32=config.residual_in_fp32, fused_add_norm=True,
               pad_vocab_size_multiple=config.pad_vocab_size_multiple, tie_embeddings=config.tie_embeddings)
    if out["attn_layer_idx"]:
        a = config.mixer_kwargs("attention")
        out["attn_cfg"] = {"num_heads": a.get("num_heads", max(1, config.d_model // 64)),
                           "num_heads_kv": a.get("num_kv_heads"), "head_dim": a.get("head_dim"),
                           "causal": True, "rotary_emb_dim": 0 if not a.get("rope", True) else a.get("head_dim") or
                           config.d_model // a.get("num_heads", max(1, config.d_model // 64))}
    return out


def attention_key_map(sd: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Rename official MHA parameters (mixer.in_proj = fused [q; k; v], mixer.out_proj) to this
    library's attention layer when its names differ (its own state dict is the target)."""
    from .lm import LanguageModel
    mixers = config.layer_mixers()
    if "attention" not in mixers:
        return sd
    target = LanguageModel(config, device="meta", init_weights=False).state_dict()
    out = dict(sd)
    for i, m in enumerate(mixers):
        if m != "attention":
            continue
        pre = f"backbone.layers.{i}.mixer."
        if pre + "in_proj.weight" in out and pre + "in_proj.weight" not in target and pre + "q_proj.weight" in target:
            w = out.pop(pre + "in_proj.weight")
            sizes = [target[pre + f"{n}_proj.weight"].shape[0] for n in "qkv"]
            for n, part in zip("qkv", torch.split(w, sizes, dim=0)):
                out[pre + f"{n}_proj.weight"] = part
            b = out.pop(pre + "in_proj.bias", None)
            if b is not None:
                for n, part in zip("qkv", torch.split(b, sizes, dim=0)):
                    out[pre + f"{n}_proj.bias"] = part
        if pre + "out_proj.weight" in out and pre + "out_proj.weight" not in target and pre + "o_proj.weight" in target:
            out[pre + "o_proj.weight"] = out.pop(pre + "out_proj.weight")
    return out


def state_dict_from_official(sd: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    return attention_key_map(sd, config)


def load_official_weights(src: Path) -> dict[str, Tensor]:
    from .checkpoint import read_safetensors
    if (src / "model.safetensors").exists():
        return read_safetensors(src / "model.safetensors")
    binf = src / "pytorch_model.bin"
    if binf.exists():
        return torch.load(binf, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{src}: neither model.safetensors nor pytorch_model.bin found")


def convert_official(src, dst, dtype=None):
    """Official checkpoint directory -> this library's format; returns the LanguageModel."""
    from .checkpoint import load_state_dict_checked
    from .lm import LanguageModel
    src = Path(src)
    with open(src / "config.json") as f:
        config = config_from_official(json.load(f))
    sd = state_dict_from_official(load_official_weights(src), config)
    model = LanguageModel(config, dtype=dtype, init_weights=False)
    load_state_dict_checked(model, sd, source=str(src))
    model.save_pretrained(dst)
    return model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Convert an official mamba_ssm checkpoint directory.")
    ap.add_argument("src")
    ap.add_argument("dst")
    args = ap.parse_args(argv)
    model = convert_official(args.src, args.dst)
    print(f"wrote {args.dst} ({model.num_parameters():,} parameters)")


if __name__ == "__main__":
    main()
