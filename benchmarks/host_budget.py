"""Where the host time of a ``FusedClipper.clip_`` call goes, on the Triton backend with its launches replaced by
no-ops (the interpreter would run the kernels on the host), beside the unit ``[p.grad for p in params]``, at 20,
2000 and 10000 gradients. The steady clip (the last table's gradients): finding the table again, which compares
each ``.grad`` with it and bumps its version, and the two launches on it. The general path, which a clip of
another list takes: gathering the gradients, each pass's way to its launch, the version bumps; and a table
built anew, as on every step whose gradients moved, with its rows read in C++ and in Python.

    python -m benchmarks.host_budget > benchmarks/results/<date>/host-path-budget.txt

Each figure is the least of 40 calls after two warm-up calls (tables built, as in every step after the first).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is decorated: the kernels run on CPU tensors

import datetime

import torch

import ampclip
from ampclip import ops
from ampclip.backends import cpp, tensor_table

from .host_timing import SIZES, least_us, triton_launches_skipped
from .machine import cpu_model


def us(fn) -> float:
    """Microseconds per call: the least of 40 calls, after two."""
    return least_us(fn, 40, warmup=2)


def rows(n: int) -> dict:
    params = [torch.nn.Parameter(torch.randn(4)) for _ in range(n)]
    for p in params:
        p.grad = torch.randn(4)
    clipper = ampclip.FusedClipper(params, max_norm=1.0, backend="triton")
    inv, coef = torch.tensor(0.5), torch.tensor(0.5)
    clipper.clip_(inv)
    table = tensor_table.last_table()
    _, grads, _, _ = ops.gathered(params)  # checked against the table the clip just used
    triton = ops._impl("triton")
    return {
        "FusedClipper.clip_, whole call (the steady clip)": us(lambda: clipper.clip_(inv)),
        "  find the table again: compare each .grad, bump its version (one C++ loop)":
            us(lambda: cpp.claim_grads(params, table.signature, True)),
        "  the two launches on the table (adapter to the launches)": us(lambda: two_passes(triton, table, inv)),
        "the general path: gather .grad, check the table's layout (one C++ loop)": us(lambda: ops.gathered(params)),
        "  norm pass: ops to the launch (table found in O(1))":
            us(lambda: ops.clip_norm_pass(grads, inv, 2.0, max_norm=1.0, backend="triton")),
        "  scale pass: ops to the launch, version bumps": us(lambda: ops.scale_pass(grads, coef, inv,
                                                                                     backend="triton")),
        "  of which: version bumps (one C++ loop)": us(lambda: cpp.bump_versions(grads)),
        "a table built (gradients that moved): signature, rows in one C++ loop, copy": us(lambda: built(grads)),
        "  the same, its rows read in Python (as without the extension)": us(lambda: built(grads, python=True)),
        "unit: [p.grad for p in params]": us(lambda: [p.grad for p in params]),
    }


def two_passes(backend, table, inv):
    """The steady clip's passes on ``table``: the norm pass that computes the coefficient, the scale pass."""
    per_tensor, total, found_inf, coef, post, _ = backend.clip_norm_pass_on_table(table, inv, 2.0, None, 1.0, 0,
                                                                                  ops.EPS, 0)
    backend.scale_pass_on_table(table, coef, inv, None, found_inf, False)


def built(grads, python: bool = False):
    """The table of ``grads`` built anew, as on a step whose gradients moved (cache emptied first)."""
    tensor_table.clear_cache()
    if not python:
        return tensor_table.tensor_table(list(grads))
    rows = tensor_table.table_rows
    tensor_table.table_rows = lambda tensors, chunk: None
    try:
        return tensor_table.tensor_table(list(grads))
    finally:
        tensor_table.table_rows = rows


def main() -> int:
    torch.set_num_threads(1)
    print(f"# python -m benchmarks.host_budget, {datetime.date.today()}, {cpu_model()} ({os.cpu_count()} cores), "
          f"torch {torch.__version__}, 1 thread, least of 40 calls, gradients of 4 elements")
    with triton_launches_skipped():
        measured = [rows(n) for n in SIZES]
    print(f"{'us per call (Triton backend, launches replaced by no-ops)':<78}" + "".join(f"{n:>9}" for n in SIZES))
    for label in measured[0]:
        print(f"{label:<78}" + "".join(f"{m[label]:>9.1f}" for m in measured))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
