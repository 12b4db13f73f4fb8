"""The host path of a clip on the GPU backends: what a call costs the host besides its launches, per gradient.

A small model's step is bound by the host, not the device: every call must look at each parameter's ``.grad``
(``zero_grad(set_to_none=True)`` reallocates them), find the kernels' table and launch. Here the GPU backends
run at 20, 2000 and 10000 tiny gradients, for ``FusedClipper.clip_``, the drop-in ``clip_grad_norm_`` (given a
list) and a scaler step (``unscale_and_clip_`` + ``update``): on a CPU the Triton backend under
``TRITON_INTERPRET=1`` with its launches replaced by no-ops; on a GPU the Triton and CUDA C++ backends with their
launches real, the time being the host's until the call returns (what decides the default backend there).

What is compared is the marginal cost per gradient, the slope from 2000 to 10000 gradients, against a unit
taken in the same run: ``[p.grad for p in params]`` over the same parameters (about 50-60 ns a gradient on the
2-core CPU here). The budget (docs/benchmarks.md): the drop-in at most 1x the unit, ``FusedClipper.clip_`` at
most 0.5x; each case records its ratio and whether it is within the budget (a timing is a measurement, not a
test's pass condition). Each time is the least of many calls, the sizes interleaved, so that both sides of a
ratio see the same machine.

    TRITON_INTERPRET=1 python -m pytest benchmarks/test_host_path.py -s      # make bench-host
"""

from __future__ import annotations

import os

import pytest
import torch

import ampclip

from .host_timing import SIZES, least_us, triton_launches_skipped

ELEMENTS = 4
BUDGET = {"clipper": 0.5, "dropin": 1.0, "scaler": None}  # at most this many units a gradient; None: reported
CALLS = ("clipper", "dropin", "scaler")


def _runnable() -> bool:
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


pytestmark = pytest.mark.skipif(not _runnable(), reason="run on a GPU, or with TRITON_INTERPRET=1 (make bench-host)")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def backends() -> list[str]:
    """The GPU backends that run here: Triton (on a CPU under its interpreter), and CUDA C++ where built."""
    from ampclip import ops

    return [name for name in ("triton", "cuda") if ops.runs_on(name, _device())]


def calls(n: int, backend: str = "triton") -> dict:
    """The timed calls on ``n`` parameters of ELEMENTS elements, on ``backend``."""
    device = _device()
    params = [torch.nn.Parameter(torch.randn(ELEMENTS, device=device)) for _ in range(n)]
    for p in params:
        p.grad = torch.randn(ELEMENTS, device=device)
    clipper = ampclip.FusedClipper(params, max_norm=1.0, backend=backend)
    inv = torch.tensor(0.5, device=device)
    scaler = ampclip.DynamicLossScaler(device, backend=backend)
    optimizer = torch.optim.SGD(params, lr=0.0)
    loss = torch.ones((), device=device)

    def scaler_step():
        scaler.scale(loss)
        scaler.unscale_and_clip_(optimizer, max_norm=1.0)
        scaler.update()

    return {"unit": lambda: [p.grad for p in params], "clipper": lambda: clipper.clip_(inv),
            "dropin": lambda: ampclip.clip_grad_norm_(params, 1.0, backend=backend), "scaler": scaler_step}


@pytest.fixture(scope="module")
def no_launches():
    """The Triton launches replaced by no-ops on a CPU (the interpreter would run the kernels on the host)."""
    if torch.cuda.is_available():
        yield
        return
    with triton_launches_skipped():
        yield


def measure(backend: str, repeats: int = 30, rounds: int = 3) -> dict:
    """``{call: {n: microseconds}}``, each the least over ``rounds`` interleaved rounds of ``repeats`` calls."""
    prepared = {n: calls(n, backend) for n in SIZES}
    for fns in prepared.values():  # tables, caches and the optimizer's state built
        for fn in fns.values():
            fn(), fn()
    times = {name: {n: float("inf") for n in SIZES} for name in ("unit", *CALLS)}
    for _ in range(rounds):
        for n, fns in prepared.items():
            for name, fn in fns.items():
                times[name][n] = min(times[name][n], least_us(fn, repeats))
    return times


def slopes(times: dict) -> dict:
    """ns per gradient from 2000 to 10000 gradients, per call."""
    return {name: (t[10000] - t[2000]) / 8000 * 1e3 for name, t in times.items()}


@pytest.fixture(scope="module", params=backends())
def measured(request, no_launches):
    times = measure(request.param)
    per_gradient = slopes(times)
    unit = per_gradient["unit"]
    print(f"\nhost path per call on {request.param}, launches "
          f"{'real' if torch.cuda.is_available() else 'replaced by no-ops'} (us):")
    for name, t in times.items():
        print(f"  {name:<8}" + "".join(f"{t[n]:>10.1f}" for n in SIZES) +
              f"   {per_gradient[name]:6.1f} ns/gradient = {per_gradient[name] / unit:4.2f} units" +
              (f" (budget {BUDGET[name]})" if BUDGET.get(name) else ""))
    return request.param, times, per_gradient


@pytest.mark.parametrize("call", CALLS)
def test_host_path(benchmark, measured, call):
    backend, times, per_gradient = measured
    ratio = per_gradient[call] / per_gradient["unit"]
    benchmark.extra_info.update(call=call, backend=backend, us_per_call={str(n): times[call][n] for n in SIZES},
                                ns_per_gradient=per_gradient[call], unit_ns_per_gradient=per_gradient["unit"],
                                units=ratio, budget_units=BUDGET[call])
    benchmark.extra_info["within_budget"] = None if BUDGET[call] is None else ratio <= BUDGET[call]
    benchmark.pedantic(calls(2000, backend)[call], rounds=5, warmup_rounds=2)
