"""Mamba-1 ops: the selective scan (S6) in reference (token loop) and chunked forms."""
from .chunked import selective_scan_chunked
from .interface import selective_scan, selective_scan_step
from .reference import selective_scan_reference, selective_scan_step_reference

__all__ = ["selective_scan", "selective_scan_step", "selective_scan_chunked", "selective_scan_reference",
           "selective_scan_step_reference"]
