"""Metrics, the benchmark suite of a run and what it feeds the model."""
