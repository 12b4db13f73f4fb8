"""FusedClipper: the per-step API. Unscale, inf/NaN check, norm (global, per tensor or per group) and clip
in as few passes as the math allows, with every statistic left on the device.

Bytes moved per step, N being the gradient bytes (see docs/clipper.md):

* in place: one read for the norms (pass 1), one read and write for the clip (pass 2): 3N. Pass 2 exits
  without touching memory when the coefficient is 1 and nothing is unscaled.
* deferred (``defer_to=optimizer``): pass 1 only, N. ``loss_scale / coef`` and ``found_inf`` go to a fused
  torch optimizer through ``optimizer.grad_scale`` / ``optimizer.found_inf``, the attributes torch's own
  GradScaler uses, and the optimizer applies them while it reads the gradients anyway.
* ``value_clip``: the clamp is applied inside both passes (after the inf/NaN check, before the norm), so it
  costs no extra pass.

What to clip to comes from a strategy (:mod:`ampclip.strategies`): a fixed norm bound by default, AutoClip,
ZClip, a value clamp, or one of your own. A step is three device ops (norm pass, clip_finalize, scale pass),
whatever the number of tensors, plus what the strategy's bound costs (ZClip: one small op). A strategy with
``own_passes`` (AGC: a bound per row of each parameter) runs the step's passes itself, through ``ops``.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import torch

from . import distributed, ops
from .overlap import Meter, Overlap
from .overlap import refusal as overlap_refusal
from .strategies import BoundOverride, ClipStep, ClipStrategy, NormClip, StepNorms

__all__ = ["ClipStats", "FusedClipper"]

MODES = tuple(ops.MODES)
NONFINITE_ACTIONS = ("leave", "zero")


@dataclass
class ClipStats:
    """What one clip saw, as device tensors: reading them costs no host sync until you ask.

    * ``total_norm``: 0-d, the norm of all unscaled gradients before clipping (after ``value_clip``).
    * ``clip_coef``: 0-d in global mode, one per gradient in per-tensor mode, one per group in per-group mode
      (the coefficient a norm needs; a step with found_inf set is not clipped but skipped).
    * ``post_clip_norm``: 0-d, the total norm after clipping.
    * ``found_inf``: 0-d float32, 1.0 when an unscaled gradient held inf or NaN.
    * ``per_tensor_norms``: one pre-clip norm per gradient that existed, in parameter order.
    * ``names``: the parameter names of those gradients, when names were given.
    * ``group_norms``: per-group pre-clip norms in per-group mode.
    * ``clamped``: 0-d float32, 1.0 when a value clamp moved an element (measured by ``GradientClipper`` with a
      value clamp; None otherwise).
    """

    total_norm: torch.Tensor
    clip_coef: torch.Tensor
    post_clip_norm: torch.Tensor
    found_inf: torch.Tensor
    per_tensor_norms: torch.Tensor
    names: Optional[list[str]] = None
    group_norms: Optional[torch.Tensor] = None
    clamped: Optional[torch.Tensor] = None

    def named_norms(self) -> dict[str, torch.Tensor]:
        """``{name: norm}`` (0-d device tensors); parameters are numbered when no names were given."""
        names = self.names or [str(i) for i in range(len(self.per_tensor_norms))]
        return dict(zip(names, self.per_tensor_norms.unbind()))

    def to_dict(self) -> dict:
        """Python floats for logging, fetched from the device with one sync."""
        scalars = torch.stack([self.total_norm.float(), self.post_clip_norm.float(), self.found_inf.float()])
        host = [t.detach().float().cpu() for t in (scalars, self.clip_coef.reshape(-1), self.per_tensor_norms)]
        total, post, found = host[0].tolist()
        coef = host[1].tolist()
        out = {
            "total_norm": total,
            "post_clip_norm": post,
            "found_inf": bool(found),
            "clip_coef": coef[0] if self.clip_coef.dim() == 0 else coef,
            "per_tensor_norms": dict(zip(self.names or range(len(self.per_tensor_norms)), host[2].tolist())),
        }
        if self.group_norms is not None:
            out["group_norms"] = self.group_norms.float().cpu().tolist()
        return out


@dataclass
class _FlatBuffers:
    """Flat-bucket mode: one contiguous gradient buffer per dtype, each .grad a view into it."""

    buffers: list[torch.Tensor]
    views: list[torch.Tensor]


class FusedClipper:
    """Fused gradient clipping for a fixed set of parameters.

    Args:
        parameters: parameters, ``named_parameters()`` pairs (names appear in the stats), or optimizer
            param groups (dicts with ``"params"``; they become the groups of per-group mode).
        max_norm: the norm bound, >= 0 (ignored when ``strategy`` is given).
        norm_type: any p > 0, or inf.
        mode: ``"global"`` (one norm over everything, like ``clip_grad_norm_``), ``"per_tensor"`` (each
            gradient clipped to its own norm) or ``"per_group"`` (one norm per group).
        groups: for per-group mode, a sequence of groups, each a sequence of parameters or names.
        value_clip: clamp every unscaled element to ``[-value_clip, value_clip]`` (or a ``(min, max)`` pair)
            before the norm clip; the inf/NaN check sees the values before the clamp.
        flatten: re-home every ``.grad`` as a view into one contiguous buffer per dtype; backward then
            accumulates into it and ``zero_grad`` is one fill (use ``zero_grad`` of this clipper or
            ``optimizer.zero_grad(set_to_none=False)`` to keep the views).
        backend: ``None``/"auto", "cpp", "triton", "cuda" or "reference" (see ``ampclip.backend()``).
        on_nonfinite: when a gradient holds inf/NaN, ``"leave"`` the gradients as they are (the step is
            to be skipped) or ``"zero"`` them.
        strategy: a :class:`ampclip.strategies.ClipStrategy` deciding the bound (its mode and value clamp
            replace ``max_norm``, ``mode`` and ``value_clip``).
        eps, coef_rule: the coefficient is ``min(1, max_norm / (norm + eps))`` (``coef_rule="torch"``, eps
            1e-6 as torch) or ``max_norm / max(norm + eps, max_norm)`` (``"max"``).
        overlap: measure the norms while backward runs (:mod:`ampclip.overlap`): ``True`` (post-accumulate-grad
            hooks, one norm pass per bucket of gradients; under FSDP2 on the reduced local shards), a
            ``DistributedDataParallel`` model (a comm hook measures the reduced buckets), or an
            :class:`ampclip.Overlap` with settings. ``clip_`` is then a finalize and the scale. Not with
            ``value_clip`` or AGC (ValueError). Wrap micro-batches that need no measuring in :meth:`no_measure`.

    Example::

        clipper = ampclip.FusedClipper(model.named_parameters(), max_norm=1.0)
        loss.backward()
        stats = clipper.clip_()                      # no host sync
        optimizer.step()
        if step % 100 == 0:
            print(stats.to_dict()["total_norm"])     # one sync, for logging
    """

    def __init__(
        self,
        parameters: Union[Iterable[torch.Tensor], Iterable[tuple[str, torch.Tensor]], Iterable[dict]],
        max_norm: float = 1.0,
        norm_type: float = 2.0,
        mode: str = "global",
        groups: Optional[Sequence[Sequence]] = None,
        value_clip=None,
        flatten: bool = False,
        backend: Optional[str] = None,
        on_nonfinite: str = "leave",
        strategy: Optional[ClipStrategy] = None,
        eps: float = ops.EPS,
        coef_rule: str = "torch",
        overlap=False,
    ):
        params, names, param_groups = _parse_parameters(parameters)
        if not params:
            raise ValueError("FusedClipper got no parameters")
        if on_nonfinite not in NONFINITE_ACTIONS:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE_ACTIONS}, got {on_nonfinite!r}")
        if coef_rule not in ops.RULES:
            raise ValueError(f"coef_rule must be one of {tuple(ops.RULES)}, got {coef_rule!r}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.strategy = strategy if strategy is not None else NormClip(max_norm, mode, value_clip)
        overlap = Overlap.of(overlap)
        refused = None if overlap is None else overlap_refusal(params, self.strategy, overlap)
        if refused is not None:
            raise refused
        devices = {p.device for p in params}
        if len(devices) != 1:
            raise ValueError(f"FusedClipper needs all parameters on one device, got {sorted(map(str, devices))}")
        self.device = devices.pop()
        self.backend = ops.resolve_backend(backend, self.device)
        self.params = params
        self.names = names
        self.norm_type = ops.check_norm_type(norm_type)
        self.on_nonfinite = on_nonfinite
        self.eps = float(eps)
        self.coef_rule = coef_rule
        self._group_of_param = _group_indices(self.mode, groups, param_groups, params, names)
        self.num_groups = 1 + max(self._group_of_param) if self._group_of_param else 0
        self._group_index_cache: dict[tuple, torch.Tensor] = {}
        self._hooked_optimizers: "weakref.WeakSet" = weakref.WeakSet()
        self._flat: Optional[_FlatBuffers] = self._flatten() if flatten else None
        self._one = torch.ones((), device=self.device)
        self.strategy.attach(self.params, self.names)
        self.strategy.bind(self.device)
        self._meter = None if overlap is None else Meter(params, self.norm_type, self.backend, overlap)

    # The strategy's settings, read and set through the clipper.
    @property
    def mode(self) -> str:
        return self.strategy.mode

    @property
    def max_norm(self) -> float:
        return self.strategy.max_norm

    @max_norm.setter
    def max_norm(self, value: float) -> None:
        self.strategy.max_norm = ops.check_bound(value, "max_norm")

    @property
    def value_clip(self) -> Optional[tuple[float, float]]:
        return self.strategy.value_clip

    # ----------------------------------------------------------------------------------------------------
    def _flatten(self) -> _FlatBuffers:
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, p in enumerate(self.params):
            by_dtype.setdefault(p.dtype, []).append(i)
        buffers, views = [], [None] * len(self.params)
        for dtype, indices in by_dtype.items():
            buffer = torch.zeros(sum(self.params[i].numel() for i in indices), dtype=dtype, device=self.device)
            offset = 0
            for i in indices:
                p = self.params[i]
                view = buffer[offset : offset + p.numel()].view_as(p)
                if p.grad is not None:
                    view.copy_(p.grad)
                p.grad = view
                views[i] = view
                offset += p.numel()
            buffers.append(buffer)
        return _FlatBuffers(buffers, views)

    def _flat_intact(self) -> bool:
        return all(p.grad is v for p, v in zip(self.params, self._flat.views))

    def zero_grad(self) -> None:
        """Zero the gradients: one fill per buffer in flat mode, else ``.grad = None`` like torch."""
        if self._flat is not None and self._flat_intact():
            for buffer in self._flat.buffers:
                buffer.zero_()
            return
        for p in self.params:
            p.grad = None

    def no_measure(self):
        """A context for backward passes whose gradients the next clip does not need measured as they stand:
        gradient accumulation's micro-batches but the last (DDP's ``no_sync`` implies it). With ``overlap``
        off it does nothing.

        Example::

            for i, batch in enumerate(micro_batches):
                with clipper.no_measure() if i < len(micro_batches) - 1 else contextlib.nullcontext():
                    model(batch).loss.backward()
            clipper.clip_()
        """
        return contextlib.nullcontext() if self._meter is None else self._meter.paused()

    # ----------------------------------------------------------------------------------------------------
    def _group_index(self, indices: Optional[list[int]]) -> torch.Tensor:
        key = None if indices is None else tuple(indices)
        cached = self._group_index_cache.get(key)
        if cached is None:
            chosen = self._group_of_param if indices is None else [self._group_of_param[i] for i in indices]
            cached = torch.tensor(chosen, dtype=torch.int64, device=self.device)
            self._group_index_cache = {key: cached}  # the present set rarely changes: keep one entry
        return cached

    def _inv_scale(self, inv_scale) -> Optional[torch.Tensor]:
        if inv_scale is None:
            return None
        if not isinstance(inv_scale, torch.Tensor):
            tensor = getattr(inv_scale, "inv_scale", None)  # a DynamicLossScaler
            if callable(tensor):
                tensor = tensor()
            if tensor is None and hasattr(inv_scale, "inv_scale"):
                return None  # a scaler that scales nothing (bf16, fp32, disabled)
            if not isinstance(tensor, torch.Tensor):
                raise TypeError("inv_scale must be None, a device tensor or an ampclip DynamicLossScaler")
            inv_scale = tensor
        if inv_scale.numel() != 1:
            raise ValueError(f"inv_scale must hold one element, got {inv_scale.numel()}")
        # free to read on the CPU (not while traced: a compiled graph takes it as it comes)
        if inv_scale.device.type == "cpu" and not torch.compiler.is_compiling() and not float(inv_scale) > 0:
            raise ValueError(f"inv_scale must be > 0 (a negative one would flip the gradients), got "
                             f"{float(inv_scale)}")
        if inv_scale.device != self.device or inv_scale.dtype != torch.float32:
            inv_scale = inv_scale.to(self.device, torch.float32, non_blocking=True)
        return inv_scale.reshape(())

    def can_defer_to(self, optimizer) -> bool:
        """Whether :meth:`clip_` can hand its coefficient to ``optimizer`` instead of rewriting the
        gradients: a fused torch optimizer (it reads ``grad_scale`` and ``found_inf``), global mode, no
        value clamp, a strategy that bounds the global norm (not one with passes of its own, such as AGC)."""
        return (getattr(optimizer, "_step_supports_amp_scaling", False) and self.mode == "global"
                and self.value_clip is None and not self.strategy.own_passes)

    # ----------------------------------------------------------------------------------------------------
    def clip_(self, inv_scale=None, defer_to: Optional[torch.optim.Optimizer] = None,
              max_norm: BoundOverride = None) -> ClipStats:
        """Unscale (when ``inv_scale`` is given), check, measure and clip the gradients.

        ``inv_scale`` is a device tensor (1 / loss scale) or an ampclip ``DynamicLossScaler``. With
        ``defer_to=optimizer`` (a fused torch Adam, AdamW or SGD) the gradients are not rewritten: the
        optimizer gets ``grad_scale = 1 / (inv_scale * coef)`` and ``found_inf`` and applies them in its
        own read of the gradients (global mode, no ``value_clip``). They are for the next step on these
        gradients only: removed after it, and before a step on other gradients.

        ``max_norm`` overrides the strategy's bound for this call: a number, a device tensor, or a function
        of the pre-clip total norm returning one.

        DTensor gradients (FSDP2) are measured on their local shards and reduced with one all-reduce per mesh
        dimension, so every rank gets the global norms and the same ``found_inf``.

        Returns :class:`ClipStats` of device tensors. No host sync on CUDA.
        """
        inv = self._inv_scale(inv_scale)
        for optimizer in self._hooked_optimizers:  # a deferred clip whose step never came is void now
            drop_deferred_scale(optimizer)
        if defer_to is not None:
            self._check_deferrable(defer_to)
        if self._meter is None and self._flat is None and not self.strategy.own_passes:
            steady = self._steady_clip(inv, max_norm, defer_to)
            if steady is not None:
                return steady
        indices, grads = ops.present_grads(self.params)
        if self.strategy.own_passes:
            return self._clip_by_strategy(inv, indices, grads, max_norm)
        if not grads:
            return self._no_gradients()
        clamp = self.value_clip
        measured = None if self._meter is None or clamp is not None else self._meter.take(indices, grads, inv,
                                                                                             self.norm_type)
        shards = distributed.sharded(grads)
        if shards is not None:
            grads = shards.locals
        known = self._known_bound(max_norm) if measured is None and shards is None else None
        grad_scale = None
        if known is not None:  # the bound is known before the norms: one pass measures and finds the coefficient
            per_tensor, total, found_inf, coef, post, grad_scale = ops.clip_norm_pass(
                grads, inv, self.norm_type, clamp, known, self.mode, self.eps, self.coef_rule, backend=self.backend)
            group_coef = group_norms = None
        else:
            if measured is None:
                per_tensor, total, found_inf = ops.norm_pass(grads, inv, self.norm_type, clamp, backend=self.backend)
            else:  # measured during backward: only the finalize and the scale are left
                per_tensor, total, found_inf = measured
            if shards is not None:
                per_tensor, total, found_inf = shards.reduce(per_tensor, found_inf, self.norm_type)
            if max_norm is None:
                bound = self.strategy.bound(StepNorms(total, per_tensor, found_inf, self.backend))
            else:
                bound = _checked_override(max_norm(total) if callable(max_norm) else max_norm)
            group_index = self._group_index(indices) if self.mode == "per_group" else None
            coef, group_coef, group_norms, post = ops.clip_finalize(
                per_tensor, total, bound, self.mode, group_index, self.num_groups, self.norm_type, self.eps,
                self.coef_rule, backend=self.backend)
        zero_if_inf = self.on_nonfinite == "zero"
        if defer_to is not None:
            if zero_if_inf:  # coefficient 1: nothing is written unless found_inf is set
                ops.scale_pass(grads, self._one, None, None, found_inf, True, backend=self.backend)
            if grad_scale is None:
                grad_scale = (coef if inv is None else inv * coef).reciprocal()
            _defer(defer_to, grad_scale, found_inf, self.params[0 if indices is None else indices[0]])
        else:
            targets = grads
            if self._flat is not None and coef.dim() == 0 and indices is None and self._flat_intact():
                targets = self._flat.buffers  # one contiguous tensor per dtype: one sweep each
            ops.scale_pass(targets, coef, inv, clamp, found_inf, zero_if_inf, backend=self.backend)
        reported = group_coef if self.mode == "per_group" else coef
        return ClipStats(total, reported, post, found_inf, per_tensor, self._present_names(indices),
                         group_norms if self.mode == "per_group" else None)

    def _steady_clip(self, inv, max_norm: BoundOverride, defer_to) -> Optional[ClipStats]:
        """The clip of the same gradients' table as the last clip's, the bound known: ``ops.steady_clip``, two
        launches (one deferred) and a few ns a gradient of host time (None when it does not apply)."""
        known = self._known_bound(max_norm)
        zero_if_inf = self.on_nonfinite == "zero"
        if known is None or (defer_to is not None and zero_if_inf):  # a deferred zeroing writes: the general path
            return None
        done = ops.steady_clip(self.params, inv, self.norm_type, self.value_clip, known, self.mode, self.eps,
                               self.coef_rule, zero_if_inf, self.backend, write=defer_to is None)
        if done is None:
            return None
        per_tensor, total, found_inf, coef, post, grad_scale = done
        if defer_to is not None:
            _defer(defer_to, grad_scale, found_inf, self.params[0])
        return ClipStats(total, coef, post, found_inf, per_tensor, self.names)

    def _known_bound(self, max_norm: BoundOverride) -> Optional[float]:
        """The step's bound as a number when it is known before the norms (the strategy's fixed bound, or a
        number given for this call) and the backend computes this mode's coefficient in its norm pass, one
        launch (``ops.fuses_coefficient``); else None."""
        if not ops.fuses_coefficient(self.backend, self.mode):
            return None
        if max_norm is None:
            return self.strategy.fixed_bound()
        if isinstance(max_norm, (int, float)) and not isinstance(max_norm, bool):
            return ops.check_bound(max_norm, "max_norm")
        return None

    def _clip_by_strategy(self, inv, indices, grads, max_norm) -> ClipStats:
        """The step of a strategy that runs its own passes (``strategy.own_passes``, e.g. AGC)."""
        if max_norm is not None:
            raise ValueError(f"strategy {self.strategy.name!r} has no single bound to override: max_norm must be None")
        if distributed.sharded(grads) is not None:
            raise NotImplementedError(f"strategy {self.strategy.name!r} does not take sharded (DTensor) gradients")
        if not grads:
            return self._no_gradients()
        params = self.params if indices is None else [self.params[i] for i in indices]
        result = self.strategy.clip(ClipStep(params, grads, indices, inv, self.norm_type,
                                             self.on_nonfinite == "zero", self.backend))
        return ClipStats(result.total, result.clip_coef, result.post_clip_norm, result.found_inf, result.per_tensor,
                         self._present_names(indices))

    def _no_gradients(self) -> ClipStats:
        zero = torch.zeros((), device=self.device)
        return ClipStats(zero, torch.ones((), device=self.device), zero, zero.clone(), zero.new_zeros(0), [])

    def _present_names(self, indices: Optional[list[int]]) -> Optional[list[str]]:
        """The names of the parameters that have gradients (``indices``: None when all have one)."""
        if self.names is None or indices is None:
            return self.names
        return [self.names[i] for i in indices]

    def _check_deferrable(self, optimizer) -> None:
        if not getattr(optimizer, "_step_supports_amp_scaling", False):
            raise TypeError(
                "defer_to needs a fused torch optimizer (Adam, AdamW or SGD with fused=True) that reads "
                f"optimizer.grad_scale and optimizer.found_inf; got {type(optimizer).__name__}"
            )
        if not self.can_defer_to(optimizer):
            raise ValueError("deferred clipping folds one coefficient into the optimizer: use mode='global', "
                             "no value_clip and a strategy that bounds the global norm, not one with passes of its "
                             "own (AGC)")
        if optimizer not in self._hooked_optimizers:
            # The optimizer reads these attributes in every step: remove them before a step on other gradients
            # and after the step they belong to.
            optimizer.register_step_pre_hook(_drop_stale_deferred_scale)
            optimizer.register_step_post_hook(_drop_after_step)
            self._hooked_optimizers.add(optimizer)

    # A copy (pickle, deepcopy) has deferred to no optimizer yet; the set of weak references cannot be pickled.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_hooked_optimizers"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._hooked_optimizers = weakref.WeakSet()

    def state_dict(self) -> dict:
        return {**self.strategy.state_dict(), "norm_type": self.norm_type}

    def load_state_dict(self, state: dict) -> None:
        norm_type = ops.check_norm_type(state.get("norm_type", self.norm_type))
        self.strategy.load_state_dict(state)
        self.norm_type = norm_type


def drop_deferred_scale(optimizer) -> None:
    """Removes what a deferred clip handed to ``optimizer`` (``grad_scale``, ``found_inf``): after the step it
    was for, or when that step never came, so that a later plain ``step()`` does not apply a stale scale."""
    for name in ("grad_scale", "found_inf", _DEFERRED_FOR):
        if hasattr(optimizer, name):
            delattr(optimizer, name)


_DEFERRED_FOR = "_ampclip_deferred_for"  # the optimizer attribute holding the _GradientMark of a deferred clip


def _defer(optimizer, grad_scale: torch.Tensor, found_inf: torch.Tensor, first: torch.Tensor) -> None:
    """Hands a clip's ``grad_scale`` and ``found_inf`` to a fused optimizer's next step, marked with the gradient
    of ``first`` (the first parameter that has one) as it is now, after the clip's own writes: any later change
    to the gradients voids the scale."""
    optimizer.grad_scale = grad_scale
    optimizer.found_inf = found_inf
    setattr(optimizer, _DEFERRED_FOR, _GradientMark(first))


class _GradientMark:
    """Which gradients a deferred scale was computed from, checked in O(1): the first gradient's identity and
    version counter. Another backward (a new tensor, or accumulation into the old one), ``zero_grad`` or any
    in-place write changes one of them. The gradient is held weakly: a dropped one is new gradients too."""

    __slots__ = ("param", "grad", "version")

    def __init__(self, param: torch.Tensor):
        self.param, self.grad, self.version = param, weakref.ref(param.grad), param.grad._version

    def holds(self) -> bool:
        grad = self.param.grad
        return grad is not None and grad is self.grad() and grad._version == self.version


def _drop_stale_deferred_scale(optimizer, args, kwargs) -> None:
    """Step pre-hook: a deferred clip whose step never came must not scale a step on new gradients."""
    mark = getattr(optimizer, _DEFERRED_FOR, None)
    if mark is not None and not mark.holds():
        drop_deferred_scale(optimizer)


def _drop_after_step(optimizer, args, kwargs) -> None:
    """Step post-hook: the deferred scale was for this step only."""
    drop_deferred_scale(optimizer)


def _checked_override(bound):
    """A per-call bound: a number must be >= 0 (a negative one would flip the gradients); a CPU tensor is
    checked too (reading it costs nothing); a device tensor cannot be read without a host sync and is
    taken as it is."""
    if isinstance(bound, torch.Tensor):
        if bound.numel() != 1:
            raise ValueError(f"max_norm must be a number or a one-element tensor, got {tuple(bound.shape)}")
        if bound.device.type == "cpu":
            ops.check_bound(bound, "max_norm")
        return bound
    return ops.check_bound(bound, "max_norm")


def _parse_parameters(parameters):
    items = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    if items and isinstance(items[0], dict):
        param_groups = [list(group["params"]) for group in items]
        params = [p for group in param_groups for p in group]
        return _dedupe(params), None, param_groups
    if items and isinstance(items[0], tuple):
        names, params = zip(*items)
        return list(params), list(names), None
    for p in items:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"parameters must be Tensors, (name, Tensor) pairs or param groups; got {type(p)}")
    return _dedupe(items), None, None


def _dedupe(params):
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _group_indices(mode, groups, param_groups, params, names) -> list[int]:
    """Group number of every parameter (all 0 unless per-group mode)."""
    if mode != "per_group":
        if groups is not None:
            raise ValueError("groups are only used with mode='per_group'")
        return [0] * len(params)
    groups = groups if groups is not None else param_groups
    if groups is None:
        raise ValueError("mode='per_group' needs groups=[[params or names], ...] or optimizer param groups")
    position = {id(p): i for i, p in enumerate(params)}
    by_name = {n: i for i, n in enumerate(names)} if names else {}
    group_of = [-1] * len(params)
    for g, members in enumerate(groups):
        for member in members:
            i = by_name.get(member) if isinstance(member, str) else position.get(id(member))
            if i is None:
                raise ValueError(f"group {g} holds {member!r}, which is not one of the clipper's parameters")
            if group_of[i] != -1:
                raise ValueError(f"parameter {member if isinstance(member, str) else i} is in two groups")
            group_of[i] = g
    missing = [names[i] if names else i for i, g in enumerate(group_of) if g == -1]
    if missing:
        raise ValueError(f"parameters in no group: {missing[:5]}{'...' if len(missing) > 5 else ''}")
    return group_of
