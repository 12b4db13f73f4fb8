"""Clipping strategies as bounds: each is one small class that, given a step's norms on the device, returns
the bound to clip to and updates its own device state. :class:`ampclip.FusedClipper` does the passes; a
strategy only decides how much a step may keep, so adding one is a class here and one ``register`` line,
with no change to the clipper, the trainer or the config.

* ``"norm"`` (:class:`NormClip`): a fixed bound on the global, per-tensor or per-group norm, optionally
  after a value clamp (seed 004's "value clamp, then norm clip" recipe).
* ``"value"`` (:class:`ValueClip`): clamp every element to ``[-c, c]`` (or ``[min, max]``); no norm bound.
* ``"adaptive"`` (:class:`AutoClip`, Seetharaman et al. 2020, arXiv:2007.14469): the ``percentile``-th
  percentile of the global norms of the clean steps so far, the current one included, kept on the device.
* ``"zclip"`` (:class:`ZClipStrategy`, Kumar et al. 2025, arXiv:2504.02507): an EMA of the mean and variance
  of the global norm; a step whose z-score passes ``z_thresh`` is clipped towards the mean. One small op per
  step (``ops.zclip_update``), its state on the device.
* ``"agc"`` (:class:`AGC`, Brock et al. 2021, arXiv:2102.06171): adaptive gradient clipping, unit-wise: each
  row of each gradient is bounded by ``clip_factor`` times the norm of the same row of its parameter.

Two extension points. A strategy that bounds a norm the clipper measures overrides :meth:`ClipStrategy.bound`
(norm, value, AutoClip, ZClip). A strategy whose bound is not one number per norm sets ``own_passes = True``
and overrides :meth:`ClipStrategy.clip`: the clipper then hands it the step (parameters, gradients,
inv_scale, backend) in a :class:`ClipStep` and it runs its own passes through :mod:`ampclip.ops` (AGC:
unit-wise norms of the parameters and of the gradients, a coefficient per row, a unit-wise scale pass).
Either way it is one class and one ``register`` line; the clipper, the trainer and the config never branch on
a strategy.

Every bound is a Python number or a 0-d device tensor: no strategy syncs with the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Union

import torch

from . import ops

__all__ = [
    "RECOMMENDED_CLIPPING_THRESHOLDS",
    "STRATEGIES",
    "AGC",
    "AGCMeasure",
    "AutoClip",
    "ClipStep",
    "ClipStrategy",
    "NormClip",
    "StepNorms",
    "StepResult",
    "ZClipStrategy",
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
    backend: Optional[str] = None  # the clipper's backend, for a strategy that runs an op of its own


@dataclass
class ClipStep:
    """What the clipper hands a strategy with ``own_passes`` (:meth:`ClipStrategy.clip`): the parameters that
    have a gradient and those gradients (in the clipper's order; ``indices`` their positions among its
    parameters, None when all are present), the loss scale's inverse (a 0-d device tensor or None), the norm
    type, whether a step with inf/NaN zeroes the gradients, and the backend to run the ops on.
    ``clip_nonfinite``: clip a step with inf/NaN all the same, as ``timm.utils.adaptive_clip_grad`` does (the
    clipper leaves such a step alone, or zeroes it)."""

    params: list
    grads: list
    indices: Optional[list]
    inv_scale: Optional[torch.Tensor]
    norm_type: float
    zero_if_inf: bool
    backend: str
    clip_nonfinite: bool = False


@dataclass
class StepResult:
    """What a strategy with ``own_passes`` returns, device tensors all: the pre-clip total norm of the unscaled
    gradients, its coefficients (any shape: AGC has one per row), the norm after clipping, found_inf and the
    per-tensor pre-clip norms."""

    total: torch.Tensor
    clip_coef: torch.Tensor
    post_clip_norm: torch.Tensor
    found_inf: torch.Tensor
    per_tensor: torch.Tensor


Bound = Union[float, torch.Tensor]


class ClipStrategy:
    """A bound on the gradients. Attributes the clipper reads:

    * ``mode``: "global", "per_tensor" or "per_group": which norm :meth:`bound` limits (one of ``modes``).
    * ``value_clip``: ``(min, max)`` to clamp every unscaled element to before it is measured, or None.
    * ``max_norm``: the fixed bound (or the cap of an adaptive one); inf for none.

    Subclasses override :meth:`bound` (and :meth:`bind`, :meth:`state_dict`, :meth:`load_state_dict` when they
    keep state). ``options`` are the keyword arguments :func:`create` accepts beyond the common ones.

    A strategy with ``own_passes = True`` overrides :meth:`clip` instead of :meth:`bound`: the clipper hands it
    the whole step and it runs its own passes over the gradients through :mod:`ampclip.ops`. It cannot be
    deferred into an optimizer, and :meth:`attach` tells it the clipper's parameters.
    """

    name = ""
    options: tuple[str, ...] = ()
    modes: tuple[str, ...] = tuple(ops.MODES)  # the modes it can bound
    own_passes = False

    def __init__(self, max_norm: float = math.inf, mode: str = "global", value_clip=None):
        if mode not in self.modes:
            hint = "; per-tensor and per-group modes are for the 'norm' strategy" if mode in ops.MODES else ""
            raise ValueError(f"mode must be one of {self.modes} for the {self.name!r} strategy, got {mode!r}{hint}")
        self.max_norm = ops.check_bound(max_norm, "max_norm")
        self.mode = mode
        self.value_clip = ops.check_clamp(value_clip, "value_clip")

    def bind(self, device: torch.device) -> None:
        """Allocate device state on ``device`` (the clipper's)."""

    def attach(self, params: list, names: Optional[list]) -> None:
        """Called once by the clipper with its parameters (and their names, or None)."""

    def bound(self, norms: StepNorms) -> Bound:
        """The max norm for this step, from its norms (a number or a 0-d device tensor)."""
        return self.max_norm

    def fixed_bound(self) -> Optional[float]:
        """The bound when it does not depend on the step's norms (a strategy that keeps :meth:`bound` as it is
        here: the fixed ``max_norm``), else None. A known bound lets the clipper compute the coefficient inside
        the norm pass (``ops.clip_norm_pass``): a clip is then two launches on a GPU."""
        return self.max_norm if type(self).bound is ClipStrategy.bound else None

    def clip(self, step: ClipStep) -> StepResult:
        """The whole clip of one step, for a strategy with ``own_passes``: no host sync, gradients untouched
        when found_inf is set unless ``step.zero_if_inf``."""
        raise NotImplementedError(f"strategy {self.name!r} bounds a norm: the clipper calls bound()")

    def statistics(self) -> dict:
        """What the strategy adds to :meth:`ampclip.GradientClipper.get_statistics` (may sync with the host)."""
        return {}

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
    modes = ("global",)

    def __init__(self, clip_value, mode: str = "global"):
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
    modes = ("global",)
    options = ("percentile", "history_size")

    def __init__(self, percentile: float = 10.0, history_size: int = 1000, max_norm: float = math.inf,
                 mode: str = "global", value_clip=None):
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

    def statistics(self) -> dict:
        return {"adaptive_bound": self.current_bound()}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "percentile": self.percentile, "history": self._history.cpu().clone(),
                "count": int(self._count)}

    def load_state_dict(self, state: dict) -> None:
        # every entry checked before any is replaced: a bad one leaves the strategy as it was
        history = state["history"]
        if isinstance(history, (torch.Tensor, list, tuple)) and len(history) != self.history_size:
            raise ValueError(f"history_size differs: saved {len(history)}, here {self.history_size}")
        history = ops.check_saved(history, (self.history_size,), "history", torch.float32)
        count = ops.check_count(state["count"], "count")
        percentile = _check_range("percentile", state["percentile"], 0.0, 100.0, low_open=True)
        super().load_state_dict(state)
        self.percentile = percentile
        self._history.copy_(history)
        self._count.fill_(count)


def _check_range(name: str, value, low: float, high: float = math.inf, low_open: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    ok = (v > low if low_open else v >= low) and v <= high
    if not ok or math.isnan(v):
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"{name} must be in {bounds}, got {value!r}")
    return v


class ZClipStrategy(ClipStrategy):
    """ZClip: z-score based adaptive clipping of the global norm, with the ``zclip`` package's arguments and
    arithmetic (see ``ampclip.reference.zclip_update``; :class:`ampclip.ZClip` is the stand-alone clipper).

    For ``warmup_steps`` clean steps the bound is ``max_grad_norm`` (None: no bound) while the norms are
    collected; then an EMA of their mean and variance (factor ``alpha``) decides: in "zscore" mode a norm whose
    z-score passes ``z_thresh`` is clipped to ``mean + z_thresh * std / (z / z_thresh)`` times ``clip_factor``
    (``clip_option="adaptive_scaling"``) or to the mean (``"mean"``); in "percentile" mode to
    ``mean + z_thresh * std`` whenever it is above it. ``max_grad_norm`` caps the bound throughout. State (the
    EMA and the warm-up buffer) lives on the device, float64; each step is one small op. A step with inf/NaN
    changes no state (the package would take a NaN into its mean and never recover).
    """

    name = "zclip"
    modes = ("global",)
    options = ("alpha", "z_thresh", "eps", "warmup_steps", "zclip_mode", "clip_option", "clip_factor",
               "skip_update_on_spike")

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, max_grad_norm: Optional[float] = 1.0,
                 eps: float = 1e-6, warmup_steps: int = 25, zclip_mode: str = "zscore",
                 clip_option: str = "adaptive_scaling", clip_factor: float = 1.0, skip_update_on_spike: bool = False,
                 mode: str = "global", value_clip=None):
        zclip_mode = str(zclip_mode).lower()
        if zclip_mode not in ("zscore", "percentile"):
            raise ValueError(f"mode must be 'zscore' or 'percentile', got {zclip_mode!r}")
        clip_option = str(clip_option).lower()
        if zclip_mode == "zscore" and clip_option not in ("adaptive_scaling", "mean"):
            raise ValueError(f"clip_option must be 'adaptive_scaling' or 'mean', got {clip_option!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        self.alpha = _check_range("alpha", alpha, 0.0, 1.0)
        self.z_thresh = _check_range("z_thresh", z_thresh, 0.0, low_open=True)
        self.eps = _check_range("eps", eps, 0.0)
        self.clip_factor = _check_range("clip_factor", clip_factor, 0.0, low_open=True)
        super().__init__(math.inf if max_grad_norm is None else max_grad_norm, mode, value_clip)
        self.warmup_steps = warmup_steps
        self.zclip_mode = zclip_mode
        self.clip_option = clip_option if zclip_mode == "zscore" else None
        self.skip_update_on_spike = bool(skip_update_on_spike)
        self._state: Optional[torch.Tensor] = None
        self._warmup: Optional[torch.Tensor] = None

    @classmethod
    def from_options(cls, precision, max_norm, clip_value, mode, **options):
        return cls(max_grad_norm=max_norm, mode=mode, value_clip=clip_value, **options)

    @property
    def rule(self) -> str:
        return "percentile" if self.zclip_mode == "percentile" else self.clip_option

    def bind(self, device: torch.device) -> None:
        self._state = torch.zeros(4, dtype=torch.float64, device=device)
        self._warmup = torch.zeros(max(self.warmup_steps, 1), dtype=torch.float64, device=device)

    def bound(self, norms: StepNorms) -> torch.Tensor:
        return ops.zclip_update(self._state, self._warmup, norms.total, norms.found_inf, self.alpha, self.z_thresh,
                                self.max_norm, self.eps, self.rule, self.clip_factor, self.skip_update_on_spike,
                                backend=norms.backend)

    def statistics(self) -> dict:
        """The EMA mean and standard deviation of the norm and whether the warm-up is over (one host sync)."""
        mean, var, ready, count = self._state.tolist()
        return {"zclip_mean": mean, "zclip_std": var ** 0.5, "zclip_ready": bool(ready),
                "zclip_warmup_seen": int(count)}

    def _settings(self) -> dict:
        return {"alpha": self.alpha, "z_thresh": self.z_thresh, "eps": self.eps, "warmup_steps": self.warmup_steps,
                "zclip_mode": self.zclip_mode, "clip_option": self.clip_option, "clip_factor": self.clip_factor,
                "skip_update_on_spike": self.skip_update_on_spike}

    def state_dict(self) -> dict:
        return {**super().state_dict(), **self._settings(), "state": self._state.cpu().clone(),
                "warmup": self._warmup.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        theirs = {key: state.get(key) for key in self._settings()}
        if theirs != self._settings():
            differ = sorted(k for k in theirs if theirs[k] != self._settings()[k])
            raise ValueError(f"state_dict is for other zclip settings: {differ} differ")
        saved = ops.check_saved(state["state"], (4,), "zclip state")
        warmup = ops.check_saved(state["warmup"], tuple(self._warmup.shape), "warm-up buffer")
        super().load_state_dict(state)
        self._state.copy_(saved)
        self._warmup.copy_(warmup)


Exclude = Union[None, Iterable[str], Callable[[Optional[str], torch.Tensor], bool]]


class AGC(ClipStrategy):
    """Adaptive gradient clipping (AGC, NFNets), unit-wise, with timm's semantics: a unit is a row (dim 0) of
    a parameter with more than one dimension, or a whole parameter otherwise; a unit's gradient may keep
    ``max_norm = max(|unit of the parameter|, eps) * clip_factor``, and one whose norm is not below it is scaled
    by ``max_norm / max(|unit of the gradient|, 1e-6)``. Norms are of the unscaled gradients (``inv_scale`` is
    folded into the passes) and of the clipper's ``norm_type``.

    ``exclude``: parameter names, or a predicate ``(name, param) -> bool`` (name None without names), whose
    gradients are not clipped (NFNets leave the final classifier out; ``lambda name, p: p.ndim <= 1`` leaves out
    biases and gains). They are still unscaled and checked.

    Per step: one read of the parameters and one of the gradients for the unit norms (``ops.unit_norm_pass``),
    the coefficients (``ops.unit_clip_finalize``), one read and write of the gradients that are clipped or
    unscaled (``ops.unit_scale_pass``): four device ops (five with ``exclude``), whatever the number of tensors.
    """

    name = "agc"
    modes = ("global",)
    options = ("clip_factor", "eps", "exclude")
    own_passes = True

    def __init__(self, clip_factor: float = 0.01, eps: float = 1e-3, exclude: Exclude = None, mode: str = "global"):
        self.clip_factor = _check_range("clip_factor", clip_factor, 0.0)
        self.eps = _check_range("eps", eps, 0.0)
        if exclude is not None and not callable(exclude):
            if isinstance(exclude, str):
                exclude = [exclude]
            exclude = frozenset(exclude)
            if not all(isinstance(n, str) for n in exclude):
                raise TypeError("exclude must be parameter names or a predicate (name, param) -> bool")
        self.exclude = exclude
        super().__init__(math.inf, mode, None)
        self._keep: Optional[list[bool]] = None
        self._layouts: dict = {}

    @classmethod
    def from_options(cls, precision, max_norm, clip_value, mode, **options):
        if max_norm is not None and not math.isinf(max_norm):
            raise ValueError("agc bounds each row by its parameter's norm times clip_factor: it takes no max_norm")
        if clip_value is not None:
            raise ValueError("agc takes no clip_value")
        return cls(mode=mode, **options)

    def attach(self, params: list, names: Optional[list]) -> None:
        if self.exclude is None:
            self._keep = [True] * len(params)
        elif callable(self.exclude):
            self._keep = [not self.exclude(names[i] if names else None, p) for i, p in enumerate(params)]
        else:
            if names is None:
                raise ValueError("agc: exclude by name needs named parameters (model.named_parameters())")
            unknown = sorted(self.exclude - set(names))
            if unknown:
                raise ValueError(f"agc: exclude names parameters the clipper does not have: {unknown[:5]}")
            self._keep = [n not in self.exclude for n in names]
        self._layouts = {}

    def _layout(self, step: ClipStep):
        """For the present parameters: those clipped, and when some are left out, the positions of their units
        among all units (a device index) and a vector of inf to scatter their norms into. Cached."""
        key = None if step.indices is None else tuple(step.indices)
        layout = self._layouts.get(key)
        if layout is None:
            keep = self._keep if step.indices is None else [self._keep[i] for i in step.indices]
            kept = [p for p, k in zip(step.params, keep) if k]
            scatter = None
            if len(kept) != len(step.params):
                positions, start = [], 0
                for p, k in zip(step.params, keep):
                    count = ops.unit_count(p)
                    if k:
                        positions.extend(range(start, start + count))
                    start += count
                device = step.grads[0].device
                acc = ops.accumulation_dtype(step.grads)
                scatter = (torch.tensor(positions, dtype=torch.int64, device=device),
                           torch.full((start,), math.inf, dtype=acc, device=device))
            layout = (kept, scatter)
            self._layouts = {key: layout}  # the present set rarely changes: keep one entry
        return layout

    def clip(self, step: ClipStep) -> StepResult:
        measured = self.measure(step)
        self.apply(step, measured)
        return measured.result

    def measure(self, step: ClipStep) -> "AGCMeasure":
        """The step's norms and coefficients, nothing written (:meth:`apply` writes them): a caller with
        gradients on several devices measures every device before it writes any.

        A gradient held by several entries (a parameter listed twice, tied weights gathered from two modules,
        two parameters sharing one ``.grad``) is clipped once, by the smallest coefficient of each unit among
        its entries: timm clips it by each in turn, which leaves the smallest (the same, within rounding).
        Every entry still counts in the norms, as in ``get_total_norm`` of such a list."""
        kept, scatter = self._layout(step)
        with torch.no_grad():
            grad_units, per_tensor, total, found_inf = ops.unit_norm_pass(step.grads, step.inv_scale, step.norm_type,
                                                                          backend=step.backend)
            if kept:
                param_units = ops.unit_norm_pass(kept, None, step.norm_type, backend=step.backend)[0]
            else:
                param_units = grad_units.new_zeros(0)
            if scatter is not None:  # the units left out get an infinite bound: coefficient 1
                index, infinite = scatter
                param_units = infinite.index_copy(0, index, param_units.to(infinite.dtype))
            coef, post = ops.unit_clip_finalize(param_units, grad_units, self.clip_factor, self.eps, step.norm_type,
                                                backend=step.backend)
            targets, written = step.grads, coef
            shared = _shared_gradients(step.grads)
            if shared is not None:
                targets, first_units, target = shared
                least = torch.full_like(coef, math.inf).scatter_reduce(0, target, coef, "amin")
                coef = least.index_select(0, target)
                post = ops.combine_norms(grad_units.double() * coef.double(), step.norm_type).to(post.dtype)
                written = coef.index_select(0, first_units)
        return AGCMeasure(StepResult(total, coef, post, found_inf, per_tensor), targets, written)

    def apply(self, step: ClipStep, measured: "AGCMeasure") -> None:
        """The unit-wise scale pass of a measured step (see :meth:`measure`)."""
        found_inf = None if step.clip_nonfinite else measured.result.found_inf
        with torch.no_grad():
            ops.unit_scale_pass(measured.targets, measured.coef, step.inv_scale, found_inf, step.zero_if_inf,
                                backend=step.backend)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "clip_factor": self.clip_factor, "eps": self.eps}

    def load_state_dict(self, state: dict) -> None:
        clip_factor = _check_range("clip_factor", state.get("clip_factor", self.clip_factor), 0.0)
        eps = _check_range("eps", state.get("eps", self.eps), 0.0)
        super().load_state_dict(state)
        self.clip_factor, self.eps = clip_factor, eps


@dataclass
class AGCMeasure:
    """A measured AGC step (:meth:`AGC.measure`): its result, and what the scale pass writes: the gradients,
    each once, and one coefficient per unit of them."""

    result: StepResult
    targets: list
    coef: torch.Tensor


def _shared_gradients(grads: list):
    """None when every entry of ``grads`` is a tensor of its own, else ``(gradients, first_units, target)``:
    each tensor once (at its first entry), the positions of their units among all units (a device index), and
    for every unit the position of the same unit in its tensor's first entry. One set of identities a step
    (about 50 ns a gradient); the rest only when a tensor repeats."""
    if len(set(map(id, grads))) == len(grads):
        return None
    first: dict[int, int] = {}
    owner = [first.setdefault(id(g), i) for i, g in enumerate(grads)]
    counts = [ops.unit_count(g) for g in grads]
    starts = [0]
    for count in counts:
        starts.append(starts[-1] + count)
    target = [u for i, o in enumerate(owner) for u in range(starts[o], starts[o] + counts[i])]
    unique = [i for i, o in enumerate(owner) if o == i]
    first_units = [u for i in unique for u in range(starts[i], starts[i + 1])]
    device = grads[0].device
    return ([grads[i] for i in unique], torch.tensor(first_units, dtype=torch.int64, device=device),
            torch.tensor(target, dtype=torch.int64, device=device))


STRATEGIES: dict[str, type[ClipStrategy]] = {}


def register(cls: type[ClipStrategy]) -> type[ClipStrategy]:
    """Make a strategy class available by its ``name`` (to :class:`ampclip.GradientClipper`, ``AMPConfig``)."""
    STRATEGIES[cls.name] = cls
    return cls


for _cls in (NormClip, ValueClip, AutoClip, ZClipStrategy, AGC):
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
