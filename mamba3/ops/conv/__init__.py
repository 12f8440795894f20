"""Depthwise causal 1-D convolution with a carried state (Mamba-1/2's short conv)."""
from .causal_conv import causal_conv1d, causal_conv1d_step

__all__ = ["causal_conv1d", "causal_conv1d_step"]
