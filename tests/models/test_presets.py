"""Every preset builds on the meta device; paper-size presets are within 5% of the nominal size."""
import pytest

from mamba3.models import PRESETS, LanguageModel, ModelConfig
from mamba3.models.config import NOMINAL_PARAMS

PAPER = [n for n in PRESETS if n.rsplit("-", 1)[-1] in NOMINAL_PARAMS]


def test_paper_preset_list_complete():
    fams = {"mamba3", "mamba3-mimo", "mamba2", "gdn", "transformer", "mamba3-hybrid"}
    assert {f"{f}-{s}" for f in fams for s in NOMINAL_PARAMS} == set(PAPER)


@pytest.mark.parametrize("name", PAPER)
def test_paper_preset_parameter_count(name):
    cfg = ModelConfig.from_preset(name)
    model = LanguageModel(cfg, device="meta", init_weights=False)
    n = model.num_parameters()
    nominal = NOMINAL_PARAMS[name.rsplit("-", 1)[-1]]
    print(f"{name}: {n / 1e6:.1f}M parameters (nominal {nominal / 1e6:.0f}M, {100 * (n / nominal - 1):+.1f}%)")
    assert abs(n / nominal - 1) < 0.05, (name, n)
    parts = model.num_parameters(by_component=True)
    assert parts["total"] == n and parts["lm_head"] == 0  # tied
    assert parts["embedding"] == cfg.padded_vocab_size * cfg.d_model
    assert model.backbone.layers[0].mlp.fc1.weight.shape == (2 * cfg.d_intermediate, cfg.d_model)


@pytest.mark.parametrize("name", [n for n in PRESETS if n not in PAPER])
def test_small_presets_build(name):
    model = LanguageModel(ModelConfig.from_preset(name), device="meta")
    assert model.num_parameters() > 0


def test_mimo_preset_is_mimo():
    model = LanguageModel(ModelConfig.from_preset("mamba3-mimo-180m"), device="meta", init_weights=False)
    assert model.backbone.layers[0].mixer.mimo_rank == 4
