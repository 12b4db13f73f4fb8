"""The benchmark harness: workloads x dtypes x providers, against torch.nn.utils and a copy of the same bytes.

    python -m ampclip bench                      # the default set for this device
    python -m ampclip bench --workloads gpt2-124m 2000x512 --dtypes fp32 bf16 --reps 20
    python -m ampclip bench --quick --out /tmp/bench          # a smoke run at tiny sizes
    python -m ampclip bench --docs docs/benchmarks.md benchmarks/results/*.json

Method (written out in ``METHOD`` below and in the generated docs):

* Scenarios, each with its torch baseline: ``unscale_clip`` (GradScaler.unscale_ + clip_grad_norm_, the
  torch chain: 5N bytes; ampclip's fused in-place path: 3N), ``clip`` (the drop-in: clip_grad_norm_ alone,
  3N for both) and ``noclip`` (a bound above the norm: torch still multiplies every gradient by 1, 3N;
  ampclip only reads, N). ``copy`` is a device copy of the same bytes (2N), the ceiling, measured in the
  same run. N is the gradient bytes.
* Inputs: K random gradient sets, rotated call by call, and on the CPU a read of a buffer twice the
  last-level cache between timed calls (``do_bench`` clears the L2 on a GPU): timings measure memory.
* Every timed call really clips, without re-randomising inside the timed region: the unscaling providers
  use ``inv_scale = 2`` and clip to the set's stored norm (coefficient 0.5), which leaves the gradients as
  they were (``g * 2 * 0.5``); the others clip to 0.99 of the stored norm, and a set that has shrunk 16x is
  multiplied back by an exact power of two (outside the timed region on the CPU; inside one call in
  several hundred under ``do_bench``). The value of a multiplier does not change the work; a coefficient
  of exactly 1 would (ampclip skips the write then), and this scheme never produces one by accident.
* Correctness first: before timing, one call of every provider is checked (returned norm against an fp64
  norm, the post-clip norm against the bound, ``noclip`` gradients bitwise unchanged, the torch baselines
  bitwise equal to ``ampclip.reference``'s). A failure stops the run.
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
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from . import ops, reference
from .functional import clip_grad_norm_
from .shapes import gpt2_shapes, scaled

__all__ = ["DTYPES", "PROVIDERS", "WORKLOADS", "Provider", "main", "render_docs", "run", "save"]

SCHEMA_VERSION = 2


# ------------------------------------------------------------------------------------------------ workloads
def _llama7b_shapes() -> list[tuple]:
    """LLaMA-7B-like decoder: 291 tensors, 6.74B elements (untied lm_head)."""
    d, ff, vocab = 4096, 11008, 32000
    layer = [(d, d)] * 4 + [(ff, d), (ff, d), (d, ff), (d,), (d,)]
    return [(vocab, d)] + layer * 32 + [(d,), (vocab, d)]


WORKLOADS: dict[str, Callable[[], list[tuple]]] = {
    "gpt2-124m": gpt2_shapes,  # 148 tensors, 124.4M elements
    "gpt2-355m": lambda: gpt2_shapes(d_model=1024, n_layer=24),
    "gpt2-1.5b": lambda: gpt2_shapes(d_model=1600, n_layer=48),
    "llama-7b": _llama7b_shapes,
    "2000x512": lambda: [(512,)] * 2000,  # pytorch#133586
    "10000x4": lambda: [(4,)] * 10000,  # pytorch PR #91846: launch-bound
    "1.5e9": lambda: [(1_500_000_000,)],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_CPU = ["gpt2-124m", "2000x512", "10000x4"]
DEFAULT_CPU_DTYPES = ["fp32", "bf16"]
DEFAULT_GPU = list(WORKLOADS)

# Gradient values: N(0, 1/8). Small enough that torch's fp16 norm of the largest workload (6.7e9 elements:
# sqrt(6.7e9)/8 = 10,000) stays below 65504, so torch_clip in fp16 clips rather than zeroing on inf.
SIGMA = 0.125
INV_SCALE = 2.0  # see the module docstring: unscale x2 then clip x0.5 leaves the gradients unchanged
SHRINK = 0.99  # non-unscaling providers clip to 0.99 of the stored norm: a real write every call
RESTORE_BELOW = 1 / 16  # a set whose norm fell below this fraction is multiplied back (exact power of 2)
SCENARIO_FLOOR_N = {"copy": 2, "unscale_clip": 3, "clip": 3, "noclip": 1}  # bytes the task must move
SCENARIO_BASELINE = {"unscale_clip": "torch_chain", "clip": "torch_clip", "noclip": "torch_clip_noclip"}


def _numel(shapes) -> int:
    return sum(math.prod(s) for s in shapes)


def _scaled_shapes(shapes: list[tuple], budget_elems: int, scale: int = 1) -> tuple[list[tuple], int]:
    """Divide every tensor's leading dimension by one divisor (at least ``scale``) until the workload fits
    ``budget_elems``; the tensor count is kept. Returns (shapes, divisor)."""
    divisor = max(1, int(scale), math.ceil(_numel(shapes) / max(1, budget_elems)))
    return scaled(shapes, divisor), divisor


# ------------------------------------------------------------------------------------------------ inputs
def _norm64(grads: list[torch.Tensor]) -> float:
    """The 2-norm in float64 on the device, one tensor at a time (no host copy of the whole workload)."""
    try:
        per = torch._foreach_norm(grads, 2, dtype=torch.float64)
    except (RuntimeError, TypeError):  # a build without the dtype overload
        per = [torch.linalg.vector_norm(g, 2, dtype=torch.float64) for g in grads]
    return float(torch.linalg.vector_norm(torch.stack(per)))


class GradSets:
    """K independent random gradient sets, rotated call by call, with the stored norm of each tracked so
    that every call clips for real (see the module docstring).

    ``mode`` (set by the harness per provider) decides the bound ``next()`` hands out:
    ``unscale_clip``: the stored norm (the unscaled norm is twice it: coefficient 0.5, values unchanged);
    ``clip``: 0.99 of it (the set shrinks by 1% a visit, multiplied back by 16 when 16x smaller);
    ``noclip``: inf (nothing changes).
    """

    def __init__(self, shapes, dtype, device, sets: int, seed: int = 0):
        gen = torch.Generator(device=device).manual_seed(seed)
        self.sets = [
            [(torch.randn(s, generator=gen, device=device) * SIGMA).to(dtype) for s in shapes]
            for _ in range(sets)
        ]
        self.inv_scale = torch.full((), INV_SCALE, device=device)
        self.norm0 = [_norm64(g) for g in self.sets]
        self.norms = list(self.norm0)
        self.params = [reference.parameters_of(g) for g in self.sets]  # built once, outside timing
        self.mode = "unscale_clip"
        self.bound_factor = 1.0  # the check sets 0.5: a provider that skipped its write would then show
        self.calls = 0
        self.restores = 0

    def peek(self) -> int:
        return self.calls % len(self.sets)

    def resync(self) -> None:
        """Measure the stored norms again (between providers, never timed)."""
        self.norms = [_norm64(g) for g in self.sets]

    def prepare(self) -> None:
        """Multiply the next set back up if this call would take it below RESTORE_BELOW of its start.
        The CPU timer calls this outside the timed region; under do_bench ``next()`` calls it (rarely)."""
        k = self.peek()
        if self.mode == "clip" and self.norms[k] * SHRINK < self.norm0[k] * RESTORE_BELOW:
            factor = 2.0 ** round(math.log2(self.norm0[k] / self.norms[k]))
            torch._foreach_mul_(self.sets[k], factor)  # a power of two: exact
            self.norms[k] *= factor
            self.restores += 1

    def next(self) -> tuple[int, list[torch.Tensor], float]:
        """(set index, gradients, bound) for the next call, advancing the rotation."""
        self.prepare()
        k = self.peek()
        self.calls += 1
        if self.mode == "noclip":
            return k, self.sets[k], math.inf
        bound = self.norms[k] * (SHRINK if self.mode == "clip" else 1.0) * self.bound_factor
        self.norms[k] = bound
        return k, self.sets[k], bound

    def nbytes(self) -> int:
        return sum(g.numel() * g.element_size() for g in self.sets[0])


# ------------------------------------------------------------------------------------------------ providers
@dataclass
class Provider:
    """``setup(gradsets)`` returns a zero-argument call doing one full clip of the next set and returning
    the pre-clip total norm (a tensor). ``moved_n``: the bytes it moves, in units of N."""

    setup: Callable[[GradSets], Callable[[], Any]]
    scenario: str
    moved_n: int
    description: str
    reference: Optional[Callable] = None  # the ampclip.reference function a torch baseline must equal
    needs_cuda: bool = False
    needs_compile_flag: bool = False


def _torch_clip(gs: GradSets):
    # reference.torch_clip_grad_norm minus its per-call wrapping of every gradient (1-15 ms on 10,000
    # tensors, not torch's cost): the parameters are built once. The check proves the two are bitwise equal.
    def call():
        k, _, bound = gs.next()
        return torch.nn.utils.clip_grad_norm_(gs.params[k], bound, 2.0, foreach=True)

    return call


def _torch_chain(gs: GradSets):
    # reference.torch_unscale_and_clip (single dtype) with the parameters built once; bitwise equal (checked).
    def call():
        k, grads, bound = gs.next()
        found_inf = torch.zeros((), dtype=torch.float32, device=gs.inv_scale.device)  # as GradScaler does
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, gs.inv_scale)
        return torch.nn.utils.clip_grad_norm_(gs.params[k], bound, 2.0, foreach=True)

    return call


def _torch_compile_chain(gs: GradSets):
    compiled = torch.compile(reference.torch_unscale_and_clip)
    bounds: dict[int, tuple[float, torch.Tensor]] = {}  # the bound as a device tensor: no recompile per value

    def call():
        k, grads, bound = gs.next()
        cached = bounds.get(k)
        if cached is None or cached[0] != bound:  # constant per set while timed in this scenario
            cached = bounds[k] = (bound, torch.tensor(bound, device=gs.inv_scale.device))
        return compiled(grads, gs.inv_scale, cached[1])[0]

    return call


def _ampclip_dropin(gs: GradSets):
    def call():
        k, _, bound = gs.next()
        return clip_grad_norm_(gs.params[k], bound)  # no unscale: the drop-in takes what torch's takes

    return call


def _ampclip_ops(backend: str):
    """The fused in-place path through the op layer: norm pass (unscale on the fly, check, norm), the
    coefficient on the device, scale pass (unscale and clip in one read and write): 3N."""

    def setup(gs: GradSets):
        def call():
            _, grads, bound = gs.next()
            _, total, found_inf = ops.norm_pass(grads, gs.inv_scale, 2.0, backend=backend)
            coef = ops.clip_coef(bound, total)
            ops.scale_pass(grads, coef, inv_scale=gs.inv_scale, found_inf=found_inf, backend=backend)
            return total

        return call

    return setup


def _fused_clipper(backend: str):
    """``FusedClipper(...).clip_(inv_scale)``: the per-step API (the op path plus its statistics)."""

    def setup(gs: GradSets):
        from .clipper import FusedClipper

        clippers = []
        for grads in gs.sets:
            params = []
            for g in grads:
                # A parameter of the gradient's shape owning no memory (one element, broadcast).
                p = torch.nn.Parameter(torch.zeros((), device=g.device, dtype=g.dtype).expand(g.shape))
                p.grad = g
                params.append(p)
            clippers.append(FusedClipper(params, max_norm=1.0, backend=backend))

        def call():
            k, _, bound = gs.next()
            return clippers[k].clip_(gs.inv_scale, max_norm=bound).total_norm

        return call

    return setup


def _providers() -> dict[str, Provider]:
    """Every provider this harness knows; ``available_providers`` filters by device and flags. Adding one
    is one entry here."""
    out = {
        "torch_chain": Provider(_torch_chain, "unscale_clip", 5,
                                "GradScaler.unscale_ + clip_grad_norm_(foreach=True)",
                                reference=reference.torch_unscale_and_clip),
        "torch_compile_chain": Provider(_torch_compile_chain, "unscale_clip", 5,
                                        "torch.compile of the torch chain", needs_compile_flag=True),
        "torch_clip": Provider(_torch_clip, "clip", 3, "torch.nn.utils.clip_grad_norm_(foreach=True)",
                               reference=reference.torch_clip_grad_norm),
        "ampclip_dropin": Provider(_ampclip_dropin, "clip", 3, "ampclip.clip_grad_norm_"),
        "torch_clip_noclip": Provider(_torch_clip, "noclip", 3, "torch clip_grad_norm_, bound above the norm",
                                      reference=reference.torch_clip_grad_norm),
        "ampclip_dropin_noclip": Provider(_ampclip_dropin, "noclip", 1,
                                          "ampclip.clip_grad_norm_, bound above the norm"),
    }
    for name in ops.BACKENDS:
        out[f"ampclip_{name}"] = Provider(_ampclip_ops(name), "unscale_clip", 3,
                                          f"ops.norm_pass + clip_coef + ops.scale_pass, backend={name}",
                                          needs_cuda=name == "triton")
        out[f"clipper_{name}"] = Provider(_fused_clipper(name), "unscale_clip", 3,
                                          f"FusedClipper(backend={name!r}).clip_(inv_scale)",
                                          needs_cuda=name == "triton")
    return out


PROVIDERS = _providers()


def available_providers(device: torch.device, with_compile: bool) -> dict[str, Provider]:
    """The providers that run here: backends that are built, Triton only on CUDA, torch.compile on CUDA
    or with ``--compile``."""
    backends = ops.available_backends()
    out = {}
    for name, prov in PROVIDERS.items():
        backend = name.split("_", 1)[1] if name.startswith(("ampclip_", "clipper_")) else None
        if backend in backends and not backends[backend]:
            continue
        if prov.needs_cuda and device.type != "cuda":
            continue
        if prov.needs_compile_flag and not with_compile:
            continue
        out[name] = prov
    return out


# ------------------------------------------------------------------------------------------------ checks
class CheckError(AssertionError):
    """A provider returned a wrong norm or left wrong gradients: the run stops, nothing is timed."""


def _check(name: str, prov: Provider, call, gs: GradSets, dtype: torch.dtype) -> dict:
    """One call of ``name`` on the next set, checked. Returns what was compared (kept in the results)."""
    k = gs.peek()
    gs.prepare()  # any restore happens now, not inside the checked call
    stored = _norm64(gs.sets[k])
    unscaled = prov.scenario == "unscale_clip"
    expected = stored * (INV_SCALE if unscaled else 1.0)  # the norm the call must return
    # Half the timed bound: in the timed scheme an unscale-and-clip leaves the stored norm where it was,
    # exactly as a call that wrote nothing would; here the correct result is half of it.
    factor = 1.0 if prov.scenario == "noclip" else 0.5
    bound = {"unscale_clip": gs.norms[k], "clip": gs.norms[k] * SHRINK, "noclip": math.inf}[prov.scenario] * factor
    problems = []
    ref_norm = ref_grads = None
    if prov.reference is not None:  # the timed torch call must equal ampclip.reference's, bitwise
        ref_grads = [g.clone() for g in gs.sets[k]]
        ref_out = prov.reference(ref_grads, gs.inv_scale, bound) if unscaled else prov.reference(ref_grads, bound)
        ref_norm = ref_out[0] if unscaled else ref_out
    # one clone at most (memory): with no clipping needed, the reference's result is the input
    before = None
    if prov.scenario == "noclip":
        before = ref_grads if ref_grads is not None else [g.clone() for g in gs.sets[k]]
        if not all(torch.equal(a, b) for a, b in zip(before, gs.sets[k])):
            problems.append("ampclip.reference's baseline changed gradients that needed no clipping")
    gs.bound_factor = factor
    try:
        returned = call()
    finally:
        gs.bound_factor = 1.0
    if isinstance(returned, (tuple, list)):
        returned = returned[0]
    got = float(returned)
    # torch's fp16/bf16 norms are rounded to the dtype, and its fp32 CPU norm of GPT-2-124M-sized tensors
    # was 8.5e-4 off the fp64 value in our runs: the torch baselines get the tolerance torch needs (their
    # error is recorded in the results), as does the reference backend, which sums with torch's kernels;
    # the compiled and Triton backends get the tight one.
    torch_baseline = prov.reference is not None or name.endswith("_reference")
    rtol = (3e-3 if torch_baseline else 1e-4) if dtype == torch.float32 else 1e-2
    if not math.isfinite(got) or abs(got - expected) > rtol * expected:
        problems.append(f"returned norm {got:.7g}, fp64 norm {expected:.7g}")
    post = _norm64(gs.sets[k])
    if prov.scenario == "noclip":
        if not all(torch.equal(a, b) for a, b in zip(before, gs.sets[k])):
            problems.append("the gradients changed although no clipping was needed")
    elif abs(post - bound) > ((3e-3 if torch_baseline else 1e-3) if dtype == torch.float32 else 2e-2) * bound:
        problems.append(f"post-clip norm {post:.7g}, bound {bound:.7g}")
    if ref_norm is not None:
        if not torch.equal(returned, ref_norm):
            problems.append(f"norm {got!r} differs from ampclip.reference's {float(ref_norm)!r}")
        if not all(torch.equal(a, b) for a, b in zip(ref_grads, gs.sets[k])):
            problems.append("gradients differ from those ampclip.reference's baseline leaves")
    if factor != 1.0:  # back to the timed scale (a power of two: exact)
        torch._foreach_mul_(gs.sets[k], 1 / factor)
        gs.norms[k] = _norm64(gs.sets[k])
    if problems:
        raise CheckError(f"{name} ({dtype}): " + "; ".join(problems))
    return {"returned_norm": got, "fp64_norm": expected, "rel_err": abs(got - expected) / expected,
            "post_clip_norm": post, "bound": bound}


# ------------------------------------------------------------------------------------------------ timing
def _quantiles(values: list[float], qs: list[float]) -> list[float]:
    """Linear interpolation, as numpy's default and triton.testing's."""
    v = sorted(values)
    out = []
    for q in qs:
        pos = q * (len(v) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(v) - 1)
        out.append(v[lo] + (v[hi] - v[lo]) * (pos - lo))
    return out


def _llc_bytes() -> int:
    """Size of the largest CPU cache (sysfs), 32 MiB when unknown."""
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        m = re.fullmatch(r"(\d+)([KMG]?)", text)
        if m:
            best = max(best, int(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])
    return best or 32 * 2**20


class _CpuTimer:
    """perf_counter around each call; between calls (not timed) the next set is prepared and a buffer of
    twice the last-level cache is read, evicting the previous call's lines (written back outside timing)."""

    def __init__(self, flush_bytes: int):
        self.flush = torch.ones(max(1, flush_bytes // 4), dtype=torch.float32) if flush_bytes > 0 else None

    def _between(self, gs):
        if gs is not None:
            gs.prepare()
        if self.flush is not None:
            self.flush.sum()

    def __call__(self, call, gs, reps: int, warmup: int) -> dict:
        for _ in range(warmup):
            self._between(gs)
            call()
        times = []
        for _ in range(reps):
            self._between(gs)
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1e3)
        return _summary(times, "perf_counter")


def _summary(times_ms: list[float], timer: str) -> dict:
    median, q20, q80 = _quantiles(times_ms, [0.5, 0.2, 0.8])
    return {"median_ms": median, "q20_ms": q20, "q80_ms": q80, "min_ms": min(times_ms), "n": len(times_ms),
            "timer": timer, "times_ms": [round(t, 6) for t in times_ms]}


def _time_cuda(call, warmup: int) -> dict:
    import triton.testing

    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    # return_mode="all" gives the raw times; the quantiles are do_bench's (linear interpolation).
    times = triton.testing.do_bench(call, return_mode="all")
    return _summary(list(times), "triton.testing.do_bench")


def _host_ms(call, reps: int = 20) -> float:
    """Median milliseconds until the call returns (kernels queued, not finished): the CPU cost per step."""
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
        torch.cuda.synchronize()
    return _quantiles(times, [0.5])[0]


def _launches(call) -> Optional[int]:
    """Kernels (and memcpy/memset) per call, counted with torch.profiler; None where it cannot count."""
    try:
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            call()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type.name in ("CUDA", "PrivateUse1"))
    except Exception as exc:  # profiler unavailable (CUPTI missing): keep the timings
        print(f"  (launch count unavailable: {type(exc).__name__}: {exc})", file=sys.stderr)
        return None


def _measure_copy(numel: int, dtype: torch.dtype, device: torch.device, buffers: int, time_fn) -> dict:
    """dst.copy_(src) of the gradients' bytes, rotated over ``buffers`` flat buffers like the gradient sets:
    the bandwidth ceiling, 2N bytes a call."""
    bufs = [torch.ones(numel, dtype=dtype, device=device) for _ in range(max(2, buffers))]
    state = {"i": 0}

    def call():
        i = state["i"]
        state["i"] = (i + 1) % len(bufs)
        return bufs[(i + 1) % len(bufs)].copy_(bufs[i])

    return time_fn(call, None)  # the buffers go with the closure


# ------------------------------------------------------------------------------------------------ running
def device_info(device: torch.device) -> dict:
    """Device name, versions and date recorded with every result."""
    info: dict[str, Any] = {"device_type": device.type}
    cpu_model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu_model = models[0] if models else cpu_model
    except OSError:
        pass
    info["cpu"] = f"{cpu_model} ({os.cpu_count()} cores)"
    info["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    info["device"] = info["gpu"] or info["cpu"]
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    try:
        from . import __version__ as ampclip_version
    except ImportError:
        ampclip_version = None
    now = datetime.datetime.now(datetime.timezone.utc)
    info.update({
        "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
        "python": platform.python_version(), "ampclip": ampclip_version,
        "backends": ops.available_backends(), "threads": torch.get_num_threads(),
        "date": now.date().isoformat(), "timestamp": now.isoformat(timespec="seconds"),
    })
    return info


def run(workloads, dtypes, provider_names=None, device=None, reps: int = 20, sets: Optional[int] = None,
        budget_gb: Optional[float] = None, scale: int = 1, with_compile: Optional[bool] = None,
        flush_bytes: Optional[int] = None, verbose: bool = True, argv: Optional[list] = None) -> dict:
    """Check, then time, every provider on every workload and dtype. Returns ``{"schema", "info",
    "config", "rows"}`` (see ``docs``/the report for the field list); nothing is written."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    with_compile = on_gpu if with_compile is None else with_compile
    if budget_gb is None:
        # GPU: half the free memory (K=2 sets + copies + do_bench's 256 MB); CPU: 3 GiB (< 4 GB in all).
        budget_gb = 0.5 * torch.cuda.mem_get_info(device)[0] / 2**30 if on_gpu else 3.0
    n_sets = sets or (2 if on_gpu else 3)
    if flush_bytes is None:
        flush_bytes = 0 if on_gpu else min(2 * _llc_bytes(), 2**29)  # <= 512 MiB: the CPU run stays < 4 GB
    providers = available_providers(device, with_compile)
    if provider_names:
        unknown = [p for p in provider_names if p not in PROVIDERS and p != "copy"]
        if unknown:
            raise ValueError(f"unknown providers {unknown}; known: {sorted(PROVIDERS)}")
        skipped = [p for p in provider_names if p not in providers and p != "copy"]
        if skipped and verbose:
            print(f"skipped here (backend missing, needs CUDA or --compile): {skipped}")
        # every speedup needs its scenario's torch baseline in the same run: add it when left out
        wanted = set(provider_names) | {SCENARIO_BASELINE[providers[p].scenario] for p in provider_names
                                        if p in providers}
        providers = {k: v for k, v in providers.items() if k in wanted}
    cpu_timer = None if on_gpu else _CpuTimer(flush_bytes)
    warmup = n_sets  # every set once: first-touch, compile specialisations

    def time_fn(call, gs):
        return _time_cuda(call, warmup) if on_gpu else cpu_timer(call, gs, reps, warmup)

    config = {"workloads": list(workloads), "dtypes": list(dtypes), "providers": list(providers),
              "device": str(device), "reps": None if on_gpu else reps, "sets": n_sets, "budget_gb": budget_gb,
              "scale": scale, "flush_bytes": flush_bytes, "sigma": SIGMA, "inv_scale": INV_SCALE,
              "shrink": SHRINK, "argv": sys.argv[1:] if argv is None else list(argv)}
    rows = []
    widest = max(DTYPES[d].itemsize for d in dtypes)
    for workload in workloads:
        # One size for every dtype of a workload (fitted for the widest), so dtypes compare on equal shapes.
        budget = int(budget_gb * 2**30 / widest / (n_sets + 2))  # the sets + two clones or K+1 copy buffers
        shapes, divisor = _scaled_shapes(WORKLOADS[workload](), budget, scale)
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            numel = _numel(shapes)
            nbytes = numel * dtype.itemsize
            base = {"workload": workload, "dtype": dtype_name, "tensors": len(shapes), "elements": numel,
                    "bytes": nbytes, "scaled_down_by": divisor}
            copy = _measure_copy(numel, dtype, device, n_sets + 1, time_fn)
            copy_gbps = 2 * nbytes / (copy["median_ms"] * 1e-3) / 1e9
            group = [{**base, "scenario": "copy", "provider": "copy", "baseline": None, **copy,
                      "host_ms": None, "launches": None, "bytes_moved_n": 2, "floor_n": 2, "check": None}]
            gs = GradSets(shapes, dtype, device, n_sets)
            for name, prov in providers.items():
                gs.mode = prov.scenario
                gs.resync()
                call = prov.setup(gs)
                check = _check(name, prov, call, gs, dtype)
                m = time_fn(call, gs)
                host = _host_ms(call) if on_gpu else None
                launches = _launches(call) if on_gpu else None
                group.append({**base, "scenario": prov.scenario, "provider": name,
                              "baseline": SCENARIO_BASELINE[prov.scenario], **m, "host_ms": host,
                              "launches": launches, "bytes_moved_n": prov.moved_n,
                              "floor_n": SCENARIO_FLOOR_N[prov.scenario], "check": check})
            del gs
            if on_gpu:
                torch.cuda.empty_cache()  # the next workload has other sizes: no fragmented cache
            _derive(group, copy_gbps)
            rows += group
            if verbose:
                for r in group:
                    _print_row(r)
    return {"schema": SCHEMA_VERSION, "info": device_info(device), "config": config, "rows": rows}


def _derive(group: list[dict], copy_gbps: float) -> None:
    """GB/s (moved and at the task's floor), fraction of copy bandwidth and speedups, in place."""
    by = {r["provider"]: r["median_ms"] for r in group}
    for r in group:
        seconds = r["median_ms"] * 1e-3
        r["gbps_moved"] = r["bytes_moved_n"] * r["bytes"] / seconds / 1e9
        r["gbps_floor"] = r["floor_n"] * r["bytes"] / seconds / 1e9
        r["copy_gbps"] = copy_gbps
        r["frac_of_copy"] = r["gbps_floor"] / copy_gbps
        if r["scenario"] == "copy":  # the ceiling, not a clip: no speedups
            r["speedup"] = r["speedup_vs_chain"] = r["speedup_vs_torch_clip"] = None
            continue
        baseline = by.get(r["baseline"]) if r["baseline"] else None
        r["speedup"] = baseline / r["median_ms"] if baseline else None
        r["speedup_vs_chain"] = by["torch_chain"] / r["median_ms"] if "torch_chain" in by else None
        r["speedup_vs_torch_clip"] = by["torch_clip"] / r["median_ms"] if "torch_clip" in by else None


def _fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def _print_row(r: dict) -> None:
    print(f"{r['workload']:10} {r['dtype']:4} {r['provider']:22} {r['median_ms']:10.4f} ms "
          f"[{r['q20_ms']:.4f}-{r['q80_ms']:.4f}]  {r['gbps_floor']:7.2f} GB/s@floor "
          f"{r['frac_of_copy']:5.2f} of copy  x{_fmt(r['speedup'], '.2f') or '-':>6} vs {r['baseline'] or '-'}",
          flush=True)


# ------------------------------------------------------------------------------------------------ output
CSV_INFO = ["device", "torch", "triton", "cuda", "date"]  # repeated on every line: each line stands alone
CSV_FIELDS = CSV_INFO + ["workload", "dtype", "tensors", "elements", "bytes", "scaled_down_by", "scenario", "provider",
              "baseline", "median_ms", "q20_ms", "q80_ms", "min_ms", "n", "timer", "host_ms", "launches",
              "bytes_moved_n", "floor_n", "gbps_moved", "gbps_floor", "copy_gbps", "frac_of_copy", "speedup",
              "speedup_vs_chain", "speedup_vs_torch_clip", "check_rel_err"]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def save(result: dict, out_dir: Path) -> Path:
    """Write ``<device-slug>-<date>.json`` (everything, raw times included), ``.csv`` (one line per row,
    device and versions on each) and ``.png``; returns the JSON path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = result["info"]
    stem = out_dir / f"{_slug(info['device'])}-{info['date']}"
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(result, indent=1))
    with stem.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in result["rows"]:
            writer.writerow({**{k: info.get(k) for k in CSV_INFO}, **r,
                             "check_rel_err": (r.get("check") or {}).get("rel_err")})
    chart(result, stem.with_suffix(".png"))
    return json_path


def chart(result: dict, path: Path) -> Optional[Path]:
    """Bar chart of each provider's speedup over its torch baseline, by workload and dtype (log scale)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib)")
        return None
    rows = [r for r in result["rows"] if r.get("speedup") and r["provider"] != r["baseline"]]
    if not rows:
        return None
    labels = list(dict.fromkeys(f"{r['workload']}\n{r['dtype']}" for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(labels) + 2), 4.5))
    width = 0.8 / len(providers)
    for i, prov in enumerate(providers):
        values = {f"{r['workload']}\n{r['dtype']}": r["speedup"] for r in rows if r["provider"] == prov}
        xs = [j + i * width for j, lab in enumerate(labels) if lab in values]
        baseline = next(r["baseline"] for r in rows if r["provider"] == prov)
        ax.bar(xs, [values[lab] for lab in labels if lab in values], width, label=f"{prov} vs {baseline}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, fontsize=8)
    ax.set_ylabel("speedup over the torch baseline (median)")
    info = result["info"]
    ax.set_title(f"{info['device']}, torch {info['torch']}, {info['date']}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


METHOD = """\
Every number below comes from the results file named above its table (`benchmarks/results/*.json`,
which also holds the raw per-call times and the correctness check of every provider).

* **Scenarios** and their torch baseline: `unscale_clip`, GradScaler's unscale then clip_grad_norm_
  (`torch_chain`, 5N bytes; ampclip's fused in-place path moves 3N); `clip`, clip_grad_norm_ alone
  (`torch_clip` against the drop-in `ampclip_dropin`, 3N each); `noclip`, a bound above the norm
  (`torch_clip_noclip` multiplies every gradient by 1, 3N; ampclip only reads, N). N is the gradient bytes.
* **GB/s @ floor**: the bytes the task must move (3N for a clip, N when nothing needs clipping) over the
  median time, so providers of one scenario compare directly. **of copy**: that over the bandwidth of a
  device copy of the same bytes (2N) measured in the same run. **moved GB/s** (CSV/JSON): the provider's
  own traffic (5N for the torch chain). On a CPU, an in-place pass can beat the copy: a copy's write
  first reads the destination line (write-allocate), an in-place rewrite does not.
* **Timing**: median and 20%/80% quantiles; `triton.testing.do_bench` on a GPU (L2 cleared before each
  call), on a CPU a `perf_counter` timer after a warm-up with a read of twice the last-level cache between
  calls. K random gradient sets are rotated. Every call clips for real: unscaling providers use
  `inv_scale = 2` and a bound equal to the stored norm (coefficient 0.5, gradients unchanged), others clip
  to 0.99 of the stored norm and a set 16x smaller is multiplied back by a power of two.
* A workload scaled down to fit memory is marked `(1/k)`: every leading dimension divided by k, the
  tensor count kept.
"""


def render_docs(result_files: list[Path], title: str = "Benchmark results") -> str:
    """Markdown for docs/benchmarks.md from one or more results JSON files: per file, a speedup summary and
    the full table, each naming the file its numbers come from."""
    parts = [f"## {title}\n", METHOD]
    for path in result_files:
        path = Path(path)
        result = json.loads(path.read_text())
        if result.get("schema") != SCHEMA_VERSION:
            raise ValueError(f"{path} was written by another version of the harness (schema "
                             f"{result.get('schema')}, expected {SCHEMA_VERSION}): run the benchmark again")
        info = result["info"]
        rows = result["rows"]
        parts.append(f"### {info['device']}, {info['date']}\n")
        parts.append(f"Source: `{path.as_posix()}`. torch {info['torch']}, triton {info.get('triton')}, "
                     f"CUDA {info.get('cuda')}, ampclip {info.get('ampclip')}, {info.get('threads')} CPU threads"
                     f"{', CPU ' + info['cpu'] if info.get('gpu') else ''}.\n")
        # Summary: speedup over the scenario's torch baseline, one column per non-baseline provider.
        providers = list(dict.fromkeys(r["provider"] for r in rows
                                       if r.get("speedup") and r["provider"] != r["baseline"]))
        if providers:
            parts.append("Speedup over the torch baseline of the provider's scenario (median time ratio; "
                         "baselines: " + ", ".join(sorted({r["baseline"] for r in rows if r["baseline"]})) + ").\n")
            parts.append("| workload | dtype | " + " | ".join(providers) + " |")
            parts.append("|---|---|" + "---|" * len(providers))
            for key in dict.fromkeys((r["workload"], r["dtype"]) for r in rows):
                mine = {r["provider"]: r for r in rows if (r["workload"], r["dtype"]) == key}
                any_row = next(iter(mine.values()))
                cells = [_fmt(mine[p]["speedup"], ".2f") + "x" if p in mine and mine[p].get("speedup") else ""
                         for p in providers]
                parts.append(f"| {_workload_label(any_row)} | {key[1]} | " + " | ".join(cells) + " |")
            parts.append("")
        parts.append(f"All rows (`{path.name}`):\n")
        parts.append("| workload | dtype | scenario | provider | median ms | 20%-80% ms | GB/s @ floor | of copy "
                     "| speedup | vs chain | vs torch_clip | host ms | launches |")
        parts.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            parts.append(
                f"| {_workload_label(r)} | {r['dtype']} | {r['scenario']} | {r['provider']} "
                f"| {r['median_ms']:.3f} | {r['q20_ms']:.3f}-{r['q80_ms']:.3f} | {r['gbps_floor']:.1f} "
                f"| {r['frac_of_copy']:.2f} | {_fmt(r.get('speedup'), '.2f')} "
                f"| {_fmt(r.get('speedup_vs_chain'), '.2f')} "
                f"| {_fmt(r.get('speedup_vs_torch_clip'), '.2f')} | {_fmt(r.get('host_ms'), '.3f')} "
                f"| {_fmt(r.get('launches'), 'd')} |")
        parts.append("")
    return "\n".join(parts)


def _workload_label(r: dict) -> str:
    k = r.get("scaled_down_by", 1)
    return f"{r['workload']}{f' (1/{k})' if k > 1 else ''}"


# ------------------------------------------------------------------------------------------------ CLI
def write_docs(paths: list[Path], dest: str) -> None:
    """The markdown of :func:`render_docs` to ``dest``, or to stdout for ``-``."""
    text = render_docs(paths)
    if dest == "-":
        print(text)
    else:
        Path(dest).write_text(text)
        print(f"wrote {dest}")


def main(argv=None) -> int:
    """``python -m ampclip bench [options]``; also ``benchmarks/run.py``. Returns the exit status."""
    parser = argparse.ArgumentParser(prog="ampclip bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=None,
                        help=f"default: {' '.join(DEFAULT_CPU)} on a CPU, all on a GPU")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=None,
                        help=f"default: {' '.join(DEFAULT_CPU_DTYPES)} on a CPU, all on a GPU")
    parser.add_argument("--providers", nargs="+", default=None, help="default: every one that runs here")
    parser.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    parser.add_argument("--reps", type=int, default=20, help="timed calls per provider on the CPU")
    parser.add_argument("--sets", type=int, default=None, help="rotated gradient sets (default 3 CPU, 2 GPU)")
    parser.add_argument("--scale", type=int, default=1, help="divide every tensor's size by at least this")
    parser.add_argument("--budget-gb", type=float, default=None,
                        help="memory for the gradient sets and copies (default 3 on a CPU, half the free GPU memory)")
    parser.add_argument("--flush-mb", type=float, default=None,
                        help="CPU cache flush read between timed calls (default twice the LLC, at most 512 MiB)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default torch's; recorded). Fewer than the cores of a busy "
                             "machine avoids OpenMP waits of a scheduler time slice")
    parser.add_argument("--compile", action="store_true", help="add torch.compile of the chain on the CPU too")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few calls: a smoke test")
    parser.add_argument("--out", default="benchmarks/results", help="directory for the JSON, CSV and PNG")
    parser.add_argument("--list", action="store_true", help="list workloads and providers, then exit")
    parser.add_argument("--docs", default=None, metavar="PATH",
                        help="write markdown tables of the given results files to PATH (- for stdout)")
    parser.add_argument("results", nargs="*", help="results JSON files for --docs")
    args = parser.parse_args(argv)
    if args.list:
        for name, shapes in WORKLOADS.items():
            s = shapes()
            print(f"workload {name:10} {len(s):6} tensors {_numel(s) / 1e6:10.1f}M elements")
        for name, prov in PROVIDERS.items():
            print(f"provider {name:22} {prov.scenario:12} {prov.moved_n}N  {prov.description}")
        return 0
    if args.docs:
        if not args.results:
            parser.error("--docs needs results files")
        write_docs([Path(p) for p in args.results], args.docs)
        return 0
    if args.results:
        parser.error("results files are only read with --docs")
    if args.threads:
        torch.set_num_threads(args.threads)
    on_gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    workloads = args.workloads or (DEFAULT_GPU if on_gpu else DEFAULT_CPU)
    dtypes = args.dtypes or (list(DTYPES) if on_gpu else DEFAULT_CPU_DTYPES)
    budget = args.budget_gb
    flush = None if args.flush_mb is None else int(args.flush_mb * 2**20)
    reps, sets = args.reps, args.sets
    if args.quick:
        budget = min(budget or 0.002, 0.002)  # ~100k elements a set
        flush = 4 * 2**20 if flush is None else flush
        reps, sets = min(reps, 3), sets or 2
    result = run(workloads, dtypes, args.providers, args.device, reps, sets, budget, args.scale,
                 args.compile or None, flush, argv=sys.argv[1:] if argv is None else argv)
    path = save(result, Path(args.out))
    print(f"wrote {path} (+ .csv, .png)")
    return 0
