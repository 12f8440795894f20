"""Modular arithmetic mod 5, without and with brackets (Grazzi et al. 2025; Mamba-3 Table 5b),
DATA.md sections 4.2-4.3. Both generators are vectorised over the batch.

Without brackets (vocab 10): 0 pad, 1 '+', 2 '-', 3 '*', 4 '=', 5..9 the digits 0..4. An example of
length n (made odd: k = (n - 1) // 2 digits, so the length used is 2k + 1 <= n) is
``d op d op ... d = answer`` with operators uniform over {+, -, *}, '*' binding tighter, the answer
taken mod 5. The answer slot is pad in the input; the model predicts it from the logits at '='.

With brackets (vocab 12): digits 0..4 are ids 0..4, then '+' 5, '-' 6, '*' 7, '(' 8, ')' 9, '=' 10,
PAD 11. An expression of target length L >= 5 is "( left op right )" with len(left) uniform in
[1, L - 4] and op uniform over {+, -} ('*' too with ``mult=True``); lengths 1..4 are d, -d, (d),
(-d). The example is expression, '=', answer (length n = L + 2); scored at '='. Chance = 1/5.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .common import TaskBatch, empty_labels, make_generator, sample_lengths

MODULUS = 5
CHANCE = 1.0 / MODULUS

# --- without brackets -------------------------------------------------------------------------
VOCAB_SIZE = 10
PAD, PLUS, MINUS, TIMES, EQUALS, DIGIT0 = 0, 1, 2, 3, 4, 5
# discrete log base 2 mod 5 of 1, 2, 3, 4 (2 generates (Z/5)^*): 2^0=1, 2^1=2, 2^3=3, 2^2=4
_LOG2 = torch.tensor([0, 0, 1, 3, 2])
_POW2 = torch.tensor([1, 2, 4, 3])


def eval_flat(digits: Tensor, ops: Tensor, k: Tensor) -> Tensor:
    """Value mod 5 of d0 op0 d1 op1 ... d_{k-1} with normal precedence, vectorised.

    digits [B, K] in 0..4, ops [B, K-1] in {PLUS, MINUS, TIMES}, k [B] digits used per row.
    Terms are the maximal runs joined by '*'; a term is 0 if it holds a 0, else 2^(sum of logs).
    """
    B, K = digits.shape
    pos = torch.arange(K)[None, :]
    used = pos < k[:, None]
    # the operator before digit i (i >= 1); '+' before the first digit
    before = torch.cat([torch.full((B, 1), PLUS, dtype=torch.long), ops], dim=1)
    starts = used & (before != TIMES)
    term = torch.cumsum(starts.long(), dim=1) - 1  # term index of each digit, 0-based
    term = torch.where(used, term, torch.full_like(term, K))  # unused digits -> a dump slot
    zeros = torch.zeros(B, K + 1, dtype=torch.long).scatter_add_(1, term, (digits == 0).long() * used)
    logs = torch.zeros(B, K + 1, dtype=torch.long).scatter_add_(1, term, _LOG2[digits] * used)
    sign = torch.zeros(B, K + 1, dtype=torch.long).scatter_add_(
        1, term, torch.where(starts, torch.where(before == MINUS, -1, 1), 0))
    value = torch.where(zeros > 0, 0, _POW2[logs % 4]) * sign
    return value[:, :K].sum(1) % MODULUS


def modular_batch(batch_size: int, min_len: int = 3, max_len: int = 40, *, context: Optional[int] = None,
                  seed: Optional[int] = None, generator: Optional[torch.Generator] = None) -> TaskBatch:
    """Without brackets. TaskBatch [B, T], T = context or the longest example less the answer slot."""
    if min_len < 3:
        raise ValueError(f"min_len must be >= 3 (d = a), got {min_len}")
    g = make_generator(seed, generator)
    n = sample_lengths(batch_size, min_len, max_len, g)
    k = (n - 1) // 2
    n = 2 * k + 1
    K = int(k.max())
    T = 2 * K if context is None else int(context)
    if T < 2 * K:
        raise ValueError(f"context={context} shorter than the longest example less its answer ({2 * K})")
    digits = torch.randint(0, MODULUS, (batch_size, K), generator=g)
    ops = torch.randint(PLUS, TIMES + 1, (batch_size, max(K - 1, 0)), generator=g)
    answer = eval_flat(digits, ops, k)
    x = torch.full((batch_size, T), PAD, dtype=torch.long)
    x[:, 0:2 * K:2] = digits + DIGIT0
    x[:, 1:2 * K - 1:2] = ops
    pos = torch.arange(T)[None, :]
    x = torch.where(pos < 2 * k[:, None] - 1, x, torch.full_like(x, PAD))
    rows = torch.arange(batch_size)
    x[rows, 2 * k - 1] = EQUALS
    labels = empty_labels(batch_size, T)
    labels[rows, 2 * k - 1] = answer + DIGIT0
    return TaskBatch(x, labels, n)


# --- with brackets ----------------------------------------------------------------------------
BR_VOCAB_SIZE = 12
B_PLUS, B_MINUS, B_TIMES, B_OPEN, B_CLOSE, B_EQUALS, B_PAD = 5, 6, 7, 8, 9, 10, 11


def _bracket_expressions(L: Tensor, mult: bool, g: torch.Generator, T: int):
    """Expressions of lengths L [B] written into [B, T] (pad elsewhere) and their values mod 5.

    Top-down, one tree level at a time (all nodes of all rows at once): each node is a span
    (row, start, length); spans of length >= 5 write '(' op ')' and split into two children.
    Values are then combined bottom-up level by level.
    """
    Bsz = L.shape[0]
    x = torch.full((Bsz, T), B_PAD, dtype=torch.long)
    row, start, length = torch.arange(Bsz), torch.zeros(Bsz, dtype=torch.long), L.clone()
    levels = []  # per level: (is_internal, op, leaf_value, parent index into previous level, is_left)
    parent, is_left = torch.full((Bsz,), -1), torch.zeros(Bsz, dtype=torch.bool)
    n_ops = 3 if mult else 2
    while row.numel() > 0:
        m = row.numel()
        internal = length >= 5
        # leaves: d, -d, (d), (-d)
        d = torch.randint(0, MODULUS, (m,), generator=g)
        neg = (length == 2) | (length == 4)
        leaf_val = torch.where(neg, -d, d) % MODULUS
        dpos = start + torch.where(length <= 2, length - 1, length - 2)
        lf = ~internal
        x[row[lf], dpos[lf]] = d[lf]
        x[row[neg], (dpos - 1)[neg]] = B_MINUS
        br = lf & (length >= 3)
        x[row[br], start[br]] = B_OPEN
        x[row[br], (start + length - 1)[br]] = B_CLOSE
        # internal nodes: ( left op right )
        span = torch.clamp(length - 4, min=1)
        left = 1 + (torch.rand(m, generator=g) * span).long().clamp(max=span - 1)
        op = torch.randint(0, n_ops, (m,), generator=g)
        it = internal
        x[row[it], start[it]] = B_OPEN
        x[row[it], (start + 1 + left)[it]] = B_PLUS + op[it]
        x[row[it], (start + length - 1)[it]] = B_CLOSE
        levels.append((internal, op, leaf_val, parent, is_left))
        idx = torch.nonzero(it).squeeze(1)
        row = torch.cat([row[idx], row[idx]])
        start = torch.cat([start[idx] + 1, start[idx] + 2 + left[idx]])
        length = torch.cat([left[idx], length[idx] - 3 - left[idx]])
        parent = torch.cat([idx, idx])
        is_left = torch.cat([torch.ones_like(idx, dtype=torch.bool), torch.zeros_like(idx, dtype=torch.bool)])
    # bottom-up values
    child_vals = None
    for internal, op, leaf_val, parent, is_left in reversed(levels):
        val = leaf_val.clone()
        if child_vals is not None:
            cv, cparent, cleft = child_vals
            lv = torch.zeros_like(val).index_put_((cparent[cleft],), cv[cleft])
            rv = torch.zeros_like(val).index_put_((cparent[~cleft],), cv[~cleft])
            comb = torch.where(op == 0, lv + rv, torch.where(op == 1, lv - rv, lv * rv)) % MODULUS
            val = torch.where(internal, comb, val)
        child_vals = (val, parent, is_left)
    return x, child_vals[0]


def modular_brackets_batch(batch_size: int, min_len: int = 3, max_len: int = 40, *,
                           context: Optional[int] = None, mult: bool = False, seed: Optional[int] = None,
                           generator: Optional[torch.Generator] = None) -> TaskBatch:
    """With brackets. Example length n = expression length + 2 ('=' and the answer)."""
    if min_len < 3:
        raise ValueError(f"min_len must be >= 3 (d = a), got {min_len}")
    g = make_generator(seed, generator)
    n = sample_lengths(batch_size, min_len, max_len, g)
    L = n - 2
    T = int(L.max()) + 1 if context is None else int(context)
    if T < int(L.max()) + 1:
        raise ValueError(f"context={context} shorter than the longest expression + '=' ({int(L.max()) + 1})")
    x, value = _bracket_expressions(L, mult, g, T)
    rows = torch.arange(batch_size)
    x[rows, L] = B_EQUALS
    labels = empty_labels(batch_size, T)
    labels[rows, L] = value
    return TaskBatch(x, labels, n)
