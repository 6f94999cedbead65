"""Benchmarks: a loopback HTTP load generator (``fos bench``), the naive baseline server, a
random model of ruri-large's exact shape, and the report."""
