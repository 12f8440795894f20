"""transformers integration (skipped only when transformers is not installed; CI's test extra has it)."""
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is optional (extra 'hf')")

from mamba3.models import LanguageModel  # noqa: E402
from mamba3.models.hf import Mamba3ForCausalLM, Mamba3LMConfig  # noqa: E402

from .conftest import tiny_model  # noqa: E402


@pytest.mark.parametrize("pattern", [None, "MA"], ids=["pure", "hybrid"])
def test_auto_model_from_pretrained_and_generate(tmp_path, pattern):
    from transformers import AutoConfig, AutoModelForCausalLM
    model = tiny_model(pattern, dtype=torch.float32)
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), Mamba3LMConfig)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(hf, Mamba3ForCausalLM)
    sd = hf.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    ids = torch.randint(0, 61, (2, 5))
    out = hf.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(out[:, 5:], model.generate(ids, 8, temperature=0).tokens)
    # left-padded batch: padding must not reach the state
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    want = model.generate([ids[0, 2:], ids[1]], 8, temperature=0).tokens
    assert torch.equal(out[:, 5:], want)
    # scoring path: same logits and loss as LanguageModel
    o = hf(ids, labels=ids)
    torch.testing.assert_close(o.logits, model(ids).logits)
    torch.testing.assert_close(o.loss, model(ids, labels=ids).loss)


def test_hf_save_then_language_model_load(tmp_path):
    model = tiny_model(dtype=torch.float32)
    hf = Mamba3ForCausalLM.from_language_model(model)
    hf.save_pretrained(tmp_path)
    back = LanguageModel.from_pretrained(tmp_path)
    assert back.config == model.config
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
