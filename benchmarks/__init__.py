"""Benchmarks: figures printed, never asserted (run with `make bench`)."""
