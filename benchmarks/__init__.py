"""The benchmark harness of ampclip (not installed with the package): workloads, providers, checks and the
report, timed by pytest-benchmark. See conftest.py for how to run it and docs/benchmarks.md for the method."""
