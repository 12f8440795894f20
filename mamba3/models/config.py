"""Language-model configuration: one JSON-serialisable dataclass, a mixer registry and presets.

Mixers are imported lazily by name (``MIXERS``: name -> "module:Class") so a config can name a
mixer whose module is optional or not yet installed; only building the model imports it.
A layer pattern is a string of letters (``PATTERN_LETTERS``), repeated / truncated to n_layer,
or an explicit list of mixer names.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
from typing import Any, Optional, Union

MIXERS: dict[str, str] = {
    "mamba3": "mamba3.layers.mamba3:Mamba3",
    "mamba2": "mamba3.layers.mamba2:Mamba2",
    "mamba1": "mamba3.layers.mamba1:Mamba1",
    "gdn": "mamba3.layers.gated_deltanet:GatedDeltaNet",
    "attention": "mamba3.layers.attention:Attention",
    "s4d": "mamba3.layers.s4d:S4D",
}
PATTERN_LETTERS: dict[str, str] = {"M": "mamba3", "A": "attention", "2": "mamba2", "1": "mamba1",
                                   "G": "gdn", "S": "s4d"}


def register_mixer(name: str, target: str, letter: Optional[str] = None) -> None:
    """Add a mixer: ``target`` is "package.module:ClassName"; ``letter`` makes it usable in patterns."""
    if ":" not in target:
        raise ValueError(f"target must look like 'package.module:ClassName', got {target!r}")
    MIXERS[name] = target
    if letter is not None:
        PATTERN_LETTERS[letter] = name


def resolve_mixer(name: str):
    """Import and return the mixer class registered as ``name``."""
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; registered: {sorted(MIXERS)}")
    module, cls = MIXERS[name].split(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"mixer {name!r} needs module {module!r}, which failed to import: {e}") from e
    return getattr(mod, cls)


@dataclasses.dataclass
class ModelConfig:
    """Configuration of ``LanguageModel``.

    d_intermediate: SwiGLU hidden width per block (0 = mixer-only blocks).
    layer_pattern: None (every layer is ``mixer``), a letter string such as "MMMMMA" (repeated /
        truncated to n_layer; letters in ``PATTERN_LETTERS``) or a list of n_layer mixer names.
    mixer_cfg: mixer name -> extra constructor kwargs for that mixer.
    """

    d_model: int = 128
    n_layer: int = 4
    vocab_size: int = 257
    d_intermediate: int = 0
    layer_pattern: Optional[Union[str, list]] = None
    mixer: str = "mamba3"
    mixer_cfg: dict = dataclasses.field(default_factory=dict)
    tie_embeddings: bool = True
    pad_vocab_size_multiple: int = 16
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    initializer_range: float = 0.02

    def __post_init__(self):
        for name in ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple"):
            _check_int(name, getattr(self, name), 1)
        _check_int("d_intermediate", self.d_intermediate, 0)
        for name in ("tie_embeddings", "residual_in_fp32"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("norm_eps", "initializer_range"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if self.mixer not in MIXERS:
            raise ValueError(f"mixer: unknown mixer {self.mixer!r}; registered: {sorted(MIXERS)}")
        if not isinstance(self.mixer_cfg, dict):
            raise ValueError(f"mixer_cfg must be a dict of mixer name -> kwargs, got {type(self.mixer_cfg).__name__}")
        for k, v in self.mixer_cfg.items():
            if k not in MIXERS:
                raise ValueError(f"mixer_cfg: unknown mixer {k!r}; registered: {sorted(MIXERS)}")
            if not isinstance(v, dict):
                raise ValueError(f"mixer_cfg[{k!r}] must be a dict of constructor kwargs, got {v!r}")
        try:
            json.dumps(self.mixer_cfg)
        except TypeError as e:
            raise ValueError(f"mixer_cfg must be JSON-serialisable: {e}") from e
        if isinstance(self.layer_pattern, tuple):
            self.layer_pattern = list(self.layer_pattern)
        self.layer_mixers()  # validates layer_pattern

    # ------------------------------------------------------------------------------------------
    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    def layer_mixers(self) -> list[str]:
        """Mixer name of each layer (length n_layer)."""
        p = self.layer_pattern
        if p is None:
            return [self.mixer] * self.n_layer
        if isinstance(p, str):
            if not p:
                raise ValueError("layer_pattern must not be empty (use None for all-`mixer`)")
            bad = sorted(set(c for c in p if c not in PATTERN_LETTERS))
            if bad:
                raise ValueError(f"layer_pattern: unknown letters {bad}; known: {PATTERN_LETTERS}")
            return [PATTERN_LETTERS[p[i % len(p)]] for i in range(self.n_layer)]
        if isinstance(p, list):
            if len(p) != self.n_layer:
                raise ValueError(f"layer_pattern list has {len(p)} entries but n_layer = {self.n_layer}")
            for i, name in enumerate(p):
                if name not in MIXERS:
                    raise ValueError(f"layer_pattern[{i}]: unknown mixer {name!r}; registered: {sorted(MIXERS)}")
            return list(p)
        raise ValueError(f"layer_pattern must be None, a letter string or a list of mixer names, got {p!r}")

    def mixer_kwargs(self, name: str) -> dict:
        return dict(self.mixer_cfg.get(name, {}))

    # ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ValueError(f"config must be a dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known: {sorted(names)}")
        return cls(**d)

    def to_json(self, path: Optional[str] = None, indent: int = 2) -> str:
        s = json.dumps(self.to_dict(), indent=indent, sort_keys=True)
        if path is not None:
            with open(path, "w") as f:
                f.write(s + "\n")
        return s

    @classmethod
    def from_json(cls, s_or_path: str) -> "ModelConfig":
        """Parse a JSON string, or read a file when given a path."""
        text = s_or_path
        if not s_or_path.lstrip().startswith("{"):
            with open(s_or_path) as f:
                text = f.read()
        return cls.from_dict(json.loads(text))

    def replace(self, **overrides) -> "ModelConfig":
        return self.from_dict({**self.to_dict(), **overrides})

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        """A named preset (``PRESETS``), optionally with fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


def _check_int(name: str, v, lo: int) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")


# ---------------------------------------------------------------------------------------------
# Presets. The paper's nominal sizes (180M/440M/880M/1.5B) are reproduced with tied embeddings
# only with the paper's tokenizer, Llama-3.1 (vocab 128,256; SPEC section 7): with GPT-NeoX's
# 50,280 the same stacks would have 126M/363M/?/1.34B parameters. So the paper presets use
# vocab 128256 (padded to 16 = itself); pass vocab_size=50280 (GPT-NeoX-20B BPE, the library's
# default real tokenizer, DATA.md section 2) to from_preset to train with that tokenizer instead.
PAPER_VOCAB = 128256
NEOX_VOCAB = 50280

# size: (d_model, n_layer, MLP SISO, MLP MIMO R=4) — SPEC section 7 (1.5B confirmed, others inferred).
_SIZES = {"180m": (768, 12, 1500, 1264), "440m": (1024, 24, 2048, 1792),
          "880m": (1536, 24, 3072, 2800), "1.5b": (2048, 24, 4096, 3824)}
# Baseline MLP widths chosen so parameter counts match the Mamba-3 SISO preset of the same size
# (tests/models/test_presets.py checks within 5%): Mamba-2 has no 3H+Sa in_proj columns and no
# B/C biases but a conv; GDN (qk head dim 128, v head dim 256, d_model/128 heads) is wider than
# Mamba-3; MHA (head dim 64) is 4 d^2 against Mamba-3's ~6 d^2.
_BASELINE_MLP = {
    "180m": {"mamba2": 1528, "gdn": 1104, "transformer": 2136},
    "440m": {"mamba2": 2080, "gdn": 1488, "transformer": 2864},
    "880m": {"mamba2": 3112, "gdn": 2184, "transformer": 4240},
    "1.5b": {"mamba2": 4144, "gdn": 2880, "transformer": 5624},
}
_MAMBA = {"d_state": 128, "headdim": 64, "expand": 2}


def _paper_presets() -> dict[str, dict]:
    out = {}
    for size, (d, n, mlp, mlp_mimo) in _SIZES.items():
        base = dict(d_model=d, n_layer=n, vocab_size=PAPER_VOCAB)
        out[f"mamba3-{size}"] = dict(base, d_intermediate=mlp, mixer="mamba3", mixer_cfg={"mamba3": dict(_MAMBA)})
        out[f"mamba3-mimo-{size}"] = dict(base, d_intermediate=mlp_mimo, mixer="mamba3", mixer_cfg={
            "mamba3": dict(_MAMBA, is_mimo=True, mimo_rank=4, chunk_size=16)})
        bl = _BASELINE_MLP[size]
        out[f"mamba2-{size}"] = dict(base, d_intermediate=bl["mamba2"], mixer="mamba2",
                                     mixer_cfg={"mamba2": dict(_MAMBA)})
        out[f"gdn-{size}"] = dict(base, d_intermediate=bl["gdn"], mixer="gdn", mixer_cfg={
            "gdn": {"num_heads": d // 128, "head_dim": 128, "expand_v": 2.0}})
        out[f"transformer-{size}"] = dict(base, d_intermediate=bl["transformer"], mixer="attention",
                                          mixer_cfg={"attention": {"num_heads": d // 64, "rope": True}})
        # 5:1 Mamba-3 : NoPE attention, outproj norm on (SPEC section 7: helps length generalisation).
        out[f"mamba3-hybrid-{size}"] = dict(base, d_intermediate=mlp, layer_pattern="MMMMMA", mixer_cfg={
            "mamba3": dict(_MAMBA, is_outproj_norm=True), "attention": {"num_heads": d // 64, "rope": False}})
    return out


PRESETS: dict[str, dict] = {
    # CPU demo / tests: byte-level vocab (256 bytes + eos id 256), small state.
    "tiny": dict(d_model=128, n_layer=4, vocab_size=257, d_intermediate=256, mixer="mamba3",
                 mixer_cfg={"mamba3": {"d_state": 32, "headdim": 32, "expand": 2, "chunk_size": 16}}),
    "tiny-hybrid": dict(d_model=128, n_layer=4, vocab_size=257, d_intermediate=256, layer_pattern="MMMA",
                        mixer_cfg={"mamba3": {"d_state": 32, "headdim": 32, "expand": 2, "chunk_size": 16},
                                   "attention": {"num_heads": 4, "rope": False}}),
    **_paper_presets(),
}

# Nominal sizes (parameters) the paper-size presets are checked against.
NOMINAL_PARAMS = {"180m": 180e6, "440m": 440e6, "880m": 880e6, "1.5b": 1.5e9}
