"""Benchmark suite (speed and peak memory side by side with the references)."""
