"""benchmarks/gpu_profile_decode.py runs every phase on CPU (tiny preset) and writes its JSON."""
import importlib.util
import json
import os

import torch

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "gpu_profile_decode.py")


def test_profile_script_all_phases_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_profile_decode", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "p.json"
    torch._dynamo.reset()
    # aot_eager: the compiled phases' code without Inductor's C++ build (see tests/bench/test_e2e.py)
    assert mod.main(["--device", "cpu", "--preset", "tiny", "--batch", "2", "--dtype", "float32", "--steps", "1",
                     "--replays", "3", "--state-dtypes", "float32,bfloat16", "--compile-backend", "aot_eager",
                     "--out", str(out)]) == 0
    torch._dynamo.reset()
    res = json.loads(out.read_text())
    assert res["meta"]["n_layer"] == 4 and [r["state_dtype"] for r in res["runs"]] == ["float32", "bfloat16"]
    for r in res["runs"]:
        assert r["errors"] == {}, r["errors"]
        for kind in ("eager", "compiled"):
            prof, graph = r[f"profile_{kind}"], r[f"graph_{kind}"]
            assert prof["kernels_per_step"] > 0 and 0 < len(prof["top"]) <= 25
            assert graph["ms_per_step_median"] > 0 and graph["replays"] == 3
