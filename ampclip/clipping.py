"""Clipping by strategy under the names users of the original design expect: ``GradientClipper`` with
``ClippingStrategy`` NORM / VALUE / ADAPTIVE, precision-aware default thresholds, and statistics.

A ``GradientClipper`` is a :class:`ampclip.FusedClipper` driven by a strategy from
:mod:`ampclip.strategies` (any registered name works, with its own options), plus on-device statistics:
clipped and skipped steps and per-layer norms, updated by one device op per step.
"""

from __future__ import annotations

import enum
import math
from typing import Optional

import torch

from . import distributed, ops, strategies
from .clipper import ClipStats, FusedClipper
from .strategies import RECOMMENDED_CLIPPING_THRESHOLDS, get_recommended_threshold

__all__ = [
    "ClippingStrategy",
    "GradientClipper",
    "RECOMMENDED_CLIPPING_THRESHOLDS",
    "create_gradient_clipper",
    "get_recommended_threshold",
]

class ClippingStrategy(str, enum.Enum):
    NORM = "norm"
    VALUE = "value"
    ADAPTIVE = "adaptive"
    ZCLIP = "zclip"
    AGC = "agc"


class GradientClipper:
    """Gradient clipping by strategy, with statistics and per-layer monitoring.

    Args:
        parameters: parameters or ``named_parameters()`` (names appear in the statistics).
        strategy: "norm", "value", "adaptive" (a :class:`ClippingStrategy`), "zclip", "agc", or any name
            registered in :mod:`ampclip.strategies`.
        max_norm: the norm bound; None picks :func:`get_recommended_threshold` for ``precision``. With
            "adaptive" or "zclip" it caps the adaptive bound (None: no cap); "agc" takes none.
        precision: "fp16", "bf16" or "fp32".
        clip_value: the element bound of the "value" strategy (default: ``max_norm``); with "norm", a value
            clamp applied before the norm clip.
        mode: "global", "per_tensor" or "per_group" (norm strategy), see FusedClipper.
        enable_monitoring: keep per-layer norm sums and maxima on the device.
        coef_rule, coef_eps: the clip coefficient of a norm bound, ``min(1, max_norm / (norm + coef_eps))``
            ("torch", eps 1e-6 as torch) or ``max_norm / max(norm + coef_eps, max_norm)`` ("max"); see
            :class:`FusedClipper`.
        overlap: measure the norms while backward runs (``True``, a DDP model or an :class:`ampclip.Overlap`);
            see :class:`FusedClipper` and :meth:`no_measure`.
        **strategy_options: the strategy's own options, e.g. ``percentile`` and ``history_size`` for
            "adaptive" (AutoClip); ``alpha``, ``z_thresh``, ``warmup_steps``, ``zclip_mode``, ... for "zclip";
            ``clip_factor``, ``eps``, ``exclude`` for "agc".

    Example::

        clipper = ampclip.create_gradient_clipper(model.named_parameters(), "adaptive", precision="bf16")
        loss.backward()
        stats = clipper.clip_()
        summary = clipper.get_statistics()     # one sync
    """

    def __init__(
        self,
        parameters,
        strategy="norm",
        max_norm: Optional[float] = None,
        precision: str = "fp32",
        clip_value=None,
        norm_type: float = 2.0,
        mode: str = "global",
        groups=None,
        enable_monitoring: bool = True,
        backend: Optional[str] = None,
        on_nonfinite: str = "leave",
        coef_rule: str = "torch",
        coef_eps: float = ops.EPS,
        overlap=False,
        **strategy_options,
    ):
        bound = strategies.create(strategy, precision, max_norm, clip_value, mode, **strategy_options)
        name = bound.name
        self.strategy = ClippingStrategy(name) if name in ClippingStrategy._value2member_map_ else name
        self.precision = precision
        self.enable_monitoring = enable_monitoring
        self.fused = FusedClipper(parameters, norm_type=norm_type, groups=groups, backend=backend,
                                  on_nonfinite=on_nonfinite, strategy=bound, eps=coef_eps, coef_rule=coef_rule,
                                  overlap=overlap)
        self.reset()

    # The settings of the clipper underneath.
    @property
    def params(self):
        return self.fused.params

    @property
    def mode(self) -> str:
        return self.fused.mode

    @property
    def max_norm(self) -> float:
        return self.fused.max_norm

    @max_norm.setter
    def max_norm(self, value: float) -> None:
        self.fused.max_norm = value

    @property
    def clip_value(self):
        clamp = self.fused.value_clip
        return None if clamp is None else (clamp[1] if clamp[0] == -clamp[1] else clamp)

    def can_defer_to(self, optimizer) -> bool:
        return self.fused.can_defer_to(optimizer)

    def no_measure(self):
        """Backward passes in this block are not measured (see :meth:`FusedClipper.no_measure`)."""
        return self.fused.no_measure()

    def reset(self) -> None:
        """Forget the statistics and the strategy's history."""
        device = self.fused.device
        self.steps = 0
        self._counters = torch.zeros(2, dtype=torch.float64, device=device)
        self._layers = torch.zeros(3, len(self.fused.params), dtype=torch.float64, device=device)
        self.fused.strategy.bind(device)
        self.last_stats: Optional[ClipStats] = None

    def clip_(self, inv_scale=None, defer_to=None) -> ClipStats:
        """Unscale (optional), check and clip by the strategy; returns :class:`ClipStats` (device tensors).
        The clipper's passes (see :meth:`FusedClipper.clip_`) and one statistics op; with a value clamp, one more
        read of the gradients (two for a (lo, hi) pair) tells whether the clamp moved an element."""
        clamped = self._clamped(inv_scale)  # before the clip rewrites the gradients
        stats = self.fused.clip_(inv_scale, defer_to=defer_to)
        self.steps += 1
        all_present = len(stats.per_tensor_norms) == self._layers.shape[1]
        layers = self._layers if self.enable_monitoring and all_present else None
        coef = stats.clip_coef
        if clamped is not None:  # a clamp is a clip too: counted as a coefficient below 1
            stats.clamped = clamped
            coef = torch.minimum(coef.reshape(-1), 1.0 - clamped.to(coef.dtype))
        ops.clip_stats_update(self._counters, layers, stats.per_tensor_norms, coef, stats.found_inf,
                              backend=self.fused.backend)
        self.last_stats = stats
        return stats

    clip = clip_  # the seed name

    def _clamped(self, inv_scale) -> Optional[torch.Tensor]:
        """1.0 (a 0-d float32 device tensor) when the value clamp will move an element of the unscaled gradients,
        or None without a clamp: the largest |u| (and, for a (lo, hi) pair, the largest and smallest u) measured
        before the clip, one more read of the gradients (two for a pair). An interval that excludes 0 counts
        every step with gradients. Sharded gradients (DTensor) are not measured: None."""
        clamp = self.fused.value_clip
        if clamp is None:
            return None
        grads = ops.present_grads(self.fused.params)[1]
        if not grads or distributed.sharded(grads) is not None:
            return None
        inv = self.fused._inv_scale(inv_scale)
        lo, hi = clamp
        backend = self.fused.backend
        if lo == -hi:
            beyond = ops.norm_pass(grads, inv, math.inf, backend=backend)[1] > hi
        else:
            top = ops.norm_pass(grads, inv, math.inf, (0.0, math.inf), backend=backend)[1]  # max(max u, 0)
            bottom = ops.norm_pass(grads, inv, math.inf, (-math.inf, 0.0), backend=backend)[1]  # max(max -u, 0)
            beyond = (top > hi) | (-bottom < lo)
        return beyond.to(torch.float32)

    def get_statistics(self) -> dict:
        """Steps, clipped and skipped counts, and per-layer norms (last, mean, max). One host sync."""
        names = self.fused.names or [str(i) for i in range(len(self.fused.params))]
        clipped, skipped = self._counters.tolist()
        out = {"steps": self.steps, "clipped_steps": int(clipped), "skipped_steps": int(skipped),
               "strategy": self.fused.strategy.name, "max_norm": self.max_norm,
               "clip_value": self.clip_value}
        if self.enable_monitoring and self.steps:
            sums, peaks, lasts = self._layers.tolist()
            out["per_layer"] = {n: {"last": last, "mean": total / self.steps, "max": peak}
                                for n, last, total, peak in zip(names, lasts, sums, peaks)}
        out.update(self.fused.strategy.statistics())  # AutoClip's bound, ZClip's mean and std
        return out

    def state_dict(self) -> dict:
        return {
            "strategy": self.fused.strategy.name,
            "clipper": self.fused.state_dict(),
            "steps": self.steps,
            "counters": self._counters.cpu().clone(),
            "layers": self._layers.cpu().clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output. Every entry is checked before any is replaced: a bad one raises
        ValueError and leaves the clipper, its strategy and its statistics as they were."""
        name = self.fused.strategy.name
        if state["strategy"] != name:
            raise ValueError(f"state_dict is for strategy {state['strategy']!r}, not {name!r}")
        layers = state["layers"]
        if isinstance(layers, torch.Tensor) and layers.dim() == 2 and layers.shape[1] != self._layers.shape[1]:
            raise ValueError(f"state_dict is for {layers.shape[1]} parameters, this clipper has "
                             f"{self._layers.shape[1]}")
        layers = ops.check_saved(layers, tuple(self._layers.shape), "layers")
        counters = ops.check_saved(state["counters"], (2,), "counters")
        if not bool((counters >= 0).all()) or not bool(counters.isfinite().all()):
            raise ValueError(f"state_dict's counters must be finite and >= 0, got {counters.tolist()}")
        steps = ops.check_count(state["steps"], "steps")
        self.fused.load_state_dict(state["clipper"])  # checks all of its own before it replaces any
        self.steps = steps
        self._counters.copy_(counters)
        self._layers.copy_(layers)


def create_gradient_clipper(parameters, strategy="norm", max_norm: Optional[float] = None,
                            precision: str = "fp32", **kwargs) -> GradientClipper:
    """A :class:`GradientClipper`; ``max_norm=None`` picks the precision's recommended threshold."""
    return GradientClipper(parameters, strategy, max_norm=max_norm, precision=precision, **kwargs)
