"""Needle in a haystack, RULER NIAH-Single-1 (Hsieh et al. 2024; Mamba-3 Table 4), DATA.md 4.8.

Text task: the haystack is RULER's repeated filler paragraph, the key a random English word, the
value a random 7-digit number. Prompt (RULER template, as ported in lm-eval):

    Some special magic numbers are hidden within the following text. Make sure to memorize it.
    I will quiz you about the numbers afterwards.
    {haystack with "One of the special magic numbers for {key} is: {value}." inserted}
    What are all the special magic numbers for {key} mentioned in the provided text? The special
    magic numbers for {key} mentioned in the provided text are

The needle goes after the sentence nearest ``depth`` (0..1) of the haystack; RULER uses 40 evenly
spaced depths and 500 samples per length. The haystack is sized so the whole prompt is at most
``context_tokens`` tokens of the model's own tokenizer (``count_tokens``). Metric: the fraction of
references found case-insensitively in the greedy generation (``metrics.substring_match``).
The word list is our own short list (RULER draws from ``wonderwords``): same task, other words.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PREAMBLE = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the numbers afterwards.\n")
NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUESTION = ("\nWhat are all the special magic numbers for {key} mentioned in the provided text? "
            "The special magic numbers for {key} mentioned in the provided text are")
WORDS = (
    "apple anchor badge basket beacon blanket bottle bridge bucket butter cabin camera candle canyon "
    "carpet castle cellar cherry circle cobalt copper cotton crystal daisy desert dragon engine fabric "
    "falcon feather fiddle forest fossil garden garlic glacier goblet granite harbor helmet hollow "
    "island jacket jungle kettle ladder lantern lemon lizard magnet maple marble meadow mirror monkey "
    "needle nickel oyster paddle parrot pencil pepper pillow planet pocket pretzel puzzle quartz rabbit "
    "raven ribbon rocket saddle salmon sandal shovel silver spider spruce squirrel summit sunset "
    "teapot thunder ticket timber tomato tunnel turtle velvet violin walnut whistle willow window "
    "wizard yogurt zebra"
).split()


def niah_single1(num_samples: int, context_tokens: int, count_tokens: Callable[[str], int], *,
                 depths: Optional[List[float]] = None, seed: int = 0) -> List[dict]:
    """Returns ``num_samples`` dicts {prompt, answer, key, depth, context_tokens}. Depths cycle
    through ``depths`` (default 40 evenly spaced in [0, 1])."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    depths = [i / 39 for i in range(40)] if depths is None else list(depths)
    g = torch.Generator().manual_seed(seed)
    keys = torch.randint(0, len(WORDS), (num_samples,), generator=g).tolist()
    values = torch.randint(1_000_000, 10_000_000, (num_samples,), generator=g).tolist()
    sentences = [s.strip() + "." for s in FILLER.split(".") if s.strip()]
    per_sentence = max(1, count_tokens(" ".join(sentences * 8)) // (8 * len(sentences)))
    out = []
    for i in range(num_samples):
        key, value = WORDS[keys[i]], str(values[i])
        needle = NEEDLE.format(key=key, value=value)
        frame = PREAMBLE + needle + QUESTION.format(key=key)
        n = max(0, (context_tokens - count_tokens(frame)) // per_sentence)
        while True:  # shrink until the tokenized prompt fits (the estimate is usually exact)
            hay = [sentences[j % len(sentences)] for j in range(n)]
            depth = depths[i % len(depths)]
            at = int(round(depth * n))
            text = " ".join(hay[:at] + [needle] + hay[at:])
            prompt = PREAMBLE + text + QUESTION.format(key=key)
            if count_tokens(prompt) <= context_tokens or n == 0:
                break
            n -= max(1, (count_tokens(prompt) - context_tokens) // per_sentence)
            n = max(n, 0)
        out.append(dict(prompt=prompt, answer=value, key=key, depth=depth, context_tokens=context_tokens))
    return out


@torch.no_grad()
def evaluate_niah(model, tokenizer, context_lengths, num_samples: int = 500, max_new_tokens: int = 16,
                  seed: int = 0, log=print) -> dict:
    """Greedy generation on NIAH-Single-1 prompts; {length: string-match score} (RULER's metric).
    RULER decodes up to 128 tokens; a 7-digit value needs far fewer, so 16 is the default here."""
    from .metrics import substring_match
    scores = {}
    for L in context_lengths:
        items = niah_single1(num_samples, L, lambda s: len(tokenizer.encode(s)), seed=seed)
        gens = []
        for it in items:
            ids = torch.tensor(tokenizer.encode(it["prompt"]), device=next(model.parameters()).device)
            out = model.generate([ids], max_new_tokens=max_new_tokens, temperature=0.0,
                                 eos_token_id=tokenizer.eos_token_id)
            n = int(out.num_generated[0])
            gens.append(tokenizer.decode(out.tokens[0, :n].tolist()))
        scores[L] = substring_match(gens, [it["answer"] for it in items])
        log(f"NIAH-Single-1 @ {L} tokens: {100 * scores[L]:.1f}")
    return scores
