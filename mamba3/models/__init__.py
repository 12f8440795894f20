"""Language models: configs and presets, pure / hybrid stacks, inference cache, generation,
checkpoints (safetensors), tokenizers and the optional transformers wrapper."""
from .cache import InferenceCache
from .config import MIXERS, PATTERN_LETTERS, PRESETS, ModelConfig, register_mixer, resolve_mixer
from .lm import LanguageModel, LMOutput, lm_loss

__all__ = ["InferenceCache", "LMOutput", "LanguageModel", "MIXERS", "ModelConfig", "PATTERN_LETTERS", "PRESETS",
           "lm_loss", "register_mixer", "resolve_mixer"]
