"""Benchmarks: each a script that writes bench/results/*.json and a PNG (see README)."""
