"""Evaluation: synthetic benchmarks and their training runner, lm-eval adapter, perplexity vs
context length, small-scale LM comparison. Submodules are imported on demand (lm-eval is optional)."""
