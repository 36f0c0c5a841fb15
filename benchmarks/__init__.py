"""Benchmarks (`sparrow bench ...`); recorded results live in benchmarks/results/."""
