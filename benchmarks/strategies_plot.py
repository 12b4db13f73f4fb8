"""The demo's spike run (``ampclip demo``: a tiny GPT, a x1e4 gradient spike at 40% of the run, an inf at
70%) trained once per clipping strategy, side by side: loss, pre-clip and post-clip gradient norm per step.

    python benchmarks/strategies_plot.py                          # 200 steps, bf16 autocast on the CPU
    python benchmarks/strategies_plot.py --steps 300 --image docs/images/strategies.png

Every run starts from the same weights and sees the same batches through AMPTrainer; only
``gradient_clip_strategy`` (and its options) differ. Writes the PNG and a JSON record (per step values and a
summary) under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
from pathlib import Path

import torch

import ampclip
from ampclip.demo import SPIKE_FACTOR, trainer_run

RUNS = {
    "no clipping (skip on inf only)": {"gradient_clip_strategy": None},
    "fixed norm (max_norm 1.0)": {"gradient_clip_strategy": "norm", "gradient_clip_max_norm": 1.0},
    "AutoClip (10th percentile)": {"gradient_clip_strategy": "adaptive", "gradient_clip_options": {"percentile": 10.0}},
    "ZClip (z 2.5, no cap)": {"gradient_clip_strategy": "zclip", "gradient_clip_options": {"z_thresh": 2.5}},
}


def run(settings: dict, steps: int, lr: float, precision: str) -> dict:
    config = ampclip.create_default_amp_config(precision=precision, **settings)
    return trainer_run(config, torch.device("cpu"), steps, lr)


def summary(record: dict, steps: int) -> dict:
    spike = int(0.4 * steps)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    finite = [x for x in record["loss"] if math.isfinite(x)]
    return {
        "loss before the spike (mean of 10)": mean(record["loss"][spike - 10 : spike]),
        "loss 10 steps after the spike (mean of 10)": mean(record["loss"][spike + 1 : spike + 11]),
        "final loss (mean of last 10)": mean(record["loss"][-10:]),
        "post-clip norm at the spike": record["post_clip_norm"][spike],
        "steps clipped (post < pre)": sum(post < pre * (1 - 1e-6) for pre, post in
                                          zip(record["pre_clip_norm"], record["post_clip_norm"])),
        "steps skipped": sum(record["skipped"]),
        "finite losses": len(finite),
    }


def plot(records: dict, steps: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
    x = range(steps)
    clean = lambda xs: [v if math.isfinite(v) else float("nan") for v in xs]  # noqa: E731
    for i, (name, record) in enumerate(records.items()):
        style = {"color": "0.6", "lw": 1.0} if i == 0 else {"color": f"C{i - 1}", "lw": 1.2}
        axes[0].plot(x, clean(record["loss"]), label=name, **style)
        axes[1].plot(x, clean(record["pre_clip_norm"]), label=name, **style)
        axes[2].plot(x, clean(record["post_clip_norm"]), label=name, **style)
    for ax in axes:
        ax.axvline(int(0.4 * steps), color="grey", ls="--", lw=0.8)
        ax.axvline(int(0.7 * steps), color="red", ls=":", lw=0.8)
    axes[0].set_ylabel("loss")
    axes[0].legend(loc="upper right", fontsize=8)
    axes[1].set_ylabel("grad norm before clipping")
    axes[1].set_yscale("log")
    axes[2].set_ylabel("grad norm after clipping")
    axes[2].set_yscale("log")
    axes[2].set_xlabel(f"step (dashed: x{SPIKE_FACTOR:g} gradient spike, dotted: inf overflow, skipped)")
    fig.suptitle("Tiny GPT through a gradient spike: clipping strategies side by side")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--image", default="docs/images/strategies.png")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    records = {}
    for name, settings in RUNS.items():
        records[name] = run(settings, args.steps, args.lr, args.precision)
        print(f"{name}: {json.dumps(summary(records[name], args.steps))}")
    plot(records, args.steps, Path(args.image))
    out = Path(args.out) / f"strategies-demo-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": datetime.date.today().isoformat(), "torch": torch.__version__, "steps": args.steps, "lr": args.lr,
        "precision": args.precision, "spike_factor": SPIKE_FACTOR, "runs": RUNS,
        "summary": {name: summary(r, args.steps) for name, r in records.items()}, "records": records,
    }, indent=1))
    print(f"wrote {args.image} and {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
