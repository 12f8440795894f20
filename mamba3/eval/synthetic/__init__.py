"""Synthetic benchmarks (DATA.md section 4), seeded and vectorised; all return ``TaskBatch``.

``TASKS`` maps the runner's task names to (batch function, vocab size, chance level); the
state-tracking tasks take (batch_size, min_len, max_len, generator=...).
"""
from .common import TaskBatch
from .induction import induction_batch
from .metrics import (IGNORE_INDEX, masked_accuracy, masked_correct, scaled_accuracy, sequence_accuracy,
                      substring_match)
from .modular import BR_VOCAB_SIZE, modular_batch, modular_brackets_batch
from .modular import VOCAB_SIZE as MOD_VOCAB_SIZE
from .mqar import mqar_batch, mqar_mamba2_batch
from .niah import evaluate_niah, niah_single1
from .parity import VOCAB_SIZE as PARITY_VOCAB_SIZE
from .parity import parity_batch
from .selective_copy import selective_copy_batch

# state-tracking tasks of Mamba-3 Table 5b: name -> (batch fn, vocab size, chance)
STATE_TASKS = {
    "parity": (parity_batch, PARITY_VOCAB_SIZE, 0.5),
    "modular": (modular_batch, MOD_VOCAB_SIZE, 0.2),
    "modular_brackets": (modular_brackets_batch, BR_VOCAB_SIZE, 0.2),
}

__all__ = ["TaskBatch", "IGNORE_INDEX", "STATE_TASKS", "induction_batch", "masked_accuracy", "masked_correct",
           "scaled_accuracy", "sequence_accuracy", "substring_match", "modular_batch", "modular_brackets_batch",
           "mqar_batch", "mqar_mamba2_batch", "niah_single1", "evaluate_niah", "parity_batch", "selective_copy_batch"]
