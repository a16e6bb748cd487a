"""Benchmarks for optax-selective: ``python -m benchmarks`` (CPU suite), ``benchmarks/gpu.py``."""
