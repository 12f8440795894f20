import math

import pytest
import torch
import torch.nn.functional as F

from mamba3.layers.mlp import GatedMLP
from mamba3.models import LanguageModel, lm_loss

from .conftest import tiny_config, tiny_model


def test_state_dict_names_follow_official(model):
    keys = set(model.state_dict())
    for k in ["backbone.embedding.weight", "backbone.norm_f.weight", "lm_head.weight",
              "backbone.layers.0.norm.weight", "backbone.layers.0.norm2.weight",
              "backbone.layers.0.mlp.fc1.weight", "backbone.layers.0.mlp.fc2.weight",
              "backbone.layers.0.mixer.in_proj.weight", "backbone.layers.0.mixer.out_proj.weight"]:
        assert k in keys, k
    assert model.lm_head.weight is model.backbone.embedding.weight


def test_vocab_padding_and_logit_width():
    model = tiny_model()
    assert model.backbone.embedding.weight.shape[0] == 64  # 61 padded to 16
    out = model(torch.randint(0, 61, (2, 5)))
    assert out.logits.shape == (2, 5, 61)


def test_loss_is_shifted_cross_entropy(model):
    ids = torch.randint(0, 61, (2, 9))
    labels = ids.clone()
    labels[0, 4] = -100
    out = model(ids, labels=labels)
    lg = out.logits[:, :-1].reshape(-1, 61)
    tgt = labels[:, 1:].reshape(-1)
    keep = tgt != -100
    want = F.cross_entropy(lg[keep], tgt[keep])
    torch.testing.assert_close(out.loss, want)
    out.loss.backward()
    assert model.backbone.embedding.weight.grad is not None


def test_varlen_forward_and_loss_equal_per_sequence(model):
    seqs = [torch.randint(0, 61, (n,)) for n in (5, 11, 3)]
    cu = torch.tensor([0, 5, 16, 19], dtype=torch.int32)
    packed = torch.cat(seqs)[None]
    out = model(packed, labels=packed, cu_seqlens=cu)
    per = [model(s[None], labels=s[None]) for s in seqs]
    torch.testing.assert_close(out.logits[0], torch.cat([p.logits[0] for p in per]))
    # mean over all 16 next-token targets, none crossing a boundary
    n = [len(s) - 1 for s in seqs]
    want = sum(p.loss * k for p, k in zip(per, n)) / sum(n)
    torch.testing.assert_close(out.loss, want)


def test_prefix_then_steps_equal_full_forward(model):
    ids = torch.randint(0, 61, (2, 12))
    full = model(ids).logits
    cache = model.allocate_inference_cache(2, 12)
    part = model(ids[:, :5], cache=cache).logits
    torch.testing.assert_close(part, full[:, :5])
    steps = torch.stack([model.step(ids[:, t], cache) for t in range(5, 12)], 1)
    torch.testing.assert_close(steps, full[:, 5:])
    assert cache.lengths.tolist() == [12, 12]


def test_num_last_tokens(model):
    ids = torch.randint(0, 61, (2, 7))
    torch.testing.assert_close(model(ids, num_last_tokens=2).logits, model(ids).logits[:, -2:])


def test_residual_fp32_with_bf16_model():
    torch.manual_seed(0)
    model = LanguageModel(tiny_config(), dtype=torch.bfloat16)
    h = model.hidden_states(torch.randint(0, 61, (1, 4)))
    assert h.dtype == torch.float32
    assert model(torch.randint(0, 61, (1, 4))).logits.dtype == torch.bfloat16


def test_init_follows_spec():
    torch.manual_seed(0)
    cfg = tiny_config(d_model=256, n_layer=8, d_intermediate=512, initializer_range=0.02,
                      mixer_cfg={"mamba3": {"d_state": 16, "headdim": 64}})
    model = LanguageModel(cfg)
    std = lambda t: t.detach().float().std().item()
    assert math.isclose(std(model.backbone.embedding.weight), 0.02, rel_tol=0.05)
    layer = model.backbone.layers[0]
    assert math.isclose(std(layer.mixer.in_proj.weight), 0.02, rel_tol=0.05)
    assert math.isclose(std(layer.mlp.fc1.weight), 0.02, rel_tol=0.05)
    scaled = 0.02 / math.sqrt(2 * 8)
    assert math.isclose(std(layer.mixer.out_proj.weight), scaled, rel_tol=0.05)
    assert math.isclose(std(layer.mlp.fc2.weight), scaled, rel_tol=0.05)
    assert torch.all(layer.mixer.D == 1)  # mixer-specific init kept


def test_num_parameters_by_component():
    model = tiny_model("MA")
    parts = model.num_parameters(by_component=True)
    assert parts["total"] == sum(p.numel() for p in model.parameters())
    assert parts["lm_head"] == 0 and parts["mixer:attention"] > 0 and parts["mixer:mamba3"] > 0
    assert model.num_parameters(exclude_embeddings=True) == parts["total"] - parts["embedding"]
    untied = LanguageModel(tiny_config(tie_embeddings=False))
    assert untied.num_parameters(by_component=True)["lm_head"] == 64 * 32


def test_gated_mlp():
    torch.manual_seed(0)
    mlp = GatedMLP(8, 12)
    x = torch.randn(3, 8)
    a, g = (x @ mlp.fc1.weight.T).chunk(2, -1)
    torch.testing.assert_close(mlp(x), (a * F.silu(g)) @ mlp.fc2.weight.T)
    assert GatedMLP(96).hidden == 256
    with pytest.raises(ValueError, match="hidden must be a positive int"):
        GatedMLP(8, 0)


def test_input_validation(model):
    with pytest.raises(ValueError, match=r"input_ids must be an integer tensor \[B, T\]"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"with cu_seqlens input_ids must be \[1, total\]"):
        model(torch.zeros(2, 3, dtype=torch.long), cu_seqlens=torch.tensor([0, 3], dtype=torch.int32))
    cache = model.allocate_inference_cache(2, 8)
    with pytest.raises(ValueError, match="cache holds batch 2"):
        model.step(torch.zeros(3, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="labels must be"):
        lm_loss(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


def test_other_mixers_build_and_decode():
    for pattern in ["2", "1", "G", "S"]:
        model = tiny_model(pattern, n_layer=2, mixer_cfg={})
        ids = torch.randint(0, 61, (2, 6))
        full = model(ids).logits
        cache = model.allocate_inference_cache(2, 6)
        model(ids[:, :3], cache=cache)
        steps = torch.stack([model.step(ids[:, t], cache) for t in range(3, 6)], 1)
        torch.testing.assert_close(steps, full[:, 3:], msg=pattern)
