"""Benchmarks: ``python -m densemoe.bench --help``."""
