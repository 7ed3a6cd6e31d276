"""Benchmarks and tools (`python -m scripts.bench`)."""
