"""Language models: configs and presets, pure / hybrid stacks, inference cache, generation,
checkpoints (safetensors), tokenizers and the optional transformers wrapper (``models.hf``)."""
from .cache import InferenceCache
from .checkpoint import CheckpointError
from .config import MIXERS, PATTERN_LETTERS, PRESETS, ModelConfig, register_mixer, resolve_mixer
from .generation import GenerationOutput, generate
from .lm import LanguageModel, LMOutput, lm_loss
from .tokenizer import ByteTokenizer, load_tokenizer

__all__ = ["ByteTokenizer", "CheckpointError", "GenerationOutput", "InferenceCache", "LMOutput", "LanguageModel",
           "MIXERS", "ModelConfig", "PATTERN_LETTERS", "PRESETS", "generate", "lm_loss", "load_tokenizer",
           "register_mixer", "resolve_mixer"]
