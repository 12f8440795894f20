"""state_dtype (fp32 default, bf16): changes only the SSM state's dtype; the phase stays fp32,
k/v/conv caches keep the model dtype, attention KV is untouched; outputs stay close."""
import pytest
import torch

from mamba3 import Mamba3
from mamba3.models import LanguageModel, ModelConfig

D = 32
M3 = dict(d_state=16, headdim=16, chunk_size=8)


def dtypes(cache):
    return {n: t.dtype for n, t in cache.tensors()}


@pytest.mark.parametrize("kw", [dict(), dict(d_conv=4), dict(is_mimo=True, mimo_rank=2)],
                         ids=["siso", "conv", "mimo"])
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_layer_cache_dtypes(kw, model_dtype):
    m = Mamba3(D, dtype=model_dtype, **M3, **kw)
    default, low = m.allocate_inference_cache(2), m.allocate_inference_cache(2, state_dtype=torch.bfloat16)
    assert default.ssm.dtype == torch.float32 and low.ssm.dtype == torch.bfloat16
    for c in (default, low):
        assert c.angle.dtype == torch.float32
        assert c.k.dtype == c.v.dtype == model_dtype
        if c.conv is not None:
            assert c.conv.dtype == model_dtype
    # only the ssm field differs, and it halves
    assert {n: d for n, d in dtypes(default).items() if n != "ssm"} == \
        {n: d for n, d in dtypes(low).items() if n != "ssm"}
    assert low.ssm.nbytes * 2 == default.ssm.nbytes
    assert Mamba3(D, dtype=torch.float64, **M3).allocate_inference_cache(1).ssm.dtype == torch.float64


def test_lm_state_dtype_reaches_ssm_layers_only():
    cfg = ModelConfig(d_model=D, n_layer=5, vocab_size=61, d_intermediate=0, layer_pattern="M2A1G",
                      mixer_cfg={"mamba3": M3, "mamba2": dict(d_state=16, headdim=16, chunk_size=8),
                                 "attention": dict(num_heads=2), "mamba1": dict(d_state=8),
                                 "gdn": dict(head_dim=16, num_heads=2)})
    model = LanguageModel(cfg)
    a = model.allocate_inference_cache(2, 16)
    b = model.allocate_inference_cache(2, 16, state_dtype=torch.bfloat16)
    for name, ca, cb in zip(cfg.layer_mixers(), a.layers, b.layers):
        da, db = dtypes(ca), dtypes(cb)
        changed = {n for n in da if da[n] != db[n]}
        if name == "attention":
            assert changed == set() and cb.k.dtype == torch.float32
        else:
            assert changed == {"ssm"} and cb.ssm.dtype == torch.bfloat16, (name, changed)
        if name == "mamba3":
            assert cb.angle.dtype == torch.float32
    assert b.nbytes() < a.nbytes()


@torch.no_grad()
def test_bf16_state_outputs_close_to_fp32():
    torch.manual_seed(0)
    m = Mamba3(D, **M3).eval()
    u = torch.randn(2, 40, D)
    c32, c16 = m.allocate_inference_cache(2), m.allocate_inference_cache(2, state_dtype=torch.bfloat16)
    y32, y16 = m(u[:, :24], cache=c32), m(u[:, :24], cache=c16)
    torch.testing.assert_close(y16, y32)                    # the forward itself runs in fp32
    assert c16.ssm.dtype == torch.bfloat16
    torch.testing.assert_close(c16.ssm.float(), c32.ssm, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(c16.angle, c32.angle, rtol=0, atol=0)   # the phase is not rounded
    scale = y32.abs().max()
    for t in range(24, 40):
        a, b = m.step(u[:, t], c32), m.step(u[:, t], c16)
        assert (a - b).abs().max() < 2e-2 * scale
        assert c16.ssm.dtype == torch.bfloat16 and c16.angle.dtype == torch.float32
    # a continuation forward from a bf16 state also stays close
    torch.testing.assert_close(m(u[:, :8], cache=c16), m(u[:, :8], cache=c32), rtol=2e-2, atol=2e-2 * scale)


@torch.no_grad()
def test_generate_state_dtype():
    cfg = ModelConfig(d_model=D, n_layer=2, vocab_size=61, d_intermediate=48, mixer_cfg={"mamba3": M3})
    torch.manual_seed(0)
    model = LanguageModel(cfg).eval()
    ids = torch.randint(0, 61, (2, 12))
    a = model.generate(ids, max_new_tokens=8, temperature=0, output_scores=True)
    b = model.generate(ids, max_new_tokens=8, temperature=0, output_scores=True, state_dtype=torch.bfloat16)
    torch.testing.assert_close(b.scores[0], a.scores[0])    # prefill logits: fp32 forward
    n = 1
    while n < 8 and torch.equal(a.tokens[:, :n], b.tokens[:, :n]):
        n += 1
    for s32, s16 in zip(a.scores[:n], b.scores[:n]):      # same inputs so far: logits close
        torch.testing.assert_close(s16, s32, rtol=5e-2, atol=5e-2)
