"""pytest-benchmark set-up of the harness: options, the cases (workload x dtype x provider), the gradient
sets, the cache flush between timed calls, and what every results file records about the machine.

    pytest benchmarks/ --benchmark-json=out.json                       # the default set for this device
    pytest benchmarks/ --workloads gpt2-124m 2000x512 --dtypes fp32 --benchmark-json=out.json
    pytest benchmarks/ --quick --benchmark-disable                     # every provider once, checked
    python -m benchmarks.report out.json [more runs.json] --out benchmarks/results --docs docs/benchmarks.md

pytest-benchmark does the timing, rounds and statistics; here is only what is ampclip's own.
"""

from __future__ import annotations

import datetime
import os
import platform

import pytest
import torch

from .machine import cpu_model as cpu_model_name
from .machine import llc_bytes
from .providers import SCENARIO_BASELINE, SCENARIO_FLOOR, SCENARIO_FLOOR_N, available
from .workloads import DEFAULT_CPU, DEFAULT_CPU_DTYPES, DTYPES, WORKLOADS, GradSets, fitted


def pytest_addoption(parser):
    group = parser.getgroup("ampclip", "ampclip benchmark harness")
    group.addoption("--workloads", nargs="+", choices=list(WORKLOADS), default=None,
                    help=f"default: {' '.join(DEFAULT_CPU)} on a CPU, all on a GPU")
    group.addoption("--dtypes", nargs="+", choices=list(DTYPES), default=None,
                    help=f"default: {' '.join(DEFAULT_CPU_DTYPES)} on a CPU, all on a GPU")
    group.addoption("--providers", nargs="+", default=None, help="default: every one that runs here")
    group.addoption("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    group.addoption("--rounds", type=int, default=None, help="timed calls per case (default 20 CPU, 100 GPU)")
    group.addoption("--sets", type=int, default=None, help="rotated gradient sets (default 3 CPU, 2 GPU)")
    group.addoption("--budget-gb", type=float, default=None,
                    help="memory for one gradient set (default 1 on a CPU, a sixth of the free GPU memory)")
    group.addoption("--compile", action="store_true", help="add torch.compile of the chain on the CPU too")
    group.addoption("--quick", action="store_true", help="tiny sizes and few rounds: a smoke run")
    group.addoption("--threads", type=int, default=None,
                    help="torch CPU threads (default torch's; recorded). Fewer than the cores of a busy machine "
                         "avoids OpenMP waiting a scheduler time slice for a descheduled thread")


class Settings:
    """The options, resolved once per session."""

    def __init__(self, config):
        option = config.getoption
        if option("--threads"):
            torch.set_num_threads(option("--threads"))
        self.device = torch.device(option("--device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        on_gpu = self.device.type == "cuda"
        self.quick = option("--quick")
        self.workloads = option("--workloads") or (list(WORKLOADS) if on_gpu else DEFAULT_CPU)
        self.dtypes = option("--dtypes") or (list(DTYPES) if on_gpu else DEFAULT_CPU_DTYPES)
        self.rounds = option("--rounds") or (3 if self.quick else 100 if on_gpu else 20)
        self.sets = option("--sets") or (2 if on_gpu or self.quick else 3)
        if option("--budget-gb") is not None:
            budget = option("--budget-gb")
        elif self.quick:
            budget = 0.0004  # ~100k float32 elements a set
        elif on_gpu:
            budget = torch.cuda.mem_get_info(self.device)[0] / 6 / 2**30
        else:
            budget = 1.0
        self.budget_bytes = int(budget * 2**30)
        providers = available(self.device, on_gpu or option("--compile"))
        wanted = option("--providers")
        if wanted:
            unknown = sorted(set(wanted) - set(providers))
            if unknown:
                raise pytest.UsageError(f"providers not known or not runnable here: {unknown}")
            # every ratio needs its scenario's baseline and floor, and GB/s the copy, in the same run
            needed = {"copy"} | {SCENARIO_BASELINE.get(providers[p].scenario) for p in wanted} | {
                SCENARIO_FLOOR.get(providers[p].scenario) for p in wanted}
            providers = {k: v for k, v in providers.items() if k in set(wanted) | needed}
        self.providers = providers
        self.skipped: list[dict] = []  # cases a provider cannot run here, with the reason (test_clip.py)
        flush = 4 * 2**20 if self.quick else min(2 * llc_bytes(), 2**29)
        # Between timed calls: evict the previous call's lines (CPU: read twice the last-level cache; GPU:
        # write 256 MiB, as triton.testing.do_bench clears the L2). Written once here: pages never written
        # all map the kernel's one zero page, and reading them evicts nothing.
        self.flush = torch.ones(2**26 if on_gpu else flush // 4, dtype=torch.float32, device=self.device)

    def cases(self):
        for workload in self.workloads:
            for dtype in self.dtypes:
                for name in self.providers:
                    yield pytest.param(workload, dtype, name, id=f"{workload}-{dtype}-{name}")


def pytest_configure(config):
    config._ampclip = Settings(config)


def pytest_generate_tests(metafunc):
    if {"workload", "dtype", "provider"} <= set(metafunc.fixturenames):
        metafunc.parametrize(("workload", "dtype", "provider"), list(metafunc.config._ampclip.cases()))


@pytest.fixture(scope="session")
def settings(request) -> Settings:
    return request.config._ampclip


class _Sets:
    """The gradient sets of the current (workload, dtype): one at a time in memory, built when a case asks."""

    key = None
    value = None


@pytest.fixture
def gradsets(settings, workload, dtype) -> GradSets:
    key = (workload, dtype)
    if _Sets.key != key:
        _Sets.key, _Sets.value = None, None
        if settings.device.type == "cuda":
            torch.cuda.empty_cache()
        shapes, divisor = fitted(WORKLOADS[workload](), settings.budget_bytes // DTYPES[dtype].itemsize)
        _Sets.value = GradSets(shapes, DTYPES[dtype], settings.device, settings.sets)
        _Sets.value.divisor = divisor
        _Sets.key = key
    return _Sets.value


def device_info(device: torch.device) -> dict:
    """Device name, versions, threads and date, recorded with every results file."""
    import ampclip

    cpu_model = cpu_model_name()
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "device": gpu or f"{cpu_model} ({os.cpu_count()} cores)", "device_type": device.type, "gpu": gpu,
        "cpu": f"{cpu_model} ({os.cpu_count()} cores)", "torch": torch.__version__, "triton": triton_version,
        "cuda": torch.version.cuda, "python": platform.python_version(), "ampclip": ampclip.__version__,
        "backends": ampclip.ops.available_backends(), "threads": torch.get_num_threads(),
        "date": now.date().isoformat(), "timestamp": now.isoformat(timespec="seconds"),
    }


def pytest_benchmark_update_json(config, benchmarks, output_json):
    settings = config._ampclip
    output_json["ampclip"] = {
        "info": device_info(settings.device),
        "config": {"workloads": settings.workloads, "dtypes": settings.dtypes, "providers": list(settings.providers),
                   "rounds": settings.rounds, "sets": settings.sets, "budget_bytes": settings.budget_bytes,
                   "flush_bytes": settings.flush.numel() * 4, "quick": settings.quick,
                   "scenario_floor_n": SCENARIO_FLOOR_N},
        "skipped": settings.skipped,
    }
