"""Triton Mamba-3 kernels vs the float64 token-loop reference.

Without a CUDA device the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set before
triton is imported) on tiny shapes; with CUDA they run compiled on the GPU.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton", reason="triton is not installed")

from mamba3.ops.mamba3 import Mamba3State, mamba3_siso, mamba3_siso_reference  # noqa: E402
from mamba3.ops.mamba3.reference import mamba3_siso_step_reference  # noqa: E402
from mamba3.ops.mamba3.triton_siso import mamba3_siso_triton  # noqa: E402
from mamba3.ops.mamba3.triton_step import mamba3_siso_step_triton  # noqa: E402

DEV = "cuda" if HAS_CUDA else "cpu"
NAMES = ("q", "k", "v", "dA", "dt", "trap", "q_bias", "k_bias", "angles", "D", "z")


def make_inputs(B=2, T=37, G=1, H=2, N=16, P=8, S=4, per_head_angles=False, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    dt = torch.rand(B, T, H, generator=g) * 0.4 + 0.05
    A = -(torch.rand(H, generator=g) + 0.3)
    ang = r(B, T, H, S) if per_head_angles else r(B, T, S)
    xs = dict(q=r(B, T, G, N), k=r(B, T, G, N), v=r(B, T, H, P), dA=dt * A, dt=dt, trap=r(B, T, H),
              q_bias=1 + 0.1 * r(H, N), k_bias=1 + 0.1 * r(H, N), angles=ang, D=r(H), z=r(B, T, H, P))
    return {n: xs[n].to(DEV, dtype) for n in NAMES}


def make_state(B, H, P, N, S, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    return Mamba3State(angle=(r(B, H, S) * 3).to(DEV), ssm=(0.5 * r(B, H, P, N)).to(DEV),
                       k=r(B, H, N).to(DEV, dtype), v=r(B, H, P).to(DEV, dtype))


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def reference64(xs, **kw):
    x64 = {n: t.detach().double().cpu().requires_grad_(True) for n, t in xs.items()}
    init = kw.pop("initial_state", None)
    if init is not None:
        init = Mamba3State(*(t.double().cpu() for t in init))
    cu = kw.pop("cu_seqlens", None)
    y, fin = mamba3_siso_reference(*(x64[n] for n in NAMES), initial_state=init, return_final_state=True,
                                   cu_seqlens=None if cu is None else cu.cpu())
    return x64, y, fin


def assert_matches(y, fin, leaves, y_ref, fin_ref, x64, names, tol=1e-4):
    """Output, final state and the gradients of ``names`` (under one random dy) vs the float64 ones."""
    assert rel(y, y_ref) < tol
    for a, b in zip(fin, fin_ref):
        assert rel(a, b) < tol
    dy = torch.randn_like(y_ref)
    (y_ref * dy).sum().backward()
    (y * dy.to(y)).sum().backward()
    for n in names:
        assert rel(leaves[n].grad, x64[n].grad) < tol, n


def check_forward_backward(xs, chunk, initial_state=None):
    """Triton output, final state and every input gradient vs the float64 reference (1e-4)."""
    x64, y_ref, fin_ref = reference64(xs, initial_state=initial_state)
    leaves = {n: t.clone().requires_grad_(True) for n, t in xs.items()}
    y, fin = mamba3_siso_triton(*(leaves[n] for n in NAMES), initial_state=initial_state, return_final_state=True,
                                chunk_size=chunk)
    assert_matches(y, fin, leaves, y_ref, fin_ref, x64, NAMES)
    return y_ref, fin_ref


@pytest.mark.parametrize("chunk", [16, 32])
def test_forward_backward_matches_reference(chunk):
    check_forward_backward(make_inputs(), chunk)


def test_initial_state_per_head_angles_groups_and_final_state_grad():
    B, T, G, H, N, P, S = 2, 70, 2, 4, 16, 16, 8  # 5 chunks: two unrolled scan steps
    xs = make_inputs(B=B, T=T, G=G, H=H, N=N, P=P, S=S, per_head_angles=True, seed=3)
    init = make_state(B, H, P, N, S)
    x64, y_ref, fin_ref = reference64(xs, initial_state=init)
    leaves = {n: t.clone().requires_grad_(True) for n, t in xs.items()}
    ssm0 = init.ssm.clone().requires_grad_(True)
    y, fin = mamba3_siso_triton(*(leaves[n] for n in NAMES), initial_state=init._replace(ssm=ssm0),
                                return_final_state=True, chunk_size=16)
    assert rel(y, y_ref) < 1e-4
    for a, b in zip(fin, fin_ref):
        assert rel(a, b) < 1e-4
    # gradient through the final ssm state and into the initial one, vs float64 autograd
    ssm64 = init.ssm.double().cpu().requires_grad_(True)
    init64 = Mamba3State(init.angle.double().cpu(), ssm64, init.k.double().cpu(), init.v.double().cpu())
    x64 = {n: t.detach().double().cpu().requires_grad_(True) for n, t in xs.items()}
    y64, f64 = mamba3_siso_reference(*(x64[n] for n in NAMES), initial_state=init64, return_final_state=True)
    dy, dS = torch.randn_like(y64), torch.randn_like(f64.ssm)
    ((y64 * dy).sum() + (f64.ssm * dS).sum()).backward()
    ((y * dy.to(y)).sum() + (fin.ssm * dS.to(fin.ssm)).sum()).backward()
    assert rel(ssm0.grad, ssm64.grad) < 1e-4
    for n in ("q", "k", "v", "dA", "dt", "trap", "angles", "q_bias"):
        assert rel(leaves[n].grad, x64[n].grad) < 1e-4, n


@pytest.mark.parametrize("G,H,per_head,chunk,bwd_rows", [(2, 6, False, 32, 4), (3, 3, True, 16, 4),
                                                          (1, 3, False, 64, 8), (2, 8, False, 32, 4),
                                                          (3, 3, True, 16, 8)])
def test_group_head_sums_and_phase_chain_across_row_steps(monkeypatch, G, H, per_head, chunk, bwd_rows):
    """The preparation backward sums q/k gradients over each group's heads (3 per group: one
    program; 4 per group: split over programs, partial sums added after) and chains the phase
    gradient across blocks of 4 or 8 rows and chunks (T = 83: partial last block and chunk; 4-row
    blocks take the phase of the forward's 8-row blocks plus the rows before them); the serial
    phase scan takes several (partial) steps; the chunk backward walks the state in column blocks."""
    from mamba3.ops.mamba3 import triton_siso_bwd as bw
    from mamba3.ops.mamba3 import triton_siso_fwd as fw
    monkeypatch.setattr(bw, "PREP_BWD_ROWS", bwd_rows)
    monkeypatch.setattr(bw, "PREP_BWD_PROGRAMS", 4096)    # split the heads wherever they divide
    monkeypatch.setattr(fw, "PHASE_SCAN_TILE", 4)         # 11 phase blocks: 3 scan steps
    monkeypatch.setattr(bw, "bwd_layout", lambda dtype, bn, nw, deep=False: (max(1, bn // 8), 4, None))  # N=16: 2 blocks
    xs = make_inputs(B=2, T=83, G=G, H=H, N=16, P=8, S=6, per_head_angles=per_head, seed=11)
    init = make_state(2, H, 8, 16, 6, seed=12)
    check_forward_backward(xs, chunk, initial_state=init)
    # the initial phase's gradient is the whole sequence's sum of d theta (every chunk total)
    a0 = init.angle.clone().requires_grad_(True)
    a64 = init.angle.double().cpu().requires_grad_(True)
    y, _ = mamba3_siso_triton(*xs.values(), initial_state=init._replace(angle=a0), chunk_size=chunk)
    y64, _ = mamba3_siso_reference(*(t.double().cpu() for t in xs.values()),
                                   initial_state=Mamba3State(a64, *(t.double().cpu() for t in init[1:])))
    dy = torch.randn_like(y64)
    (y64 * dy).sum().backward()
    (y * dy.to(y)).sum().backward()
    assert rel(a0.grad, a64.grad) < 1e-4


@pytest.mark.parametrize("per_head", [False, True])
def test_phase_scan_split_over_pairs_and_many_token_programs(monkeypatch, per_head):
    """Few batch x heads: the phase scan splits its S = 20 pairs over programs of 16 (the second
    partial); the backward's phase / dt pass takes 4 blocks of 8 rows per program (T = 83: a
    partial last program); with an initial state, so d(initial phase) and du_0 are exercised."""
    from mamba3.ops.mamba3 import triton_siso_bwd as bw
    monkeypatch.setattr(bw, "PHASE_DT_TOKENS", 32)
    xs = make_inputs(B=1, T=83, G=1, H=2, N=48, P=8, S=20, per_head_angles=per_head, seed=21)
    init = make_state(1, 2, 8, 48, 20, seed=22)
    a0 = init.angle.clone().requires_grad_(True)
    a64 = init.angle.double().cpu().requires_grad_(True)
    check_forward_backward(xs, 32, initial_state=init._replace(angle=a0))
    y64, _ = mamba3_siso_reference(*(t.double().cpu() for t in xs.values()),
                                   initial_state=Mamba3State(a64, *(t.double().cpu() for t in init[1:])))
    y64.sum().backward()
    y, _ = mamba3_siso_triton(*xs.values(), initial_state=init._replace(angle=a0), chunk_size=32)
    a0.grad = None
    y.sum().backward()
    assert rel(a0.grad, a64.grad) < 1e-4


@pytest.mark.parametrize("P,final_grad", [(32, True), (8, False)])
def test_state_gradient_walk_matches_reference(monkeypatch, P, final_grad):
    """The one-program-per-(batch, head) reverse walk of the state gradient (taken when batch x
    heads fill the GPU; forced here), with P split over two programs (P = 32) or one, with and
    without a final-state gradient; T = 83 ends in a partial chunk."""
    from mamba3.ops.mamba3 import triton_siso_bwd as bw
    monkeypatch.setattr(bw, "WALK_MIN_PROGRAMS", 1)
    monkeypatch.setattr(bw, "WALK_P_SPLIT", 2)
    xs = make_inputs(B=2, T=83, G=1, H=2, N=16, P=P, S=4, seed=41)
    init = make_state(2, 2, P, 16, 4, seed=42)
    x64, y_ref, fin_ref = reference64(xs, initial_state=init)
    ssm0 = init.ssm.clone().requires_grad_(True)
    ssm64 = init.ssm.double().cpu().requires_grad_(True)
    init64 = Mamba3State(*(t.double().cpu() for t in init))._replace(ssm=ssm64)
    y_ref, fin_ref = mamba3_siso_reference(*(x64[n] for n in NAMES), return_final_state=True, initial_state=init64)
    leaves = {n: t.clone().requires_grad_(True) for n, t in xs.items()}
    y, fin = mamba3_siso_triton(*(leaves[n] for n in NAMES), initial_state=init._replace(ssm=ssm0),
                                return_final_state=True, chunk_size=16)
    dy, dS = torch.randn_like(y_ref), torch.randn_like(fin_ref.ssm)
    final_term = (lambda f: (f.ssm * dS.to(f.ssm)).sum()) if final_grad else (lambda f: 0.0)  # else no d(final)
    ((y_ref * dy).sum() + final_term(fin_ref)).backward()
    ((y * dy.to(y)).sum() + final_term(fin)).backward()
    assert rel(ssm0.grad, ssm64.grad) < 1e-4
    for n in NAMES:
        assert rel(leaves[n].grad, x64[n].grad) < 1e-4, n


@pytest.mark.parametrize("per_head", [False, True])
def test_gradient_through_final_phase_and_key(per_head):
    """The final state's angle and k (the phase after the last token and the last rotated key) are
    differentiable: dt, angles, k, k_bias and the initial phase get their share (vs float64)."""
    xs = make_inputs(B=2, T=29, H=2, N=16, P=8, S=4, per_head_angles=per_head, seed=51)
    init = make_state(2, 2, 8, 16, 4, seed=52)
    leaves = {n: t.clone().requires_grad_(True) for n, t in xs.items()}
    x64 = {n: t.detach().double().cpu().requires_grad_(True) for n, t in xs.items()}
    a0, a64 = init.angle.clone().requires_grad_(True), init.angle.double().cpu().requires_grad_(True)
    _, fin = mamba3_siso_triton(*(leaves[n] for n in NAMES), initial_state=init._replace(angle=a0),
                                return_final_state=True, chunk_size=16)
    _, fin64 = mamba3_siso_reference(*(x64[n] for n in NAMES), return_final_state=True, initial_state=Mamba3State(
        a64, *(t.double().cpu() for t in init[1:])))
    da, dk = torch.randn_like(fin64.angle), torch.randn_like(fin64.k)
    ((fin64.angle * da).sum() + (fin64.k * dk).sum()).backward()
    ((fin.angle * da.to(fin.angle)).sum() + (fin.k * dk.to(fin.k)).sum()).backward()
    assert rel(a0.grad, a64.grad) < 1e-4
    for n in ("dt", "angles", "k", "k_bias"):
        assert rel(leaves[n].grad, x64[n].grad) < 1e-4, n


@pytest.mark.parametrize("target", [1, 4, 10**6])
def test_chunk_group_layouts_match_reference(monkeypatch, target):
    """One group (state carried through every chunk), a few groups (pre-pass + group scan, a
    partial last group) and one chunk per group, with an initial state: outputs, final state and
    gradients all agree with the float64 reference."""
    from mamba3.ops.mamba3 import triton_siso_fwd as fw
    monkeypatch.setattr(fw, "GROUP_TARGET_PROGRAMS", target)
    B, T, H, N, P, S = 1, 83, 2, 16, 8, 4          # 6 chunks of 16, the last one partial
    xs = make_inputs(B=B, T=T, H=H, N=N, P=P, S=S, seed=5)
    init = make_state(B, H, P, N, S)
    y_ref, fin_ref = check_forward_backward(xs, 16, initial_state=init)
    for prefetch in (True, False):                 # v, skip, z loaded one chunk ahead or in step
        monkeypatch.setattr(fw, "GROUP_PREFETCH", prefetch)
        with torch.no_grad():                      # inference: no per-chunk states are kept
            y2, fin2 = mamba3_siso_triton(*xs.values(), initial_state=init, return_final_state=True, chunk_size=16)
        assert rel(y2, y_ref) < 1e-4 and rel(fin2.ssm, fin_ref.ssm) < 1e-4


@pytest.mark.parametrize("target", [1, 10**6])
def test_inference_output_chunk_rule_and_result(monkeypatch, target):
    """Inference walks the output kernel in chunks of INFER_CORE_CHUNK (here 16 under a caller's 32),
    in one group or in chunk groups whose state pre-pass keeps the caller's chunk; training and
    chunk sizes it does not divide keep the caller's."""
    from mamba3.ops.mamba3 import triton_siso_fwd as fw
    monkeypatch.setattr(fw, "INFER_CORE_CHUNK", 16)
    assert fw.infer_out_chunk(32, False) == 16
    assert fw.infer_out_chunk(32, True) is None and fw.infer_out_chunk(16, False) is None
    assert fw.infer_out_chunk(24, False) is None
    monkeypatch.setattr(fw, "GROUP_TARGET_PROGRAMS", target)
    calls = []
    kernel = fw._core_group_out_kernel
    monkeypatch.setattr(fw, "_core_group_out_kernel", type("K", (), {"__getitem__": lambda self, grid: (
        lambda *a, **k: calls.append((k["CHUNK"], a[17])) or kernel[grid](*a, **k))})())
    xs = make_inputs(B=2, T=83, H=3, N=16, P=8, S=4, seed=6)
    init = make_state(2, 3, 8, 16, 4)
    y_ref, fin_ref = check_forward_backward(xs, 32, initial_state=init)
    with torch.no_grad():
        y, fin = mamba3_siso_triton(*xs.values(), initial_state=init, return_final_state=True, chunk_size=32)
    cpg = 3 if target == 1 else 1                           # chunks of 32 per group: one group, or one each
    assert calls == [(32, cpg), (16, 2 * cpg)]              # the training forward, then inference
    assert rel(y, y_ref) < 1e-4 and rel(fin.ssm, fin_ref.ssm) < 1e-4


def test_group_pipeline_depth_rule(monkeypatch):
    """Hopper-class shared memory: the training depth, the deeper inference one up to chunk 64;
    fp32 operands and smaller parts: one stage."""
    from mamba3.ops.mamba3 import triton_siso_fwd as fw
    monkeypatch.setattr(fw, "INTERPRET", False)
    monkeypatch.setattr(fw, "_smem_optin", lambda index: 227 * 1024)
    depth = lambda *a, **k: fw.group_pipeline_depth(*a, **k)
    assert depth(torch.bfloat16, "cuda:0") == fw.GROUP_NUM_STAGES
    assert depth(torch.bfloat16, "cuda:0", inference=True) == fw.GROUP_NUM_STAGES_INFER
    assert depth(torch.bfloat16, "cuda:0", inference=True, chunk=128) == fw.GROUP_NUM_STAGES
    assert depth(torch.float32, "cuda:0", inference=True) == 1 and depth(torch.bfloat16, "cpu") == 1
    monkeypatch.setattr(fw, "_smem_optin", lambda index: 99 * 1024)
    assert depth(torch.bfloat16, "cuda:0", inference=True) == 1


def test_mamba2_inference_matches_reference():
    """Mamba-2 on the SISO kernels without gradients (the inference layout of the group core)."""
    from mamba3.ops.mamba2 import ssd
    from mamba3.ops.mamba3.triton_siso import ssd_triton
    g = torch.Generator().manual_seed(22)
    r = lambda *s: torch.randn(*s, generator=g).to(DEV)
    Bs, T, H, P, G, N = 2, 29, 4, 8, 2, 32
    xs = dict(x=r(Bs, T, H, P), dt=(torch.rand(Bs, T, H, generator=g) * 0.3 + 0.02).to(DEV),
              A=-(torch.rand(H, generator=g) + 0.2).to(DEV), B=r(Bs, T, G, N), C=r(Bs, T, G, N), D=r(H),
              z=r(Bs, T, H, P))
    init = r(Bs, H, P, N)
    y_ref, s_ref = ssd(*(t.double().cpu() for t in xs.values()), initial_state=init.double().cpu(),
                       return_final_state=True, impl="reference")
    y, s = ssd_triton(*xs.values(), initial_state=init, return_final_state=True, chunk_size=16)
    assert rel(y, y_ref) < 1e-4 and rel(s, s_ref) < 1e-4


def test_varlen_matches_reference():
    lens = [5, 0, 19, 9]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=DEV)
    xs = make_inputs(B=1, T=sum(lens), seed=5)
    init = make_state(len(lens), 2, 8, 16, 4, seed=6)
    _, y_ref, fin_ref = reference64(xs, cu_seqlens=cu, initial_state=init)
    y, fin = mamba3_siso_triton(*(xs[n] for n in NAMES), cu_seqlens=cu, initial_state=init,
                                return_final_state=True, chunk_size=16)
    assert rel(y, y_ref) < 1e-4
    for a, b in zip(fin, fin_ref):
        assert rel(a, b) < 1e-4


def test_bf16_within_tolerance():
    xs = make_inputs(T=40, seed=7, dtype=torch.bfloat16)
    x64, y_ref, _ = reference64(xs)
    leaves = {n: t.clone().requires_grad_(True) for n, t in xs.items()}
    y, _ = mamba3_siso_triton(*(leaves[n] for n in NAMES), chunk_size=16)
    assert y.dtype == torch.bfloat16
    assert rel(y, y_ref) < 2e-2
    dy = torch.randn_like(y_ref)
    (y_ref * dy).sum().backward()
    (y.float() * dy.to(y.device)).sum().backward()
    for n in ("q", "k", "v", "dA", "dt", "z"):
        assert rel(leaves[n].grad, x64[n].grad) < 3e-2, n


def test_bad_input_raises_before_launch():
    xs = make_inputs(T=8)
    with pytest.raises(ValueError, match="power of two"):
        mamba3_siso_triton(*(xs[n] for n in NAMES), chunk_size=24)
    x64 = {n: t.double() for n, t in xs.items()}
    with pytest.raises(TypeError, match="float32/bfloat16/float16"):
        mamba3_siso_triton(*(x64[n] for n in NAMES))
    if not HAS_CUDA:
        with pytest.raises(ValueError, match="impl='triton' needs CUDA"):
            mamba3_siso(*(xs[n] for n in NAMES), impl="triton")
    st = make_state(2, 2, 8, 16, 4)
    with pytest.raises(ValueError, match="p_block"):
        mamba3_siso_step_triton(*(xs[n][:, 0] if n not in ("q_bias", "k_bias", "D") else xs[n] for n in NAMES),
                                st, p_block=3)


@pytest.mark.parametrize("state_dtype,per_head,G,P,p_block,split", [
    (torch.float32, False, 1, 8, None, None), (torch.bfloat16, True, 2, 8, None, None),
    (torch.float32, True, 2, 12, 4, 1),   # state rows in loop steps of 4, the last one partly masked
    (torch.float32, False, 1, 12, 2, 4),  # rows over 4 programs: the last to finish writes the k / angle cache
    (torch.bfloat16, True, 2, 8, None, 2),
])
def test_step_matches_reference_loop(state_dtype, per_head, G, P, p_block, split):
    B, T, H, N, S = 3, 5, 4, 16, 4
    xs = make_inputs(B=B, T=T, G=G, H=H, N=N, P=P, S=S, per_head_angles=per_head, seed=11)
    init = make_state(B, H, P, N, S, seed=12)
    _, y_ref, fin_ref = reference64(xs, initial_state=init)
    state = Mamba3State(init.angle.clone(), init.ssm.to(state_dtype).clone(), init.k.clone(), init.v.clone())
    from mamba3.ops.mamba3.triton_step import _COUNTERS
    for buf in _COUNTERS.values():   # a test that failed mid-launch must not leave counts behind
        buf.zero_()
    ys = []
    for t in range(T):
        ys.append(mamba3_siso_step_triton(*(xs[n][:, t] if xs[n].dim() > 2 and n not in ("q_bias", "k_bias")
                                            else xs[n] for n in NAMES), state, p_block=p_block,
                                           split=split))
    tol = 1e-5 if state_dtype == torch.float32 else 2e-2
    assert rel(torch.stack(ys, 1), y_ref) < tol
    for a, b in zip(state, fin_ref):
        assert rel(a, b) < tol
    if split:
        assert int(_COUNTERS[y_ref.new_empty(0, device=DEV).device].abs().sum()) == 0   # every count was reset


@pytest.mark.parametrize("d2", [False, True])
def test_mamba2_ssd_on_siso_kernels(d2):
    from mamba3.ops.mamba2 import ssd
    from mamba3.ops.mamba3.triton_siso import ssd_triton
    g = torch.Generator().manual_seed(21)
    r = lambda *s: torch.randn(*s, generator=g).to(DEV)
    Bs, T, H, P, G, N = 2, 37, 4, 8, 2, 16
    xs = dict(x=r(Bs, T, H, P), dt=(torch.rand(Bs, T, H, generator=g) * 0.3 + 0.02).to(DEV),
              A=-(torch.rand(H, generator=g) + 0.2).to(DEV), B=r(Bs, T, G, N), C=r(Bs, T, G, N),
              D=r(H, P) if d2 else r(H), z=r(Bs, T, H, P))
    init = r(Bs, H, P, N)
    x64 = {n: t.double().cpu().requires_grad_(True) for n, t in xs.items()}
    y_ref, s_ref = ssd(*x64.values(), initial_state=init.double().cpu(), return_final_state=True, impl="reference")
    leaves = {n: t.clone().requires_grad_(True) for n, t in xs.items()}
    y, s = ssd_triton(*leaves.values(), initial_state=init, return_final_state=True, chunk_size=16)
    assert rel(y, y_ref) < 1e-4 and rel(s, s_ref) < 1e-4
    dy = torch.randn_like(y_ref)
    (y_ref * dy).sum().backward()
    (y * dy.to(y)).sum().backward()
    for n in xs:
        assert rel(leaves[n].grad, x64[n].grad) < 1e-4, n


MIMO_NAMES = ("q", "k", "v", "dA", "dt", "trap", "q_bias", "k_bias", "angles", "mimo_x", "mimo_z", "mimo_o", "D", "z")


def make_mimo(B=2, T=13, R=2, G=1, H=2, N=16, P=8, S=4, seed=31):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    dt = torch.rand(B, T, H, generator=g) * 0.4 + 0.05
    xs = dict(q=r(B, T, R, G, N), k=r(B, T, R, G, N), v=r(B, T, H, P), dA=dt * -(torch.rand(H, generator=g) + 0.3),
              dt=dt, trap=r(B, T, H), q_bias=1 + 0.1 * r(H, R, N), k_bias=1 + 0.1 * r(H, R, N), angles=r(B, T, S),
              mimo_x=1 + 0.2 * r(H, R, P), mimo_z=1 + 0.2 * r(H, R, P), mimo_o=1 + 0.2 * r(H, R, P), D=r(H),
              z=r(B, T, H, P))
    return {n: xs[n].to(DEV) for n in MIMO_NAMES}


@pytest.mark.parametrize("R,chunk,norm", [(2, 8, False), (4, 4, True)])
def test_mimo_matches_reference(R, chunk, norm):
    from mamba3.ops.mamba3 import mamba3_mimo_reference
    from mamba3.ops.mamba3.triton_mimo import mamba3_mimo_triton
    B, T, H, N, P, S = 2, 13, 2, 16, 8, 4
    xs = make_mimo(B=B, T=T, R=R, H=H, N=N, P=P, S=S)
    g = torch.Generator().manual_seed(32)
    init = Mamba3State(angle=torch.randn(B, H, S, generator=g).to(DEV), ssm=0.5 * torch.randn(B, H, P, N, generator=g).to(DEV),
                       k=torch.randn(B, R, H, N, generator=g).to(DEV), v=torch.randn(B, H, P, generator=g).to(DEV))
    w = (1 + 0.1 * torch.randn(H, P, generator=g)).to(DEV) if norm else None
    x64 = {n: t.double().cpu().requires_grad_(True) for n, t in xs.items()}
    y_ref, f_ref = mamba3_mimo_reference(*(x64[n] for n in MIMO_NAMES), initial_state=Mamba3State(
        *(t.double().cpu() for t in init)), return_final_state=True,
        outproj_norm_weight=None if w is None else w.double().cpu())
    leaves = {n: t.clone().requires_grad_(True) for n, t in xs.items()}
    y, fin = mamba3_mimo_triton(*(leaves[n] for n in MIMO_NAMES), initial_state=init, return_final_state=True,
                                chunk_size=chunk, outproj_norm_weight=w)
    assert_matches(y, fin, leaves, y_ref, f_ref, x64, MIMO_NAMES)


def test_mimo_varlen_matches_reference():
    from mamba3.ops.mamba3 import mamba3_mimo_reference
    from mamba3.ops.mamba3.triton_mimo import mamba3_mimo_triton
    lens = [6, 0, 11]
    cu = torch.tensor([0, 6, 6, 17], dtype=torch.int32, device=DEV)
    xs = make_mimo(B=1, T=sum(lens), seed=33)
    y_ref, f_ref = mamba3_mimo_reference(*(xs[n].double().cpu() for n in MIMO_NAMES), cu_seqlens=cu.cpu(),
                                         return_final_state=True)
    y, fin = mamba3_mimo_triton(*(xs[n] for n in MIMO_NAMES), cu_seqlens=cu, return_final_state=True, chunk_size=8)
    assert rel(y, y_ref) < 1e-4
    for a, b in zip(fin, f_ref):
        assert rel(a, b) < 1e-4


def test_no_rotary_angles_no_skip_no_gate():
    """S = 0 (no rotation), D = None, z = None: forward, gradients, and the step."""
    xs = make_inputs(T=19, S=0, seed=41)
    xs["D"], xs["z"] = None, None
    names = [n for n in NAMES if xs[n] is not None]
    x64 = {n: xs[n].double().cpu().requires_grad_(True) for n in names}
    y_ref, f_ref = mamba3_siso_reference(*(x64.get(n) for n in NAMES), return_final_state=True)
    leaves = {n: xs[n].clone().requires_grad_(True) for n in names}
    y, fin = mamba3_siso_triton(*(leaves.get(n) for n in NAMES), return_final_state=True, chunk_size=16)
    assert rel(y, y_ref) < 1e-4 and rel(fin.ssm, f_ref.ssm) < 1e-4
    dy = torch.randn_like(y_ref)
    (y_ref * dy).sum().backward()
    (y * dy.to(y)).sum().backward()
    for n in ("q", "k", "v", "dA", "dt", "trap", "q_bias"):
        assert rel(leaves[n].grad, x64[n].grad) < 1e-4, n
    state = Mamba3State(*(t.clone() for t in fin))
    nxt = {n: (xs[n][:, 0] if n not in ("q_bias", "k_bias") else xs[n]) for n in names}
    y1 = mamba3_siso_step_triton(*(nxt.get(n) for n in NAMES), state)
    y1_ref, _ = mamba3_siso_step_reference(*(nxt.get(n) for n in NAMES), Mamba3State(*(t.clone() for t in fin)))
    assert rel(y1, y1_ref) < 1e-5


def test_fp32_dot_precision_follows_torch_and_full_precision_takes_8_warps():
    from mamba3.ops.mamba3.triton_siso_fwd import chunk_warps, dot_precision, group_warps
    before = torch.get_float32_matmul_precision()
    try:
        assert dot_precision(torch.float32) == "ieee" and dot_precision(torch.bfloat16) == "tf32"
        torch.set_float32_matmul_precision("high")
        assert dot_precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)
    assert chunk_warps(64, 64, 16, "ieee") == 8 and group_warps("ieee") == 8
    assert chunk_warps(64, 64, 16, "tf32") == 4 and chunk_warps(64, 128, 64, "tf32") == 8


def test_tf32_setting_still_matches_reference():
    """Under "high" the kernels take the tf32 / 4-warp launch settings (the interpreter computes
    the dots in full precision, so this checks the launch path, not tf32 rounding)."""
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        check_forward_backward(make_inputs(), 16)
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("P,has_z,do_dtype", [(8, True, torch.float32), (24, True, torch.bfloat16), (16, False, torch.float32)])
def test_gate_backward_kernel_matches_torch(P, has_z, do_dtype):
    """gate_bwd (one pass: dO, dz, dskip) == autograd of y = ypre * silu(z) and of sum_p dO v, with
    a row count that is not a multiple of the kernel's row block and P not a power of two."""
    from mamba3.ops.mamba3.triton_siso_bwd import gate_bwd
    g = torch.Generator().manual_seed(3)
    B, T, H = 2, 37, 3
    r = lambda: torch.randn(B, T, H, P, generator=g, dtype=torch.float64)  # noqa: E731
    dy, z, ypre, v = r(), r(), r(), r()
    zl, yl = z.clone().requires_grad_(True), ypre.clone().requires_grad_(True)
    out = yl * torch.nn.functional.silu(zl) if has_z else yl
    out.backward(dy)
    do, dz, dskip = gate_bwd(dy.float().to(DEV), z.float().to(DEV) if has_z else None, ypre.float().to(DEV),
                             v.float().to(DEV), do_dtype)
    tol = 1e-5 if do_dtype == torch.float32 else 1e-2
    assert do.dtype == do_dtype and rel(do, yl.grad) < tol
    assert rel(dskip, (yl.grad * v).sum(-1)) < 1e-5
    if has_z:
        assert rel(dz, zl.grad) < 1e-5
    else:
        assert dz is None


@pytest.mark.parametrize("shape", [(3, 5), (2, 4, 1500), (7, 1), (0, 9), (1, 9000)])
def test_row_cumsum_kernel(shape):
    """The backward's block-sum scan (short and long rows, length one, no rows, past the one-tile limit)."""
    from mamba3.ops.mamba3.triton_siso_bwd import row_cumsum
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3)).to(DEV)
    want = x.double().cumsum(-1)
    got = row_cumsum(x)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * (1 + want.abs().max().item() if x.numel() else 1))


@pytest.mark.parametrize("shape,splits", [((2, 300, 40), 1), ((2, 300, 40), 3), ((1, 5, 7), 1), ((1, 5, 7), 8),
                                          ((2, 0, 8), 2), ((3, 129, 1), 1)])
def test_middle_sum_kernel(monkeypatch, shape, splits):
    """The bias-gradient partial sums: several row tiles with a partial last one, ragged columns,
    no rows (zeros), one column; the rows in one program or split over several (more splits than
    rows included)."""
    from mamba3.ops.mamba3 import triton_siso_bwd as bw
    from mamba3.ops.mamba3.triton_siso_bwd import middle_sum
    monkeypatch.setattr(bw, "MIDDLE_SUM_SPLITS", splits)
    monkeypatch.setattr(bw, "MIDDLE_SUM_ROWS", 32)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(4)).to(DEV)
    got = middle_sum(x)
    assert got.shape == (shape[0], shape[2]) and got.dtype == torch.float32
    assert torch.allclose(got.double(), x.double().sum(1), rtol=1e-5, atol=1e-4)


def test_prep_rows_rule(monkeypatch):
    """Row blocks: the forward preparation's (and its phase blocks') PREP_ROWS, the backward
    preparation's PREP_BWD_ROWS within them; never past the chunk."""
    from mamba3.ops.mamba3 import triton_siso_bwd as bw
    from mamba3.ops.mamba3 import triton_siso_fwd as fw
    monkeypatch.setattr(fw, "PREP_ROWS", 8)
    monkeypatch.setattr(bw, "PREP_BWD_ROWS", 4)
    assert (fw.prep_rows(64), bw.prep_bwd_rows(64), fw.prep_rows(2), bw.prep_bwd_rows(2)) == (8, 4, 2, 2)
    monkeypatch.setattr(bw, "PREP_BWD_ROWS", 16)
    assert bw.prep_bwd_rows(64) == 8


def test_walk_split_rule():
    """The state-gradient pass: a walk with all of P per program from 128 (batch, head) pairs, 4 P
    blocks from 64, chunk-parallel below; never blocks under 16 rows of P."""
    from mamba3.ops.mamba3.triton_siso_bwd import walk_split
    assert [walk_split(bh, 64) for bh in (256, 128, 127, 64, 63, 32)] == [1, 1, 4, 4, 0, 0]
    assert walk_split(64, 32) == 2 and walk_split(64, 16) == 1 and walk_split(256, 16) == 1
