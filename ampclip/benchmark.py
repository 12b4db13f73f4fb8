"""The benchmark harness: workloads x dtypes x providers, against torch.nn.utils and a copy of the same bytes.

    python -m ampclip bench                      # the default set for this device
    python -m ampclip bench --workloads gpt2-124m 2000x512 --dtypes fp32 --reps 20
    python -m ampclip bench --docs docs/benchmarks.md benchmarks/results/*.json

Method (docs/benchmarks.md): every provider clips the same random gradients, rotated over several sets
so that timings measure memory rather than a cache; every call really rewrites the gradients (each call
clips to half of the bound of the previous one; values do not change the cost of a memory-bound pass).
Times are medians with 20%/80% quantiles: ``triton.testing.do_bench`` on a GPU, a repeated timer on the
CPU. Before timing, each provider's norm is checked against torch's.

Bytes: N is the gradient bytes. The torch chain (``GradScaler.unscale_`` + ``clip_grad_norm_``) moves
5N, an in-place fused clip 3N, a deferred one N. A device copy of N bytes moves 2N and is the ceiling.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from . import ops, reference
from .clipper import FusedClipper
from .functional import clip_grad_norm_
from .shapes import gpt2_shapes

__all__ = ["WORKLOADS", "main", "run", "render_docs"]


def _llama7b_shapes() -> list[tuple]:
    d, ff, vocab = 4096, 11008, 32000
    layer = [(d, d)] * 4 + [(ff, d), (ff, d), (d, ff), (d,), (d,)]
    return [(vocab, d)] + layer * 32 + [(d,), (vocab, d)]


WORKLOADS: dict[str, Callable[[], list[tuple]]] = {
    "gpt2-124m": gpt2_shapes,
    "gpt2-355m": lambda: gpt2_shapes(d_model=1024, n_layer=24),
    "gpt2-1.5b": lambda: gpt2_shapes(d_model=1600, n_layer=48),
    "llama-7b": _llama7b_shapes,
    "2000x512": lambda: [(512,)] * 2000,
    "10000x4": lambda: [(4,)] * 10000,
    "1.5e9": lambda: [(1_500_000_000,)],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LOSS_SCALE = 2.0**16  # fp16 gradients carry a loss scale, as under GradScaler
DEFAULT_CPU = ["gpt2-124m", "2000x512", "10000x4"]
DEFAULT_GPU = list(WORKLOADS)


# ------------------------------------------------------------------------------------------------ inputs
def _scaled_shapes(shapes: list[tuple], budget_elems: int) -> tuple[list[tuple], int]:
    """Shrink every tensor's leading dimension by one divisor until the workload fits the budget."""
    total = sum(math.prod(s) for s in shapes)
    divisor = max(1, math.ceil(total / budget_elems))
    if divisor == 1:
        return shapes, 1
    return [(max(1, s[0] // divisor), *s[1:]) for s in shapes], divisor


class _GradSets:
    """K independent random gradient sets (never zeros) rotated call by call, each with its clip bound
    halved at every visit so that every call really clips."""

    def __init__(self, shapes, dtype, device, sets, seed=0):
        gen = torch.Generator(device=device).manual_seed(seed)
        scale = LOSS_SCALE if dtype == torch.float16 else 1.0
        self.sets = [[(torch.randn(s, generator=gen, device=device, dtype=torch.float32) * scale).to(dtype)
                      for s in shapes] for _ in range(sets)]
        self.inv_scale = torch.full((), 1.0 / scale, device=device)
        self.norms = [reference.exact_norm(g, 2.0, 1.0 / scale) for g in self.sets]
        self.bounds = [n / 2 for n in self.norms]
        self.calls = 0

    def next(self):
        k = self.calls % len(self.sets)
        self.calls += 1
        bound = self.bounds[k]
        self.bounds[k] = bound / 2 if bound > 1e-20 else self.norms[k] / 2
        return self.sets[k], bound


# ------------------------------------------------------------------------------------------------ providers
class _Holder:
    __slots__ = ("grad",)

    def __init__(self, grad):
        self.grad = grad


def _providers(device: torch.device, with_compile: bool) -> dict[str, Callable]:
    """name -> setup(gradsets) returning a zero-argument call, and the bytes it must move (in units of N)."""

    def torch_clip(gs):
        def call():
            grads, bound = gs.next()
            reference.torch_clip_grad_norm(grads, bound)
        return call, 3

    def torch_chain(gs):
        def call():
            grads, bound = gs.next()
            reference.torch_unscale_and_clip(grads, gs.inv_scale, bound)
        return call, 5

    def torch_compile_chain(gs):
        compiled = torch.compile(reference.torch_unscale_and_clip)

        def call():
            grads, bound = gs.next()
            compiled(grads, gs.inv_scale, bound)
        return call, 5

    def ampclip_dropin(gs):
        params = [[_Holder(g) for g in grads] for grads in gs.sets]

        def call():
            k = gs.calls % len(gs.sets)
            grads, bound = gs.next()
            clip_grad_norm_(params[k], bound)  # no unscale: the drop-in takes what torch's takes
        return call, 3

    def ampclip_backend(name):
        def setup(gs):
            clippers = [_clipper_for(grads, name) for grads in gs.sets]

            def call():
                k = gs.calls % len(gs.sets)
                _, bound = gs.next()
                clippers[k].clip_(gs.inv_scale, max_norm=bound)
            return call, 3
        return setup

    def no_clip_needed(fn, moved):
        # max_norm above the norm: torch still multiplies every gradient by 1 (3N); ampclip reads once (N).
        def setup(gs):
            params = [[_Holder(g) for g in grads] for grads in gs.sets]

            def call():
                k = gs.calls % len(gs.sets)
                gs.calls += 1
                fn(params[k], math.inf)
            return call, moved
        return setup

    providers = {"torch_clip": torch_clip, "torch_chain": torch_chain, "ampclip_dropin": ampclip_dropin,
                 "torch_clip_noclip": no_clip_needed(torch.nn.utils.clip_grad_norm_, 3),
                 "ampclip_dropin_noclip": no_clip_needed(clip_grad_norm_, 1)}
    if with_compile:
        providers["torch_compile_chain"] = torch_compile_chain
    for name, ok in ops.available_backends().items():
        if ok and (name != "triton" or device.type == "cuda"):
            providers[f"ampclip_{name}"] = ampclip_backend(name)
    return providers


def _clipper_for(grads, backend):
    params = []
    for g in grads:
        # A parameter of the gradient's shape that owns no memory (one element, broadcast).
        p = torch.nn.Parameter(torch.zeros((), device=g.device, dtype=g.dtype).expand(g.shape))
        p.grad = g
        params.append(p)
    return FusedClipper(params, max_norm=1.0, backend=backend)


# ------------------------------------------------------------------------------------------------ timing
def _time_cpu(call, reps: int) -> list[float]:
    call()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def _measure(call, reps: int, device: torch.device) -> dict:
    if device.type == "cuda":
        import triton.testing

        median, q20, q80 = triton.testing.do_bench(call, quantiles=[0.5, 0.2, 0.8])
        host = _host_time(call)
        return {"median_ms": median, "q20_ms": q20, "q80_ms": q80, "host_ms": host}
    times = sorted(t * 1e3 for t in _time_cpu(call, reps))
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return {"median_ms": statistics.median(times), "q20_ms": q[1], "q80_ms": q[7], "host_ms": None}


def _measure_copy(numel: int, dtype: torch.dtype, device: torch.device, reps: int) -> dict:
    """A device copy of the gradients' bytes: the bandwidth ceiling, measured in the same run."""
    src = torch.empty(numel, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    return _measure(lambda: dst.copy_(src), reps, device)


def _host_time(call, reps: int = 20) -> float:
    """Milliseconds until the call returns (kernels queued, not finished), median."""
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
        torch.cuda.synchronize()
    return statistics.median(times)


def _launches(call) -> int | None:
    try:
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return None
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA")


def _check(providers, gs_factory) -> None:
    """Before timing: one call of each provider must leave gradients whose norm is the clip bound (or, with
    no clip needed, the norm they had)."""
    for name, setup in providers.items():
        gs = gs_factory()
        # the bound is below the norm, scaled or not: every clipping provider clips to it
        bound = reference.exact_norm(gs.sets[0], 2.0) if name.endswith("_noclip") else gs.bounds[0]
        call, _ = setup(gs)
        call()
        got = reference.exact_norm(gs.sets[0], 2.0)
        if abs(got - bound) > 1e-2 * bound:
            raise AssertionError(f"{name}: the clipped norm is {got:.6g}, expected {bound:.6g}")


# ------------------------------------------------------------------------------------------------ running
def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        models = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")] \
            if os.path.exists("/proc/cpuinfo") else [platform.processor()]
        name = f"{models[0]} ({os.cpu_count()} cores)"
    info = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": None,
            "python": platform.python_version(), "date": datetime.date.today().isoformat(),
            "threads": torch.get_num_threads()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def run(workloads, dtypes, provider_names=None, device=None, reps=10, sets=None, budget_gb=None,
        with_compile=None) -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with_compile = device.type == "cuda" if with_compile is None else with_compile
    if budget_gb is None:
        # GPU: a quarter of the free memory; CPU: 3 GiB, enough for GPT-2-124M at full size
        budget_gb = 0.25 * torch.cuda.mem_get_info(device)[0] / 2**30 if device.type == "cuda" else 3.0
    providers = _providers(device, with_compile)
    if provider_names:
        providers = {k: v for k, v in providers.items() if k in provider_names}
    rows = []
    for workload in workloads:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            n_sets = sets or (2 if device.type == "cuda" else 3)
            budget = int(budget_gb * 2**30 / dtype.itemsize / (n_sets + 2))  # sets + torch's temporaries
            shapes, divisor = _scaled_shapes(WORKLOADS[workload](), budget)
            numel = sum(math.prod(s) for s in shapes)
            nbytes = numel * dtype.itemsize

            def factory(shapes=shapes, dtype=dtype, n=n_sets):
                return _GradSets(shapes, dtype, device, n)

            _check(providers, lambda: factory(n=1))
            copy = _measure_copy(numel, dtype, device, reps)
            copy_gbps = 2 * nbytes / (copy["median_ms"] * 1e-3) / 1e9
            base = {"workload": workload, "dtype": dtype_name, "tensors": len(shapes), "elements": numel,
                    "bytes": nbytes, "scaled_down_by": divisor}
            rows.append({**base, "provider": "copy", **copy, "bytes_moved_n": 2, "gbps": copy_gbps,
                         "frac_of_copy": 1.0, "launches": None})
            for name, setup in providers.items():
                gs = factory()
                call, moved = setup(gs)
                m = _measure(call, reps, device)
                launches = _launches(call) if device.type == "cuda" else None
                gbps = moved * nbytes / (m["median_ms"] * 1e-3) / 1e9
                rows.append({**base, "provider": name, **m, "bytes_moved_n": moved, "gbps": gbps,
                             "frac_of_copy": gbps / copy_gbps, "launches": launches})
                del gs
            _add_speedups(rows, workload, dtype_name)
            for row in rows[-len(providers) - 1:]:
                print(f"{workload:10} {dtype_name:5} {row['provider']:22} {row['median_ms']:9.3f} ms  "
                      f"{row['gbps']:8.1f} GB/s  x{row.get('speedup_vs_chain') or float('nan'):5.2f} vs chain",
                      flush=True)
    return {"info": device_info(device), "rows": rows}


def _add_speedups(rows, workload, dtype_name):
    mine = [r for r in rows if r["workload"] == workload and r["dtype"] == dtype_name]
    by = {r["provider"]: r["median_ms"] for r in mine}
    for r in mine:
        r["speedup_vs_chain"] = by["torch_chain"] / r["median_ms"] if "torch_chain" in by else None
        torch_clip = by.get("torch_clip_noclip" if r["provider"].endswith("_noclip") else "torch_clip")
        r["speedup_vs_torch_clip"] = torch_clip / r["median_ms"] if torch_clip else None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def save(result: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{_slug(result['info']['device'])}-{result['info']['date']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    with stem.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(result["rows"][0]))
        writer.writeheader()
        writer.writerows(result["rows"])
    _chart(result, stem.with_suffix(".png"))
    return stem.with_suffix(".json")


def _chart(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart")
        return
    rows = [r for r in result["rows"] if r["provider"].startswith("ampclip_") and r.get("speedup_vs_chain")]
    if not rows:
        return
    labels = sorted({f"{r['workload']}\n{r['dtype']}" for r in rows})
    providers = sorted({r["provider"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels)), 4))
    width = 0.8 / len(providers)
    for i, prov in enumerate(providers):
        values = {f"{r['workload']}\n{r['dtype']}": r["speedup_vs_chain"] for r in rows if r["provider"] == prov}
        ax.bar([j + i * width for j in range(len(labels))], [values.get(lab, 0) for lab in labels], width,
               label=prov)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, fontsize=8)
    ax.set_ylabel("speedup vs the torch chain")
    ax.set_title(f"{result['info']['device']}, torch {result['info']['torch']}, {result['info']['date']}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render_docs(result_files: list[Path]) -> str:
    """Markdown tables of recorded results; every number names its results file."""
    parts = []
    for path in result_files:
        result = json.loads(Path(path).read_text())
        info = result["info"]
        parts.append(f"### {info['device']} ({info['date']})\n\nFrom `{Path(path).as_posix()}`: torch "
                     f"{info['torch']}, triton {info['triton']}, CUDA {info['cuda']}, {info['threads']} threads.\n")
        parts.append("| workload | dtype | provider | median ms | 20%-80% ms | GB/s | of copy | vs chain "
                     "| vs torch clip |")
        parts.append("|---|---|---|---|---|---|---|---|---|")
        for r in result["rows"]:
            fmt = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
            parts.append(
                f"| {r['workload']}{' (1/' + str(r['scaled_down_by']) + ')' if r['scaled_down_by'] > 1 else ''} "
                f"| {r['dtype']} | {r['provider']} | {r['median_ms']:.3f} | {r['q20_ms']:.3f}-{r['q80_ms']:.3f} "
                f"| {r['gbps']:.1f} | {r['frac_of_copy']:.2f} | {fmt(r.get('speedup_vs_chain'), '.2f')} "
                f"| {fmt(r.get('speedup_vs_torch_clip'), '.2f')} |")
        parts.append("")
    return "\n".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ampclip bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=None)
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=None)
    parser.add_argument("--providers", nargs="+", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--budget-gb", type=float, default=None, help="gradient memory budget per workload")
    parser.add_argument("--compile", action="store_true", help="add torch.compile of the chain on the CPU too")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--docs", default=None, help="write markdown tables of the given results files here")
    parser.add_argument("results", nargs="*", help="results files for --docs")
    args = parser.parse_args(argv)
    if args.docs:
        Path(args.docs).write_text(render_docs([Path(p) for p in args.results]))
        return 0
    on_gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    workloads = args.workloads or (DEFAULT_GPU if on_gpu else DEFAULT_CPU)
    dtypes = args.dtypes or (list(DTYPES) if on_gpu else ["fp32"])
    budget = 0.002 if args.quick else args.budget_gb
    result = run(workloads, dtypes, args.providers, args.device, 3 if args.quick else args.reps,
                 budget_gb=budget, with_compile=args.compile or None)
    path = save(result, Path(args.out))
    print(f"wrote {path} (+ .csv, .png)")
    return 0
