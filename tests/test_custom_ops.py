"""torch.library custom ops of Mamba-3 SISO (mamba3/ops/custom_ops.py), tested on CPU.

On CPU the ops run their PyTorch form; the same registrations (schema, fake, autograd) wrap the
Triton kernels on CUDA, which the TRITON_INTERPRET subprocess test runs on CPU tensors.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mamba3 import Mamba3
from mamba3.ops import custom_ops
from mamba3.ops.custom_ops import _core_bwd_torch, _core_fwd_torch, mamba3_siso_op, mamba3_siso_step_op
from mamba3.ops.mamba3 import Mamba3State, interface, mamba3_siso
from mamba3.ops.mamba3.reference import mamba3_siso_step_reference

NAMES = ("q", "k", "v", "dA", "dt", "trap", "q_bias", "k_bias", "angles", "D", "z")


def inputs(B=2, T=11, G=1, H=2, N=8, P=4, S=2, dtype=torch.float64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    dt = torch.rand(B, T, H, generator=g, dtype=torch.float64) * 0.3 + 0.05
    xs = dict(q=r(B, T, G, N), k=r(B, T, G, N), v=r(B, T, H, P), dA=-0.7 * dt, dt=dt, trap=r(B, T, H),
              q_bias=1 + 0.1 * r(H, N), k_bias=1 + 0.1 * r(H, N), angles=r(B, T, S), D=r(H), z=r(B, T, H, P))
    st = Mamba3State(r(B, H, S), 0.5 * r(B, H, P, N), r(B, H, N), r(B, H, P))
    xs = {n: t.to(dtype).requires_grad_(grad) for n, t in xs.items()}
    st = Mamba3State(st.angle.float() if dtype != torch.float64 else st.angle,
                     *(t.to(torch.float32 if dtype != torch.float64 else dtype) if i == 0 else t.to(dtype)
                       for i, t in enumerate(st[1:])))
    return xs, Mamba3State(*(t.requires_grad_(grad) for t in st))


def core_inputs(B=2, T=11, H=2, N=4, P=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
    return r(B, T, H, N), r(B, T, H, N), r(B, T, H, P), -torch.rand(B, T, H, generator=g, dtype=torch.float64).to(
        dtype) * 0.5, r(B, H, P, N)


def test_core_backward_equals_autograd_of_core_forward():
    Q, K, V, dA, S0 = core_inputs()
    leaves = [t.clone().requires_grad_(True) for t in (Q, K, V, dA, S0)]
    y, states, dec, fin = _core_fwd_torch(*leaves, 4)
    g = torch.Generator().manual_seed(5)
    dy, dsf = torch.randn(y.shape, generator=g, dtype=y.dtype), torch.randn(fin.shape, generator=g, dtype=y.dtype)
    ref = torch.autograd.grad((y * dy).sum() + (fin * dsf).sum(), leaves)
    mine = _core_bwd_torch(Q, K, V, dA, dy, states.detach(), dec.detach(), dsf, 4)
    for name, a, b in zip(("dQ", "dK", "dV", "ddA", "dS0"), mine, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_op_path_equals_chunked_forward_state_and_grads(varlen, with_state):
    xs, st = inputs(grad=True, B=1 if varlen else 2, T=13)
    cu = torch.tensor([0, 5, 13], dtype=torch.int32) if varlen else None
    if varlen and with_state:
        st = Mamba3State(*(torch.cat([t.detach()] * 2).requires_grad_(True) for t in st))
    kw = dict(initial_state=st if with_state else None, return_final_state=True, cu_seqlens=cu, chunk_size=4)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(xs["v"].shape, generator=g, dtype=torch.float64)

    def run(fn):
        y, fin = fn(*xs.values(), **kw)
        leaves = list(xs.values()) + (list(st) if with_state else [])
        grads = torch.autograd.grad((y * w).sum() + 0.1 * fin.ssm.square().sum(), leaves, allow_unused=True)
        return y, fin, grads

    a = run(mamba3_siso_op)
    b = run(lambda *args, **k: mamba3_siso(*args, impl="chunked", **k))
    torch.testing.assert_close(a[0], b[0], rtol=1e-12, atol=1e-12)
    for x, y in zip(a[1], b[1]):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    for x, y in zip(a[2], b[2]):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


def test_op_path_gradcheck():
    xs, st = inputs(B=1, T=6, H=2, N=4, P=2, S=1, grad=True)
    names = list(xs)

    def f(*ts):
        d = dict(zip(names, ts[: len(names)]))
        y, fin = mamba3_siso_op(*d.values(), initial_state=Mamba3State(*ts[len(names):]), return_final_state=True,
                                chunk_size=4)
        return y, fin.ssm
    torch.autograd.gradcheck(f, tuple(xs.values()) + tuple(st), eps=1e-6, atol=1e-6)


def test_opcheck_fwd_bwd_step():
    Q, K, V, dA, S0 = core_inputs(dtype=torch.float32, T=9)
    req = lambda t: t.clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.mamba3.siso_fwd, (req(Q), req(K), req(V), req(dA), req(S0), 4))
    torch.library.opcheck(torch.ops.mamba3.siso_fwd, (Q, K, V, dA, None, 4),
                          test_utils=("test_schema", "test_faketensor"))
    y, states, dec, fin = torch.ops.mamba3.siso_fwd(Q, K, V, dA, S0, 4)
    torch.library.opcheck(torch.ops.mamba3.siso_bwd, (Q, K, V, dA, torch.randn_like(y), states, dec,
                                                      torch.randn_like(fin), 4),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    xs, st = inputs(T=1, dtype=torch.float32)
    one = {n: (t[:, 0] if t.dim() >= 3 and n not in ("q_bias", "k_bias") else t) for n, t in xs.items()}
    torch.library.opcheck(torch.ops.mamba3.siso_step, tuple(one.values()) + tuple(t.clone() for t in st))


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("gate", [False, True])
def test_fused_op_equals_chunked_forward_and_final_state(with_state, gate):
    xs, st = inputs(T=13)
    if not gate:
        xs["D"] = xs["z"] = None
    init = st if with_state else None
    got = torch.ops.mamba3.siso_fused(*xs.values(), *(st if with_state else (None,) * 4), 4)
    y, fin = mamba3_siso(*xs.values(), initial_state=init, return_final_state=True, chunk_size=4, impl="chunked")
    for a, b in zip(got, (y, *fin)):
        assert a.dtype == b.dtype and a.is_contiguous()
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.library.opcheck(torch.ops.mamba3.siso_fused, (*xs.values(), *(st if with_state else (None,) * 4), 4))


def test_op_path_is_one_fused_op_in_inference_and_the_core_op_with_autograd():
    """mamba3_siso_op: grad mode off (or no input requiring grad) -> mamba3::siso_fused alone;
    recording autograd -> PyTorch preparation around mamba3::siso_fwd. Same values."""
    xs, st = inputs(dtype=torch.float32, T=21)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    def f(xs, st):
        y, fin = mamba3_siso_op(*xs.values(), initial_state=st, return_final_state=True, chunk_size=8)
        return (y, *fin)

    torch._dynamo.reset()
    with torch.no_grad():
        inf = torch.compile(f, fullgraph=True, backend=backend)(xs, st)
    assert "mamba3.siso_fused" in graphs[-1] and "siso_fwd" not in graphs[-1]
    leaves = {n: t.clone().requires_grad_(True) for n, t in xs.items()}
    train = torch.compile(f, fullgraph=True, backend=backend)(leaves, st)
    assert "mamba3.siso_fwd" in graphs[-1] and "siso_fused" not in graphs[-1]
    torch._dynamo.reset()
    for a, b in zip(inf, train):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-5)


def test_step_op_updates_state_in_place_like_reference():
    xs, st = inputs(T=1)
    one = {n: (t[:, 0] if t.dim() >= 3 and n not in ("q_bias", "k_bias") else t) for n, t in xs.items()}
    mine = Mamba3State(*(t.clone() for t in st))
    ptrs = [t.data_ptr() for t in mine]
    y = mamba3_siso_step_op(*one.values(), mine)
    y_ref, new = mamba3_siso_step_reference(*one.values(), st)
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(mine, new):
        torch.testing.assert_close(a, b)
    assert [t.data_ptr() for t in mine] == ptrs


def test_compile_fullgraph_op_path_forward_backward_and_step():
    xs, st = inputs(dtype=torch.float32, grad=True, T=21)

    def f(xs, st):
        y, fin = mamba3_siso_op(*xs.values(), initial_state=st, return_final_state=True, chunk_size=8)
        return y, fin.ssm

    comp = torch.compile(f, fullgraph=True, backend="aot_eager")
    (yc, sc), (ye, se) = comp(xs, st), f(xs, st)
    torch.testing.assert_close(yc, ye)
    torch.testing.assert_close(sc, se)
    w = torch.randn_like(ye)
    gc = torch.autograd.grad((yc * w).sum() + sc.sum(), list(xs.values()) + list(st))
    ge = torch.autograd.grad((ye * w).sum() + se.sum(), list(xs.values()) + list(st))
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    xs1, st1 = inputs(T=1, dtype=torch.float32)
    one = {n: (t[:, 0] if t.dim() >= 3 and n not in ("q_bias", "k_bias") else t) for n, t in xs1.items()}
    s_c, s_e = Mamba3State(*(t.clone() for t in st1)), Mamba3State(*(t.clone() for t in st1))
    step = torch.compile(mamba3_siso_step_op, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(step(*one.values(), s_c), mamba3_siso_step_op(*one.values(), s_e))
    for a, b in zip(s_c, s_e):  # the mutation is written back to the caller's state tensors
        torch.testing.assert_close(a, b)


def test_layer_on_triton_dispatch_compiles_fullgraph_through_the_ops(monkeypatch):
    """interface.py's Triton branch uses the ops while compiling; pretend Triton is available so the
    branch runs on CPU (the ops then run their PyTorch form). Eager reference: impl="chunked"."""
    torch.manual_seed(0)
    m = Mamba3(32, d_state=16, headdim=8, chunk_size=8)       # impl="auto"
    u = torch.randn(2, 20, 32, requires_grad=True)
    ref = m(u)                                                  # CPU: chunked
    g_ref = torch.autograd.grad(ref.square().sum(), [u, m.in_proj.weight])
    monkeypatch.setattr(interface, "triton_available", lambda device: True)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    out = torch.compile(m, fullgraph=True, backend=backend)(u)
    assert any("mamba3.siso_fwd" in c for c in graphs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.autograd.grad(out.square().sum(), [u, m.in_proj.weight])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)

    c_eager, c_comp = m.allocate_inference_cache(2), m.allocate_inference_cache(2)
    with torch.no_grad():
        monkeypatch.setattr(interface, "triton_available", lambda device: False)
        m(u[:, :9], cache=c_eager)
        m(u[:, :9], cache=c_comp)
        graphs.clear()
        monkeypatch.setattr(interface, "triton_available", lambda device: True)
        step = torch.compile(m.step, fullgraph=True, backend=backend)
        for t in range(9, 11):
            y = step(u[:, t], c_comp)
            monkeypatch.setattr(interface, "triton_available", lambda device: False)
            torch.testing.assert_close(y, m.step(u[:, t], c_eager), rtol=1e-5, atol=1e-5)
            monkeypatch.setattr(interface, "triton_available", lambda device: True)
    assert any("mamba3.siso_step" in c for c in graphs)
    for (n, a), (_, b) in zip(c_eager.tensors(), c_comp.tensors()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=n)
    torch._dynamo.reset()


def test_cpu_eager_dispatch_does_not_use_the_ops(monkeypatch):
    calls = []
    monkeypatch.setattr(custom_ops, "mamba3_siso_op", lambda *a, **k: calls.append(1))
    xs, _ = inputs(dtype=torch.float32)
    mamba3_siso(*xs.values())
    torch.compile(lambda: mamba3_siso(*xs.values()), fullgraph=True, backend="aot_eager")()
    assert calls == []


def _run(code: str, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_registration_imports_without_triton():
    out = _run("""
        import sys
        sys.modules["triton"] = None          # import triton -> ImportError
        import torch
        from mamba3.ops.custom_ops import mamba3_siso_op
        from mamba3 import Mamba3
        m = Mamba3(16, d_state=8, headdim=8, chunk_size=4)
        print(m(torch.randn(1, 5, 16)).shape, torch.ops.mamba3.siso_fwd)
    """)
    assert "mamba3.siso_fwd" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter check is for CPU-only machines")
def test_ops_on_triton_kernels_under_interpreter_match_pytorch_form():
    pytest.importorskip("triton", reason="runs the real kernels under the Triton interpreter: needs triton")
    _run("""
        import torch
        from mamba3.ops.custom_ops import _core_fwd_torch, _core_bwd_torch, mamba3_siso_step_op
        from mamba3.ops.mamba3 import Mamba3State
        from mamba3.ops.mamba3.reference import mamba3_siso_step_reference
        torch.manual_seed(0)
        B, T, H, N, P, C = 1, 20, 2, 16, 8, 16
        Q, K, V = torch.randn(B, T, H, N), torch.randn(B, T, H, N), torch.randn(B, T, H, P)
        dA, S0 = -torch.rand(B, T, H) * 0.5, torch.randn(B, H, P, N)
        got = torch.ops.mamba3.siso_fwd(Q, K, V, dA, S0, C)          # Triton kernels (interpreted)
        ref = _core_fwd_torch(Q, K, V, dA, S0, C)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        dY, dSF = torch.randn(B, T, H, P), torch.randn(B, H, P, N)
        got = torch.ops.mamba3.siso_bwd(Q, K, V, dA, dY, ref[1], ref[2], dSF, C)
        for a, b in zip(got, _core_bwd_torch(Q, K, V, dA, dY, ref[1], ref[2], dSF, C)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        S, G = 2, 1
        q, k = torch.randn(B, G, N), torch.randn(B, G, N)
        v, z = torch.randn(B, H, P), torch.randn(B, H, P)
        dt = torch.rand(B, H) * 0.3
        st = Mamba3State(torch.rand(B, H, S), torch.randn(B, H, P, N), torch.randn(B, H, N), torch.randn(B, H, P))
        args = (q, k, v, -dt, dt, torch.randn(B, H), torch.randn(H, N), torch.randn(H, N), torch.randn(B, S),
                torch.randn(H), z)
        mine = Mamba3State(*(t.clone() for t in st))
        y = mamba3_siso_step_op(*args, mine)
        y_ref, new = mamba3_siso_step_reference(*args, st)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(mine.ssm, new.ssm, rtol=1e-4, atol=1e-4)
        # the whole fused forward (triton_siso) as mamba3::siso_fused; v and z strided views of one
        # tensor as the layer passes them
        from mamba3.ops.mamba3.chunked import mamba3_siso_chunked
        T, S = 40, 4
        zx = torch.randn(B, T, 2, H, P)
        dt = torch.rand(B, T, H) * 0.3 + 0.05
        args = (torch.randn(B, T, G, N), torch.randn(B, T, G, N), zx[:, :, 1], -0.7 * dt, dt, torch.randn(B, T, H),
                1 + 0.1 * torch.randn(H, N), 1 + 0.1 * torch.randn(H, N), torch.randn(B, T, S), torch.randn(H),
                zx[:, :, 0])
        st = Mamba3State(torch.rand(B, H, S), torch.randn(B, H, P, N), torch.randn(B, H, N), torch.randn(B, H, P))
        for init in (None, st):
            got = torch.ops.mamba3.siso_fused(*args, *(init if init is not None else (None,) * 4), C)
            y, fin = mamba3_siso_chunked(*args, initial_state=init, return_final_state=True, chunk_size=C)
            for a, b in zip(got, (y, *fin)):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        print("ok")
    """, env={"TRITON_INTERPRET": "1"})
