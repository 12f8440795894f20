"""Mamba-2 ops: the SSD selective scan in reference (token loop) and chunked forms."""
from .chunked import ssd_chunked
from .interface import ssd, ssd_step
from .reference import ssd_reference, ssd_step_reference

__all__ = ["ssd", "ssd_step", "ssd_chunked", "ssd_reference", "ssd_step_reference"]
