"""Clipping strategies under the names users of the original design expect: ``GradientClipper`` with
``ClippingStrategy`` NORM / VALUE / ADAPTIVE, precision-aware default thresholds, and statistics.

All strategies are thin layers over :class:`ampclip.FusedClipper`:

* NORM: clip the (global, per-tensor or per-group) norm to ``max_norm``.
* VALUE: clamp every element to ``[-clip_value, clip_value]``.
* ADAPTIVE: AutoClip (Seetharaman et al. 2020, arXiv:2007.14469): clip to the ``percentile``-th percentile
  of the gradient norms seen so far (the current one included), kept in a bounded on-device history, so
  the bound follows the run without a host sync. The history is part of the state_dict.
"""

from __future__ import annotations

import enum
import math
from typing import Optional

import torch

from .clipper import ClipStats, FusedClipper

__all__ = [
    "ClippingStrategy",
    "GradientClipper",
    "RECOMMENDED_CLIPPING_THRESHOLDS",
    "create_gradient_clipper",
    "get_recommended_threshold",
]

# Max-norm defaults by training precision: fp16 gradients overflow first, so clip them tightest.
RECOMMENDED_CLIPPING_THRESHOLDS = {"fp16": 1.0, "bf16": 5.0, "fp32": 10.0}


def get_recommended_threshold(precision: str) -> float:
    """The default max norm for ``precision`` ("fp16" 1.0, "bf16" 5.0, "fp32" 10.0)."""
    try:
        return RECOMMENDED_CLIPPING_THRESHOLDS[precision]
    except KeyError:
        raise ValueError(
            f"precision must be one of {sorted(RECOMMENDED_CLIPPING_THRESHOLDS)}, got {precision!r}"
        ) from None


class ClippingStrategy(str, enum.Enum):
    NORM = "norm"
    VALUE = "value"
    ADAPTIVE = "adaptive"


class GradientClipper:
    """Gradient clipping by strategy, with statistics and per-layer monitoring.

    Args:
        parameters: parameters or ``named_parameters()`` (names appear in the statistics).
        strategy: "norm", "value" or "adaptive" (or a :class:`ClippingStrategy`).
        max_norm: the norm bound; None picks :func:`get_recommended_threshold` for ``precision``. With
            "adaptive" it caps the adaptive bound (None: no cap).
        precision: "fp16", "bf16" or "fp32".
        clip_value: the element bound of the "value" strategy (default: ``max_norm``).
        mode: "global", "per_tensor" or "per_group" (norm strategy), see FusedClipper.
        percentile: the AutoClip percentile, in (0, 100].
        history_size: how many norms AutoClip remembers.
        enable_monitoring: keep per-layer norm sums and maxima on the device.

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
        clip_value: Optional[float] = None,
        norm_type: float = 2.0,
        mode: str = "global",
        groups=None,
        percentile: float = 10.0,
        history_size: int = 1000,
        enable_monitoring: bool = True,
        backend: Optional[str] = None,
        on_nonfinite: str = "leave",
    ):
        try:
            self.strategy = ClippingStrategy(strategy)
        except ValueError:
            names = [s.value for s in ClippingStrategy]
            raise ValueError(f"strategy must be one of {names}, got {strategy!r}") from None
        default_bound = get_recommended_threshold(precision)
        if self.strategy is ClippingStrategy.ADAPTIVE:
            if mode != "global":
                raise ValueError("the adaptive strategy clips the global norm: use mode='global'")
            if not 0 < percentile <= 100:
                raise ValueError(f"percentile must be in (0, 100], got {percentile}")
            if history_size < 1:
                raise ValueError(f"history_size must be >= 1, got {history_size}")
        bound = max_norm if max_norm is not None else (math.inf if self.strategy is ClippingStrategy.ADAPTIVE
                                                        else default_bound)
        value = None
        if self.strategy is ClippingStrategy.VALUE:
            value = clip_value if clip_value is not None else (max_norm if max_norm is not None else default_bound)
            bound = math.inf
        self.precision = precision
        self.percentile = percentile
        self.enable_monitoring = enable_monitoring
        self._fused = FusedClipper(parameters, bound, norm_type, mode=mode, groups=groups, value_clip=value,
                                   backend=backend, on_nonfinite=on_nonfinite)
        self.max_norm = self._fused.max_norm
        self.clip_value = self._fused.value_clip
        device = self._fused.device
        self._history = torch.zeros(history_size, device=device)
        self._history_count = 0
        self.reset()

    @property
    def params(self):
        return self._fused.params

    def reset(self) -> None:
        """Forget the statistics and the adaptive history."""
        device = self._fused.device
        self.steps = 0
        self._clipped = torch.zeros((), device=device)
        self._skipped = torch.zeros((), device=device)
        n = len(self._fused.params)
        self._layer_sum = torch.zeros(n, dtype=torch.float64, device=device)
        self._layer_max = torch.zeros(n, device=device)
        self._layer_last = torch.zeros(n, device=device)
        self._history.zero_()
        self._history_count = 0
        self.last_stats: Optional[ClipStats] = None

    def _adaptive_bound(self, total: torch.Tensor) -> torch.Tensor:
        """AutoClip: the percentile of the history with the current norm appended (on the device)."""
        slot = self._history_count % len(self._history)
        self._history[slot] = torch.where(torch.isfinite(total), total.float(), self._history[slot - 1])
        self._history_count += 1
        seen = self._history[: min(self._history_count, len(self._history))]
        bound = torch.quantile(seen, self.percentile / 100.0)
        return torch.minimum(bound, torch.tensor(self.max_norm, device=bound.device)).to(total.dtype)

    def clip_(self, inv_scale=None, defer_to=None) -> ClipStats:
        """Unscale (optional), check and clip by the strategy; returns :class:`ClipStats` (device tensors)."""
        bound = self._adaptive_bound if self.strategy is ClippingStrategy.ADAPTIVE else None
        stats = self._fused.clip_(inv_scale, defer_to=defer_to, max_norm=bound)
        self.steps += 1
        self._clipped += (stats.clip_coef < 1).any().float() * (1 - stats.found_inf)
        self._skipped += stats.found_inf
        if self.enable_monitoring and len(stats.per_tensor_norms) == len(self._layer_sum):
            norms = stats.per_tensor_norms.float()
            finite = torch.where(torch.isfinite(norms), norms, torch.zeros_like(norms))
            self._layer_sum += finite.double()
            self._layer_max = torch.maximum(self._layer_max, finite)
            self._layer_last = norms
        self.last_stats = stats
        return stats

    clip = clip_  # the seed name

    def get_statistics(self) -> dict:
        """Steps, clipped and skipped counts, and per-layer norms (last, mean, max). One host sync."""
        names = self._fused.names or [str(i) for i in range(len(self._fused.params))]
        clipped, skipped = torch.stack([self._clipped, self._skipped]).tolist()
        out = {"steps": self.steps, "clipped_steps": int(clipped), "skipped_steps": int(skipped),
               "strategy": self.strategy.value, "max_norm": self.max_norm, "clip_value": self.clip_value}
        if self.enable_monitoring and self.steps:
            last, mean, peak = (self._layer_last.tolist(), (self._layer_sum / self.steps).tolist(),
                                self._layer_max.tolist())
            out["per_layer"] = {n: {"last": a, "mean": b, "max": c} for n, a, b, c in zip(names, last, mean, peak)}
        if self.strategy is ClippingStrategy.ADAPTIVE and self._history_count:
            out["adaptive_bound"] = float(torch.quantile(
                self._history[: min(self._history_count, len(self._history))], self.percentile / 100.0))
        return out

    def state_dict(self) -> dict:
        return {
            "strategy": self.strategy.value,
            "max_norm": self.max_norm,
            "clip_value": self.clip_value,
            "percentile": self.percentile,
            "history": self._history.cpu().clone(),
            "history_count": self._history_count,
            "steps": self.steps,
            "clipped": self._clipped.cpu().clone(),
            "skipped": self._skipped.cpu().clone(),
            "layer_sum": self._layer_sum.cpu().clone(),
            "layer_max": self._layer_max.cpu().clone(),
            "layer_last": self._layer_last.cpu().clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["strategy"] != self.strategy.value:
            raise ValueError(f"state_dict is for strategy {state['strategy']!r}, not {self.strategy.value!r}")
        if len(state["history"]) != len(self._history):
            raise ValueError("history_size differs from the saved one")
        self.percentile = state["percentile"]
        self._history.copy_(state["history"])
        self._history_count = state["history_count"]
        self.steps = state["steps"]
        for name in ("clipped", "skipped", "layer_sum", "layer_max", "layer_last"):
            getattr(self, "_" + name).copy_(state[name])


def create_gradient_clipper(parameters, strategy="norm", max_norm: Optional[float] = None,
                            precision: str = "fp32", **kwargs) -> GradientClipper:
    """A :class:`GradientClipper`; ``max_norm=None`` picks the precision's recommended threshold."""
    return GradientClipper(parameters, strategy, max_norm=max_norm, precision=precision, **kwargs)
