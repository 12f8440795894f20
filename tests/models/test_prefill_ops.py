"""The prefill forward's op budget (issue #10: a batch-128 prefill pays one pass over a
[B, T, D]-sized tensor per elementwise op). Counted on CPU with a dispatch mode; F.rms_norm (one
fused kernel on CUDA) and the SSM op (the Triton forward on CUDA) count as one op each, and the
copies the SSM op would make of non-contiguous inputs are counted too."""
import collections

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import mamba3.layers.mamba3 as mamba3_layer
from mamba3.models import LanguageModel, ModelConfig

NO_KERNEL = {"view", "_unsafe_view", "split", "split_with_sizes", "slice", "select", "unsqueeze", "squeeze", "t",
             "transpose", "expand", "as_strided", "detach", "alias", "permute", "unbind", "empty", "empty_like",
             "empty_strided", "lift_fresh", "_reshape_alias", "promote_types"}
B, T, D = 2, 64, 64


class _Ops(TorchDispatchMode):
    """(op name, largest tensor it reads or writes) of every kernel-launching aten op."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in NO_KERNEL:
            ts = [t for t in (*args, *(kwargs or {}).values(), *(out if isinstance(out, (tuple, list)) else [out]))
                  if isinstance(t, torch.Tensor)]
            self.ops.append((name, max((t.numel() for t in ts), default=0)))
        return out


def prefill_ops(n_layer: int, monkeypatch) -> list:
    """Ops of one no-grad hidden_states over [B, T] continuing a cache (a prefill slice), for the
    SISO model of the paper presets at toy width (bf16 weights, fp32 residual, SwiGLU MLP)."""
    cfg = ModelConfig.from_preset("mamba3-1.5b", n_layer=n_layer, d_model=D, d_intermediate=D, vocab_size=64,
                                  mixer_cfg={"mamba3": dict(d_state=16, headdim=16, chunk_size=16)})
    torch.manual_seed(0)
    model = LanguageModel(cfg, dtype=torch.bfloat16).eval()
    counter = _Ops()

    def as_one(name, fn, inputs_of=None):
        def wrapped(*a, **k):
            with _disable_current_modes():
                out = fn(*a, **k)
                if name == "mamba3_siso":  # CUDA's op returns y contiguous (the chunked form may not)
                    out = (out[0].contiguous(), out[1])
            counter.ops.append((name, B * T * D))
            for t in (inputs_of(a) if inputs_of else ()):  # Mamba3SisoFn's .contiguous() copies
                if isinstance(t, torch.Tensor) and not t.is_contiguous():
                    counter.ops.append(("ssm_input_copy", t.numel()))
            return out
        return wrapped

    cache = model.allocate_inference_cache(B, T)
    ids = torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(0))
    with monkeypatch.context() as mp:
        mp.setattr(mamba3_layer, "mamba3_siso", as_one("mamba3_siso", mamba3_layer.mamba3_siso, lambda a: a))
        mp.setattr(F, "rms_norm", as_one("rms_norm", F.rms_norm))
        with torch.no_grad(), counter:
            model.hidden_states(ids, cache=cache)
    return counter.ops


def test_prefill_ops_per_layer(monkeypatch):
    """Per layer 32 ops: 6 GEMMs (z, x and the rest of in_proj as three, so the SSM op gets z and
    x contiguous; out_proj, fc1, fc2), the SSM op, 3 fused RMSNorms (block, MLP, B and C together),
    4 cache writes, [B, T, H]-sized dt / decay / trapezoid / phase math, and 6 passes over
    full-size tensors (two weight-and-cast scales, two promoting residual adds, the MLP's silu and
    product); no copy of a full-size tensor, no clone of the cached state. The plain forms took 63
    ops per layer, 16 of them full-size passes (+ 2 copies inside the SSM op)."""
    one, two = prefill_ops(1, monkeypatch), prefill_ops(2, monkeypatch)
    layer = collections.Counter(n for n, _ in two)
    layer.subtract(collections.Counter(n for n, _ in one))
    assert sum(layer.values()) <= 32, layer
    assert (layer["mm"], layer["mamba3_siso"], layer["rms_norm"]) == (6, 1, 3), layer
    assert layer["clone"] == 0 and layer["ssm_input_copy"] == 0, layer
    full = lambda ops: collections.Counter(n for n, size in ops if size >= B * T * D and n not in (
        "mm", "mamba3_siso", "rms_norm"))
    per_layer = full(two)
    per_layer.subtract(full(one))
    assert sum(per_layer.values()) <= 6, per_layer
