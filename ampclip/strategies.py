"""Clipping strategies as bounds: each is one small class that, given a step's norms on the device, returns
the bound to clip to and updates its own device state. :class:`ampclip.FusedClipper` does the passes; a
strategy only decides how much a step may keep, so adding one is a class here and one ``register`` line,
with no change to the clipper, the trainer or the config.

* ``"norm"`` (:class:`NormClip`): a fixed bound on the global, per-tensor or per-group norm, optionally
  after a value clamp (seed 004's "value clamp, then norm clip" recipe).
* ``"value"`` (:class:`ValueClip`): clamp every element to ``[-c, c]`` (or ``[min, max]``); no norm bound.
* ``"adaptive"`` (:class:`AutoClip`, Seetharaman et al. 2020, arXiv:2007.14469): the ``percentile``-th
  percentile of the global norms of the clean steps so far, the current one included, kept on the device.

Every bound is a Python number or a 0-d device tensor: no strategy syncs with the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from . import ops

__all__ = [
    "RECOMMENDED_CLIPPING_THRESHOLDS",
    "STRATEGIES",
    "AutoClip",
    "ClipStrategy",
    "NormClip",
    "StepNorms",
    "ValueClip",
    "create",
    "get_recommended_threshold",
    "register",
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


@dataclass
class StepNorms:
    """What a strategy sees of a step, all device tensors: the total norm (after any value clamp), the
    per-tensor norms of the gradients present, and found_inf (1.0 when an unscaled element was inf/NaN)."""

    total: torch.Tensor
    per_tensor: torch.Tensor
    found_inf: torch.Tensor


Bound = Union[float, torch.Tensor]


class ClipStrategy:
    """A bound on the gradients. Attributes the clipper reads:

    * ``mode``: "global", "per_tensor" or "per_group": which norm :meth:`bound` limits.
    * ``value_clip``: ``(min, max)`` to clamp every unscaled element to before it is measured, or None.
    * ``max_norm``: the fixed bound (or the cap of an adaptive one); inf for none.

    Subclasses override :meth:`bound` (and :meth:`bind`, :meth:`state_dict`, :meth:`load_state_dict` when they
    keep state). ``options`` are the keyword arguments :func:`create` accepts beyond the common ones.
    """

    name = ""
    options: tuple[str, ...] = ()

    def __init__(self, max_norm: float = math.inf, mode: str = "global", value_clip=None):
        if mode not in ops.MODES:
            raise ValueError(f"mode must be one of {tuple(ops.MODES)}, got {mode!r}")
        self.max_norm = ops.check_bound(max_norm, "max_norm")
        self.mode = mode
        self.value_clip = ops.check_clamp(value_clip, "value_clip")

    def bind(self, device: torch.device) -> None:
        """Allocate device state on ``device`` (the clipper's)."""

    def bound(self, norms: StepNorms) -> Bound:
        """The max norm for this step, from its norms (a number or a 0-d device tensor)."""
        return self.max_norm

    def state_dict(self) -> dict:
        return {"name": self.name, "max_norm": self.max_norm, "mode": self.mode, "value_clip": self.value_clip}

    def load_state_dict(self, state: dict) -> None:
        if state.get("name", self.name) != self.name:
            raise ValueError(f"state_dict is for strategy {state['name']!r}, not {self.name!r}")
        if state.get("mode", self.mode) != self.mode:
            raise ValueError(f"state_dict is for mode {state['mode']!r}, this clipper is {self.mode!r}")
        max_norm = ops.check_bound(state["max_norm"], "max_norm")
        value_clip = ops.check_clamp(state.get("value_clip"), "value_clip")
        self.max_norm, self.value_clip = max_norm, value_clip

    @classmethod
    def from_options(cls, precision: str, max_norm: Optional[float], clip_value, mode: str, **options):
        """The strategy for :class:`ampclip.GradientClipper`'s arguments (``max_norm=None``: the precision's
        recommended threshold)."""
        bound = get_recommended_threshold(precision) if max_norm is None else max_norm
        return cls(bound, mode, value_clip=clip_value, **options)


class NormClip(ClipStrategy):
    """Clip the norm (global, per tensor or per group) to ``max_norm``, after an optional value clamp."""

    name = "norm"


class ValueClip(ClipStrategy):
    """Clamp every element to ``[-clip_value, clip_value]`` (or a ``(min, max)`` pair); no norm bound."""

    name = "value"

    def __init__(self, clip_value, mode: str = "global"):
        if mode != "global":
            raise ValueError("the value strategy clamps elements: per-tensor and per-group modes are for the 'norm' "
                             "strategy")
        super().__init__(math.inf, mode, value_clip=clip_value)

    @classmethod
    def from_options(cls, precision, max_norm, clip_value, mode, **options):
        if clip_value is None:
            clip_value = get_recommended_threshold(precision) if max_norm is None else max_norm
        return cls(clip_value, mode, **options)


class AutoClip(ClipStrategy):
    """AutoClip: clip the global norm to the ``percentile``-th percentile of the norms of the clean steps
    seen so far (the current one included), at most ``max_norm``.

    The history is a ring of ``history_size`` norms on the device, NaN where not yet written; a step whose
    gradients held inf/NaN is not recorded (its norm says nothing about the run, and would pull the bound
    down for ``history_size`` steps). About ten device ops per step, no host sync.
    """

    name = "adaptive"
    options = ("percentile", "history_size")

    def __init__(self, percentile: float = 10.0, history_size: int = 1000, max_norm: float = math.inf,
                 mode: str = "global", value_clip=None):
        if mode != "global":
            raise ValueError("the adaptive strategy clips the global norm: per-tensor and per-group modes are for the "
                             "'norm' strategy")
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        if not isinstance(history_size, int) or history_size < 1:
            raise ValueError(f"history_size must be an int >= 1, got {history_size!r}")
        super().__init__(max_norm, mode, value_clip)
        self.percentile = float(percentile)
        self.history_size = history_size
        self._history: Optional[torch.Tensor] = None
        self._count: Optional[torch.Tensor] = None  # clean steps recorded, on the device

    @classmethod
    def from_options(cls, precision, max_norm, clip_value, mode, **options):
        return cls(max_norm=math.inf if max_norm is None else max_norm, mode=mode, value_clip=clip_value, **options)

    def bind(self, device: torch.device) -> None:
        self._history = torch.full((self.history_size,), math.nan, device=device)
        self._count = torch.zeros((), dtype=torch.int64, device=device)

    def bound(self, norms: StepNorms) -> torch.Tensor:
        clean = (norms.found_inf == 0) & torch.isfinite(norms.total)
        slot = self._count.remainder(self.history_size).reshape(1)
        kept = self._history.index_select(0, slot)
        self._history.index_copy_(0, slot, torch.where(clean, norms.total.float().reshape(1), kept))
        self._count += clean.long()
        # nanquantile skips the slots not written yet; before any clean step there is no bound but the cap
        q = torch.nanquantile(self._history, self.percentile / 100.0)
        q = torch.where(torch.isnan(q), torch.full_like(q, self.max_norm), q)
        return torch.clamp(q, max=self.max_norm).to(norms.total.dtype)

    def current_bound(self) -> float:
        """The bound a step with no new norm would get (one host sync), for statistics."""
        q = float(torch.nanquantile(self._history, self.percentile / 100.0))
        return min(q, self.max_norm) if not math.isnan(q) else self.max_norm

    def state_dict(self) -> dict:
        return {**super().state_dict(), "percentile": self.percentile, "history": self._history.cpu().clone(),
                "count": int(self._count)}

    def load_state_dict(self, state: dict) -> None:
        history = state["history"]
        if len(history) != self.history_size:
            raise ValueError(f"history_size differs: saved {len(history)}, here {self.history_size}")
        percentile = float(state["percentile"])
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        super().load_state_dict(state)
        self.percentile = percentile
        self._history.copy_(history)
        self._count.fill_(int(state["count"]))


STRATEGIES: dict[str, type[ClipStrategy]] = {}


def register(cls: type[ClipStrategy]) -> type[ClipStrategy]:
    """Make a strategy class available by its ``name`` (to :class:`ampclip.GradientClipper`, ``AMPConfig``)."""
    STRATEGIES[cls.name] = cls
    return cls


for _cls in (NormClip, ValueClip, AutoClip):
    register(_cls)


def create(name, precision: str = "fp32", max_norm: Optional[float] = None, clip_value=None, mode: str = "global",
           **options) -> ClipStrategy:
    """The strategy registered as ``name`` (a string or a :class:`ampclip.ClippingStrategy`), built from the
    common arguments and its own ``options``; unknown names or options raise ValueError / TypeError."""
    key = getattr(name, "value", name)
    cls = STRATEGIES.get(key)
    if cls is None:
        raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {name!r}")
    unknown = set(options) - set(cls.options)
    if unknown:
        raise TypeError(f"strategy {key!r} takes no option {sorted(unknown)}; its options: {list(cls.options)}")
    return cls.from_options(precision, max_norm, clip_value, mode, **options)


BoundOverride = Union[None, float, torch.Tensor, Callable[[torch.Tensor], Bound]]
