"""``mamba3 bench ...`` subcommands."""
from __future__ import annotations


def add_parser(subparsers) -> None:
    from . import e2e
    p = subparsers.add_parser("bench", help="benchmarks")
    sub = p.add_subparsers(dest="bench_cmd", required=True)
    pe = sub.add_parser("e2e", help="end-to-end prefill + decode latency (the paper's Table 7 protocol)")
    e2e.add_arguments(pe)
    pe.set_defaults(func=e2e.main)
