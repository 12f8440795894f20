"""Mamba-3 MIMO through impl="triton" (mamba3_mimo dispatch -> triton_mimo.py) vs the float64
reference: forward, final state, every input gradient, continuation, varlen, the no-grad head/batch
blocks, auto dispatch and the named errors.

Without a CUDA device the kernels run under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1) on tiny fp32 shapes; the reference runs in float64 on CPU.
"""
import os
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed")

from mamba3.ops import mamba3_mimo  # noqa: E402
from mamba3.ops.mamba3.mimo_interface import mamba3_mimo_step  # noqa: E402
from mamba3.ops.mamba3.mimo_reference import mamba3_mimo_step_reference  # noqa: E402
import mamba3.ops.mamba3.mimo_chunked as mimo_chunked  # noqa: E402
import mamba3.ops.mamba3.triton_mimo as triton_mimo  # noqa: E402
from mamba3.ops.mamba3 import Mamba3State, mamba3_mimo_reference  # noqa: E402
from mamba3.ops.mamba3.mimo_interface import triton_mimo_supported  # noqa: E402

DEV = "cuda" if HAS_CUDA else "cpu"
NAMES = ("q", "k", "v", "dA", "dt", "trap", "q_bias", "k_bias", "angles", "mimo_x", "mimo_z", "mimo_o", "D", "z")
PARAMS = ("q_bias", "k_bias", "mimo_x", "mimo_z", "mimo_o", "D", "w")


def make_inputs(B=2, T=13, R=2, G=1, H=2, N=16, P=8, S=4, per_head_angles=False, norm=False, seed=0):
    """fp32 inputs on DEV (w: the outproj norm weight [H, P] when norm)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    dt = torch.rand(B, T, H, generator=g) * 0.4 + 0.05
    x = dict(q=r(B, T, R, G, N), k=r(B, T, R, G, N), v=r(B, T, H, P), dA=dt * -(torch.rand(H, generator=g) + 0.3),
             dt=dt, trap=r(B, T, H), q_bias=1 + 0.1 * r(H, R, N), k_bias=1 + 0.1 * r(H, R, N),
             angles=r(B, T, H, S) if per_head_angles else r(B, T, S), mimo_x=1 + 0.2 * r(H, R, P),
             mimo_z=1 + 0.2 * r(H, R, P), mimo_o=1 + 0.2 * r(H, R, P), D=r(H), z=r(B, T, H, P))
    if norm:
        x["w"] = 1 + 0.1 * r(H, P)
    return {n: t.to(DEV) for n, t in x.items()}


def make_state(B, R, H=2, N=16, P=8, S=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    return Mamba3State(angle=3 * r(B, H, S), ssm=0.5 * r(B, H, P, N), k=r(B, R, H, N), v=r(B, H, P))


def run(fn, x, **kw):
    """fn(q, ..., z, outproj_norm_weight=w, **kw); D / z may be None."""
    return fn(*[x.get(n) for n in NAMES], outproj_norm_weight=x.get("w"), **kw)


def slice_t(x, a, b):
    return {n: (t if n in PARAMS or t is None else t[:, a:b]) for n, t in x.items()}


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def to64(x):
    return {n: (None if t is None else t.detach().double().cpu()) for n, t in x.items()}


@pytest.mark.parametrize("R,chunk,G,H,norm,per_head,optional,init", [
    (1, 16, 1, 2, False, False, True, False),       # R = 1, default-like tile of 16 rows
    (2, 8, 2, 4, True, True, True, True),           # groups, per-head angles, norm, initial state
    (4, 4, 1, 2, True, False, False, True),         # R = 4, no D / z
    (4, 8, 2, 2, False, False, True, True),         # G = H, tile of 32 rows
])
def test_forward_state_and_all_gradients_match_fp64_reference(R, chunk, G, H, norm, per_head, optional, init):
    x = make_inputs(T=13, R=R, G=G, H=H, per_head_angles=per_head, norm=norm)
    if not optional:
        x["D"], x["z"] = None, None
    st = make_state(2, R, H=H) if init else None
    leaves = {n: t.clone().requires_grad_(True) for n, t in x.items() if t is not None}
    st_leaves = None if st is None else Mamba3State(*(t.clone().to(DEV).requires_grad_(True) for t in st))
    l64 = {n: t.requires_grad_(True) for n, t in to64(leaves).items()}
    st64 = None if st is None else Mamba3State(*(t.clone().double().requires_grad_(True) for t in st))

    y, fin = run(mamba3_mimo, leaves, initial_state=st_leaves, return_final_state=True, chunk_size=chunk,
                 impl="triton")
    y_ref, fin_ref = run(mamba3_mimo_reference, l64, initial_state=st64, return_final_state=True)
    assert y.dtype == torch.float32 and y.shape == y_ref.shape
    assert rel(y, y_ref) < 1e-4
    for name, a, b in zip(Mamba3State._fields, fin, fin_ref):
        assert a.shape == b.shape and rel(a, b) < 1e-4, f"final.{name}"

    g = torch.Generator().manual_seed(5)
    dy = torch.randn(y_ref.shape, generator=g, dtype=torch.float64)
    dS = torch.randn(fin_ref.ssm.shape, generator=g, dtype=torch.float64)
    ((y_ref * dy).sum() + (fin_ref.ssm * dS).sum()).backward()
    ((y * dy.to(y)).sum() + (fin.ssm * dS.to(fin.ssm)).sum()).backward()
    for n in leaves:
        if l64[n].grad is None:                                             # mimo_z without z
            assert leaves[n].grad is None and n == "mimo_z" and x["z"] is None, n
            continue
        assert rel(leaves[n].grad, l64[n].grad) < 1e-4, n
    if init:
        for name, a, b in zip(Mamba3State._fields, st_leaves, st64):
            assert rel(a.grad, b.grad) < 1e-4, f"initial_state.{name}"


@pytest.mark.parametrize("R,chunk,G,H,norm,per_head,optional,init", [
    (1, 16, 1, 2, False, False, True, False),
    (2, 8, 2, 4, True, True, True, True),
    (4, 4, 1, 2, True, False, False, True),
    (4, 8, 2, 2, False, False, True, True),
    (4, 16, 1, 2, False, False, True, True),      # 64 rows a chunk: the output kernel walks 32 (INFER_CORE_CHUNK)
])
def test_inference_forward_fused_kernels_match_fp64_reference(R, chunk, G, H, norm, per_head, optional, init):
    """Without autograd impl="triton" runs the fused preparation / core / epilogue kernels
    (triton_mimo_fwd.py; T = 37: several phase blocks and epilogue programs, a partial chunk)."""
    x = make_inputs(T=37, R=R, G=G, H=H, per_head_angles=per_head, norm=norm, seed=9)
    if not optional:
        x["D"], x["z"] = None, None
    st = make_state(2, R, H=H, seed=10) if init else None
    with torch.no_grad():
        y, fin = run(mamba3_mimo, x, initial_state=None if st is None else Mamba3State(*(t.to(DEV) for t in st)),
                     return_final_state=True, chunk_size=chunk, impl="triton")
    y_ref, fin_ref = run(mamba3_mimo_reference, to64(x), return_final_state=True,
                         initial_state=None if st is None else Mamba3State(*(t.double() for t in st)))
    assert y.dtype == torch.float32 and rel(y, y_ref) < 1e-4
    for name, a, b in zip(Mamba3State._fields, fin, fin_ref):
        assert a.shape == b.shape and rel(a, b) < 1e-4, f"final.{name}"


def test_same_time_block_backward_matches_autograd():
    """The backward of W[r, j] = (gamma - c [j < r]) <q_r + q_bias_r, k_j + k_bias_j> (PyTorch, per
    group of heads) against autograd through the formula in float64."""
    from mamba3.ops.mamba3.triton_mimo_bwd import same_time_block_bwd
    B, T, R, G, H, N = 2, 5, 4, 2, 4, 8
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    q, k, qb, kb, dW = r(B, T, R, G, N), r(B, T, R, G, N), r(H, R, N), r(H, R, N), r(B, T, H, R, R)
    dt, trap = torch.rand(B, T, H, generator=g, dtype=torch.float64), r(B, T, H)
    lam = torch.sigmoid(trap)
    gamma = lam * dt
    cs = gamma + torch.nn.functional.pad(((1 - lam) * dt)[:, 1:], (0, 0, 0, 1))
    leaves = [x.clone().requires_grad_(True) for x in (q, k, qb, kb, gamma, cs)]
    lq, lk, lqb, lkb, lg, lc = leaves
    heads = torch.arange(H) // (H // G)
    qh, kh = lq[:, :, :, heads] + lqb.transpose(0, 1), lk[:, :, :, heads] + lkb.transpose(0, 1)   # [B, T, R, H, N]
    lower = torch.ones(R, R, dtype=torch.bool).tril(-1)
    W = (lg[..., None, None] - lc[..., None, None] * lower) * torch.einsum("brhn,bjhn->bhrj", qh.flatten(0, 1),
                                                                            kh.flatten(0, 1)).view(B, T, H, R, R)
    (W * dW).sum().backward()
    got = same_time_block_bwd(dW, q, k, qb, kb, dt, trap)
    for name, a, leaf in zip(("q", "k", "q_bias", "k_bias", "gamma", "c"), got, (lq, lk, lqb, lkb, lg, lc)):
        assert a.shape == leaf.shape and rel(a, leaf.grad) < 1e-6, name     # gamma, c and the sums in fp32


def test_gradient_through_final_phase_and_key():
    """The final state's angle and k [B, R, H, N] are differentiable (dt, angles, k, k_bias and the
    initial phase vs float64)."""
    x = make_inputs(T=13, R=2, seed=53)
    st = make_state(2, 2, seed=54)
    leaves = {n: t.clone().requires_grad_(True) for n, t in x.items()}
    l64 = {n: t.requires_grad_(True) for n, t in to64(leaves).items()}
    a0, a64 = st.angle.clone().to(DEV).requires_grad_(True), st.angle.double().requires_grad_(True)
    _, fin = run(mamba3_mimo, leaves, initial_state=Mamba3State(a0, *(t.to(DEV) for t in st[1:])),
                 return_final_state=True, chunk_size=8, impl="triton")
    _, fin64 = run(mamba3_mimo_reference, l64, initial_state=Mamba3State(a64, *(t.double() for t in st[1:])),
                   return_final_state=True)
    g = torch.Generator().manual_seed(55)
    da = torch.randn(fin64.angle.shape, generator=g, dtype=torch.float64)
    dk = torch.randn(fin64.k.shape, generator=g, dtype=torch.float64)
    ((fin64.angle * da).sum() + (fin64.k * dk).sum()).backward()
    ((fin.angle * da.to(fin.angle)).sum() + (fin.k * dk.to(fin.k)).sum()).backward()
    assert rel(a0.grad, a64.grad) < 1e-4
    for n in ("dt", "angles", "k", "k_bias"):
        assert rel(leaves[n].grad, l64[n].grad) < 1e-4, n


def test_empty_sequence_passes_the_state_through():
    x = slice_t(make_inputs(T=5, R=2, seed=56), 0, 0)
    st = Mamba3State(*(t.to(DEV) for t in make_state(2, 2, seed=57)))
    y, s = run(mamba3_mimo, x, initial_state=st, return_final_state=True, chunk_size=8, impl="triton")
    assert y.shape == (2, 0, 2, 8)
    for name, a, b in zip(Mamba3State._fields, s, st):
        torch.testing.assert_close(a.float(), b.float(), msg=f"state.{name}")
    _, s = run(mamba3_mimo, x, return_final_state=True, chunk_size=8, impl="triton")
    assert all(float(t.abs().sum()) == 0 for t in s) and s.k.shape == (2, 2, 2, 16)


@pytest.mark.parametrize("split", [5, 8])          # chunk 8: inside a chunk and on its boundary
def test_prefix_plus_continuation_equals_whole(split):
    x = make_inputs(T=13, R=2, norm=True, seed=3)
    kw = dict(chunk_size=8, return_final_state=True, impl="triton")
    y, s = run(mamba3_mimo, x, **kw)
    y1, s1 = run(mamba3_mimo, slice_t(x, 0, split), **kw)
    y2, s2 = run(mamba3_mimo, slice_t(x, split, 13), initial_state=s1, **kw)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, atol=2e-5, rtol=1e-5)
    for name, a, b in zip(Mamba3State._fields, s2, s):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5, msg=f"state.{name}")


def test_varlen_equals_per_sequence_and_reference():
    lens = [5, 0, 9]
    cu = torch.tensor([0, 5, 5, 14], dtype=torch.int32, device=DEV)
    x = make_inputs(B=1, T=sum(lens), R=4, seed=4)
    st = Mamba3State(*(t.to(DEV) for t in make_state(len(lens), 4, seed=6)))
    kw = dict(return_final_state=True, chunk_size=4, impl="triton")
    y, s = run(mamba3_mimo, x, cu_seqlens=cu, initial_state=st, **kw)
    y_ref, s_ref = run(mamba3_mimo_reference, to64(x), cu_seqlens=cu.cpu(), initial_state=Mamba3State(
        *(t.double().cpu() for t in st)), return_final_state=True)
    assert rel(y, y_ref) < 1e-4
    for name, a, b in zip(Mamba3State._fields, s, s_ref):
        assert rel(a, b) < 1e-4, f"final.{name}"
    start = 0
    for i, n in enumerate(lens):
        one = Mamba3State(*(t[i : i + 1] for t in st))
        yi, si = run(mamba3_mimo, slice_t(x, start, start + n), initial_state=one, **kw)
        torch.testing.assert_close(y[:, start : start + n], yi, atol=2e-5, rtol=1e-5)
        for name, a, b in zip(Mamba3State._fields, s, si):
            torch.testing.assert_close(a[i : i + 1], b, atol=2e-5, rtol=1e-5, msg=f"seq {i} state.{name}")
        start += n


@pytest.mark.parametrize("impl", ["chunked", "triton"])
@pytest.mark.parametrize("G,H,budget_slabs,blocks", [(1, 4, 2, (1, 2)), (2, 4, 1, (1, 1)), (4, 4, 7, (2, 3)),
                                                      (2, 4, 6, (2, 3))])
def test_no_grad_blocks_equal_one_pass(monkeypatch, impl, G, H, budget_slabs, blocks):
    """Without autograd the forms run over (heads, batch rows) blocks sized by NO_GRAD_BLOCK_BYTES;
    every output and final-state field equals the one-pass result (packed sequences, state)."""
    R, T, C, N, P = 2, 11, 8, 16, 8
    x = make_inputs(B=1, T=T, R=R, G=G, H=H, per_head_angles=True, norm=True, seed=7)
    cu = torch.tensor([0, 4, 4, 11], dtype=torch.int32, device=DEV)
    st = Mamba3State(*(t.to(DEV) for t in make_state(3, R, H=H, seed=8)))
    if impl == "chunked":
        x, st = to64(x), Mamba3State(*(t.double() for t in st))
    slab = 4 * (T - 4) * R * max(N, P, C * R)          # one padded row (Tmax = 7), one head
    assert mimo_chunked._block_sizes(3, T - 4, H, G, R, N, P, C, budget_slabs * slab) == blocks
    kw = dict(cu_seqlens=cu, initial_state=st, return_final_state=True, chunk_size=C, impl=impl)
    with torch.no_grad():
        y0, s0 = run(mamba3_mimo, x, **kw)
        scale = 1 if impl == "chunked" else triton_mimo.FUSED_NO_GRAD_SLABS   # the fused form takes larger blocks
        monkeypatch.setattr(mimo_chunked, "NO_GRAD_BLOCK_BYTES", budget_slabs * slab // scale)
        y, s = run(mamba3_mimo, x, **kw)
    tol = dict(atol=1e-13, rtol=0) if impl == "chunked" else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, y0, **tol)
    for name, a, b in zip(Mamba3State._fields, s, s0):
        torch.testing.assert_close(a, b, **tol, msg=f"state.{name}")


class _PeakBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages that ops create while the mode is on (alive at once)."""

    def __init__(self):
        super().__init__()
        self.live, self.seen, self.cur, self.peak = {}, set(), 0, 0

    def _drop(self, key, tid):
        self.seen.discard(tid)
        ent = self.live[key]
        ent[1] -= 1
        if ent[1] == 0:
            self.cur -= ent[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and id(t) not in self.seen:
                st = t.untyped_storage()
                key = (st.data_ptr(), st.nbytes())
                self.seen.add(id(t))
                ent = self.live.setdefault(key, [st.nbytes(), 0])
                if ent[1] == 0:
                    self.cur += ent[0]
                    self.peak = max(self.peak, self.cur)
                ent[1] += 1
                weakref.finalize(t, self._drop, key, id(t))
        return out


@pytest.mark.skipif(HAS_CUDA, reason="counts CPU tensor allocations through a dispatch mode")
def test_no_grad_chunked_peak_memory_is_bounded_by_the_block(monkeypatch):
    """The OOM of MIMO R=4 prefill: per-head [B, T, R, H, N] fp32 intermediates. With one head per
    block the chunked no-grad forward peaks at ~9 one-head slabs (one pass over all 16 heads: ~117)."""
    B, T, H, R, N, P, C = 2, 64, 16, 4, 32, 16, 16
    x = make_inputs(B=B, T=T, R=R, H=H, N=N, P=P, norm=True, seed=9)
    slab = B * T * R * max(N, P, C * R) * 4            # one head
    monkeypatch.setattr(mimo_chunked, "NO_GRAD_BLOCK_BYTES", slab)
    mode = _PeakBytes()
    with torch.no_grad(), mode:
        run(mamba3_mimo, x, chunk_size=C, impl="chunked", return_final_state=True)
    assert mode.peak < 16 * slab, mode.peak / slab


def test_auto_dispatch():
    x = make_inputs(T=9, R=4)
    assert triton_mimo_supported(4, 4, x.values()) and triton_mimo_supported(16, 4, x.values())
    assert not triton_mimo_supported(2, 4, x.values())                      # 8 rows
    assert not triton_mimo_supported(6, 4, x.values())                      # 24 rows
    assert not triton_mimo_supported(4, 4, [x["v"].double()])
    if not HAS_CUDA:  # CPU tensors: auto is the chunked path
        y, s = run(mamba3_mimo, x, chunk_size=4, return_final_state=True)
        y_c, s_c = run(mamba3_mimo, x, chunk_size=4, return_final_state=True, impl="chunked")
        torch.testing.assert_close(y, y_c, atol=0, rtol=0)


def test_auto_rule_prunes_tiles_over_the_shared_memory():
    """The shared-memory half of impl='auto' (the CUDA-device half needs a GPU: the test below):
    the R=4 default tile of 64 rows fits a 227 KB Hopper part in bf16 and fp32 forward; a 99 KB
    part takes bf16 but not the fp32 backward at 64 rows (the SISO chunk backward's bound)."""
    from mamba3.ops.mamba3.mimo_interface import mimo_triton_fits
    kb = 1024
    assert mimo_triton_fits(16, 4, 128, 64, torch.bfloat16, backward=True, smem_limit=227 * kb)
    assert mimo_triton_fits(16, 4, 128, 64, torch.float32, backward=False, smem_limit=227 * kb)
    assert mimo_triton_fits(16, 4, 128, 64, torch.bfloat16, backward=False, smem_limit=99 * kb)
    assert not mimo_triton_fits(16, 4, 128, 64, torch.float32, backward=True, smem_limit=99 * kb)
    assert mimo_triton_fits(4, 4, 128, 64, torch.float32, backward=True, smem_limit=99 * kb)   # 16-row tile


@pytest.mark.skipif(not HAS_CUDA, reason="impl='auto' picks Triton only for CUDA tensors (its shared-memory rule "
                                          "is tested on CPU above)")
def test_auto_picks_triton_on_cuda(monkeypatch):
    from mamba3.ops.mamba3 import triton_mimo
    calls = []
    real = triton_mimo.mamba3_mimo_triton
    monkeypatch.setattr(triton_mimo, "mamba3_mimo_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = make_inputs(T=9, R=4)
    run(mamba3_mimo, x, chunk_size=4)
    assert calls == [1]
    run(mamba3_mimo, x, chunk_size=3)                                       # 12 rows: chunked
    assert calls == [1]


@pytest.mark.parametrize("name", ["q", "v", "mimo_x", "w"])
def test_float64_with_impl_triton_raises_type_error_naming_the_argument(name):
    x = make_inputs(T=5, norm=True)
    x[name] = x[name].double()
    label = "outproj_norm_weight" if name == "w" else name
    with pytest.raises(TypeError, match=rf"impl='triton' needs {label} in float32/bfloat16/float16, got torch.float64"):
        run(mamba3_mimo, x, impl="triton")


def test_impl_triton_errors():
    x = make_inputs(T=5, R=2)
    with pytest.raises(ValueError, match=r"impl='triton' needs chunk_size \* R .* power of two >= 16, "
                                         r"got chunk_size=3, R=2"):
        run(mamba3_mimo, x, impl="triton", chunk_size=3)
    with pytest.raises(ValueError, match=r"chunk_size \* R .* got chunk_size=4, R=2"):    # 8 rows
        run(mamba3_mimo, x, impl="triton", chunk_size=4)
    bad = dict(x, mimo_o=torch.ones(2, 3, 8, device=DEV))                  # generic checks still first
    with pytest.raises(ValueError, match=r"mimo_o must have shape \[H, R, P\].*dim 1: expected 2, got 3"):
        run(mamba3_mimo, bad, impl="triton")
    with pytest.raises(ValueError, match=r"impl must be one of \['auto', 'reference', 'chunked', 'triton'\]"):
        run(mamba3_mimo, x, impl="tilelang")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    """bf16 / fp16 activations (parameters and dt/dA in fp32, as the layer passes them): output in the
    input dtype, close to the float64 reference of the same (rounded) inputs; the state stays fp32."""
    x = make_inputs(T=13, R=4, norm=True, seed=11)
    for n in ("q", "k", "v", "z", "angles", "trap"):
        x[n] = x[n].to(dtype)
    st = Mamba3State(*(t.to(DEV) for t in make_state(2, 4, seed=12)))
    st = st._replace(k=st.k.to(dtype), v=st.v.to(dtype))
    y, s = run(mamba3_mimo, x, initial_state=st, return_final_state=True, chunk_size=4, impl="triton")
    y_ref, s_ref = run(mamba3_mimo_reference, to64(x), return_final_state=True,
                       initial_state=Mamba3State(*(t.double().cpu() for t in st)))
    assert y.dtype == dtype and s.ssm.dtype == torch.float32 and s.k.dtype == dtype
    assert rel(y, y_ref) < 1e-2 and rel(s.ssm, s_ref.ssm) < 1e-2


# ------------------------------------------------------------------------------ decode step
def step_args(x, t):
    """Token t of make_inputs as mamba3_mimo_step positional args (q ... z)."""
    return [None if x.get(n) is None else (x[n] if n in PARAMS else x[n][:, t]) for n in NAMES]


@pytest.mark.parametrize("R,G,H,per_head,optional,norm,state_dtype", [
    (1, 1, 2, False, True, False, torch.float32),
    (2, 2, 4, True, True, True, torch.float32),
    (4, 1, 2, False, False, True, torch.float32),     # no D / z, outproj norm
    (4, 2, 2, True, True, False, torch.float32),      # G = H
    (2, 1, 2, False, True, True, torch.bfloat16),     # bf16 state
    (4, 2, 4, True, False, False, torch.bfloat16),
])
def test_step_loop_matches_fp64_reference_and_chunked(R, G, H, per_head, optional, norm, state_dtype):
    """A loop of Triton steps == the float64 reference loop == the chunked sequence forward on the
    same tokens (outputs and the final state: angle, ssm, k, v), starting from a random state."""
    B, T = 2, 4
    x = make_inputs(B=B, T=T, R=R, G=G, H=H, per_head_angles=per_head, norm=norm, seed=20 + R)
    if not optional:
        x["D"], x["z"] = None, None
    st0 = Mamba3State(*(t.to(DEV) for t in make_state(B, R, H=H, seed=21)))
    st = st0._replace(ssm=st0.ssm.to(state_dtype).clone(), k=st0.k.clone(), v=st0.v.clone(), angle=st0.angle.clone())
    ys = [mamba3_mimo_step(*step_args(x, t), st, impl="triton", outproj_norm_weight=x.get("w")) for t in range(T)]
    y = torch.stack(ys, 1)
    init64 = Mamba3State(*(t.double().cpu() for t in st0))
    y_ref, fin_ref = run(mamba3_mimo_reference, to64(x), initial_state=init64, return_final_state=True)
    y_ch, fin_ch = run(mamba3_mimo, to64(x), initial_state=init64, return_final_state=True, chunk_size=3,
                       impl="chunked")
    tol = 1e-5 if state_dtype == torch.float32 else 2e-2
    assert y.dtype == torch.float32 and st.ssm.dtype == state_dtype
    assert rel(y, y_ref) < tol and rel(y_ch, y_ref) < 1e-10
    for name, a, b, c in zip(Mamba3State._fields, st, fin_ref, fin_ch):
        assert rel(a, b) < tol and rel(c, b) < 1e-10, f"state.{name}"


def test_step_updates_the_cache_in_place_without_new_state():
    """The four state tensors keep their storage and hold the new state; the op allocates nothing
    the size of the [B, H, P, N] state (only the [B, H, P] output)."""
    B, R, H, N, P = 2, 2, 2, 16, 8
    x = make_inputs(B=B, T=1, R=R, H=H, N=N, P=P, norm=True, seed=30)
    st = Mamba3State(*(t.to(DEV) for t in make_state(B, R, H=H, N=N, P=P, seed=31)))
    ptrs = [t.data_ptr() for t in st]
    _, new = mamba3_mimo_step_reference(*[None if t is None else t.double() for t in step_args(x, 0)],
                                        Mamba3State(*(t.double() for t in st)), x["w"].double())
    mode = _PeakBytes()
    with torch.no_grad(), mode:
        out = mamba3_mimo_step(*step_args(x, 0), st, impl="triton", outproj_norm_weight=x["w"])
    assert [t.data_ptr() for t in st] == ptrs
    for name, a, b in zip(Mamba3State._fields, st, new):
        assert rel(a, b) < 1e-5, f"state.{name}"
    assert out.shape == (B, H, P) and mode.peak < st.ssm.numel() * 4, mode.peak


@pytest.mark.parametrize("opts", [dict(is_outproj_norm=True), dict(rope="fixed", d_conv=4)])
def test_step_strided_inputs_and_layer_cache(monkeypatch, opts):
    """The Mamba3 MIMO layer's decode (strided views of in_proj's output, the cache as allocated)
    on the kernel: step loop == the layer's sequence forward; the cache is updated in place."""
    from mamba3.layers.mamba3 import Mamba3
    import mamba3.ops.mamba3.mimo_interface as mi
    calls = []
    monkeypatch.setattr(mi, "_step_picks_triton", lambda *a: calls.append(1) or True)   # CPU: interpreter
    torch.manual_seed(0)
    m = Mamba3(16, d_state=8, headdim=4, is_mimo=True, mimo_rank=2, ngroups=2, chunk_size=4, **opts).to(DEV)
    u = torch.randn(2, 3, 16, device=DEV)
    with torch.no_grad():
        y_seq = m(u)
        cache = m.allocate_inference_cache(2)
        ptrs = [cache.ssm.data_ptr(), cache.k.data_ptr(), cache.v.data_ptr(), cache.angle.data_ptr()]
        y = torch.stack([m.step(u[:, t], cache) for t in range(3)], 1)
    assert len(calls) == 3
    assert [cache.ssm.data_ptr(), cache.k.data_ptr(), cache.v.data_ptr(), cache.angle.data_ptr()] == ptrs
    torch.testing.assert_close(y, y_seq, atol=2e-5, rtol=1e-4)


def test_step_auto_dispatch(monkeypatch):
    import mamba3.ops.mamba3.triton_mimo_step as tms
    calls = []
    real = tms.mamba3_mimo_step_triton
    monkeypatch.setattr(tms, "mamba3_mimo_step_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = make_inputs(T=1, R=2)
    st = Mamba3State(*(t.to(DEV) for t in make_state(2, 2)))
    mamba3_mimo_step(*step_args(x, 0), st)
    assert calls == ([1] if HAS_CUDA else [])                               # CPU: the reference
    mamba3_mimo_step(*step_args(x, 0), Mamba3State(*(t.double() for t in st)))  # float64 state: reference
    assert calls == ([1] if HAS_CUDA else [])


@pytest.mark.parametrize("name", ["q", "angles", "mimo_o", "w", "state.ssm", "state.k"])
def test_step_float64_with_impl_triton_raises_type_error_naming_the_argument(name):
    x = make_inputs(T=1, R=2, norm=True)
    st = Mamba3State(*(t.to(DEV) for t in make_state(2, 2)))
    if name.startswith("state."):
        st = st._replace(**{name[6:]: getattr(st, name[6:]).double()})
    else:
        x[name] = x[name].double()
    label = "outproj_norm_weight" if name == "w" else name
    with pytest.raises(TypeError, match=rf"impl='triton' needs {label} in float32/bfloat16/float16, got torch.float64"):
        mamba3_mimo_step(*step_args(x, 0), st, impl="triton", outproj_norm_weight=x["w"])


def test_step_triton_errors():
    x = make_inputs(T=1, R=2)
    st = Mamba3State(*(t.to(DEV) for t in make_state(2, 2)))
    with pytest.raises(TypeError, match=r"impl='triton' needs state.angle in float32, got torch.float64"):
        mamba3_mimo_step(*step_args(x, 0), st._replace(angle=st.angle.double()), impl="triton")
    ssm_t = st.ssm.transpose(-1, -2).contiguous().transpose(-1, -2)        # right shape, not contiguous
    with pytest.raises(ValueError, match=r"state.ssm must be contiguous"):
        mamba3_mimo_step(*step_args(x, 0), st._replace(ssm=ssm_t), impl="triton")
    with pytest.raises(ValueError, match=r"impl must be one of \['auto', 'reference', 'triton'\]"):
        mamba3_mimo_step(*step_args(x, 0), st, impl="chunked")


def test_step_op_opcheck_and_compile_fullgraph():
    """``mamba3::mimo_step`` (the route under torch.compile): opcheck (schema, in-place mutation,
    fake tensor), and a fullgraph compile of mamba3_mimo_step(impl='triton') equals eager."""
    from mamba3.ops.custom_ops import mimo_step
    x = make_inputs(B=2, T=2, R=2, H=2, norm=True, seed=40)
    st = Mamba3State(*(t.to(DEV) for t in make_state(2, 2, seed=41)))
    args = tuple(step_args(x, 0)) + (x["w"], 1e-5)
    torch.library.opcheck(mimo_step, args + tuple(t.clone() for t in st),
                          test_utils=("test_schema", "test_faketensor"))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm

    fn = lambda t, s: mamba3_mimo_step(*step_args(x, t), s, impl="triton", outproj_norm_weight=x["w"])
    comp = torch.compile(fn, fullgraph=True, backend=backend)
    s_c, s_e = (Mamba3State(*(t.clone() for t in st)) for _ in range(2))
    with torch.no_grad():
        for t in range(2):
            torch.testing.assert_close(comp(t, s_c), fn(t, s_e), atol=0, rtol=0)
    for a, b in zip(s_c, s_e):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert any("mamba3.mimo_step" in g for g in graphs)


def test_step_half_precision_inputs_and_cache():
    """bf16 activations and bf16 k / v cache (as the layer allocates for a bf16 model), fp32 ssm:
    output and cache in bf16, close to the float64 reference of the same rounded inputs."""
    x = make_inputs(B=2, T=2, R=4, norm=True, seed=50)
    for n in ("q", "k", "v", "z", "angles", "trap"):
        x[n] = x[n].bfloat16()
    st = Mamba3State(*(t.to(DEV) for t in make_state(2, 4, seed=51)))
    st = st._replace(k=st.k.bfloat16(), v=st.v.bfloat16())
    st64 = Mamba3State(*(t.double() for t in st))
    for t in range(2):
        y = mamba3_mimo_step(*step_args(x, t), st, impl="triton", outproj_norm_weight=x["w"])
        y_ref, st64 = mamba3_mimo_step_reference(*[None if a is None else a.double() for a in step_args(x, t)],
                                                 st64, x["w"].double())
        assert y.dtype == torch.bfloat16 and rel(y, y_ref) < 1e-2
    assert st.ssm.dtype == torch.float32 and st.k.dtype == st.v.dtype == torch.bfloat16
    for name, a, b in zip(Mamba3State._fields, st, st64):
        assert rel(a, b) < 1e-2, f"state.{name}"


class _LaunchSpy:
    """Stands in for a @triton.jit kernel and records each launch grid (and, with ``meta``, the
    launch's keyword arguments: constexprs and num_warps)."""

    def __init__(self, kernel, grids, meta=None):
        self.kernel, self.grids, self.meta = kernel, grids, meta

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        launch = self.kernel[grid]
        if self.meta is None:
            return launch
        return lambda *a, **kw: self.meta.append(kw) or launch(*a, **kw)


@pytest.mark.parametrize("p_blocks,P,R,G,per_head,optional,norm,state_dtype,split", [
    (1, 32, 2, 1, False, True, False, torch.float32, 1),      # p_blocks 1: the single kernel
    (2, 32, 2, 2, True, True, False, torch.float32, 2),
    (4, 32, 2, 1, False, True, False, torch.bfloat16, 2),     # BLOCK_P clamped to 16
    (4, 64, 4, 1, True, False, False, torch.float32, 4),      # no D / z
    (4, 64, 2, 2, False, True, False, torch.bfloat16, 4),
    (2, 48, 2, 1, True, True, False, torch.bfloat16, 2),      # P not a power of two: last block masked
    (None, 64, 2, 1, False, True, False, torch.float32, 2),   # automatic: 2 blocks
    (4, 64, 2, 1, True, True, True, torch.float32, 1),        # the norm needs all of P: single kernel
    (None, 32, 2, 1, False, False, True, torch.bfloat16, 1),
])
def test_step_p_split_matches_fp64_reference_token_by_token(monkeypatch, p_blocks, P, R, G, per_head, optional,
                                                            norm, state_dtype, split):
    """The P-split launch (grid (B*H, blocks), then the k / angle cache kernel) == the float64
    reference step after each of 4 tokens: out and every state field (a block that read k / theta
    after another overwrote them, or a stale cache, would show from the second token on)."""
    import mamba3.ops.mamba3.triton_mimo_step as tms
    main, cache = [], []
    monkeypatch.setattr(tms, "_mimo_step_kernel", _LaunchSpy(tms._mimo_step_kernel, main))
    monkeypatch.setattr(tms, "_mimo_step_cache_kernel", _LaunchSpy(tms._mimo_step_cache_kernel, cache))
    B, H, N, T = 2, 2, 16, 4
    x = make_inputs(B=B, T=T, R=R, G=G, H=H, N=N, P=P, per_head_angles=per_head, norm=norm, seed=60 + P)
    if not optional:
        x["D"], x["z"] = None, None
    st = Mamba3State(*(t.to(DEV) for t in make_state(B, R, H=H, N=N, P=P, seed=61)))
    st = st._replace(ssm=st.ssm.to(state_dtype))
    st64 = Mamba3State(*(t.double().cpu() for t in st))
    tol = 1e-5 if state_dtype == torch.float32 else 2e-2
    for t in range(T):
        y = tms.mamba3_mimo_step_triton(*step_args(x, t), st, x.get("w"), 1e-5, p_blocks=p_blocks)
        y_ref, st64 = mamba3_mimo_step_reference(*[None if a is None else a.double().cpu() for a in step_args(x, t)],
                                                 st64, None if x.get("w") is None else x["w"].double().cpu())
        assert rel(y, y_ref) < tol, f"out, token {t}"
        for name, a, b in zip(Mamba3State._fields, st, st64):
            assert rel(a, b) < tol, f"state.{name}, token {t}"
    assert main == [(B * H, split)] * T and cache == ([(B * H,)] * T if split > 1 else [])
    assert st.ssm.dtype == state_dtype


@pytest.mark.parametrize("p_blocks", [0, 3, -2, 2.0, True])
def test_step_p_blocks_must_be_a_positive_power_of_two(p_blocks):
    from mamba3.ops.mamba3.triton_mimo_step import mamba3_mimo_step_triton
    x = make_inputs(T=1, R=2)
    st = Mamba3State(*(t.to(DEV) for t in make_state(2, 2)))
    before = [t.clone() for t in st]
    with pytest.raises(ValueError, match=r"p_blocks must be None or a positive power of two, got "):
        mamba3_mimo_step_triton(*step_args(x, 0), st, p_blocks=p_blocks)
    assert all(torch.equal(a, b) for a, b in zip(st, before))


@pytest.mark.parametrize("P,R,G,per_head,optional,norm,state_dtype,p_blocks,prec", [
    (32, 2, 1, False, True, False, torch.float32, None, "ieee"),   # fp32 state, full-precision dots
    (32, 4, 2, True, True, True, torch.bfloat16, None, None),      # R = 4: 2R = 8 of the 16 columns
    (64, 4, 1, True, False, False, torch.float32, 2, "tf32"),      # P split, no D / z
    (48, 2, 1, True, True, False, torch.bfloat16, 2, None),        # P not a power of two
    (32, 1, 1, False, True, True, torch.float32, None, "ieee"),
    (16, 8, 1, False, True, False, torch.float32, None, "ieee"),   # 2R = 16: every column used
])
def test_step_dot_form_matches_fp64_reference_token_by_token(monkeypatch, P, R, G, per_head, optional, norm,
                                                             state_dtype, p_blocks, prec):
    """dot=True (rank-R update and readout as tensor-core products) == the float64 reference step
    after each of 4 tokens: out and every state field; the launch really took the dot branch."""
    import mamba3.ops.mamba3.triton_mimo_step as tms
    grids, meta = [], []
    monkeypatch.setattr(tms, "_mimo_step_kernel", _LaunchSpy(tms._mimo_step_kernel, grids, meta))
    B, H, N, T = 2, 2, 32, 4
    x = make_inputs(B=B, T=T, R=R, G=G, H=H, N=N, P=P, per_head_angles=per_head, norm=norm, seed=70 + P + R)
    if not optional:
        x["D"], x["z"] = None, None
    st = Mamba3State(*(t.to(DEV) for t in make_state(B, R, H=H, N=N, P=P, seed=71)))
    st = st._replace(ssm=st.ssm.to(state_dtype))
    st64 = Mamba3State(*(t.double().cpu() for t in st))
    # tf32 products round operands to 10 mantissa bits; a bf16 state is coarser still
    tol = 1e-5 if prec == "ieee" else 2e-2
    for t in range(T):
        y = tms.mamba3_mimo_step_triton(*step_args(x, t), st, x.get("w"), 1e-5, p_blocks=p_blocks, dot=True,
                                        dot_precision=prec)
        y_ref, st64 = mamba3_mimo_step_reference(*[None if a is None else a.double().cpu() for a in step_args(x, t)],
                                                 st64, None if x.get("w") is None else x["w"].double().cpu())
        assert rel(y, y_ref) < tol, f"out, token {t}"
        for name, a, b in zip(Mamba3State._fields, st, st64):
            assert rel(a, b) < tol, f"state.{name}, token {t}"
    assert all(kw["DOT"] and kw["BLOCK_R"] == 16 for kw in meta) and len(meta) == T
    split = 2 if p_blocks == 2 else 1
    assert grids == [(B * H, split)] * T


@pytest.mark.parametrize("state_dtype,matmul_precision,dot,kw_expected", [
    (torch.bfloat16, "highest", None, dict(DOT=True, PREC="tf32", num_warps=2)),
    (torch.float32, "highest", None, dict(DOT=False, PREC="ieee", num_warps=1)),   # ieee dots are slow
    (torch.float32, "high", None, dict(DOT=True, PREC="tf32", num_warps=2)),
    (torch.bfloat16, "highest", False, dict(DOT=False, num_warps=1)),
])
def test_step_dot_default_follows_the_precision(monkeypatch, state_dtype, matmul_precision, dot, kw_expected):
    """The default launch: tensor-core dots (one P block, 2 warps) when they would run as tf32 (bf16
    state, or fp32 state under torch's "high" fp32 matmul precision), else the CUDA-core form with
    the P split; the result matches the reference either way."""
    import mamba3.ops.mamba3.triton_mimo_step as tms
    grids, meta = [], []
    monkeypatch.setattr(tms, "_mimo_step_kernel", _LaunchSpy(tms._mimo_step_kernel, grids, meta))
    B, H, N, P, R = 2, 2, 32, 64, 2
    x = make_inputs(B=B, T=1, R=R, H=H, N=N, P=P, seed=80)
    st = Mamba3State(*(t.to(DEV) for t in make_state(B, R, H=H, N=N, P=P, seed=81)))
    st = st._replace(ssm=st.ssm.to(state_dtype))
    st64 = Mamba3State(*(t.double().cpu() for t in st))
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(matmul_precision)
    try:
        y = tms.mamba3_mimo_step_triton(*step_args(x, 0), st, dot=dot)
    finally:
        torch.set_float32_matmul_precision(old)
    y_ref, _ = mamba3_mimo_step_reference(*[None if a is None else a.double().cpu() for a in step_args(x, 0)], st64)
    assert rel(y, y_ref) < (1e-5 if kw_expected.get("PREC") == "ieee" else 2e-2)
    assert {k: meta[0][k] for k in kw_expected} == kw_expected
    assert grids == [(B * H, 1 if kw_expected["DOT"] else 2)]
