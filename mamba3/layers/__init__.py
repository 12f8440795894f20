"""nn.Modules sharing one protocol: forward(x, cache=None, cu_seqlens=None) / step(x, cache) /
allocate_inference_cache(batch_size, max_seqlen, device=, dtype=)."""
from .attention import Attention, AttentionCache
from .cache import LayerCache
from .gated_deltanet import GatedDeltaNet, GatedDeltaNetCache
from .mamba1 import Mamba1, Mamba1Cache
from .mamba2 import Mamba2, Mamba2Cache
from .mamba3 import Mamba3, Mamba3Cache
from .mlp import GatedMLP
from .norm import RMSNorm, RMSNormGated
from .s4d import S4D, S4DCache

__all__ = ["Attention", "AttentionCache", "GatedDeltaNet", "GatedDeltaNetCache", "S4D", "S4DCache", "Mamba1", "Mamba1Cache", "Mamba2", "Mamba2Cache", "LayerCache", "GatedMLP", "Mamba3", "Mamba3Cache", "RMSNorm", "RMSNormGated"]
