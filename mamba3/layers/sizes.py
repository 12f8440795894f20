"""Constructor checks shared by the mixers: named errors for impossible sizes."""
from __future__ import annotations


def check_positive_ints(**values) -> None:
    """Raise ``ValueError("<name> must be a positive int, got ...")`` for the first bad value."""
    for name, val in values.items():
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")


def split_heads(d_model: int, expand: int, headdim: int, ngroups: int) -> tuple[int, int]:
    """(d_inner, nheads) for d_inner = expand * d_model split into heads of ``headdim``, with
    ``ngroups`` B/C groups dividing the heads."""
    d_inner = expand * d_model
    if d_inner % headdim != 0:
        raise ValueError(f"headdim={headdim} must divide d_inner = expand * d_model = {d_inner}")
    nheads = d_inner // headdim
    if nheads % ngroups != 0:
        raise ValueError(f"ngroups={ngroups} must divide the number of heads {nheads}")
    return d_inner, nheads
