"""Shared tiny models for tests/models (float64 so greedy argmax comparisons have no ties)."""
import pytest
import torch

from mamba3.models import LanguageModel, ModelConfig

M3 = {"d_state": 16, "headdim": 16, "expand": 2, "chunk_size": 8}


def tiny_config(pattern=None, **kw):
    base = dict(d_model=32, n_layer=3, vocab_size=61, d_intermediate=48, layer_pattern=pattern,
                initializer_range=0.3,
                mixer_cfg={"mamba3": dict(M3), "attention": {"num_heads": 2, "rope": False}})
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(pattern=None, seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    return LanguageModel(tiny_config(pattern, **kw), dtype=dtype).eval()


@pytest.fixture(params=[None, "MA"], ids=["pure", "hybrid"])
def model(request):
    return tiny_model(request.param)
