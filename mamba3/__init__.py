"""mamba3: the Mamba-3 state space model (and its family) in PyTorch + Triton.

Importing this package never requires triton or a GPU; kernels are picked at call time.
"""
from .layers import Mamba3, Mamba3Cache
from .layers import Mamba1, Mamba2
from .models import LanguageModel, ModelConfig

__version__ = "0.1.0"
__all__ = ["LanguageModel", "Mamba1", "Mamba2", "Mamba3", "Mamba3Cache", "ModelConfig", "__version__"]
