"""Benchmarks (run on a GPU): `dsmoe bench SUITE` or `python bench/run.py SUITE`."""
