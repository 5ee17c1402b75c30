"""Benchmarks: scripts run as `python bench/<name>.py`, each writing JSON under bench/results/."""
