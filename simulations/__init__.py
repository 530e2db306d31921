"""Benchmarks and run launchers; each bench_*.py prints JSON lines."""
