"""The decode step's fewer-kernel forms (Mamba3._step_siso, Block.step, LanguageModel.step) give
the values of the plain forms, and a whole-model step stays at a bounded number of ops (issue #10:
a decode step pays per kernel launch)."""
import collections

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import mamba3.layers.mamba3 as mamba3_layer
from mamba3.layers.mamba3 import Mamba3
from mamba3.models import LanguageModel, ModelConfig

SISO_OPTIONS = [dict(), dict(is_outproj_norm=True, ngroups=2), dict(rope="none", use_trapezoid=False,
                                                                    use_bc_bias=False), dict(a_activation="heavy_tail")]


def _perturbed(module):
    with torch.no_grad():  # away from the init's ones / zeros so every parameter matters
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kw", SISO_OPTIONS)
def test_siso_step_equals_project_path_exactly(kw, dtype):
    torch.manual_seed(0)
    m = _perturbed(Mamba3(32, d_state=16, headdim=8, dtype=dtype, **kw))
    c_fast, c_ref = m.allocate_inference_cache(3), m.allocate_inference_cache(3)
    for _ in range(3):
        u = torch.randn(3, 32, dtype=dtype)
        assert torch.equal(m.step(u, c_fast), m._step_siso_project(u[:, None], c_ref)[:, 0])
    for (n, a), (_, b) in zip(c_fast.tensors(), c_ref.tensors()):
        assert torch.equal(a, b), n


def _plain_model_step(model, ids, cache):
    """LanguageModel.step as written before the decode forms (norm, cast, add as separate ops)."""
    h = model.backbone.embedding(ids).float()
    for block, c in zip(model.backbone.layers, cache.layers):
        u = block._branch_in(block.norm, h)
        y = block.mixer._step_siso_project(u[:, None], c)[:, 0] if isinstance(block.mixer, Mamba3) \
            else block.mixer.step(u, c)
        h = h + y.to(h.dtype)
        h = h + block.mlp(block._branch_in(block.norm2, h)).to(h.dtype)
    cache.advance(1)
    return model.logits_from_hidden(h)


@pytest.mark.parametrize("pattern", [None, "MA"])
def test_model_step_equals_plain_step_exactly_bf16(pattern):
    cfg = ModelConfig.from_preset("tiny", n_layer=2)
    if pattern:
        cfg = cfg.replace(layer_pattern=pattern, mixer_cfg={**cfg.mixer_cfg, "attention": {"num_heads": 2}})
    torch.manual_seed(0)
    model = _perturbed(LanguageModel(cfg, dtype=torch.bfloat16).eval())
    c_fast, c_ref = model.allocate_inference_cache(2, 8), model.allocate_inference_cache(2, 8)
    ids = torch.tensor([3, 7])
    with torch.no_grad():
        for _ in range(3):
            a, b = model.step(ids, c_fast), _plain_model_step(model, ids, c_ref)
            assert a.dtype == torch.bfloat16 and torch.equal(a, b)
            ids = a.argmax(-1)
    for (n, x), (_, y) in zip(c_fast.tensors(), c_ref.tensors()):
        assert torch.equal(x, y), n


class _CountOps(TorchDispatchMode):
    """aten ops that launch a kernel on a GPU (views / metadata excluded)."""
    NO_KERNEL = {"view", "_unsafe_view", "split", "split_with_sizes", "slice", "select", "unsqueeze", "squeeze",
                 "t", "transpose", "expand", "as_strided", "detach", "alias", "permute", "unbind", "empty",
                 "empty_like", "empty_strided", "lift_fresh", "_reshape_alias", "promote_types"}

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in self.NO_KERNEL:
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def count_step_ops(model, batch: int, monkeypatch) -> collections.Counter:
    """Ops of one whole-model decode step + argmax; the SSM step op (one Triton kernel on CUDA; the
    reference on CPU) and F.rms_norm (one fused kernel on CUDA) count as one op each."""
    counter = _CountOps()

    def as_one(name, fn):
        def wrapped(*a, **k):
            counter.ops[name] += 1
            with _disable_current_modes():
                return fn(*a, **k)
        return wrapped

    cache, ids = model.allocate_inference_cache(batch, 4), torch.zeros(batch, dtype=torch.long)
    with monkeypatch.context() as mp:
        mp.setattr(mamba3_layer, "mamba3_siso_step", as_one("mamba3_siso_step", mamba3_layer.mamba3_siso_step))
        mp.setattr(F, "rms_norm", as_one("rms_norm", F.rms_norm))
        with torch.no_grad(), counter:
            model.step(ids, cache).argmax(-1)
    return counter.ops


def test_whole_model_decode_step_op_count(monkeypatch):
    """The SISO model of the paper presets (bf16 weights, fp32 residual, SwiGLU MLP): 28 ops per
    layer (4 GEMMs, the SSM op, 3 RMSNorms) + 7 per step; the plain forms took 57 per layer."""
    def model(n_layer):
        cfg = ModelConfig.from_preset("mamba3-1.5b", n_layer=n_layer, d_model=64, d_intermediate=64,
                                      vocab_size=64, mixer_cfg={"mamba3": dict(d_state=16, headdim=16)})
        return LanguageModel(cfg, dtype=torch.bfloat16).eval()
    one, two = count_step_ops(model(1), 2, monkeypatch), count_step_ops(model(2), 2, monkeypatch)
    per_layer = sum(two.values()) - sum(one.values())
    assert per_layer <= 28, (per_layer, two)
    assert sum(one.values()) - per_layer <= 7, one
    assert (two["aten.mm.default"], two["mamba3_siso_step"], two["rms_norm"]) == (2 * 4 + 1, 2, 2 * 3 + 1), two
