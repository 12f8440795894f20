import json
import subprocess
import sys
import types

import pytest
import torch

from mamba3 import cli
from mamba3.models import LanguageModel, ModelConfig


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layer=2, vocab_size=257, d_intermediate=32,
                      mixer_cfg={"mamba3": {"d_state": 8, "headdim": 16}})
    LanguageModel(cfg).save_pretrained(d)
    return d


def test_generate_streams_text(model_dir, capsys):
    assert cli.main(["generate", "--model", str(model_dir), "--prompt", "Hi", "--max-new-tokens", "12",
                     "--seed", "0", "--temperature", "0.7"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("Hi") and "tokens in" in err
    cli.main(["generate", "--model", str(model_dir), "--prompt", "Hi", "--max-new-tokens", "12",
              "--seed", "0", "--temperature", "0.7"])
    assert capsys.readouterr().out == out  # seeded: reproducible


def test_generate_ids_greedy_matches_api(model_dir, capsys):
    cli.main(["generate", "--model", str(model_dir), "--prompt", "ab", "--max-new-tokens", "6",
              "--temperature", "0", "--ids"])
    got = [int(t) for t in capsys.readouterr().out.split()]
    model = LanguageModel.from_pretrained(model_dir)
    want = model.generate([[97, 98]], 6, temperature=0, eos_token_id=256).tokens[0].tolist()
    assert got == want[: len(got)] and len(got) >= 1


def test_info_preset_and_model(model_dir, capsys):
    cli.main(["info", "--preset", "mamba3-hybrid-180m", "--context", "4096"])
    out = capsys.readouterr().out
    assert "mixer:attention" in out and "KV cache at context 4096" in out and "recurrent state" in out
    cli.main(["info", "--model", str(model_dir), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["params"]["total"] == LanguageModel.from_pretrained(model_dir).num_parameters()
    assert info["kv_bytes_per_sequence_at_context"] == 0 and info["state_bytes_per_sequence"] > 0


def test_info_memory_numbers():
    cfg = ModelConfig.from_preset("mamba3-hybrid-180m")
    info = cli.model_info(cfg, context=1000, dtype=torch.bfloat16)
    # 2 NoPE attention layers: K and V of 12 heads x 64 in bf16, plus an int64 length counter each
    assert info["kv_bytes_per_sequence_at_context"] == 2 * (2 * 1000 * 12 * 64 * 2 + 8)
    # 10 Mamba-3 layers: fp32 ssm state H x P x N = 24 x 64 x 128 dominates
    assert info["state_bytes_per_sequence"] > 10 * 24 * 64 * 128 * 4
    assert info["all_attention_kv_bytes_at_context"] == 2 * 12 * 768 * 1000 * 2


def test_application_modules_register_with_one_line(monkeypatch, capsys):
    mod = types.ModuleType("fake_app_cli")

    def add_parser(sub):
        p = sub.add_parser("hello")
        p.add_argument("--name", default="x")
        p.set_defaults(func=lambda a: print(f"hello {a.name}") or 3)

    mod.add_parser = add_parser
    monkeypatch.setitem(sys.modules, "fake_app_cli", mod)
    monkeypatch.setattr(cli, "APP_MODULES", ["fake_app_cli", "not_installed_app.cli"])
    assert cli.main(["hello", "--name", "y"]) == 3
    assert capsys.readouterr().out == "hello y\n"


def test_broken_application_module_is_reported_not_fatal(monkeypatch, capsys, tmp_path):
    (tmp_path / "broken_app_mod.py").write_text("import definitely_missing_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "APP_MODULES", ["broken_app_mod"])
    parser = cli.build_parser()
    assert "definitely_missing_dependency_xyz" in capsys.readouterr().err
    assert parser.parse_args(["info", "--preset", "tiny"]).command == "info"


def test_errors(capsys):
    with pytest.raises(SystemExit):
        cli.main([])
    with pytest.raises(SystemExit):
        cli.main(["info", "--model", "a", "--preset", "b"])
    capsys.readouterr()
    assert cli.main(["info", "--preset", "nope"]) == 2        # bad input: one line on stderr, exit 2
    assert "unknown preset 'nope'" in capsys.readouterr().err


def test_console_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "mamba3.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "generate" in r.stdout and "info" in r.stdout and "demo" in r.stdout
