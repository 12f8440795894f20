"""SwiGLU MLP (the official ``mamba_ssm.modules.mlp.GatedMLP``: names fc1 / fc2, no biases)."""
from __future__ import annotations

from typing import Optional

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class GatedMLP(nn.Module):
    """y = fc2(silu(gate) * x) with [x | gate] = fc1(u).

    fc1: d_model -> 2 * hidden (first half is the value x, second half the gate, as upstream);
    fc2: hidden -> d_model. ``hidden`` defaults to 8/3 * d_model rounded up to ``multiple_of``.
    Input / output [..., d_model].
    """

    def __init__(self, d_model: int, hidden: Optional[int] = None, bias: bool = False, multiple_of: int = 128,
                 device=None, dtype=None):
        super().__init__()
        if hidden is None:
            hidden = (int(8 * d_model / 3) + multiple_of - 1) // multiple_of * multiple_of
        if not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden must be a positive int, got {hidden!r}")
        self.d_model, self.hidden = d_model, hidden
        self.fc1 = nn.Linear(d_model, 2 * hidden, bias=bias, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, d_model, bias=bias, device=device, dtype=dtype)

    def forward(self, u: Tensor) -> Tensor:
        x, gate = self.fc1(u).chunk(2, dim=-1)
        return self.fc2(x * F.silu(gate))
