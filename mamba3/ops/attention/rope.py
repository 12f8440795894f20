"""Rotary position embedding (RoPE) for the attention layer."""
from __future__ import annotations

import torch
from torch import Tensor


def apply_rope(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """Rotary embedding, non-interleaved halves (Llama / GPT-NeoX style).

    x: [B, T, H, D] (D even); positions: [T] or [B, T] integer (or float) positions.
    Channel i < D/2 pairs with i + D/2 and rotates by position * base ** (-2i / D).
    Computed in float32 (float64 for float64 x), returned in x's dtype.
    """
    D = x.shape[-1]
    if D % 2 != 0:
        raise ValueError(f"apply_rope needs an even head dim, got D={D}")
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv = base ** (-torch.arange(0, D // 2, device=x.device, dtype=wide) * 2 / D)
    ang = positions.to(device=x.device, dtype=wide)[..., None] * inv           # [(B,) T, D/2]
    if ang.dim() == 2:
        ang = ang.unsqueeze(0)
    cos, sin = ang.cos()[:, :, None, :], ang.sin()[:, :, None, :]              # [B|1, T, 1, D/2]
    x1, x2 = x.to(wide).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
