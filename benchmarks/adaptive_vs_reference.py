"""AGC and ZClip, ampclip against the implementations people use, side by side in one run on GPT-2-124M-shaped
gradients (148 tensors, 124.4M elements): timm's ``adaptive_clip_grad`` against ``ampclip.adaptive_clip_grad_``,
and the ``zclip`` package's ``ZClip.step`` against ``ampclip.ZClip.clip_``.

    python -m benchmarks.adaptive_vs_reference                     # fp32, 7 timed calls per case
    python -m benchmarks.adaptive_vs_reference --reps 5 --dtypes fp32 bf16 --out benchmarks/results

Every timed call gets the same gradients back (restored outside the timing) after a cache flush (a write of
twice the last-level cache); the providers of a case take turns call by call, so that other load on a shared
machine falls on all of them alike; a memcpy of the gradients is timed in the same run as the bandwidth
yardstick.
Each case checks ampclip's result against the baseline's before it is timed. Writes
``adaptive-<device>-<date>.json`` (device, versions, date, every raw time) and a ``.txt`` summary.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import time
from pathlib import Path

import torch

import ampclip
from ampclip import reference
from ampclip.shapes import gpt2_shapes

from .machine import cpu_model, llc_bytes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Timer:
    """``reps`` timed calls of each provider, each after its ``prepare()`` (untimed) and a cache flush. The
    providers of a case take turns, one call each per round (in a rotating order), so that load from other
    processes on a shared machine falls on all of them alike."""

    def __init__(self, device: torch.device, reps: int):
        self.device, self.reps = device, reps
        self.flush = torch.empty(2 * llc_bytes() // 4, dtype=torch.float32, device=device)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def once(self, fn, prepare) -> float:
        prepare()
        self.flush.fill_(1.0)
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return (time.perf_counter() - start) * 1e3

    def compare(self, providers: dict) -> dict[str, list[float]]:
        """``{name: (fn, prepare)}`` -> ``{name: times in ms}``."""
        for fn, prepare in providers.values():  # warm: caches, tables, layouts
            prepare()
            fn()
        names = list(providers)
        times = {name: [] for name in names}
        for round_ in range(self.reps):
            for name in names[round_ % len(names):] + names[: round_ % len(names)]:
                times[name].append(self.once(*providers[name]))
        return times

    def __call__(self, fn, prepare=lambda: None) -> list[float]:
        return self.compare({"": (fn, prepare)})[""]


def _summary(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median_ms": statistics.median(times), "q25_ms": q[0], "q75_ms": q[2], "raw_ms": times}


def _params(shapes, dtype, device, seed, scale):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        rows = shape[0] if len(shape) > 1 else 1
        row_scale = 10 ** (torch.rand(rows, generator=gen) * 2 - 2.5)
        view = (rows,) + (1,) * (len(shape) - 1) if len(shape) > 1 else (1,)
        out.append((torch.randn(shape, generator=gen) * row_scale.reshape(view) * scale).to(dtype).to(device))
    return out


def bench_memcpy(timer, dtype, device) -> tuple[dict, int]:
    """A copy of as many bytes as the gradients: the bandwidth yardstick of the run."""
    flat = torch.randn(sum(math.prod(s) for s in gpt2_shapes())).to(dtype).to(device)
    copy = torch.empty_like(flat)
    return _summary(timer(lambda: copy.copy_(flat))), flat.numel() * flat.element_size()


def bench_agc(timer, dtype, device, check) -> dict:
    shapes = gpt2_shapes()
    weights = _params(shapes, dtype, device, seed=0, scale=1.0)
    master = _params(shapes, dtype, device, seed=1, scale=0.002)  # about a fifth of the rows clip
    params = []
    for w, g in zip(weights, master):
        p = torch.nn.Parameter(w)
        p.grad = g.clone()
        params.append(p)
    timm = reference.timm_adaptive_clip_grad()

    def restore():
        for p, g in zip(params, master):
            p.grad.copy_(g)

    providers = {"ampclip cpp": lambda: ampclip.adaptive_clip_grad_(params, 0.01, 1e-3, backend="cpp"),
                 "ampclip reference (torch ops)": lambda: ampclip.adaptive_clip_grad_(params, 0.01, 1e-3,
                                                                                      backend="reference")}
    if timm is not None:
        providers = {"timm adaptive_clip_grad": lambda: timm(params, 0.01, 1e-3), **providers}
    results = {}
    if timm is not None and check:  # the results agree before anything is timed
        restore()
        timm(params, 0.01, 1e-3)
        want = [p.grad.clone() for p in params]
        restore()
        ampclip.adaptive_clip_grad_(params, 0.01, 1e-3, backend="cpp")
        worst = max(float(((p.grad.double() - w.double()).abs() / w.double().abs().clamp(min=1e-30)).max())
                    for p, w in zip(params, want))
        clipped = sum(int((p.grad != g).reshape(ampclip.ops.unit_count(g), -1).any(1).sum())
                      for p, g in zip(params, master))
        results["check"] = {"max_relative_difference_vs_timm": worst, "units_clipped": clipped,
                            "units": sum(ampclip.ops.unit_count(g) for g in master)}
    for name, times in timer.compare({name: (fn, restore) for name, fn in providers.items()}).items():
        results[name] = _summary(times)
        print(f"  agc {name:32s} {results[name]['median_ms']:9.2f} ms")
    restore()
    return results


class _Module(torch.nn.Module):
    def __init__(self, params):
        super().__init__()
        self.params = torch.nn.ParameterList(params)


def bench_zclip(timer, dtype, device, check, clipping: bool) -> dict:
    try:
        from zclip import ZClip as PackageZClip
    except ImportError:
        PackageZClip = None
    shapes = gpt2_shapes()
    master = _params(shapes, dtype, device, seed=2, scale=0.05)
    settings = {"max_grad_norm": 1.0 if clipping else None, "warmup_steps": 3}

    def fresh():
        params = [torch.nn.Parameter(torch.zeros(g.shape, dtype=dtype, device=device)) for g in master]
        for p, g in zip(params, master):
            p.grad = g.clone()
        return params

    def restorer(params):
        def restore():
            for p, g in zip(params, master):
                p.grad.copy_(g)
        return restore

    providers = {}
    ours = fresh()
    ours_clip = ampclip.ZClip(ours, backend="cpp", **settings)
    providers["ampclip ZClip.clip_ (cpp)"] = (lambda: ours_clip.clip_(), restorer(ours))
    if PackageZClip is not None:
        theirs = fresh()
        module = _Module(theirs)
        package = PackageZClip(**settings)
        providers = {"zclip package ZClip.step": (lambda: package.step(module), restorer(theirs)), **providers}
    results = {}
    for fn, restore in providers.values():  # through the warm-up, so that the EMA decides
        for _ in range(settings["warmup_steps"] + 1):
            restore()
            fn()
    if PackageZClip is not None and check:
        restorer(theirs)()
        restorer(ours)()
        package.step(module)
        stats = ours_clip.clip_()
        theirs_norm = reference.exact_norm([p.grad for p in theirs], 2.0)
        ours_norm = reference.exact_norm([p.grad for p in ours], 2.0)
        results["check"] = {"post_clip_norm_package": theirs_norm, "post_clip_norm_ampclip": ours_norm,
                            "relative_difference": abs(theirs_norm - ours_norm) / theirs_norm,
                            "clip_coef_ampclip": float(stats.clip_coef)}
    for name, times in timer.compare(providers).items():
        results[name] = _summary(times)
        print(f"  zclip {'clipping' if clipping else 'no clip':8s} {name:28s} {results[name]['median_ms']:9.2f} ms")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--dtypes", nargs="+", default=["fp32"], choices=sorted(DTYPES))
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--no-check", action="store_true")
    parser.add_argument("--report", help="write the .txt summary of an existing results .json and exit")
    args = parser.parse_args(argv)
    if args.report:
        path = Path(args.report)
        path.with_suffix(".txt").write_text(_table(json.loads(path.read_text())))
        return 0
    device = torch.device("cpu")  # the CPU kernels; a GPU run would time the Triton backend the same way
    timer = Timer(device, args.reps)
    info = ampclip.backend()
    versions = {"torch": torch.__version__, "triton": info["triton"], "ampclip": ampclip.__version__}
    for package in ("timm", "zclip"):
        try:
            from importlib.metadata import version

            versions[package] = version(package)
        except Exception:
            versions[package] = None
    record = {
        "device": cpu_model(), "threads": torch.get_num_threads(), "gpu": info["gpu"], "versions": versions,
        "date": datetime.date.today().isoformat(), "reps": args.reps, "flush_bytes": timer.flush.numel() * 4,
        "workload": "gpt2-124m (148 tensors, 124.4M elements)", "results": {},
    }
    print(f"{record['device']} x{record['threads']} threads, torch {torch.__version__}, timm {versions['timm']}, "
          f"zclip {versions['zclip']}; median of {args.reps}")
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        memcpy, nbytes = bench_memcpy(timer, dtype, device)
        print(f"{dtype_name}: memcpy of the gradients {memcpy['median_ms']:.2f} ms "
              f"({2 * nbytes / memcpy['median_ms'] / 1e6:.1f} GB/s)")
        entry = {"gradient_bytes": nbytes, "memcpy": memcpy}
        entry["agc"] = bench_agc(timer, dtype, device, not args.no_check)
        entry["zclip_clipping"] = bench_zclip(timer, dtype, device, not args.no_check, clipping=True)
        entry["zclip_no_clip"] = bench_zclip(timer, dtype, device, not args.no_check, clipping=False)
        record["results"][dtype_name] = entry
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in record["device"].lower()).strip("-")
    stem = out / f"adaptive-{slug}-{record['threads']}-threads-{record['date']}"
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1))
    stem.with_suffix(".txt").write_text(_table(record))
    print(f"wrote {stem}.json and .txt")
    return 0


def _table(record) -> str:
    lines = [f"# benchmarks/adaptive_vs_reference.py, {record['date']}, {record['device']} x{record['threads']} "
             f"threads, torch {record['versions']['torch']}, timm {record['versions']['timm']}, zclip "
             f"{record['versions']['zclip']}",
             f"{record['workload']}; median of {record['reps']} calls, caches flushed between calls", ""]
    for dtype, entry in record["results"].items():
        memcpy = entry["memcpy"]["median_ms"]
        lines.append(f"{dtype}: gradients {entry['gradient_bytes'] / 1e6:.0f} MB, memcpy {memcpy:.2f} ms "
                     f"({2 * entry['gradient_bytes'] / memcpy / 1e6:.1f} GB/s)")
        for case in ("agc", "zclip_clipping", "zclip_no_clip"):
            rows = {k: v for k, v in entry[case].items() if k != "check"}
            base = next(iter(rows.values()))
            lines.append(f"  {case}  (speed-up: the median of the per-round ratios baseline / provider)")
            for name, r in rows.items():
                paired = statistics.median(b / t for b, t in zip(base["raw_ms"], r["raw_ms"]))
                lines.append(f"    {name:34s} {r['median_ms']:9.2f} ms  (q25 {r['q25_ms']:.2f}, q75 {r['q75_ms']:.2f})"
                             f"  {paired:5.2f}x")
            if "check" in entry[case]:
                lines.append(f"    check: {json.dumps(entry[case]['check'])}")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
