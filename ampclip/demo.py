"""``ampclip demo``: the same tiny GPT trained twice through the same injected gradient spike and the same
injected overflow: once with a plain mixed-precision loop and no clipping, once with AMPTrainer (fused
clipping, loss scaler, skip on inf/NaN). Prints a summary, writes a PNG, exits 0 only when the ampclip
run stayed finite.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from .config import create_default_amp_config
from .functional import get_total_norm
from .models import TinyGPT, random_batches
from .trainer import AMPTrainer

SPIKE_FACTOR = 1e4  # a bad batch: its loss, and so its gradients, ten thousand times too large


def _injection(step: int, steps: int) -> float:
    """The loss factor of each step: a spike at 40% of the run, an overflow (inf) at 70%."""
    if step == int(0.4 * steps):
        return SPIKE_FACTOR
    if step == int(0.7 * steps):
        return math.inf
    return 1.0


class _InjectingTrainer(AMPTrainer):
    factor = 1.0
    model_loss = None  # the loss before the injection, for the record

    def compute_loss(self, batch):
        self.model_loss = super().compute_loss(batch)
        return self.model_loss * self.factor


def _progress(steps: int, label: str):
    """A progress bar on stderr over the steps of one run (the summary goes to stdout)."""
    return tqdm(range(steps), desc=label, unit="step", leave=True, dynamic_ncols=True)


def _plain_run(device, precision, steps, lr):
    """The usual loop: autocast, backward, optimizer.step(); no clipping, no scaler, no skip."""
    torch.manual_seed(0)
    model = TinyGPT().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    batches = random_batches(16, 64, seed=1, device=device)
    record = {"loss": [], "pre_clip_norm": [], "loss_scale": [], "skipped": []}
    for step in _progress(steps, "no clipping"):
        batch = next(batches)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model(**batch).loss
        (loss.float() * _injection(step, steps)).backward()
        norm = get_total_norm([p.grad for p in model.parameters()])
        opt.step()
        opt.zero_grad()
        record["loss"].append(float(loss.detach()))
        record["pre_clip_norm"].append(float(norm))
        record["loss_scale"].append(1.0)
        record["skipped"].append(False)
    return record


def trainer_run(config, device, steps: int, lr: float, label: Optional[str] = None) -> dict:
    """The tiny GPT trained by AMPTrainer with ``config`` through the spike and the overflow: per step, the loss
    before the injection and the step's clipping statistics. ``label``: show a progress bar under that name.
    Every run starts from the same weights and sees the same batches."""
    torch.manual_seed(0)
    model = TinyGPT().to(device)
    trainer = _InjectingTrainer(model, torch.optim.AdamW(model.parameters(), lr=lr), amp_config=config)
    batches = random_batches(16, 64, seed=1, device=device)
    record = {"loss": [], "pre_clip_norm": [], "post_clip_norm": [], "loss_scale": [], "skipped": [], "clipped": []}
    for step in _progress(steps, label) if label else range(steps):
        trainer.factor = _injection(step, steps)
        trainer.training_step_async(next(batches))
        stats = trainer.last_clipping_stats  # one sync per step, for the plot
        record["loss"].append(float(trainer.model_loss.detach()))
        record["pre_clip_norm"].append(stats["pre_clip_norm"])
        record["post_clip_norm"].append(stats["post_clip_norm"])
        record["loss_scale"].append(stats["loss_scale"])
        record["skipped"].append(stats["found_inf"])
        record["clipped"].append(stats["clipped"])
    return record


def _summary(name, record, steps):
    mean = lambda xs: sum(xs) / len(xs) if xs else math.nan  # noqa: E731  (a run too short for a window)
    overflow = int(0.7 * steps)
    finite_steps = sum(math.isfinite(x) for x in record["loss"])
    return {
        "run": name,
        "loss before the spike (mean of 10)": mean(record["loss"][int(0.4 * steps) - 10 : int(0.4 * steps)]),
        "loss before the overflow (mean of 10)": mean(record["loss"][overflow - 10 : overflow]),
        "final loss (mean of last 10)": mean(record["loss"][-10:]),
        "steps with a non-finite loss": len(record["loss"]) - finite_steps,
        "skipped steps": sum(record["skipped"]),
        "clipped steps": sum(record.get("clipped", [])),
        "largest pre-clip grad norm": max((x for x in record["pre_clip_norm"] if math.isfinite(x)), default=math.nan),
    }


def _json_ready(value):
    """``value`` with every non-finite float as None (JSON null): json.dumps would write NaN and Infinity, which
    are not JSON, and strict parsers (JavaScript's JSON.parse, jq) reject the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    return value


def _divergence(values) -> Optional[int]:
    """The step from which a series is non-finite to its end (a run that diverged), or None."""
    step = len(values)
    while step > 0 and not math.isfinite(values[step - 1]):
        step -= 1
    return step if step < len(values) else None


def _mark_divergence(ax, values, color) -> None:
    """A cross where a diverged series ends (its last finite value) and the step it went non-finite: the line
    itself just stops there."""
    step = _divergence(values)
    if step is None:
        return
    last = next((values[i] for i in range(step - 1, -1, -1) if math.isfinite(values[i])), None)
    if last is None:  # no line drawn at all
        return
    kind = "NaN" if math.isnan(values[step]) else "inf"
    ax.plot([step], [last], marker="X", markersize=10, color=color, markeredgecolor="black", zorder=5)
    # right of the cross and above it: the diverged run's line lies to its left, the other run's below
    ax.annotate(f"diverged ({kind}) at step {step}", xy=(step, last), xytext=(8, 6), textcoords="offset points",
                ha="left", va="bottom", color=color, fontsize=9, fontweight="bold",
                bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none", "alpha": 0.8})


def _plot(plain, fused, steps, precision, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    x = range(steps)
    runs = ((plain, "no clipping (plain loop)", "C0"), (fused, "ampclip (clip + scaler)", "C1"))
    for record, label, color in runs:
        for ax, key in ((axes[0], "loss"), (axes[1], "pre_clip_norm")):
            ax.plot(x, [v if math.isfinite(v) else float("nan") for v in record[key]], label=label, color=color)
            _mark_divergence(ax, record[key], color)
    axes[2].plot(x, fused["loss_scale"], color="C1", label="ampclip loss scale")
    for ax in axes:
        ax.axvline(int(0.4 * steps), color="grey", ls="--", lw=0.8)
        ax.axvline(int(0.7 * steps), color="red", ls=":", lw=0.8)
        ax.legend(loc="upper right")
    axes[0].set_ylabel("loss")
    axes[1].set_ylabel("grad norm (pre-clip)")
    axes[1].set_yscale("log")
    axes[2].set_ylabel("loss scale")
    axes[2].set_title("fp16: dynamic loss scale" if precision == "fp16" else f"{precision}: the scale stays 1; "
                      "the inf/NaN check and the skip still run", fontsize=9)
    axes[2].set_xlabel("step (dashed: x1e4 gradient spike, dotted: inf overflow)")
    fig.suptitle("Tiny GPT through a gradient spike and an overflow")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = "fp16" if device.type == "cuda" else "bf16"
    steps, lr, max_norm = args.steps, 3e-3, 1.0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"tiny GPT ({sum(p.numel() for p in TinyGPT().parameters())} parameters), {steps} steps, {precision} "
          f"autocast on {device}; x{SPIKE_FACTOR:g} spike at step {int(0.4 * steps)}, inf at step {int(0.7 * steps)}")
    start = time.perf_counter()
    plain = _plain_run(device, precision, steps, lr)
    fused = trainer_run(create_default_amp_config(precision=precision, gradient_clip_max_norm=max_norm), device,
                        steps, lr, label="ampclip")
    elapsed = time.perf_counter() - start
    rows = [_summary("no clipping", plain, steps), _summary(f"ampclip, max_norm {max_norm:g}", fused, steps)]
    keys = list(rows[0])
    width = max(len(k) for k in keys)
    print()
    print(f"{'':{width}}  {rows[0]['run']:>22}  {rows[1]['run']:>22}")
    for key in keys[1:]:
        a, b = rows[0][key], rows[1][key]
        fmt = (lambda v: f"{v:22.4f}") if isinstance(a, float) else (lambda v: f"{v:22d}")
        print(f"{key:{width}}  {fmt(a)}  {fmt(b)}")
    summary = _json_ready({"rows": rows, "plain": plain, "ampclip": fused})
    (out / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False))
    if _plot(plain, fused, steps, precision, out / "demo.png"):
        print(f"\nwrote {out / 'demo.png'} and {out / 'summary.json'} ({elapsed:.1f} s)")
    else:
        print(f"\nwrote {out / 'summary.json'} ({elapsed:.1f} s; install matplotlib for the PNG)")
    stayed_finite = all(math.isfinite(v) for v in fused["loss"][-10:])
    print("ampclip run stayed finite: " + ("yes" if stayed_finite else "NO"))
    return 0 if stayed_finite else 1
