"""Stateless tensor functions. One folder per algorithm: reference, chunked and kernel forms
behind one dispatching entry point with one signature."""
from .mamba3 import Mamba3State, mamba3_siso, mamba3_siso_step
from .mamba3 import mamba3_mimo, mamba3_mimo_step
from .s4d import s4d, s4d_step
from .attention import apply_rope, attention
from .gated_delta import gated_delta_rule, gated_delta_rule_step
from .mamba1 import selective_scan, selective_scan_step
from .mamba2 import ssd, ssd_step

__all__ = ["attention", "apply_rope", "gated_delta_rule", "gated_delta_rule_step", "s4d", "s4d_step", "selective_scan", "selective_scan_step", "ssd", "ssd_step", "Mamba3State", "mamba3_siso", "mamba3_siso_step", "mamba3_mimo", "mamba3_mimo_step"]
