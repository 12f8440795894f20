"""Decoding memory is constant in the generated length for SSM stacks (CPU, RSS)."""
import gc
import os
import time

import pytest
import torch

from mamba3.models import LanguageModel, ModelConfig
from mamba3.models.generation import generate


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("n_tokens", [
    5_000,
    # ~1 min on one CPU core; the 5k case covers the same code in the default run.
    pytest.param(20_000, marks=pytest.mark.slow),
])
def test_rss_constant_over_long_decode(n_tokens):
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layer=1, vocab_size=257, d_intermediate=0,
                      mixer_cfg={"mamba3": {"d_state": 8, "headdim": 16}})
    model = LanguageModel(cfg).eval()
    marks = {}

    def probe(step, tok):
        if step in (1_000, n_tokens - 1):
            gc.collect()
            marks[step] = _rss_bytes()

    generate(model, [torch.tensor([1, 2, 3])], 200, seed=0)  # warm up allocator / kernels
    t0 = time.perf_counter()
    out = generate(model, [torch.tensor([1, 2, 3])], n_tokens, seed=0, callback=probe)
    dt = time.perf_counter() - t0
    assert out.tokens.shape == (1, n_tokens)
    a, b = marks[1_000], marks[n_tokens - 1]
    print(f"{n_tokens} tokens in {dt:.1f}s; RSS {a / 2**20:.1f} -> {b / 2**20:.1f} MiB")
    assert b - a < 2 * 2**20, f"RSS grew by {(b - a) / 2**20:.2f} MiB over {n_tokens - 1_000} decode steps"
