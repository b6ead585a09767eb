"""Benchmarks: ``python -m benchmarks.bench`` (also ``moe-adapter bench``)."""
