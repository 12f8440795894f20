"""fp32 where the math needs it: one test per place (dt / A / trapezoid / phase projections,
decode caches, op final states, long cumulative phases, bf16 vs fp32 agreement) and
detect_anomalies naming the layer and the op."""
from __future__ import annotations

import math

import pytest
import torch

import mamba3.layers.mamba3 as m3mod
from mamba3.debug import AnomalyError, detect_anomalies
from mamba3.layers import S4D, Attention, GatedDeltaNet, Mamba1, Mamba2, Mamba3
from mamba3.models import LanguageModel, ModelConfig
from mamba3.ops import gated_delta_rule, mamba3_mimo, mamba3_siso, selective_scan, ssd
from mamba3.ops.mamba3.common import TWO_PI, cumulative_angles

BF16, F32, F64 = torch.bfloat16, torch.float32, torch.float64
D = 32


def mamba3_layer(dtype, **kw):
    torch.manual_seed(0)
    return Mamba3(D, d_state=16, headdim=16, chunk_size=8, dtype=dtype, **kw).eval()


@pytest.mark.parametrize("mimo", [False, True], ids=["siso", "mimo"])
def test_bf16_layer_feeds_fp32_dt_dA_trap_angles_to_the_op(monkeypatch, mimo):
    """dt = softplus(.), A, dA = A * dt, trapezoid logits and rotary angles reach the op in fp32
    even from a bf16 layer (the projections themselves are bf16)."""
    seen = {}
    name = "mamba3_mimo" if mimo else "mamba3_siso"
    real = getattr(m3mod, name)

    def spy(q, k, v, dA, dt, trap, q_bias, k_bias, angles, *a, **kw):
        seen.update(q=q.dtype, v=v.dtype, dA=dA.dtype, dt=dt.dtype, trap=trap.dtype, angles=angles.dtype,
                    q_bias=q_bias.dtype)
        return real(q, k, v, dA, dt, trap, q_bias, k_bias, angles, *a, **kw)

    monkeypatch.setattr(m3mod, name, spy)
    layer = mamba3_layer(BF16, is_mimo=mimo, mimo_rank=2)
    with torch.no_grad():
        layer(torch.randn(2, 5, D, dtype=BF16))
    assert seen["v"] == BF16 and seen["q"] == BF16
    for k in ("dA", "dt", "trap", "angles", "q_bias"):
        assert seen[k] == F32, f"{k} reaches the op in {seen[k]}"


CACHE_FIELDS = {  # field -> dtype a bf16 layer's cache must hold
    "mamba3": ({"angle": F32, "ssm": F32, "k": BF16, "v": BF16}, lambda dt: mamba3_layer(dt)),
    "mamba3_mimo": ({"angle": F32, "ssm": F32}, lambda dt: mamba3_layer(dt, is_mimo=True, mimo_rank=2)),
    "mamba2": ({"ssm": F32}, lambda dt: Mamba2(D, d_state=8, headdim=16, dtype=dt)),
    "mamba1": ({"ssm": F32}, lambda dt: Mamba1(D, d_state=4, dtype=dt)),
    "gdn": ({"ssm": F32}, lambda dt: GatedDeltaNet(D, head_dim=8, num_heads=2, dtype=dt)),
    "s4d": ({"state": F32}, lambda dt: S4D(D, d_state=8, dtype=dt)),
}


@pytest.mark.parametrize("name", list(CACHE_FIELDS))
def test_bf16_layer_cache_keeps_fp32_state_and_phase(name):
    want, build = CACHE_FIELDS[name]
    layer = build(BF16).eval()
    cache = layer.allocate_inference_cache(2, 16)
    fields = dict(cache.tensors())
    for field, dt in want.items():
        if field not in fields:  # GDN names its state differently: any float state field must be fp32
            assert name == "gdn", f"{name} cache has no field {field}: {sorted(fields)}"
            fp = [n for n, t in fields.items() if "conv" not in n and t.is_floating_point()]
            assert fp and all(fields[n].dtype == F32 for n in fp), {n: fields[n].dtype for n in fp}
            continue
        assert fields[field].dtype == dt, f"{name}.{field} is {fields[field].dtype}, want {dt}"
    with torch.no_grad():  # a prefill and a step leave the dtypes as they were
        layer(torch.randn(2, 3, D, dtype=BF16), cache=cache)
        layer.step(torch.randn(2, D, dtype=BF16), cache)
    for n, t in cache.tensors():
        assert t.dtype == fields[n].dtype, f"{name}.{n} changed dtype to {t.dtype}"


OPS = ["mamba3_siso", "mamba3_mimo", "ssd", "selective_scan", "gated_delta_rule"]


def op_args(op, dtype, T=16, B=1):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    H, P, N = 2, 4, 8
    dt = (torch.rand(B, T, H, generator=g) * 0.2 + 0.01)
    if op == "mamba3_siso":
        return mamba3_siso, (r(B, T, 1, N), r(B, T, 1, N), r(B, T, H, P), -dt, dt, torch.randn(B, T, H, generator=g),
                             torch.ones(H, N), torch.ones(H, N), torch.randn(B, T, 2, generator=g))
    if op == "mamba3_mimo":
        R = 2
        return mamba3_mimo, (r(B, T, R, 1, N), r(B, T, R, 1, N), r(B, T, H, P), -dt, dt,
                             torch.randn(B, T, H, generator=g), torch.ones(H, R, N), torch.ones(H, R, N),
                             torch.randn(B, T, 2, generator=g), torch.ones(H, R, P) / R, torch.ones(H, R, P),
                             torch.ones(H, R, P) / R)
    if op == "ssd":
        return ssd, (r(B, T, H, P), dt, -torch.rand(H, generator=g), r(B, T, 1, N), r(B, T, 1, N))
    if op == "selective_scan":
        return selective_scan, (r(B, T, P), torch.rand(B, T, P, generator=g) * 0.2, -torch.rand(P, N, generator=g),
                                r(B, T, N), r(B, T, N))
    k = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g), dim=-1).to(dtype)
    return gated_delta_rule, (r(B, T, H, N), k, r(B, T, H, P), -torch.rand(B, T, H, generator=g) * 0.1,
                              torch.rand(B, T, H, generator=g))


def _states(st):
    return list(st) if isinstance(st, tuple) else [st]


@pytest.mark.parametrize("op", OPS)
def test_bf16_op_returns_fp32_state_and_matches_fp32(op):
    """bf16 activations: the final state (and phase) come back fp32, and the output agrees with
    an fp32 run on the same (bf16-rounded) values within bf16 output rounding."""
    fn, args = op_args(op, BF16, T=48)
    y16, st16 = fn(*args, return_final_state=True)
    y32, st32 = fn(*[a.float() if a.dtype == BF16 else a for a in args], return_final_state=True)
    assert y16.dtype == BF16
    for s in _states(st16):
        if s.dtype != BF16 or op not in ("mamba3_siso", "mamba3_mimo"):  # Mamba3State.k / .v follow v's dtype
            assert s.dtype == F32, f"{op} final state field in {s.dtype}"
    err = (y16.float() - y32).abs().max() / y32.abs().max()
    assert err < 2e-2, f"{op}: bf16 vs fp32 relative error {err:.3g}"
    for a, b in zip(_states(st16), _states(st32)):
        if a.dtype == F32:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("op", ["ssd", "mamba3_siso", "gated_delta_rule"])
def test_long_bf16_sequence_no_accumulation_drift(op):
    """T = 2048 with slow decays: cumulative decay sums stay fp32, so the bf16 run tracks the
    float64 reference of the same values to bf16 output precision (no growth with T)."""
    fn, args = op_args(op, BF16, T=2048)
    y16, _ = fn(*args)
    y64, _ = fn(*[a.double() for a in args], impl="reference")
    err = ((y16.double() - y64).abs().max() / y64.abs().max()).item()
    assert err < 2e-2, f"{op}: bf16 long-sequence relative error {err:.3g}"


def test_cumulative_phase_20k_tokens_fp32():
    """20k tokens of fp32 phase increments: the cumulative phase stays within 1e-6 rad of the
    float64 sum (fp32 partial sums and fp32(2*pi) wraps drifted by 2e-4 rad here before the
    float64 carry; a plain fp32 cumsum drifts by ~2e-4)."""
    g = torch.Generator().manual_seed(0)
    T = 20_000
    inc = (torch.rand(1, T, 2, 3, generator=g) * 0.5).float()
    got = cumulative_angles(inc)
    ref = torch.remainder(torch.cumsum(inc.double(), 1), TWO_PI)
    diff = torch.remainder(got.double() - ref + math.pi, TWO_PI) - math.pi
    assert got.dtype == F32
    assert diff.abs().max() < 1e-6, diff.abs().max()
    naive = torch.remainder(torch.cumsum(inc, 1).double(), TWO_PI)
    naive_err = (torch.remainder(naive - ref + math.pi, TWO_PI) - math.pi).abs().max()
    assert naive_err > 10 * diff.abs().max(), "the test no longer distinguishes blocked from naive cumsum"


def test_op_phase_after_20k_tokens():
    """Through the op: the final state's phase after 20k tokens (chunked, fp32) equals the float64
    sum of dt * pi * tanh(angles) mod 2*pi."""
    g = torch.Generator().manual_seed(1)
    B, T, H, P, N = 1, 20_000, 1, 1, 2
    dt = torch.rand(B, T, H, generator=g) * 0.1 + 0.01
    ang = torch.randn(B, T, 1, generator=g)
    z = lambda *s: torch.zeros(*s)  # noqa: E731
    _, st = mamba3_siso(z(B, T, 1, N), z(B, T, 1, N), z(B, T, H, P), -dt, dt, z(B, T, H), z(H, N), z(H, N), ang,
                        return_final_state=True, chunk_size=256)
    ref = torch.remainder((dt.double() * math.pi * torch.tanh(ang.double())).sum(1), TWO_PI)
    diff = torch.remainder(st.angle[0, 0].double() - ref[0] + math.pi, TWO_PI) - math.pi
    assert st.angle.dtype == F32 and diff.abs().max() < 1e-5, diff  # fp32 increments: ~1e-8 each


def test_decode_phase_after_5k_steps():
    """Decode: 5k single-token steps (20k take 8 s on CI; same per-step math) keep the cached phase within 2e-5 rad of the float64 sum
    (each step adds in fp32 but wraps in float64, so only per-step rounding accumulates)."""
    from mamba3.ops import mamba3_siso_step
    from mamba3.ops.mamba3.common import zero_state
    g = torch.Generator().manual_seed(2)
    B, H, P, N, T = 1, 1, 1, 2, 5_000
    dt = torch.rand(T, B, H, generator=g) * 0.1 + 0.01
    ang = torch.randn(T, B, 1, generator=g)
    st = zero_state(B, H, P, N, 1)
    z = lambda *s: torch.zeros(*s)  # noqa: E731
    for t in range(T):
        mamba3_siso_step(z(B, 1, N), z(B, 1, N), z(B, H, P), -dt[t], dt[t], z(B, H), z(H, N), z(H, N), ang[t], None,
                         None, st, impl="reference")
    ref = torch.remainder((dt.double() * math.pi * torch.tanh(ang.double())).sum(0), TWO_PI)
    diff = torch.remainder(st.angle[0, 0].double() - ref[0] + math.pi, TWO_PI) - math.pi
    assert diff.abs().max() < 2e-5, diff


def test_bf16_model_matches_fp32_model():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layer=2, vocab_size=50, layer_pattern="MA",
                      mixer_cfg={"mamba3": {"d_state": 16, "headdim": 16, "chunk_size": 8}, "attention": {"num_heads": 2}})
    m32 = LanguageModel(cfg).eval()
    m16 = LanguageModel(cfg, dtype=BF16).eval()
    m16.load_state_dict(m32.state_dict())
    ids = torch.randint(0, 50, (2, 24))
    with torch.no_grad():
        p32 = m32(ids).logits.float().softmax(-1)
        p16 = m16(ids).logits.float().softmax(-1)
    assert (p32 - p16).abs().max() < 5e-2
    assert (p32.argmax(-1) == p16.argmax(-1)).float().mean() > 0.9


# ------------------------------------------------------------------------------------------------
def test_detect_anomalies_names_the_layer():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layer=3, vocab_size=50,
                      mixer_cfg={"mamba3": {"d_state": 16, "headdim": 16, "chunk_size": 8}})
    m = LanguageModel(cfg).eval()
    with torch.no_grad():
        m.backbone.layers[1].mixer.out_proj.weight[0, 0] = float("inf")
    with torch.no_grad(), pytest.raises(AnomalyError) as info:
        with detect_anomalies(m):
            m(torch.randint(0, 50, (1, 8)))
    msg = str(info.value)
    assert "backbone.layers.1.mixer.out_proj" in msg and "Linear" in msg, msg


def test_detect_anomalies_names_the_op():
    """Finite inputs, non-finite output (a positive log decay overflows exp): the op is named."""
    fn, args = op_args("mamba3_siso", F32, T=8)
    args = list(args)
    args[3] = torch.full_like(args[3], 200.0)  # dA > 0: exp(dA) overflows fp32
    with pytest.raises(AnomalyError) as info:
        with detect_anomalies():
            fn(*args)
    assert "mamba3_siso[" in str(info.value), str(info.value)


def test_detect_anomalies_off_costs_nothing_and_lets_nan_through():
    """Outside the context the same overflow is not checked (propagation, no exception)."""
    fn, args = op_args("mamba3_siso", F32, T=8)
    args = list(args)
    args[3] = torch.full_like(args[3], 200.0)
    y, _ = fn(*args)
    assert not torch.isfinite(y).all()
