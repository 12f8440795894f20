"""Benchmarks reachable from the CLI (``mamba3 bench ...``)."""
