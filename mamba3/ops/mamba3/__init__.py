"""Mamba-3 ops: SISO (and MIMO) sequence mixing in reference, chunked and Triton forms."""
from .common import Mamba3State, zero_state
from .interface import mamba3_siso, mamba3_siso_step
from .chunked import mamba3_siso_chunked
from .reference import mamba3_siso_reference, mamba3_siso_step_reference
from .mimo_interface import mamba3_mimo, mamba3_mimo_step
from .mimo_chunked import mamba3_mimo_chunked
from .mimo_reference import mamba3_mimo_reference, mamba3_mimo_step_reference

__all__ = ["Mamba3State", "zero_state", "mamba3_siso", "mamba3_siso_step", "mamba3_siso_chunked",
           "mamba3_siso_reference", "mamba3_siso_step_reference", "mamba3_mimo", "mamba3_mimo_step",
           "mamba3_mimo_chunked", "mamba3_mimo_reference", "mamba3_mimo_step_reference"]
