"""Perplexity vs context length on a tiny model."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mamba3.eval.perplexity import load_tokens, markdown, plot, ppl_vs_length, window_nll
from mamba3.models import LanguageModel, ModelConfig


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layer=2, vocab_size=257, mixer="mamba3",
                      mixer_cfg={"mamba3": {"d_state": 16, "headdim": 16, "expand": 2, "chunk_size": 16}})
    return LanguageModel(cfg).eval()


def test_window_nll_matches_cross_entropy_and_chunked(model):
    x = torch.randint(0, 257, (2, 40))
    nll = window_nll(model, x)
    with torch.no_grad():
        logits = model(x).logits
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 257), x[:, 1:].reshape(-1), reduction="none").view(2, 39)
    torch.testing.assert_close(nll, ref)
    torch.testing.assert_close(window_nll(model, x, chunk=16), ref, atol=1e-4, rtol=1e-4)


def test_ppl_rows_and_outputs(model, tmp_path):
    tokens = load_tokens("tiny")
    assert tokens.dtype == np.int64 and tokens.max() <= 256
    rows = ppl_vs_length(model, tokens, [16, 64, 10 ** 9], max_tokens=256, log=lambda s: None)
    assert [r["length"] for r in rows] == [16, 64]  # the too-long length is skipped
    assert rows[0]["windows"] == 16 and rows[1]["windows"] == 4
    for r in rows:
        assert r["ppl"] == pytest.approx(math.exp(r["nll"])) and 1 < r["ppl"] < 1000
    md = markdown(rows, "tiny")
    assert md.count("\n") == 3 and "| tiny | 64 |" in md
    plot({"tiny": rows}, str(tmp_path / "ppl.png"), train_len=16)
    assert (tmp_path / "ppl.png").stat().st_size > 1000
