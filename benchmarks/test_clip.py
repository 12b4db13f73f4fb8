"""Every provider on every workload and dtype: checked once, then timed by pytest-benchmark with the cache
flushed before each call (see conftest.py for the options, providers.py for what is timed)."""

import pytest
import torch

from .providers import SCENARIO_BASELINE, SCENARIO_FLOOR, SCENARIO_FLOOR_N, check
from .workloads import DTYPES


def test_clip(benchmark, settings, gradsets, workload, dtype, provider):
    prov = settings.providers[provider]
    reason = prov.unsupported and prov.unsupported(DTYPES[dtype], settings.device)
    if reason:  # recorded in the results, so the report lists it beside the cases that ran
        settings.skipped.append({"workload": workload, "dtype": dtype, "provider": provider, "reason": reason})
        pytest.skip(f"{provider}: {reason}")
    gs = gradsets
    gs.mode = prov.scenario if not prov.flat else "noclip"
    gs.resync()
    call = prov.setup(gs)
    checked = None if prov.flat else check(provider, prov, call, gs, gs.sets[0][0].dtype)
    on_gpu = settings.device.type == "cuda"

    def between():  # not timed: the next set restored if needed, the caches flushed, the device idle
        gs.prepare()
        if on_gpu:
            settings.flush.zero_()
            torch.cuda.synchronize()
        else:
            settings.flush.sum()

    def timed():
        out = call()
        if on_gpu:
            torch.cuda.synchronize()
        return out

    benchmark.extra_info.update({
        "workload": workload, "dtype": dtype, "provider": provider, "scenario": prov.scenario,
        "baseline": SCENARIO_BASELINE.get(prov.scenario), "floor": SCENARIO_FLOOR.get(prov.scenario),
        "moved_n": prov.moved_n, "floor_n": SCENARIO_FLOOR_N[prov.scenario] or prov.moved_n,
        "bytes": gs.nbytes(), "tensors": len(gs.sets[0]), "elements": gs.numel(), "scaled_down_by": gs.divisor,
        "description": prov.description, "check": checked,
    })
    benchmark.pedantic(timed, setup=between, rounds=settings.rounds, warmup_rounds=len(gs.sets), iterations=1)
