import pytest
import torch

from mamba3.models.generation import generate, process_logits, split_prompts

from .conftest import tiny_model


def test_greedy_matches_full_forward_argmax(model):
    """Every generated token is the argmax of a full (no-cache) forward over the sequence so far."""
    prompt = torch.randint(0, 61, (6,))
    out = generate(model, [prompt], 16, temperature=0, output_scores=True)
    seq = out.sequences()[0]
    assert seq.numel() == 22
    logits = model(seq[None]).logits[0]
    assert torch.equal(logits[5:-1].argmax(-1), seq[6:])
    # and the cached logits equal the full forward's
    torch.testing.assert_close(torch.stack([s[0] for s in out.scores]), logits[5:-1])
    assert len(set(seq[6:].tolist())) > 3  # not a degenerate repeat


@pytest.mark.parametrize("mode", ["varlen", "per_row"])
def test_unequal_prompts_equal_one_by_one(model, mode):
    torch.manual_seed(1)
    prompts = [torch.randint(0, 61, (n,)) for n in (4, 9, 1, 6)]
    batched = generate(model, prompts, 10, temperature=0, prefill_mode=mode)
    for i, p in enumerate(prompts):
        single = generate(model, [p], 10, temperature=0)
        assert torch.equal(batched.tokens[i], single.tokens[0]), (mode, i)


def test_attention_mask_and_prompt_lengths(model):
    torch.manual_seed(2)
    a, b = torch.randint(0, 61, (3,)), torch.randint(0, 61, (5,))
    want = generate(model, [a, b], 6, temperature=0).tokens
    left = torch.stack([torch.cat([torch.zeros(2, dtype=torch.long), a]), b])
    mask = torch.stack([torch.tensor([0, 0, 1, 1, 1]), torch.ones(5, dtype=torch.long)])
    assert torch.equal(generate(model, left, 6, temperature=0, attention_mask=mask).tokens, want)
    right = torch.stack([torch.cat([a, torch.full((2,), 7)]), b])
    assert torch.equal(generate(model, right, 6, temperature=0, prompt_lengths=[3, 5]).tokens, want)


def test_sampling_seeded_and_reproducible(model):
    p = [torch.randint(0, 61, (4,)), torch.randint(0, 61, (2,))]
    kw = dict(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.2)
    a = generate(model, p, 12, seed=123, **kw).tokens
    state = torch.random.get_rng_state()
    b = generate(model, p, 12, seed=123, **kw).tokens
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert torch.equal(a, b)
    assert not torch.equal(a, generate(model, p, 12, seed=124, **kw).tokens)


def test_eos_stops_rows_and_pads(model):
    prompt = torch.randint(0, 61, (5,))
    free = generate(model, [prompt, prompt[:2]], 12, temperature=0).tokens
    eos = int(free[0, 3])
    out = generate(model, [prompt, prompt[:2]], 12, temperature=0, eos_token_id=eos, pad_token_id=60)
    n0 = int(out.num_generated[0])
    assert n0 <= 4 and out.tokens[0, n0 - 1] == eos
    assert torch.all(out.tokens[0, n0:] == 60)
    assert out.sequences()[0][-1] == eos


def test_streamer_and_callback(model):
    class Streamer:
        def __init__(self):
            self.got, self.ended = [], False

        def put(self, t):
            self.got.append(t.clone())

        def end(self):
            self.ended = True

    s = Streamer()
    steps = []
    out = generate(model, [torch.tensor([1, 2, 3])], 8, temperature=0, streamer=s,
                   callback=lambda i, t: steps.append(i) or i == 4)
    assert s.ended and steps == [0, 1, 2, 3, 4]
    assert torch.equal(torch.stack(s.got, 1), out.tokens) and out.tokens.shape == (1, 5)


def test_process_logits():
    x = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    assert torch.isinf(process_logits(x, top_k=2)).tolist() == [[True, False, False, True]]
    # probs of [3, 2, 1, -1]: 0.64, 0.24, 0.09, 0.03 -> top_p 0.8 keeps {3, 2}
    assert torch.isinf(process_logits(x, top_p=0.8)).tolist() == [[True, False, False, True]]
    assert torch.isinf(process_logits(x, top_p=0.5)).tolist() == [[True, False, True, True]]
    seen = torch.tensor([[True, False, False, True]])
    torch.testing.assert_close(process_logits(x, repetition_penalty=2.0, seen=seen),
                               torch.tensor([[0.5, 3.0, 2.0, -2.0]]))
    torch.testing.assert_close(process_logits(x, temperature=0.5), x * 2)


def test_errors(model):
    with pytest.raises(ValueError, match="use_cuda_graph=True needs the model on a CUDA device"):
        generate(model, [torch.tensor([1])], 2, use_cuda_graph=True)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [torch.tensor([1]), torch.tensor([], dtype=torch.long)], 2)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate(model, [torch.tensor([1])], 0)
    with pytest.raises(ValueError, match="not one contiguous run"):
        split_prompts(torch.ones(1, 4, dtype=torch.long), attention_mask=torch.tensor([[1, 0, 1, 1]]))
    with pytest.raises(ValueError, match="prefill mode"):
        generate(model, [torch.tensor([1]), torch.tensor([1, 2])], 2, prefill_mode="magic")


def test_model_generate_method(model):
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, temperature=0)
    assert out.tokens.shape == (1, 4)


def test_mimo_stack_generation():
    mimo = {"d_state": 16, "headdim": 16, "is_mimo": True, "mimo_rank": 2, "chunk_size": 8}
    model = tiny_model(n_layer=2, mixer_cfg={"mamba3": mimo})
    prompts = [torch.randint(0, 61, (n,)) for n in (3, 7)]
    out = generate(model, prompts, 6, temperature=0)
    for i, p in enumerate(prompts):
        seq = out.sequences()[i]
        assert torch.equal(model(seq[None]).logits[0, len(p) - 1:-1].argmax(-1), seq[len(p):])
