"""The timing of the host-path measurements (``test_host_path.py``, ``host_budget.py``, ``host_costs.py``): the
least time of many calls (other load on a shared machine only ever adds time), and the Triton interpreter's
launches replaced by no-ops, so that what is timed on a CPU is the host's work, not the kernels run on the host."""

from __future__ import annotations

import contextlib
import time

SIZES = (20, 2000, 10000)  # gradients per call: a fixed cost, and the slope from 2000 to 10000 per gradient


def least_us(fn, calls: int, warmup: int = 0) -> float:
    """The least time of ``calls`` calls of ``fn`` in microseconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e6


@contextlib.contextmanager
def triton_launches_skipped():
    """Every Triton launch under ``TRITON_INTERPRET=1`` returns at once, inside this block."""
    import triton.runtime.interpreter as interpreter

    run = interpreter.InterpretedFunction.run
    interpreter.InterpretedFunction.run = lambda self, *args, grid, warmup, **kwargs: None
    try:
        yield
    finally:
        interpreter.InterpretedFunction.run = run
