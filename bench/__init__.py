"""Benchmarks of the presence pipeline against baselines measured in the same run (see bench/README.md)."""
