"""Synthetic generators against independently recomputed answers (Python eval / loops)."""
import pytest
import torch

from mamba3.eval.synthetic import (IGNORE_INDEX, induction_batch, masked_accuracy, modular_batch,
                                   modular_brackets_batch, mqar_batch, mqar_mamba2_batch, niah_single1,
                                   parity_batch, scaled_accuracy, selective_copy_batch, sequence_accuracy,
                                   substring_match)
from mamba3.eval.synthetic.modular import eval_flat

BR_CHARS = "01234+-*()="


def test_parity_hand_checked_and_random():
    b = parity_batch(64, 2, 30, seed=3)
    for row, lab, n in zip(b.input_ids.tolist(), b.labels.tolist(), b.lengths.tolist()):
        bits = row[: n - 1]
        assert all(t in (1, 2) for t in bits) and all(t == 0 for t in row[n - 1:])
        pos = [i for i, t in enumerate(lab) if t != IGNORE_INDEX]
        assert pos == [n - 2]
        assert lab[n - 2] == 1 + sum(t == 2 for t in bits) % 2
    assert b.lengths.min() >= 2 and b.lengths.max() <= 30


def test_parity_seeded_and_context():
    a, b = parity_batch(8, 3, 40, seed=7), parity_batch(8, 3, 40, seed=7)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    c = parity_batch(8, 3, 40, seed=7, context=256)
    assert c.input_ids.shape == (8, 256)
    with pytest.raises(ValueError, match="min_len"):
        parity_batch(2, 1, 5)


def _decode_flat(row, n):
    sym = {1: "+", 2: "-", 3: "*", 4: "="}
    return "".join(str(t - 5) if t >= 5 else sym[t] for t in row[: n - 1])


def test_eval_flat_hand_examples():
    # 3*0-4+2*2*3 = 0 - 4 + 12 = 8 = 3 mod 5;  4-1*3 = 1;  2 = 2
    digits = torch.tensor([[3, 0, 4, 2, 2, 3], [4, 1, 3, 0, 0, 0], [2, 0, 0, 0, 0, 0]])
    ops = torch.tensor([[3, 2, 1, 3, 3], [2, 3, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert eval_flat(digits, ops, torch.tensor([6, 3, 1])).tolist() == [3, 1, 2]


def test_modular_without_brackets_matches_python_eval():
    b = modular_batch(200, 3, 41, seed=11)
    for row, lab, n in zip(b.input_ids.tolist(), b.labels.tolist(), b.lengths.tolist()):
        assert n % 2 == 1
        s = _decode_flat(row, n)
        assert s.endswith("=") and all(t == 0 for t in row[n - 1:])
        assert lab[n - 2] - 5 == eval(s[:-1]) % 5
        assert sum(t != IGNORE_INDEX for t in lab) == 1


def test_modular_with_brackets_matches_python_eval():
    b = modular_brackets_batch(200, 3, 60, seed=5)
    saw_unary = False
    for row, lab, n in zip(b.input_ids.tolist(), b.labels.tolist(), b.lengths.tolist()):
        s = "".join(BR_CHARS[t] for t in row[: n - 1])
        assert s.endswith("=") and len(s) == n - 1
        assert all(t == 11 for t in row[n - 1:])
        assert "*" not in s
        saw_unary |= "(-" in s or s.startswith("-")
        assert lab[n - 2] == eval(s[:-1]) % 5, s
    assert saw_unary


def test_modular_brackets_mult_and_structure():
    b = modular_brackets_batch(100, 20, 30, mult=True, seed=1)
    ops = set()
    for row, lab, n in zip(b.input_ids.tolist(), b.labels.tolist(), b.lengths.tolist()):
        s = "".join(BR_CHARS[t] for t in row[: n - 1])
        ops |= set(s) & set("+-*")
        assert s[0] == "(" and s[-2] == ")"  # length >= 5 -> outer brackets
        assert lab[n - 2] == eval(s[:-1]) % 5
    assert ops == {"+", "-", "*"}


def test_mqar_layout():
    V, T, P = 128, 64, 8
    b = mqar_batch(16, T, P, V, seed=2)
    for row, lab in zip(b.input_ids.tolist(), b.labels.tolist()):
        keys, vals = row[0:2 * P:2], row[1:2 * P:2]
        assert len(set(keys)) == P and len(set(vals)) == P
        assert all(1 <= k < V // 2 for k in keys) and all(V // 2 <= v < V for v in vals)
        kv = dict(zip(keys, vals))
        qpos = [i for i, t in enumerate(lab) if t != IGNORE_INDEX]
        assert len(qpos) == P and all(i >= 2 * P and (i - 2 * P) % 2 == 0 for i in qpos)
        assert sorted(row[i] for i in qpos) == sorted(keys)
        assert all(lab[i] == kv[row[i]] for i in qpos)
        assert all(row[i] == 0 for i in range(2 * P, T) if i not in qpos)


def test_mqar_mamba2_random_filler():
    b = mqar_mamba2_batch(4, 64, vocab_size=256, seed=0)
    assert (b.labels != IGNORE_INDEX).sum(1).tolist() == [16] * 4
    assert (b.input_ids[:, 32:] != 0).float().mean() > 0.9
    with pytest.raises(ValueError, match="vocab_size"):
        mqar_batch(2, 64, 4, 64)


def test_selective_copy():
    b = selective_copy_batch(8, 64, 16, 16, seed=4)
    for row, lab in zip(b.input_ids.tolist(), b.labels.tolist()):
        data = [t for t in row[:48] if t != 0]
        assert len(data) == 16 and all(1 <= t <= 14 for t in data)
        assert row[48:] == [15] * 16 and lab[48:] == data and set(lab[:48]) == {IGNORE_INDEX}


def test_induction():
    b = induction_batch(32, 40, 16, seed=9)
    for row, lab in zip(b.input_ids.tolist(), b.labels.tolist()):
        sp = [i for i, t in enumerate(row) if t == 15]
        assert len(sp) == 2 and sp[1] == 39 and sp[0] <= 37
        assert lab[39] == row[sp[0] + 1] and set(lab[:39]) == {IGNORE_INDEX}


def test_niah_prompt_fits_and_contains_needle():
    count = lambda s: len(s.split())  # noqa: E731
    items = niah_single1(5, 300, count, depths=[0.0, 0.5, 1.0], seed=1)
    for it in items:
        assert count(it["prompt"]) <= 300 and count(it["prompt"]) > 250
        assert f"for {it['key']} is: {it['answer']}." in it["prompt"]
        assert len(it["answer"]) == 7 and it["prompt"].endswith("provided text are")
    assert substring_match(["the number is 1234567.", "no"], ["1234567", "7654321"]) == 0.5


def test_metrics():
    assert scaled_accuracy(1.0, 0.5) == 1.0 and scaled_accuracy(0.5, 0.5) == 0.0
    assert abs(scaled_accuracy(0.6, 0.2) - 0.5) < 1e-12
    with pytest.raises(ValueError, match="chance"):
        scaled_accuracy(0.5, 1.0)
    logits = torch.zeros(2, 3, 4)
    logits[0, 1, 2] = 1
    logits[1, 2, 3] = 1
    labels = torch.tensor([[IGNORE_INDEX, 2, IGNORE_INDEX], [IGNORE_INDEX, 1, 3]])
    assert masked_accuracy(logits, labels) == 2 / 3
    assert sequence_accuracy(logits, labels) == 0.5


def test_evaluate_niah_runs_generation():
    from mamba3.eval.synthetic import evaluate_niah
    from mamba3.models import LanguageModel, ModelConfig
    from mamba3.models.tokenizer import ByteTokenizer
    torch.manual_seed(0)
    model = LanguageModel(ModelConfig(d_model=16, n_layer=1, vocab_size=257, mixer="mamba3",
                                      mixer_cfg={"mamba3": {"d_state": 8, "headdim": 8, "chunk_size": 16}})).eval()
    scores = evaluate_niah(model, ByteTokenizer(), [400], num_samples=2, max_new_tokens=3, log=lambda s: None)
    assert list(scores) == [400] and scores[400] == 0.0  # an untrained model cannot emit 7 digits in 3 bytes
