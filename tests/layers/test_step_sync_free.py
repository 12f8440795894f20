"""Every mixer's decode step is CUDA-graph capturable: no host synchronisation (``.item()``,
``bool(tensor)``, ``.tolist()``, data-dependent shapes such as ``nonzero`` or boolean-mask
indexing), fixed shapes, the cache updated in place.

``torch.cuda.set_sync_debug_mode`` needs CUDA, so on CPU a TorchDispatchMode flags the aten ops that
read device values on the host (``_local_scalar_dense`` is what item/bool/int/float lower to) or
whose output shape depends on data, and ``Tensor.tolist``/``numpy`` (not dispatched) are patched.
Attention is checked on its capture path (``_capturing`` -> True: the one CUDA graphs take).
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mamba3.layers.attention as attention_layer
from mamba3.models import LanguageModel, ModelConfig, resolve_mixer

aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense.default, aten.item.default, aten.nonzero.default, aten.masked_select.default,
            aten.nonzero_static.default}
DATA_SHAPE = (aten.unique_consecutive, aten._unique2, aten.unique_dim)


class HostSyncDetector(TorchDispatchMode):
    """Inside ``with``: records host-syncing aten ops; Tensor.tolist/numpy/item raise."""

    UNDISPATCHED = ("tolist", "numpy", "item")

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bad = func in SYNC_OPS or func.overloadpacket in DATA_SHAPE
        if func.overloadpacket in (aten.index, aten.index_put, aten.index_put_):
            bad |= any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])
        if func.overloadpacket is aten.repeat_interleave and kwargs.get("output_size") is None \
                and isinstance(args[0], torch.Tensor) and args[0].dtype in (torch.int32, torch.int64):
            bad = True
        if bad:
            self.found.append(str(func))
        return func(*args, **kwargs)

    def __enter__(self):
        self._saved = {n: getattr(torch.Tensor, n) for n in self.UNDISPATCHED}
        for n in self.UNDISPATCHED:
            setattr(torch.Tensor, n, self._refuse(n))
        return super().__enter__()

    def __exit__(self, *exc):
        for n, f in self._saved.items():
            setattr(torch.Tensor, n, f)
        return super().__exit__(*exc)

    def _refuse(self, name):
        def f(t, *a, **k):
            self.found.append(f"Tensor.{name}")
            raise AssertionError(f"Tensor.{name} in a decode step (host sync)")
        return f


@pytest.fixture
def no_host_reads():
    return HostSyncDetector()


def test_detector_catches_host_syncs(no_host_reads):
    x = torch.randn(4)
    with no_host_reads:
        bool(x.sum() > 0)
        x[x > 0]
        int(x.argmax())
        torch.repeat_interleave(torch.tensor([1, 2]))
        with pytest.raises(AssertionError):
            x.tolist()
    x.tolist()                                  # restored outside
    assert len(no_host_reads.found) >= 4


D = 32
MIXERS = {
    "mamba3": ("mamba3", dict(d_state=16, headdim=16, chunk_size=8)),
    "mamba3_conv_fixed_rope": ("mamba3", dict(d_state=16, headdim=16, chunk_size=8, d_conv=4, rope="fixed")),
    "mamba3_outproj_norm": ("mamba3", dict(d_state=16, headdim=16, chunk_size=8, is_outproj_norm=True)),
    "mamba3_mimo": ("mamba3", dict(d_state=16, headdim=16, chunk_size=8, is_mimo=True, mimo_rank=2)),
    "mamba2": ("mamba2", dict(d_state=16, headdim=16, chunk_size=8)),
    "mamba1": ("mamba1", dict(d_state=8)),
    "gdn": ("gdn", dict(head_dim=16, num_heads=2)),
    "attention": ("attention", dict(num_heads=2)),
    "attention_window_ring": ("attention", dict(num_heads=2, window=4)),
    "attention_window_full": ("attention", dict(num_heads=2, window=30)),
    "s4d": ("s4d", dict(d_state=8)),
}


@pytest.mark.parametrize("name", list(MIXERS))
@torch.no_grad()
def test_step_has_no_host_sync_and_fixed_buffers(name, no_host_reads, monkeypatch):
    kind, kw = MIXERS[name]
    torch.manual_seed(0)
    layer = resolve_mixer(kind)(D, **kw).eval()
    cache = layer.allocate_inference_cache(2, 16)
    layer(torch.randn(2, 5, D), cache=cache)                   # prefill may sync; decode may not
    monkeypatch.setattr(attention_layer, "_capturing", lambda device: True)
    before = [(n, t.data_ptr(), t.shape, t.dtype) for n, t in cache.tensors()]
    with no_host_reads:
        outs = [layer.step(torch.randn(2, D), cache) for _ in range(3)]
    assert no_host_reads.found == [], f"{name}.step synchronises with the host: {sorted(set(no_host_reads.found))}"
    assert [(n, t.data_ptr(), t.shape, t.dtype) for n, t in cache.tensors()] == before
    assert all(o.shape == (2, D) and torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize("window", [None, 4])
@torch.no_grad()
def test_attention_capture_path_equals_eager_path(window, monkeypatch):
    """The graph-safe step (whole buffer under a mask) gives what the eager step gives."""
    torch.manual_seed(0)
    layer = resolve_mixer("attention")(D, num_heads=2, window=window, dtype=torch.float64).eval()
    c1, c2 = layer.allocate_inference_cache(2, 16), layer.allocate_inference_cache(2, 16)
    x = torch.randn(2, 9, D, dtype=torch.float64)
    layer(x[:, :3], cache=c1)
    layer(x[:, :3], cache=c2)
    for t in range(3, 9):
        monkeypatch.setattr(attention_layer, "_capturing", lambda device: True)
        a = layer.step(x[:, t], c1)
        monkeypatch.setattr(attention_layer, "_capturing", lambda device: False)
        torch.testing.assert_close(a, layer.step(x[:, t], c2), rtol=1e-12, atol=1e-12)


@torch.no_grad()
def test_hybrid_lm_step_has_no_host_sync(no_host_reads, monkeypatch):
    cfg = ModelConfig(d_model=D, n_layer=6, vocab_size=61, d_intermediate=48, layer_pattern="M2A1GS",
                      mixer_cfg={"mamba3": dict(d_state=16, headdim=16, chunk_size=8),
                                 "mamba2": dict(d_state=16, headdim=16, chunk_size=8), "mamba1": dict(d_state=8),
                                 "gdn": dict(head_dim=16, num_heads=2), "attention": dict(num_heads=2, window=8),
                                 "s4d": dict(d_state=8)})
    torch.manual_seed(0)
    model = LanguageModel(cfg).eval()
    cache = model.allocate_inference_cache(2, 32)
    model(torch.randint(0, 61, (2, 5)), cache=cache)
    monkeypatch.setattr(attention_layer, "_capturing", lambda device: True)
    tok = torch.randint(0, 61, (2,))
    with no_host_reads:
        for _ in range(3):
            tok = model.step(tok, cache).argmax(-1)
    assert no_host_reads.found == [], sorted(set(no_host_reads.found))
