"""AMPConfig: one validated description of a mixed-precision training step."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Union

from . import ops, strategies
from .clipper import MODES
from .nan import STRATEGIES as NAN_STRATEGIES
from .strategies import RECOMMENDED_CLIPPING_THRESHOLDS

__all__ = ["AMPConfig", "create_default_amp_config"]


@dataclass
class AMPConfig:
    """Mixed-precision training settings. Invalid combinations raise ValueError at construction.

    * ``precision``: "fp16" (autocast fp16 + dynamic loss scaling), "bf16" (autocast bf16, scale 1) or
      "fp32".
    * ``gradient_clip_max_norm``: None picks ``RECOMMENDED_CLIPPING_THRESHOLDS[precision]`` (fp16 1.0,
      bf16 5.0, fp32 10.0). ``gradient_clip_strategy=None`` switches clipping off.
    * ``gradient_clip_strategy``: "norm", "value", "adaptive" (AutoClip), "zclip", "agc", any name registered
      in :mod:`ampclip.strategies`, or None; ``gradient_clip_options``: that strategy's own options (e.g.
      ``{"percentile": 10.0, "history_size": 1000}`` for "adaptive", ``{"z_thresh": 2.5}`` for "zclip",
      ``{"clip_factor": 0.01, "exclude": ["head.weight"]}`` for "agc"); ``gradient_clip_mode``: "global",
      "per_tensor" or "per_group".
    * ``gradient_clip_coef_rule`` / ``gradient_clip_coef_eps``: the coefficient of a norm bound, "torch"
      (``min(1, max_norm / (norm + eps))``, eps 1e-6) or "max" (``max_norm / max(norm + eps, max_norm)``), to
      match another system's recipe (docs/strategies.md).
    * ``enable_gradient_monitoring``: per-layer norms, every ``monitoring_interval`` steps to the logger.
    * loss-scaler settings, ``grad_accumulation_steps``, ``nan_recovery_strategy`` ("skip",
      "reduce_scale", "clip" or "rollback").
    * ``overlap_clip``: measure the gradient norms while backward runs (:mod:`ampclip.overlap`): "auto" on a
      GPU where it applies (one process, FSDP2, or DDP without a comm hook of its own; not a value clamp or AGC),
      True (also on a CPU; an error where it does not apply), False (measure after backward).
    """

    precision: str = "fp16"
    gradient_clip_max_norm: Optional[float] = None
    gradient_clip_strategy: Optional[str] = "norm"
    gradient_clip_mode: str = "global"
    gradient_clip_value: Optional[float] = None
    gradient_clip_options: dict = field(default_factory=dict)
    gradient_clip_coef_rule: str = "torch"
    gradient_clip_coef_eps: float = 1e-6
    enable_gradient_monitoring: bool = True
    monitoring_interval: int = 100
    init_scale: Optional[float] = None
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    hysteresis: int = 1
    min_scale: float = 0.0
    max_scale: float = math.inf
    grad_accumulation_steps: int = 1
    nan_recovery_strategy: str = "skip"
    defer_clip: Union[bool, str] = "auto"
    overlap_clip: Union[bool, str] = "auto"

    def __post_init__(self):
        if self.precision not in RECOMMENDED_CLIPPING_THRESHOLDS:
            raise ValueError(f"precision must be 'fp16', 'bf16' or 'fp32', got {self.precision!r}")
        if self.gradient_clip_mode not in MODES:
            raise ValueError(f"gradient_clip_mode must be one of {MODES}, got {self.gradient_clip_mode!r}")
        for name in ("gradient_clip_max_norm", "gradient_clip_value"):
            value = getattr(self, name)
            if isinstance(value, (int, float)) and (math.isnan(value) or value < 0):
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.gradient_clip_coef_rule not in ops.RULES:
            raise ValueError(f"gradient_clip_coef_rule must be one of {tuple(ops.RULES)}, got "
                             f"{self.gradient_clip_coef_rule!r}")
        if not (isinstance(self.gradient_clip_coef_eps, (int, float)) and self.gradient_clip_coef_eps >= 0):
            raise ValueError(f"gradient_clip_coef_eps must be a number >= 0, got {self.gradient_clip_coef_eps!r}")
        if self.gradient_clip_strategy is not None:
            name = getattr(self.gradient_clip_strategy, "value", self.gradient_clip_strategy)
            if name not in strategies.STRATEGIES:
                raise ValueError(f"gradient_clip_strategy must be one of {sorted(strategies.STRATEGIES)} or None, "
                                 f"got {self.gradient_clip_strategy!r}")
            try:  # building the strategy checks the rest: the mode and the strategy's own options
                strategy = self.clip_strategy()
            except (TypeError, ValueError) as exc:
                raise ValueError(f"gradient_clip_strategy {name!r}: {exc}") from None
            self.gradient_clip_strategy = strategy.name
            if self.gradient_clip_max_norm is None and math.isfinite(strategy.max_norm):
                self.gradient_clip_max_norm = strategy.max_norm  # the precision's recommended threshold
        elif self.gradient_clip_options:
            raise ValueError("gradient_clip_options were given but gradient_clip_strategy is None")
        if self.grad_accumulation_steps < 1 or self.monitoring_interval < 1:
            raise ValueError("grad_accumulation_steps and monitoring_interval must be >= 1")
        if self.nan_recovery_strategy not in NAN_STRATEGIES:
            raise ValueError(
                f"nan_recovery_strategy must be one of {NAN_STRATEGIES}, got {self.nan_recovery_strategy!r}")
        if self.defer_clip not in (True, False, "auto"):
            raise ValueError(f"defer_clip must be True, False or 'auto', got {self.defer_clip!r}")
        if self.overlap_clip not in (True, False, "auto"):
            raise ValueError(f"overlap_clip must be True, False or 'auto', got {self.overlap_clip!r}")
        if self.precision != "fp16" and self.init_scale not in (None, 1.0):
            raise ValueError(f"loss scaling is for fp16; precision {self.precision!r} keeps the scale at 1")

    def clip_strategy(self) -> strategies.ClipStrategy:
        """The clipping strategy these settings describe (a new object each call)."""
        return strategies.create(self.gradient_clip_strategy, self.precision, self.gradient_clip_max_norm,
                                 self.gradient_clip_value, self.gradient_clip_mode, **self.gradient_clip_options)

    def to_dict(self) -> dict:
        return asdict(self)


def create_default_amp_config(**overrides) -> AMPConfig:
    """An :class:`AMPConfig` with the defaults, overridden by keyword.

    Example::

        config = ampclip.create_default_amp_config(
            precision="bf16", gradient_clip_max_norm=None,      # None: the bf16 default, 5.0
            gradient_clip_strategy="norm", enable_gradient_monitoring=True)
    """
    return AMPConfig(**overrides)
