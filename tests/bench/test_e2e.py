"""The fast inference path equals the plain model (CPU, tiny model, greedy)."""
import pytest
import torch

from mamba3.bench.e2e import fast_generate, run_config
from mamba3.models import LanguageModel, ModelConfig


@pytest.mark.parametrize("pattern", [None, "MMA"])
def test_fast_path_greedy_tokens_equal_generate(pattern):
    cfg = ModelConfig.from_preset("tiny")
    if pattern:
        cfg = ModelConfig.from_dict({**cfg.to_dict(), "layer_pattern": pattern,
                                     "mixer_cfg": {**cfg.mixer_cfg, "attention": {"num_heads": 2, "rope": False}}})
    torch.manual_seed(0)
    model = LanguageModel(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (3, 21))
    fast = fast_generate(model, prompt, 12, prefill_chunk=8)   # prefill in 3 slices through the cache
    ref = model.generate(prompt, max_new_tokens=12, temperature=0).tokens
    assert torch.equal(fast["tokens"], ref)
    # logits of the sliced prefill equal one full forward
    cache = model.allocate_inference_cache(3, 40)
    from mamba3.bench.e2e import prefill
    torch.testing.assert_close(prefill(model, prompt, cache, 8), model(prompt).logits[:, -1], atol=1e-4, rtol=1e-4)


def test_run_config_reports_rows_on_cpu():
    row = run_config("tiny", 16, batch=2, reps=1, device="cpu", dtype=torch.float32, prefill_chunk=8)
    assert row["prefill_tok_s"] > 0 and row["decode_ms_per_step"] > 0 and not row["extrapolated"]
    assert row["cache_bytes"] > 0


def _decode(model, prompt, steps, compile, before_decode=None):
    """Prefill eagerly, then ``steps`` GraphDecoder steps: (tokens [B, steps], last logits)."""
    from mamba3.bench.e2e import GraphDecoder, prefill
    with torch.no_grad():
        cache = model.allocate_inference_cache(prompt.shape[0], prompt.shape[1] + steps)
        first = prefill(model, prompt, cache, 8).argmax(-1)
        if before_decode is not None:
            before_decode()
        dec = GraphDecoder(model, cache, first, use_cuda_graph=False, compile=compile)
        toks = torch.stack([dec().clone() for _ in range(steps)], 1)
    return toks, dec.logits


def _tiny(n_layer, dtype=torch.float32):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", n_layer=n_layer)
    return LanguageModel(cfg, dtype=dtype).eval(), torch.randint(0, cfg.vocab_size, (3, 9))


def test_compiled_decode_step_equals_eager_through_the_step_op(monkeypatch):
    """compile=<backend>: the whole-model step traced fullgraph; Triton dispatch pretended so the
    SSM step is the mamba3::siso_step custom op as on CUDA (on CPU it runs its PyTorch form).
    aot_eager traces what Inductor gets (dynamo + functionalisation) without compiling C++."""
    from mamba3.ops.mamba3 import interface
    model, prompt = _tiny(2)
    ref_tok, ref_logits = _decode(model, prompt, 5, compile=False)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    pretend = lambda: monkeypatch.setattr(interface, "triton_available", lambda device: True)  # noqa: E731
    tok, logits = _decode(model, prompt, 5, compile=backend, before_decode=pretend)
    torch._dynamo.reset()
    assert len(graphs) == 1 and "mamba3.siso_step" in graphs[0]      # one graph: no break, no recompile
    assert torch.equal(tok, ref_tok)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_decode_inductor_equals_eager_and_updates_state_in_place(monkeypatch):
    """compile=True (Inductor; CPU C++ codegen, ~30 s cold on 2 cores, hence slow: the aot_eager
    test above covers the same code up to Inductor). Through the step custom op as on CUDA, and the
    SSM state is handed to the op as the cache's own tensor (reinplaced), not a copy of it."""
    from torch._inductor.utils import run_and_get_code
    from mamba3.ops.mamba3 import interface
    model, prompt = _tiny(1)
    ref_tok, ref_logits = _decode(model, prompt, 4, compile=False)
    pretend = lambda: monkeypatch.setattr(interface, "triton_available", lambda device: True)  # noqa: E731
    torch._dynamo.reset()
    (tok, logits), codes = run_and_get_code(_decode, model, prompt, 4, True, pretend)
    torch._dynamo.reset()
    assert torch.equal(tok, ref_tok)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    calls = [line.split("siso_step.default(", 1)[1] for c in codes for line in c.splitlines()
             if "siso_step.default(" in line]
    assert len(calls) == 1, calls
    args, depth, cur = [], 0, ""
    for ch in calls[0]:  # split the call's arguments at top-level commas
        if ch == "," and depth == 0:
            args.append(cur.strip())
            cur = ""
            continue
        depth += (ch == "(") - (ch == ")")
        if depth < 0:
            break
        cur += ch
    args.append(cur.strip())
    assert len(args) == 15 and args[12].startswith("arg"), args   # ssm: the graph's input buffer itself


def _prefill_pair(model, prompt, chunk, compile):
    """(eager logits, cache), (prefill with ``compile`` logits, cache)."""
    from mamba3.bench.e2e import prefill
    out = []
    for c in (False, compile):
        cache = model.allocate_inference_cache(prompt.shape[0], prompt.shape[1] + 1)
        out.append((prefill(model, prompt, cache, chunk, compile=c), cache))
    return out


def _assert_same_prefill(a, b, tol):
    torch.testing.assert_close(b[0], a[0], rtol=tol, atol=tol)
    for (n, x), (_, y) in zip(a[1].tensors(), b[1].tensors()):
        torch.testing.assert_close(y, x, rtol=tol, atol=tol, msg=n)


def test_compiled_prefill_equals_eager_through_the_fused_op(monkeypatch):
    """compile=<backend> for prefill: each slice is one fullgraph whole-model forward whose SSM is
    the mamba3::siso_fused custom op (Triton dispatch pretended, as on CUDA: on CPU fp32 the op runs
    the Triton kernels under the interpreter, eager runs the chunked form). One graph per slice
    length (8, 4), none recompiled for a second prompt and cache; last-token logits and
    every cache state equal eager."""
    from mamba3.ops.mamba3 import interface
    model, _ = _tiny(1)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, model.config.vocab_size, (2, 12), generator=g) for _ in range(2)]
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    with torch.no_grad():
        for prompt in prompts:
            monkeypatch.setattr(interface, "triton_available", lambda device: False)
            eager = _prefill_pair(model, prompt, 8, False)[0]
            monkeypatch.setattr(interface, "triton_available", lambda device: True)
            comp = _prefill_pair(model, prompt, 8, backend)[1]
            _assert_same_prefill(eager, comp, 1e-4)
    torch._dynamo.reset()
    assert len(graphs) == 2 and all("mamba3.siso_fused" in c and "siso_fwd" not in c for c in graphs)


def test_fast_generate_compile_covers_prefill_and_decode():
    """fast_generate(compile=...) compiles the prefill slices too; tokens equal the eager path."""
    model, prompt = _tiny(1)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    ref = fast_generate(model, prompt, 4, prefill_chunk=8)["tokens"]
    torch._dynamo.reset()
    got = fast_generate(model, prompt, 4, prefill_chunk=8, compile=backend)["tokens"]
    torch._dynamo.reset()
    assert torch.equal(got, ref)
    assert len(graphs) == 3   # prefill slices of 8 and 1 tokens, the decode step
    graphs.clear()
    got = fast_generate(model, prompt, 4, prefill_chunk=8, compile=backend, compile_prefill=False)["tokens"]
    torch._dynamo.reset()
    assert torch.equal(got, ref)
    assert len(graphs) == 1   # the decode step only


@pytest.mark.slow
def test_compiled_prefill_inductor_equals_eager_bf16(monkeypatch):
    """compile=True (Inductor; CPU C++ codegen, ~15 s cold on 2 cores, hence slow: the aot_eager
    test above covers the same code up to Inductor), bf16 weights as on the GPU, through the fused
    op (its chunked form on CPU bf16)."""
    from mamba3.ops.mamba3 import interface
    model, _ = _tiny(1, dtype=torch.bfloat16)
    prompt = torch.randint(0, model.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = _prefill_pair(model, prompt, 16, False)[0]
        monkeypatch.setattr(interface, "triton_available", lambda device: True)
        torch._dynamo.reset()
        comp = _prefill_pair(model, prompt, 16, True)[1]
        torch._dynamo.reset()
    _assert_same_prefill(eager, comp, 2e-2)


def test_cli_compile_flag_reaches_the_rows(monkeypatch):
    import argparse
    from mamba3.bench import e2e
    p = argparse.ArgumentParser()
    e2e.add_arguments(p)
    seen = []
    monkeypatch.setattr(e2e, "run_config", lambda preset, n, **kw: seen.append((kw["compile"], kw["compile_prefill"]))
                        or dict(preset=preset))
    base = ["--presets", "tiny", "--lengths", "16", "--device", "cpu"]
    assert e2e.main(p.parse_args(base + ["--compile"])) == 0
    assert e2e.main(p.parse_args(base)) == 0
    assert e2e.main(p.parse_args(base + ["--compile", "--no-compile-prefill"])) == 0
    assert seen == [(True, None), (False, None), (True, False)]
