"""Portability of the Triton kernels: shared memory per launch config against a 99 KB part
(sm_86 / sm_89 opt-in limit), measured by compiling the real kernels offline for sm_86 (no GPU
needed: triton's bundled ptxas), plus the prune hook and launch check in triton_utils."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="the portability checks compile the Triton kernels: needs triton")

from mamba3.ops import triton_utils as tu  # noqa: E402

BF16, F32 = torch.bfloat16, torch.float32
DEFAULT = dict(chunk=64, d_state=128, headdim=64)  # Mamba3 layer defaults (chunk_size, d_state, headdim)


FAST_KERNELS = ["chunk_state", "chunk_out", "prep_qk", "group_state", "group_out", "chunk_dstate", "chunk_bwd",
                "prep_bwd", "step"]
QUERIES = ([(k, 64, 128, 64, BF16, 86) for k in FAST_KERNELS]
           + [(k, 64, 128, 64, F32, 86) for k in ("chunk_state", "chunk_out", "group_out", "chunk_dstate")]
           + [("chunk_bwd", 32, 64, 64, BF16, 86)])
_RESULTS = {}


def _compiled(kernel, dtype, **shape):
    """Compiled sizes of every config this file needs, from one subprocess (the test session runs
    the kernels under TRITON_INTERPRET=1, which cannot compile)."""
    if not _RESULTS:
        try:
            _RESULTS.update(zip(QUERIES, tu.compiled_smem_batch(QUERIES)))
        except Exception as e:  # pragma: no cover - depends on the triton install
            _RESULTS["error"] = str(e)
    key = (kernel, shape["chunk"], shape["d_state"], shape["headdim"], dtype, 86)
    got = _RESULTS.get(key, _RESULTS.get("error", "not queried"))
    if isinstance(got, str):
        pytest.skip(f"offline compile for sm_86 unavailable: {got[:300]}")
    return got


@pytest.mark.parametrize("kernel", FAST_KERNELS)
def test_default_bf16_configs_fit_99kb(kernel):
    """Every kernel of a bf16 forward + backward at the layer defaults fits a 99 KB part, and the
    analytic bound used for pruning is >= the compiled number."""
    smem = _compiled(kernel, BF16, **DEFAULT)
    assert smem <= tu.SMEM_99KB, f"{kernel}: {smem} bytes > 99 KB"
    assert tu.analytic_smem(kernel, DEFAULT["chunk"], DEFAULT["d_state"], DEFAULT["headdim"], BF16) >= smem


@pytest.mark.parametrize("kernel", ["chunk_state", "chunk_out", "group_out", "chunk_dstate"])
def test_default_fp32_forward_fits_99kb(kernel):
    smem = _compiled(kernel, F32, **DEFAULT)
    assert smem <= tu.SMEM_99KB
    assert tu.analytic_smem(kernel, DEFAULT["chunk"], DEFAULT["d_state"], DEFAULT["headdim"], F32) >= smem


@pytest.mark.xfail(strict=True, reason="known: the fp32 backward chunk kernel at the defaults (C=64, N=128, P=64) "
                                       "compiles to 144 KB (147456 bytes, bound 224 KB): it fits H100/H200 and "
                                       "A100 (163 KB), not a 99 KB part; the launcher does "
                                       "not shrink the chunk (left to the kernels owner; check_launch_fits names it)")
def test_default_fp32_backward_fits_99kb():
    assert tu.analytic_smem("chunk_bwd", 64, 128, 64, F32) <= tu.SMEM_99KB


def test_backward_bound_covers_the_compiled_size():
    """The analytic bound of the biggest kernel is >= the compiled size (bf16, compiled here; fp32
    at the defaults: bound 229376 bytes, compiled 147456 for sm_86, see RELIABILITY.md; compiling
    it takes ~100 s, so only the bf16 twin is compiled in the tests)."""
    smem = _compiled("chunk_bwd", BF16, chunk=32, d_state=64, headdim=64)
    assert smem <= tu.analytic_smem("chunk_bwd", 32, 64, 64, BF16)
    assert tu.analytic_smem("chunk_bwd", 64, 128, 64, F32) == 229376


def test_check_launch_fits_names_the_sizes(monkeypatch):
    monkeypatch.setattr(tu, "device_smem_limit", lambda device=None: tu.SMEM_99KB)
    _compiled("chunk_bwd", BF16, **DEFAULT)  # warm the batch (and skip without an offline compiler)
    # compiled sizes where this file has them, else the bound (exact for fp32 chunk_bwd; ~100 s to compile)
    monkeypatch.setattr(tu, "compiled_smem", lambda *a: _RESULTS[a] if isinstance(_RESULTS.get(a), int)
                        else tu.analytic_smem(*a[:5]))
    tu.check_launch_fits(64, 128, 64, BF16, arch=86)             # bound 128 KB, compiled 64 KB: fits
    tu.check_launch_fits(64, 128, 64, F32, backward=False)       # forward only fits
    with pytest.raises(ValueError, match="chunk_size=64, d_state=128, headdim=64.*chunk_bwd"):
        tu.check_launch_fits(64, 128, 64, F32, arch=86)
    with pytest.raises(ValueError, match="chunk_size=256"):
        tu.check_launch_fits(256, 256, 128, BF16, arch=86)


@pytest.mark.parametrize("dtype", [BF16, F32])
def test_grid_pruned_counts(dtype):
    """Over chunk 16..256 x d_state 32..256 x headdim 32..128, the configs a 99 KB part must prune
    (analytic, fwd + bwd) are exactly those with a kernel over the limit, and the smallest chunk
    always fits (so pruning never empties the candidate list)."""
    pruned, total = 0, 0
    for N in (32, 64, 128, 256):
        for P in (32, 64, 128):
            fits = []
            for C in (16, 32, 64, 128, 256):
                total += 1
                need = max(tu.analytic_smem(k, C, N, P, dtype) for k in FAST_KERNELS)
                fits.append(need <= tu.SMEM_99KB)
                pruned += not fits[-1]
            assert fits == sorted(fits, reverse=True), "fitting must be monotone in the chunk size"
            if N <= 128 and P <= 64:
                assert fits[0], f"C=16 must fit at N={N}, P={P}"
    assert 0 < pruned < total


def test_smem_pruner_keeps_fitting_configs():
    cfgs = [triton.Config({"CHUNK": c}, num_warps=4, num_stages=1) for c in (32, 64, 128, 256)]
    est = lambda kw, nw, ns: tu.analytic_smem("chunk_out", kw["CHUNK"], kw["N"], kw["P"], BF16)  # noqa: E731
    prune = tu.smem_pruner(est, limit=tu.SMEM_99KB)
    kept = prune(cfgs, {"N": 128, "P": 64})
    assert [c.kwargs["CHUNK"] for c in kept] == [32, 64]
    tiny = tu.smem_pruner(est, limit=1024)(cfgs, {"N": 128, "P": 64})  # nothing fits: keep the smallest
    assert [c.kwargs["CHUNK"] for c in tiny] == [32]


def test_device_limit_without_cuda():
    if torch.cuda.is_available():
        assert tu.device_smem_limit() >= 48 * 1024
    else:
        assert tu.device_smem_limit() == tu.SMEM_99KB


def test_triton_version_recorded():
    """CI runs one triton version (see .ci/run); RELIABILITY.md states which. Fails loudly if the
    installed major version changes, so the shared-memory numbers get re-measured."""
    major = int(triton.__version__.split(".")[0])
    assert major == 3, f"shared-memory numbers were measured with triton 3.x, found {triton.__version__}"


@pytest.mark.parametrize("dtype", [BF16, F32])
def test_launch_params_mirror_the_launchers(dtype):
    """The smem accounting compiles what the launchers launch: rows / warps of the preparation
    kernels and the chunk backward's column blocks / warps (bwd_layout) agree with the modules."""
    from mamba3.ops.mamba3 import triton_siso_bwd as bw
    from mamba3.ops.mamba3 import triton_siso_fwd as fw
    C, N, P = DEFAULT["chunk"], DEFAULT["d_state"], DEFAULT["headdim"]
    const, nw = tu.launch_params("prep_qk", C, N, P, dtype)
    assert (const["ROWS"], nw) == (fw.prep_rows(C), fw.PREP_NUM_WARPS)
    const, nw = tu.launch_params("prep_bwd", C, N, P, dtype)
    assert (const["ROWS"], nw) == (bw.prep_bwd_rows(C), bw.PREP_BWD_NUM_WARPS)
    const, nw = tu.launch_params("chunk_bwd", C, N, P, dtype)
    prec = "ieee" if dtype == F32 else "tf32"
    assert (const["NSPLIT"], nw) == bw.bwd_layout(dtype, const["BLOCK_N"],   # a 99 KB part: not "deep"
                                                  fw.chunk_warps(C, const["BLOCK_N"], const["BLOCK_P"], prec))[:2]
