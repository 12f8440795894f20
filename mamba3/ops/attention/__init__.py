"""Causal softmax attention (MHA / GQA, sliding window, KV-cache masks) and rotary embedding."""
from .interface import attention
from .reference import attention_reference, visible_mask
from .rope import apply_rope
from .sdpa import attention_sdpa

__all__ = ["attention", "attention_reference", "attention_sdpa", "apply_rope", "visible_mask"]
