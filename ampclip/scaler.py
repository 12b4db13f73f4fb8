"""DynamicLossScaler: torch.amp.GradScaler's API and scale sequence, fused with clipping, sync-free skips.

Differences from ``torch.amp.GradScaler`` (all documented in docs/scaler.md):

* ``unscale_and_clip_(optimizer, max_norm)`` unscales, checks and clips in FusedClipper's fused passes
  (3N bytes in place, N deferred into a fused optimizer) instead of unscale_ + clip_grad_norm_ (5N).
* ``hysteresis=H`` backs the scale off only after H consecutive overflowing steps (DeepSpeed's
  consecutive hysteresis; H=1, the default, is torch's behaviour). ``min_scale`` / ``max_scale`` bound it.
* A bounded on-device history of scales, overflow flags and gradient norms, for logging.
* Sharded gradients (FSDP2's DTensors, or any given ``process_group``): every rank skips together.
* ``precision="bf16"`` or ``"fp32"``: the scale stays 1 but the inf/NaN check and the skip still work.

Host syncs: ``step`` is sync-free with a fused torch optimizer (Adam, AdamW, SGD with ``fused=True``),
which skips on the device through ``optimizer.found_inf``. With any other optimizer ``step`` reads
``found_inf`` once (one host sync per step, as torch does) to decide whether to call ``optimizer.step``.
``update`` never syncs.
"""

from __future__ import annotations

import enum
import inspect
import math
import warnings
import weakref
from typing import Iterable, Optional, Union

import torch

from . import distributed, ops
from .clipper import ClipStats, FusedClipper, drop_deferred_scale
from .ops import HISTORY_ROWS, INV_SCALE, SCALE

MAX_COUNT = 2**24  # the trackers are kept in float32, exact for integers up to 2^24

__all__ = ["DynamicLossScaler"]

PRECISIONS = ("fp16", "bf16", "fp32")


class _Stage(enum.Enum):
    READY = 0
    UNSCALED = 1  # gradients rewritten in place (unscale_ or an in-place clip)
    DEFERRED = 2  # grad_scale / found_inf handed to a fused optimizer, gradients untouched
    STEPPED = 3


class _OptimizerState:
    __slots__ = ("stage", "found_inf", "grad_norm")

    def __init__(self):
        self.stage = _Stage.READY
        self.found_inf: Optional[torch.Tensor] = None
        self.grad_norm: Optional[torch.Tensor] = None


class DynamicLossScaler:
    """Dynamic loss scaling with torch.amp.GradScaler's API and defaults (2^16, x2 every 2000 clean steps,
    x0.5 on overflow), plus hysteresis, scale bounds, fused unscale+clip and an on-device history.

    Example::

        scaler = ampclip.DynamicLossScaler()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(x).loss
        scaler.scale(loss).backward()
        stats = scaler.unscale_and_clip_(optimizer, max_norm=1.0)   # fused, no host sync
        scaler.step(optimizer)                                      # skipped when stats.found_inf
        scaler.update()
    """

    def __init__(
        self,
        device: Union[str, torch.device] = "cuda",
        init_scale: Optional[float] = None,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        enabled: bool = True,
        hysteresis: int = 1,
        min_scale: float = 0.0,
        max_scale: float = math.inf,
        precision: str = "fp16",
        history_size: int = 1000,
        backend: Optional[str] = None,
        process_group=None,  # gradients sharded by hand over this group: found_inf is all-reduced over it
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        dynamic = precision == "fp16"
        if init_scale is None:
            init_scale = 2.0**16 if dynamic else 1.0
        _check_settings(init_scale, growth_factor, backoff_factor, growth_interval, hysteresis, min_scale,
                        max_scale, scale_name="init_scale")
        if not isinstance(history_size, int) or history_size < 1:
            raise ValueError(f"history_size must be an int >= 1, got {history_size!r}")
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            if enabled:  # as torch.amp.GradScaler("cuda") does
                warnings.warn("ampclip DynamicLossScaler is enabled on device 'cuda', but CUDA is not available. "
                              "Disabling (pass device='cpu' to scale and check on the CPU).", stacklevel=2)
            enabled = False
            device = torch.device("cpu")
        self._device = device
        self._enabled = enabled
        self._dynamic = dynamic
        self._growth_factor = float(growth_factor)
        self._backoff_factor = float(backoff_factor)
        self._growth_interval = int(growth_interval)
        self._hysteresis = hysteresis
        self._min_scale = float(min_scale)
        self._max_scale = float(max_scale)
        self._backend = backend
        self._process_group = process_group
        # One float32 state tensor, so that an update is one device op: the scale (the tensor losses are
        # multiplied by), its inverse (the unscale), the growth and the hysteresis trackers.
        self._scale_state = torch.tensor([init_scale, 0.0, 0.0, hysteresis], dtype=torch.float32, device=device)
        self._scale_state[INV_SCALE] = self._scale_state[SCALE].double().reciprocal().float()  # of the float32 scale
        self._history_size = history_size
        self._history = torch.full((len(HISTORY_ROWS), history_size), math.nan, device=device)
        self._steps = 0
        self._scaled = False
        self._states: dict[int, _OptimizerState] = {}
        self._one = torch.ones((), device=device)
        self._derive()

    # Rebuilt, not copied, by a pickle or a deep copy: views into the state tensor (a pickle would copy them
    # apart from it) and caches that refer to other objects by identity.
    _DERIVED = ("_scale", "_inv_scale", "_clippers", "_deferred", "_checked_clippers")

    def _derive(self) -> None:
        self._scale, self._inv_scale = self._scale_state[SCALE], self._scale_state[INV_SCALE]
        self._clippers: dict[int, tuple[tuple, FusedClipper]] = {}
        self._deferred: "weakref.WeakSet" = weakref.WeakSet()  # optimizers holding a deferred scale
        self._checked_clippers: "weakref.WeakSet" = weakref.WeakSet()  # clippers whose parameters are not fp16

    def __getstate__(self) -> dict:
        # torch's rule and words: between the first unscale_/step of an iteration and its update() the scaler
        # holds that iteration's inf checks, keyed by the optimizers' identities, which a copy does not share.
        if self._enabled and self._states:
            raise AssertionError("A DynamicLossScaler instance may only be pickled at the beginning of an iteration, "
                                 "or at the end after scaler.update().")
        return {k: v for k, v in self.__dict__.items() if k not in self._DERIVED}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._derive()

    # ------------------------------------------------------------------------------------------ scaling
    def scale(self, outputs):
        """Multiply a loss (or a tensor, or an iterable of them) by the current scale."""
        if not self._enabled:
            return outputs
        self._scaled = True
        if isinstance(outputs, torch.Tensor):
            return outputs * self._scale.to(outputs.device, non_blocking=True)
        if isinstance(outputs, Iterable):
            scaled = [self.scale(o) for o in outputs]
            return type(outputs)(scaled) if isinstance(outputs, (list, tuple)) else scaled
        raise TypeError(f"outputs must be a Tensor or an iterable of Tensors, got {type(outputs).__name__}")

    @property
    def inv_scale(self) -> Optional[torch.Tensor]:
        """1 / scale as a 0-d float32 device tensor, kept up to date by :meth:`update` (None when nothing
        is scaled). Read it, do not write it."""
        if not self._enabled or not self._dynamic:
            return None
        return self._inv_scale

    @property
    def loss_scale(self) -> torch.Tensor:
        """The current scale as a 0-d float32 device tensor (no host sync); 1 when disabled, as
        :meth:`get_scale`. Read it, do not write it."""
        return self._scale if self._enabled else self._one

    # ------------------------------------------------------------------------------------------ per step
    def _state(self, optimizer) -> _OptimizerState:
        return self._states.setdefault(id(optimizer), _OptimizerState())

    def _check_ready(self, optimizer, what: str) -> _OptimizerState:
        state = self._state(optimizer)
        if state.stage in (_Stage.UNSCALED, _Stage.DEFERRED):
            raise RuntimeError(f"{what} has already been called on this optimizer since the last update()")
        if state.stage is _Stage.STEPPED:
            raise RuntimeError(f"{what} is being called after step() and before update()")
        return state

    @staticmethod
    def _grads(optimizer) -> list[torch.Tensor]:
        return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]

    def _agree(self, found_inf: torch.Tensor) -> torch.Tensor:
        """Gradients sharded by hand hold an inf on one rank only: one MAX all-reduce of one float over the
        ``process_group`` given, so that every rank skips (DTensor gradients agree in their own reduction).
        Nothing without a group, as under DDP, whose gradients are already averaged across ranks."""
        import torch.distributed as dist

        group = self._process_group
        if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
            return found_inf
        found_inf = found_inf.clone()
        dist.all_reduce(found_inf, op=dist.ReduceOp.MAX, group=group)
        return found_inf

    def _check_grads(self, optimizer, unscale_in_place: bool):
        """One read of the optimizer's gradients: (norm, found_inf) of the unscaled values, or (None, None)
        when there is no gradient; with ``unscale_in_place`` also one write of ``g * inv_scale``."""
        grads = self._grads(optimizer)
        if self._dynamic and any(g.dtype == torch.float16 for g in grads):
            raise ValueError("Attempting to unscale FP16 gradients.")  # torch's words: keep fp32 master weights
        shards = distributed.sharded(grads)
        if shards is not None:
            grads = shards.locals
        if not grads:
            return None, None
        inv = self.inv_scale
        per_tensor, norm, found_inf = ops.norm_pass(grads, inv, 2.0, backend=self._backend)
        if unscale_in_place and inv is not None:
            ops.scale_pass(grads, self._one, inv, backend=self._backend)
        if shards is not None:  # every rank skips together: one all-reduce per mesh dimension
            _, norm, found_inf = shards.reduce(per_tensor, found_inf, 2.0)
        return norm, self._agree(found_inf)

    def unscale_(self, optimizer) -> None:
        """Divide the optimizer's gradients by the scale in place and record inf/NaN (no host sync)."""
        if not self._enabled:
            return
        state = self._check_ready(optimizer, "unscale_()")
        state.grad_norm, state.found_inf = self._check_grads(optimizer, unscale_in_place=True)
        state.stage = _Stage.UNSCALED

    def unscale_and_clip_(
        self,
        optimizer,
        max_norm: Optional[float] = None,
        norm_type: float = 2.0,
        mode: str = "global",
        value_clip: Optional[float] = None,
        defer: Union[bool, str] = "auto",
        clipper=None,
    ) -> ClipStats:
        """Unscale, check and clip the optimizer's gradients in FusedClipper's fused passes.

        ``defer="auto"`` hands the coefficient and the scale to a fused torch optimizer (one read of the
        gradients in all) when it can: global mode, no value clip, ``optimizer`` fused. Per-group mode
        uses the optimizer's param groups. ``clipper`` (a FusedClipper or a GradientClipper) replaces the
        one built from the other arguments. Returns the :class:`ClipStats` (device tensors).

        Disabled (``enabled=False``, or "cuda" without CUDA), it clips and records nothing, as
        ``GradScaler(enabled=False)`` followed by ``clip_grad_norm_`` does: in place unless ``defer=True``.
        """
        state = self._check_ready(optimizer, "unscale_and_clip_()") if self._enabled else None
        if clipper is None:
            if max_norm is None:
                raise ValueError("unscale_and_clip_ needs max_norm (or a clipper)")
            clipper = self._clipper_for(optimizer, max_norm, norm_type, mode, value_clip)
        if self._enabled and self._dynamic and clipper not in self._checked_clippers:  # once per clipper
            if any(p.dtype == torch.float16 for p in clipper.params):
                raise ValueError("Attempting to unscale FP16 gradients.")  # torch's words: keep fp32 master weights
            self._checked_clippers.add(clipper)
        deferrable = clipper.can_defer_to(optimizer)
        if defer is True and not deferrable:
            raise ValueError("defer=True needs a fused torch optimizer, mode='global' and no value_clip")
        if defer == "auto":
            # Not into an optimizer that step() hands the scaler to (torch's grad_scaler keyword): it unscales
            # through the scaler and need not read grad_scale.
            use_defer = deferrable and self._enabled and not _takes_grad_scaler(optimizer)
        else:
            use_defer = bool(defer)
        if not self._enabled:
            return clipper.clip_(None, defer_to=optimizer if use_defer else None)
        stats = clipper.clip_(self.inv_scale, defer_to=optimizer if use_defer else None)
        stats.found_inf = self._agree(stats.found_inf)
        if use_defer:
            optimizer.found_inf = stats.found_inf
            self._deferred.add(optimizer)
        if len(stats.per_tensor_norms):  # no gradient: nothing recorded, and step() raises as torch's does
            state.found_inf, state.grad_norm = stats.found_inf, stats.total_norm
        state.stage = _Stage.DEFERRED if use_defer else _Stage.UNSCALED
        return stats

    def _clipper_for(self, optimizer, max_norm, norm_type, mode, value_clip) -> FusedClipper:
        # The clipper is rebuilt when the optimizer's parameter lists change (add_param_group, a new list);
        # the key costs one tuple per group, not one per parameter.
        key = (tuple((id(g["params"]), len(g["params"])) for g in optimizer.param_groups), norm_type, mode,
               value_clip)
        cached = self._clippers.get(id(optimizer))
        if cached is None or cached[0] != key:
            clipper = FusedClipper(optimizer.param_groups, max_norm, norm_type, mode=mode, value_clip=value_clip,
                                   backend=self._backend)
            self._clippers[id(optimizer)] = (key, clipper)
            return clipper
        cached[1].max_norm = max_norm
        return cached[1]

    def step(self, optimizer, *args, **kwargs):
        """``optimizer.step()`` unless the gradients held inf/NaN; the skip is decided on the device for
        fused torch optimizers (no sync) and with one host sync otherwise. An optimizer with
        ``_step_supports_amp_scaling`` whose ``step`` takes ``grad_scaler`` is handed this scaler and left to
        unscale and skip through it, as torch's GradScaler does (with its FutureWarning)."""
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        state = self._state(optimizer)
        if state.stage is _Stage.STEPPED:
            raise RuntimeError("step() has already been called since the last update()")
        if not self._scaled and self._dynamic:
            raise RuntimeError("step() called before scale(): scale the loss with scaler.scale(loss) first")
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            if _takes_grad_scaler(optimizer):  # torch's older contract: the optimizer gets the scaler itself
                warnings.warn(GRAD_SCALER_WARNING, FutureWarning, stacklevel=2)
                result = optimizer.step(*args, **{**kwargs, "grad_scaler": self})
            else:
                result = self._fused_step(optimizer, state, args, kwargs)
        else:
            if state.stage is _Stage.READY:
                self.unscale_(optimizer)
            _check_recorded(state)
            result = optimizer.step(*args, **kwargs) if state.found_inf.item() == 0 else None  # the one sync
        state.stage = _Stage.STEPPED
        return result

    def _fused_step(self, optimizer, state, args, kwargs):
        if state.stage is not _Stage.DEFERRED:  # this step's attributes replace what another clip deferred
            drop_deferred_scale(optimizer)
        if state.stage is _Stage.READY:
            # One read for found_inf; the gradients stay scaled and the optimizer divides by grad_scale.
            state.grad_norm, state.found_inf = self._check_grads(optimizer, unscale_in_place=False)
            if self._dynamic:
                optimizer.grad_scale = self._scale
        _check_recorded(state)
        if state.stage is _Stage.DEFERRED:  # the clipper set grad_scale and found_inf, and drops them
            return optimizer.step(*args, **kwargs)
        optimizer.found_inf = state.found_inf
        try:
            return optimizer.step(*args, **kwargs)
        finally:
            drop_deferred_scale(optimizer)

    def update(self, new_scale: Optional[Union[float, torch.Tensor]] = None) -> None:
        """Back off on overflow, grow after ``growth_interval`` clean steps; one device op, no host sync."""
        if not self._enabled:
            return
        recorded = [s for s in self._states.values() if s.found_inf is not None]
        found = None
        if new_scale is not None:
            if isinstance(new_scale, torch.Tensor):
                if new_scale.numel() != 1 or new_scale.requires_grad:
                    raise ValueError("new_scale must be a float or a 1-element tensor without grad")
                self._scale.copy_(new_scale.reshape(()))
            else:
                _check_positive(new_scale, "new_scale")
                self._scale.fill_(float(new_scale))
        elif not recorded:
            raise RuntimeError("update() found no inf/NaN checks: call step() (or unscale_) first")
        elif len(recorded) == 1:
            found = recorded[0].found_inf
        else:
            found = torch.stack([s.found_inf.to(self._device, torch.float32) for s in recorded]).amax()
        norms = [s.grad_norm for s in recorded if s.grad_norm is not None]
        for optimizer in self._deferred:  # a deferred clip whose step never came must not outlive its update
            drop_deferred_scale(optimizer)
        self._deferred.clear()
        ops.scaler_update(self._scale_state, self._history, found, norms[0] if norms else None,
                          self._steps % self._history_size, self._growth_factor, self._backoff_factor,
                          self._growth_interval, self._hysteresis, self._min_scale, self._max_scale, self._dynamic,
                          backend=self._backend)
        self._steps += 1
        self._states.clear()
        self._scaled = False

    # ------------------------------------------------------------------------------------------ inspection
    def history(self) -> dict[str, torch.Tensor]:
        """The last ``history_size`` updates, oldest first: ``scale`` (after the update), ``found_inf`` and
        ``grad_norm`` (NaN when not measured), and ``step`` numbers. CPU tensors; one sync."""
        n = min(self._steps, self._history_size)
        start = self._steps - n
        order = [(start + i) % self._history_size for i in range(n)]
        rows = self._history[:, order].cpu()
        out = dict(zip(HISTORY_ROWS, rows.unbind()))
        out["step"] = torch.arange(start, self._steps)
        return out

    def get_scale(self) -> float:
        """The current scale as a Python float (one sync); 1.0 when disabled, like torch."""
        return self._scale.item() if self._enabled else 1.0

    def is_enabled(self) -> bool:
        return self._enabled

    def get_growth_factor(self) -> float:
        return self._growth_factor

    def set_growth_factor(self, new_factor: float) -> None:
        _check_settings(1.0, new_factor, self._backoff_factor, self._growth_interval, self._hysteresis,
                        self._min_scale, self._max_scale)
        self._growth_factor = float(new_factor)

    def get_backoff_factor(self) -> float:
        return self._backoff_factor

    def set_backoff_factor(self, new_factor: float) -> None:
        _check_settings(1.0, self._growth_factor, new_factor, self._growth_interval, self._hysteresis,
                        self._min_scale, self._max_scale)
        self._backoff_factor = float(new_factor)

    def get_growth_interval(self) -> int:
        return self._growth_interval

    def set_growth_interval(self, new_interval: int) -> None:
        _check_settings(1.0, self._growth_factor, self._backoff_factor, new_interval, self._hysteresis,
                        self._min_scale, self._max_scale)
        self._growth_interval = int(new_interval)

    def get_hysteresis(self) -> int:
        return self._hysteresis

    # ------------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything needed to continue bit for bit (torch's five keys plus ours); empty when disabled.
        One host sync."""
        if not self._enabled:
            return {}
        scale, _, growth, hysteresis = self._scale_state.tolist()
        return {
            "scale": scale,
            "growth_factor": self._growth_factor,
            "backoff_factor": self._backoff_factor,
            "growth_interval": self._growth_interval,
            "_growth_tracker": int(growth),
            "hysteresis": self._hysteresis,
            "_hysteresis_tracker": int(hysteresis),
            "min_scale": self._min_scale,
            "max_scale": self._max_scale,
            "_steps": self._steps,
            "history": {name: row.cpu().clone() for name, row in zip(HISTORY_ROWS, self._history.unbind())},
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state from :meth:`state_dict` (or from ``torch.amp.GradScaler.state_dict()``). Every value
        is checked as the constructor checks it before anything is assigned."""
        if not self._enabled:
            return
        if not state_dict:
            raise RuntimeError("the state_dict is empty: it was saved from a disabled scaler")
        scale = float(state_dict["scale"])
        growth_factor = float(state_dict["growth_factor"])
        backoff_factor = float(state_dict["backoff_factor"])
        growth_interval = state_dict["growth_interval"]
        hysteresis = state_dict.get("hysteresis", self._hysteresis)
        min_scale = float(state_dict.get("min_scale", self._min_scale))
        max_scale = float(state_dict.get("max_scale", self._max_scale))
        _check_settings(scale, growth_factor, backoff_factor, growth_interval, hysteresis, min_scale, max_scale)
        growth_tracker = min(_checked_count(state_dict["_growth_tracker"], "_growth_tracker", 0, limit=None),
                             MAX_COUNT)
        hysteresis_tracker = _checked_count(state_dict.get("_hysteresis_tracker", hysteresis),
                                            "_hysteresis_tracker", 1)
        steps = _checked_count(state_dict.get("_steps", 0), "_steps", 0, limit=None)
        history = state_dict.get("history")
        if history is not None:
            if set(history) != set(HISTORY_ROWS):
                raise ValueError(f"history must hold {HISTORY_ROWS}, got {sorted(history)}")
            if any(len(v) != self._history_size for v in history.values()):
                raise ValueError(f"history_size differs: saved {len(history['scale'])}, here {self._history_size}")
        # everything checked: assign
        self._growth_factor, self._backoff_factor = growth_factor, backoff_factor
        self._growth_interval, self._hysteresis = int(growth_interval), int(hysteresis)
        self._min_scale, self._max_scale = min_scale, max_scale
        self._steps = steps
        state = torch.tensor([scale, 0.0, growth_tracker, hysteresis_tracker], dtype=torch.float32)
        state[INV_SCALE] = state[SCALE].double().reciprocal().float()
        self._scale_state.copy_(state)
        if history is not None:
            self._history.copy_(torch.stack([torch.as_tensor(history[name]) for name in HISTORY_ROWS]))


# torch's words, so that a warnings filter written for GradScaler's applies to this one too
GRAD_SCALER_WARNING = (
    "GradScaler is going to stop passing itself as a keyword argument to the passed optimizer. In the near future "
    "GradScaler registers `grad_scale: Tensor` and `found_inf: Tensor` to the passed optimizer and let the "
    "optimizer use them directly.")


def _takes_grad_scaler(optimizer) -> bool:
    return "grad_scaler" in inspect.signature(optimizer.step).parameters


def _check_recorded(state: _OptimizerState) -> None:
    if state.found_inf is None:
        raise AssertionError("No inf checks were recorded for this optimizer.")  # torch's words: no gradient


def _check_positive(value, name: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _checked_count(value, name: str, least: int, limit: Optional[int] = MAX_COUNT) -> int:
    if isinstance(value, bool) or not float(value).is_integer() or value < least or (limit and value > limit):
        raise ValueError(f"{name} must be an integer >= {least}{f' and <= {limit}' if limit else ''}, got {value!r}")
    return int(value)


def _check_settings(scale, growth_factor, backoff_factor, growth_interval, hysteresis, min_scale, max_scale,
                    scale_name: str = "scale") -> None:
    """The constructor's checks, shared by load_state_dict and the setters: a clear error, nothing assigned.
    (The trackers count in float32: past 2^24 a count stops growing, which only matters for intervals
    longer than 16.7M steps, where it keeps the scale from growing, as such an interval intends.)"""
    _check_positive(scale, scale_name)
    if not isinstance(growth_factor, (int, float)) or not growth_factor > 1.0 or math.isinf(growth_factor):
        raise ValueError(f"growth_factor must be a finite number > 1, got {growth_factor!r}")
    if not isinstance(backoff_factor, (int, float)) or not 0.0 < backoff_factor < 1.0:
        raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor!r}")
    if not isinstance(growth_interval, int) or isinstance(growth_interval, bool) or growth_interval < 1:
        raise ValueError(f"growth_interval must be an int >= 1, got {growth_interval!r}")
    if not isinstance(hysteresis, int) or isinstance(hysteresis, bool) or not 1 <= hysteresis <= MAX_COUNT:
        raise ValueError(f"hysteresis must be an int in [1, 2^24], got {hysteresis!r}")
    if not (0.0 <= min_scale <= max_scale) or math.isnan(max_scale):
        raise ValueError(f"need 0 <= min_scale <= max_scale, got {min_scale} and {max_scale}")
