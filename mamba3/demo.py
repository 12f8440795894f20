"""CPU demo: a small stack of Mamba-3 layers on random tokens, then a 200-step decode.

Run: python -m mamba3.demo
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn

from .layers import Mamba3, RMSNorm


class _TinyStack(nn.Module):
    def __init__(self, vocab=256, d_model=128, n_layer=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d_model)
        self.norms = nn.ModuleList(RMSNorm(d_model) for _ in range(n_layer))
        self.layers = nn.ModuleList(Mamba3(d_model, d_state=32, headdim=32, layer_idx=i) for i in range(n_layer))
        self.norm_f = RMSNorm(d_model)

    def forward(self, ids, caches=None):
        h = self.emb(ids)
        for i, (n, m) in enumerate(zip(self.norms, self.layers)):
            h = h + m(n(h), cache=None if caches is None else caches[i])
        return self.norm_f(h) @ self.emb.weight.T

    def step(self, ids, caches):
        h = self.emb(ids)
        for i, (n, m) in enumerate(zip(self.norms, self.layers)):
            h = h + m.step(n(h), caches[i])
        return self.norm_f(h) @ self.emb.weight.T


def main() -> None:
    torch.manual_seed(0)
    model = _TinyStack().eval()
    ids = torch.randint(0, 256, (2, 512))
    with torch.no_grad():
        t0 = time.perf_counter()
        logits = model(ids)
        t1 = time.perf_counter()
        print(f"forward: input {tuple(ids.shape)} -> logits {tuple(logits.shape)} in {t1 - t0:.3f}s "
              f"({ids.numel() / (t1 - t0):,.0f} tok/s)")
        caches = [m.allocate_inference_cache(2) for m in model.layers]
        model(ids[:, :64], caches=caches)
        tok = ids[:, 64]
        t0 = time.perf_counter()
        for _ in range(200):
            tok = model.step(tok, caches).argmax(-1)
        t1 = time.perf_counter()
        state = sum(c.nbytes() for c in caches)
        print(f"decode: 200 steps x batch 2 in {t1 - t0:.3f}s ({(t1 - t0) / 200 * 1e3:.2f} ms/step), "
              f"state {state / 1024:.1f} KiB per batch (constant in length)")


if __name__ == "__main__":
    main()
