"""Benchmarks: each module is a command `python -m fewstep_jax.bench.<name>` that prints a table."""
