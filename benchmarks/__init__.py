"""The benchmarks of `make bench` (run.py; README "Benchmarks"), a package so that the tests import their code."""
