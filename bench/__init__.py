"""Benchmark and test helpers for ucxkv (tiny local models, load generators)."""
