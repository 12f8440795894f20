"""Metrics for the synthetic tasks, as the papers report them.

* ``scaled_accuracy``: (acc - chance) / (1 - chance), so 1 is perfect and 0 is chance. This is the
  formula Grazzi et al. (ICLR 2025) state, following Beck et al.'s xLSTM paper. The Mamba-3 paper
  (Table 5b) only says "scaled accuracy" and cites Grazzi; that it uses exactly this formula is our
  best guess (UNCONFIRMED, see SPEC section 8). Values below chance give negative numbers; they are
  not clipped.
* ``masked_accuracy``: accuracy of argmax predictions over the positions whose label is not
  ``ignore_index`` (MQAR query positions, selective-copy marker positions, the one answer position
  of the state-tracking tasks).
* ``sequence_accuracy``: fraction of examples whose every supervised position is right.
"""
from __future__ import annotations

from torch import Tensor

IGNORE_INDEX = -100


def scaled_accuracy(acc, chance: float):
    """(acc - chance) / (1 - chance); works on floats and tensors. ``chance`` must be in [0, 1)."""
    if not 0.0 <= chance < 1.0:
        raise ValueError(f"chance must be in [0, 1), got {chance}")
    return (acc - chance) / (1.0 - chance)


def masked_correct(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX):
    """logits [B, T, V], labels [B, T] -> (correct [B, T] bool, mask [B, T] bool)."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits [B, T, V] and labels [B, T] disagree: {tuple(logits.shape)} vs {tuple(labels.shape)}")
    mask = labels != ignore_index
    correct = (logits.argmax(-1) == labels) & mask
    return correct, mask


def masked_accuracy(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> float:
    """Accuracy over supervised positions (labels != ignore_index)."""
    correct, mask = masked_correct(logits, labels, ignore_index)
    n = int(mask.sum())
    if n == 0:
        raise ValueError("labels hold no supervised position")
    return float(correct.sum()) / n


def sequence_accuracy(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> float:
    """Fraction of rows whose supervised positions are all predicted right."""
    correct, mask = masked_correct(logits, labels, ignore_index)
    ok = (correct | ~mask).all(dim=1)
    return float(ok.float().mean())


def substring_match(generations, references) -> float:
    """RULER's string-match metric: fraction of references found (case-insensitive) in the output."""
    if len(generations) != len(references):
        raise ValueError("generations and references differ in length")
    if not generations:
        raise ValueError("no generations")
    hits = [str(r).lower() in str(g).lower() for g, r in zip(generations, references)]
    return sum(hits) / len(hits)
