"""Suite-wide setup.

Without a CUDA device, Triton kernels run under the interpreter on CPU tensors. TRITON_INTERPRET
must be set before any module defining @triton.jit kernels is imported (triton.jit reads it at
decoration time), and any test may import them first, so it is set here, before collection.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
