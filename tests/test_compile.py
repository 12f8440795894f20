"""torch.compile(fullgraph=True) over the chunked ops: no graph breaks, same outputs as eager.

The aot_eager backend traces exactly what inductor would (dynamo + AOT autograd, so a graph break
fails fullgraph) without compiling C++, which keeps this test fast on CI's 2 cores.
"""
import torch

from mamba3 import Mamba3


def test_layer_forward_continuation_and_step_compile_fullgraph():
    torch.manual_seed(0)
    m = Mamba3(32, d_state=16, headdim=8, chunk_size=8, impl="chunked")
    u = torch.randn(2, 20, 32)
    fwd = torch.compile(m, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fwd(u), m(u), atol=1e-6, rtol=1e-5)

    c_eager, c_comp = m.allocate_inference_cache(2), m.allocate_inference_cache(2)
    m(u[:, :9], cache=c_eager)
    fwd(u[:, :9], cache=c_comp)
    step = torch.compile(m.step, fullgraph=True, backend="aot_eager")
    for t in range(9, 12):
        torch.testing.assert_close(step(u[:, t], c_comp), m.step(u[:, t], c_eager), atol=1e-6, rtol=1e-5)
    for (n, a), (_, b) in zip(c_eager.tensors(), c_comp.tensors()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=n)


def test_training_step_compiles_fullgraph():
    torch.manual_seed(0)
    m = Mamba3(16, d_state=8, headdim=4, chunk_size=4, impl="chunked")
    u = torch.randn(1, 10, 16, requires_grad=True)
    fwd = torch.compile(m, fullgraph=True, backend="aot_eager")
    fwd(u).square().sum().backward()
    g_comp = u.grad.clone()
    u.grad = None
    m(u).square().sum().backward()
    torch.testing.assert_close(g_comp, u.grad, atol=1e-5, rtol=1e-5)
