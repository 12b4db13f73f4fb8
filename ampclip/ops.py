"""The op contract, and the only way from the public layer down to a kernel.

Checks, the clip coefficient, the combination of norms, the gathering of gradients and the choice of
backend live here once; the public layer (``functional``, ``clipper``, ``scaler``, ``clipping``, ``trainer``,
``distributed``) calls these functions and nothing below them.

Two gradient passes cover every clip, scale and check ampclip does:

``ampclip::norm_pass(Tensor[] grads, Tensor? inv_scale, float norm_type, float[]? clamp, str backend)
    -> (Tensor per_tensor_norms, Tensor total_norm, Tensor found_inf)``
    One read of every gradient. Each element is unscaled on the fly (``u = g * inv_scale``, ``inv_scale`` a
    device tensor) and checked: ``found_inf`` (0-d float32) is 1.0 exactly when some u is inf or NaN. Then
    ``u`` is clamped to ``clamp = [lo, hi]`` when given (the check sees u before the clamp, so a clamp never
    hides an overflow) and accumulated in float32 (float64 when any gradient is float64). ``per_tensor_norms``
    has one entry per gradient; ``total_norm`` is 0-d; both are float32, or float64 when any gradient is
    float64, and right whenever they are representable (a float32 sum of squares that overflows is taken
    again in float64). norm_type is any p > 0 or inf.

``ampclip::clip_norm_pass(Tensor[] grads, Tensor? inv_scale, float norm_type, float[]? clamp, float max_norm,
    int mode, float eps, int rule, str backend) -> (per_tensor, total, found_inf, coef, post_clip_norm, grad_scale)``
    ``norm_pass`` followed by ``clip_finalize`` (global or per-tensor mode, a number as the bound), and
    ``grad_scale = 1 / (inv_scale * coef)``, what a fused optimizer divides the gradients by: on a GPU one launch,
    whose last program computes the coefficient, so that a clip is two launches with the scale pass.

``ampclip::scale_pass(Tensor(a!)[] grads, Tensor coef, Tensor? inv_scale, float[]? clamp, Tensor? found_inf,
    bool zero_if_inf, str backend) -> ()``
    In place ``g <- clamp(g * inv_scale, lo, hi) * coef``. ``coef`` is a device tensor, 0-d or one entry
    per gradient. When ``found_inf`` is non-zero the gradients are zeroed (``zero_if_inf``) or left
    untouched. Backends skip the write when the coefficient is 1 and there is neither unscale nor clamp.
    Gradients that share memory are scaled one after the other, as torch's per-tensor ``mul_`` does.

Three small ops do a step's bookkeeping on the device, in one call each whatever the number of tensors:

``ampclip::clip_finalize(per_tensor, total, max_norm, max_norm_tensor?, mode, group_index?, num_groups,
    norm_type, eps, rule, backend) -> (coef, group_coef, group_norms, post_clip_norm)``
    The clip coefficient of the global norm (mode 0, ``coef`` 0-d), of each tensor (mode 1) or of each
    group (mode 2: ``group_norms``, ``group_coef`` per group, ``coef`` per tensor), and the norm after
    clipping. rule 0 is torch's ``min(1, max_norm / (norm + eps))``, rounded as torch rounds it; rule 1 is
    ``max_norm / max(norm + eps, max_norm)``.
``ampclip::scaler_update(Tensor(a!) state, Tensor(b!) history, ...)``: one dynamic loss-scale update
    (backoff, growth, hysteresis, bounds) and its history entry.
``ampclip::clip_stats_update(Tensor(a!) counters, Tensor(b!)? layer_stats, ...)``: clipped and skipped counts
    and per-layer norm statistics.

Unit-wise passes (adaptive gradient clipping, AGC) and ZClip's bound, in one call each:

``ampclip::unit_norm_pass(Tensor[] tensors, Tensor? inv_scale, float norm_type, str backend)
    -> (Tensor unit_norms, Tensor per_tensor_norms, Tensor total_norm, Tensor found_inf)``
    :func:`norm_pass` per unit: a tensor's units are its rows along dim 0 when it has more than one
    dimension, else the whole tensor (:func:`unit_count`). One read of every tensor; ``unit_norms`` holds the
    units of every tensor in order.
``ampclip::unit_scale_pass(Tensor(a!)[] grads, Tensor unit_coef, Tensor? inv_scale, Tensor? found_inf,
    bool zero_if_inf, str backend) -> ()``
    In place ``unit <- unit * inv_scale * unit_coef[unit]``; found_inf as in ``scale_pass``. Units whose
    coefficient is 1 with nothing to unscale may be skipped.
``ampclip::unit_clip_finalize(param_norms, grad_norms, clip_factor, eps, norm_type, backend)
    -> (coef, post_clip_norm)``: AGC's coefficient of every unit (see ``reference.unit_clip_finalize``).
``ampclip::zclip_update(Tensor(a!) state, Tensor(b!) warmup, total, found_inf, alpha, z_thresh, max_grad_norm,
    eps, rule, clip_factor, skip_update_on_spike, backend) -> Tensor bound``: one ZClip step (see
    ``reference.zclip_update``).

Every op is a ``torch.library`` custom op with a fake, so it traces under ``torch.compile(fullgraph=True)``
and a dispatch mode sees it as one op. In eager mode the functions below call the chosen backend's adapter
directly (custom-op boxing costs about 0.5 us per tensor, more than the clip itself on 10,000 tiny
gradients); an adapter that cannot take its input directly (tensor subclasses, dispatch modes) answers
``NotImplemented`` and the registered op runs instead. A backend is an adapter in ``ampclip/backends/``.
"""

from __future__ import annotations

import math
import os
from typing import Iterable, Optional, Sequence, Union

import torch

from . import backends
from .backends import cpp as _cpp
from .backends import tensor_table
from .backends.tensor_table import to_device  # a host tensor to a GPU without a sync, for the layer above
from .contract import (  # the contract's fixed parts, re-exported: ampclip.ops.EPS and so on
    CLIPPED,
    EPS,
    GROWTH_TRACKER,
    HISTORY_ROWS,
    HYSTERESIS_TRACKER,
    INV_SCALE,
    LAYER_LAST,
    LAYER_MAX,
    LAYER_SUM,
    MODES,
    RULES,
    SCALE,
    SKIPPED,
    SUPPORTED_DTYPES,
    ZCLIP_COUNT,
    ZCLIP_MEAN,
    ZCLIP_READY,
    ZCLIP_RULES,
    ZCLIP_VAR,
    Clamp,
    accumulation_dtype,
    check_grads,
    combine_groups,
    combine_norms,
    unit_count,
)
from .errors import GradientValueError

__all__ = [
    "BACKENDS",
    "CLIPPED",
    "EPS",
    "GROWTH_TRACKER",
    "HISTORY_ROWS",
    "HYSTERESIS_TRACKER",
    "INV_SCALE",
    "LAYER_LAST",
    "LAYER_MAX",
    "LAYER_SUM",
    "MODES",
    "RULES",
    "SCALE",
    "SKIPPED",
    "SUPPORTED_DTYPES",
    "ZCLIP_COUNT",
    "ZCLIP_MEAN",
    "ZCLIP_READY",
    "ZCLIP_RULES",
    "ZCLIP_VAR",
    "accumulation_dtype",
    "as_list",
    "available_backends",
    "backend",
    "by_device",
    "check_backend",
    "check_bound",
    "check_clamp",
    "check_count",
    "check_grads",
    "check_norm_type",
    "check_saved",
    "clip_coef",
    "clip_finalize",
    "clip_grad_norm",
    "clip_norm_pass",
    "clip_parameters",
    "clip_stats_update",
    "dispatched",
    "combine_groups",
    "combine_norms",
    "fuses_coefficient",
    "gathered",
    "grads_of",
    "norm_pass",
    "present_grads",
    "raise_if_nonfinite",
    "resolve_backend",
    "runs_on",
    "scale_by",
    "scale_pass",
    "scaler_update",
    "steady_clip",
    "to_device",
    "total_norm",
    "unit_clip_finalize",
    "unit_count",
    "unit_norm_pass",
    "unit_scale_pass",
    "zclip_update",
]

BACKENDS = backends.NAMES
ENV_BACKEND = "AMPCLIP_BACKEND"  # forces a backend where the caller asks for none (to debug a patched run)

# --------------------------------------------------------------------------------------------------------
# the small ops' inputs


def _wide(norms):
    """A norm or coefficient tensor as the small ops take it: float32 or float64. A float16, bfloat16 or integer
    one (torch's ``get_total_norm`` returns a float16 total for float16 gradients) is taken in float32, which
    holds every float16 and bfloat16 value (and integers up to 2**24) exactly; a number or None passes
    through. Every backend then takes it, and the coefficient is computed in float32 as for a float32 norm."""
    if isinstance(norms, torch.Tensor) and norms.dtype not in (torch.float32, torch.float64):
        return norms.float()
    return norms


# --------------------------------------------------------------------------------------------------------
# checks: a clear error before anything is modified


def check_norm_type(norm_type, kernels: bool = True) -> float:
    """norm_type as a float: any p > 0 or inf for the kernels; with ``kernels=False`` (the drop-ins) also
    what torch computes: 0 (the count of non-zeros), negative p, -inf (the smallest |g|) and NaN (a NaN norm).

    The errors are torch's for the same argument: TypeError for what ``float()`` does not take (None),
    ValueError for a string that is not a number."""
    try:
        p = float(norm_type)
    except TypeError:
        raise TypeError(f"norm_type must be a number, got {type(norm_type).__name__}") from None
    except ValueError:
        raise ValueError(f"norm_type must be a number, got {norm_type!r}") from None
    if kernels and not p > 0:
        raise ValueError(f"norm_type must be a number > 0 or inf, got {norm_type!r}")
    return p


def check_bound(value, name: str) -> float:
    """max_norm or a clip value as a float >= 0 (inf allowed): a negative one would flip the gradients."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number, got a tensor of {value.numel()} elements")
        value = value.item()
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if math.isnan(v) or v < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r} (a negative bound would reverse the gradients)")
    return v


def check_clamp(value, name: str = "value_clip") -> Clamp:
    """A value clamp as ``(lo, hi)``: None, a number c >= 0 for ``[-c, c]``, or a pair with lo <= hi."""
    if value is None:
        return None
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be a number or a (min, max) pair, got {value!r}")
        lo, hi = (float(v) for v in value)
        if math.isnan(lo) or math.isnan(hi) or lo > hi:
            raise ValueError(f"{name} needs min <= max, got {value!r}")
        return lo, hi
    c = check_bound(value, name)
    return -c, c


def check_saved(value, shape: tuple, name: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A tensor (or nested list of numbers) from a state dict as a CPU ``dtype`` tensor of ``shape``, or a
    ValueError naming it: a ``load_state_dict`` checks every entry this way before it replaces any."""
    try:
        tensor = torch.as_tensor(value, dtype=dtype, device="cpu")
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"state_dict's {name} must be a tensor of shape {tuple(shape)}, got "
                         f"{type(value).__name__}") from None
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"state_dict's {name} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
    return tensor


def check_count(value, name: str) -> int:
    """A counter from a state dict (a step count) as an int >= 0, or a ValueError naming it."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"state_dict's {name} must be an int >= 0, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------------------
# gathering gradients


def as_list(tensors, what: str) -> list:
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    try:
        return list(tensors)  # a generator is consumed exactly once
    except TypeError:
        raise TypeError(f"{what} must be a Tensor or an iterable of Tensors, got {type(tensors).__name__}") from None


def grads_of(parameters) -> list[torch.Tensor]:
    """The ``.grad`` of every parameter that has one, in order (parameters: a Tensor or an iterable)."""
    params = as_list(parameters, "parameters")
    try:  # one pass: on 10,000 parameters every extra Python loop costs about a millisecond
        return [p.grad for p in params if p.grad is not None]
    except AttributeError:
        bad = next(p for p in params if not hasattr(p, "grad"))
        raise TypeError(f"parameters must hold Tensors, got {type(bad).__name__}") from None


def present_grads(params: Sequence[torch.Tensor]) -> tuple[Optional[list[int]], list[torch.Tensor]]:
    """``(indices, grads)``: the gradients that exist and their parameters' indices (None when every
    parameter has one). Read in C++ when the extension is there: about 50 us instead of 500 for 2000."""
    return gathered(params)[:2]


def gathered(params: Sequence[torch.Tensor]):
    """``(indices, grads, device, ready)``: :func:`present_grads`, the one device of the gradients (None when
    they are on several, or there are none) and whether the kernels take every one as it is (dense, float16,
    bfloat16, float32 or float64, no tensor subclass). One loop over the parameters, in C++ when the extension
    is there (tens of ns a parameter)."""
    if not torch.compiler.is_compiling():  # a C call is not traced
        last = tensor_table.last_table()
        found = _cpp.present_grads(params, last.signature if last is not None else None)
        if found is not None:
            grads, indices, device, ready, matched = found
            # when the last table fits them, the passes find it without checking again; else the first pass
            # that finds or builds their table leaves it there for the next
            return indices, tensor_table.Checked(grads, last if matched else None), device, ready
    grads = grads_of(params)  # a TypeError for anything that is not a tensor
    indices = [i for i, p in enumerate(params) if p.grad is not None] if len(grads) != len(params) else None
    devices = {g.device for g in grads}
    device = devices.pop() if len(devices) == 1 else None
    ready = all(type(g) is torch.Tensor and g.layout == torch.strided and not g.is_nested
                and g.dtype in SUPPORTED_DTYPES for g in grads)
    return indices, grads, device, ready


def by_device(grads: list[torch.Tensor]) -> dict[torch.device, list[torch.Tensor]]:
    """The gradients grouped by device, in order."""
    # Without an accelerator every gradient is on the CPU (or the call fails its checks); asking each tensor
    # for its device would cost about 0.1 us a tensor (1 ms for 10,000), more than the clip itself.
    if not torch.cuda.is_available():
        return {grads[0].device: grads}
    groups: dict[torch.device, list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault(g.device, []).append(g)
    return groups


# --------------------------------------------------------------------------------------------------------
# backend choice


def available_backends() -> dict[str, bool]:
    """Which backends are installed here (the Triton one then runs on the devices :func:`backend` lists)."""
    return backends.available()


_default: dict[str, str] = {}


def _auto(device: torch.device) -> str:
    name = _default.get(device.type)
    if name is None:
        # among the backends that serve this device type (the Triton interpreter takes CPU tensors for
        # testing, but does not serve them)
        candidates = [b for b in map(backends.load, BACKENDS) if b is not None and device.type in b.device_types]
        name = _default[device.type] = max(candidates, key=lambda b: b.priority).name
    return name


@torch.compiler.assume_constant_result  # traced once as a constant: no guard on the backend tables
def resolve_backend(name: Optional[str], device) -> str:
    """The backend that runs for ``name`` on ``device``: None or "auto" picks the default there (the
    ``AMPCLIP_BACKEND`` environment variable, when set, forces one instead).

    Raises ValueError for an unknown name and RuntimeError for a backend that cannot run here.
    """
    device = torch.device(device)
    if name in (None, "auto"):
        name = os.environ.get(ENV_BACKEND) or None
        if name is None:
            return _auto(device)
    impl = backends.load(name)  # ValueError for an unknown name
    if impl is None:
        raise RuntimeError(f"ampclip backend {name!r} is not available here: {backends.unavailable_reason(name)}")
    if not impl.runs_on(device):
        raise RuntimeError(f"ampclip backend {name!r} does not take {device.type} tensors here (see "
                           "`python -m ampclip env`)")
    return name


def fuses_coefficient(name: str, mode: str = "global") -> bool:
    """Whether backend ``name`` computes a ``mode`` clip's coefficient in its norm pass (``clip_norm_pass`` is
    one launch of its own): then a clip whose bound is known is two passes; else the norm pass,
    ``clip_finalize`` and the scale pass."""
    return mode in _impl(name).fused_clip_modes


def runs_on(name: str, device) -> bool:
    """Whether backend ``name`` is available and takes tensors on ``device`` here (the Triton one takes CPU
    tensors only under ``TRITON_INTERPRET=1`` with triton 3.7 or newer)."""
    impl = backends.load(name)
    return impl is not None and impl.runs_on(torch.device(device))


def check_backend(name: Optional[str]) -> None:
    """A clear error now for a backend name that is unknown (ValueError) or cannot run here (RuntimeError)."""
    if name not in (None, "auto") and backends.load(name) is None:
        raise RuntimeError(f"ampclip backend {name!r} is not available here: {backends.unavailable_reason(name)}")


def _impl(name: str) -> backends.Backend:
    return backends.load(name)


# --------------------------------------------------------------------------------------------------------
# torch.library registration: each op once, with its fake


def _direct(op: str, name: str, *args):
    """The op's result from backend ``name``, inside the registered op: by then the dispatcher has unwrapped
    whatever the eager call could not take."""
    out = getattr(_impl(name), op)(*args)
    if out is NotImplemented:
        raise RuntimeError(f"ampclip backend {name!r} could not run {op} on its input")
    return out


def _clamp_arg(clamp: Optional[Sequence[float]]) -> Clamp:
    return None if clamp is None else (float(clamp[0]), float(clamp[1]))


@torch.library.custom_op("ampclip::norm_pass", mutates_args=())
def _norm_pass_op(grads: list[torch.Tensor], inv_scale: Optional[torch.Tensor], norm_type: float,
                  clamp: Optional[list[float]], backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _direct("norm_pass", backend, grads, inv_scale, norm_type, _clamp_arg(clamp))


@_norm_pass_op.register_fake
def _(grads, inv_scale, norm_type, clamp, backend):
    acc = accumulation_dtype(grads)
    device = grads[0].device if grads else torch.device("cpu")
    return (torch.empty(len(grads), dtype=acc, device=device), torch.empty((), dtype=acc, device=device),
            torch.empty((), dtype=torch.float32, device=device))


@torch.library.custom_op("ampclip::clip_norm_pass", mutates_args=())
def _clip_norm_pass_op(grads: list[torch.Tensor], inv_scale: Optional[torch.Tensor], norm_type: float,
                       clamp: Optional[list[float]], max_norm: float, mode: int, eps: float, rule: int,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                              torch.Tensor]:
    return _direct("clip_norm_pass", backend, grads, inv_scale, norm_type, _clamp_arg(clamp), max_norm, mode, eps,
                   rule)


@_clip_norm_pass_op.register_fake
def _(grads, inv_scale, norm_type, clamp, max_norm, mode, eps, rule, backend):
    acc = accumulation_dtype(grads)
    device = grads[0].device if grads else torch.device("cpu")
    n = len(grads)

    def new(*shape, dtype=acc):
        return torch.empty(shape, dtype=dtype, device=device)

    return new(n), new(), new(dtype=torch.float32), new() if mode == 0 else new(n), new(), new()


@torch.library.custom_op("ampclip::scale_pass", mutates_args=("grads",))
def _scale_pass_op(grads: list[torch.Tensor], coef: torch.Tensor, inv_scale: Optional[torch.Tensor],
                   clamp: Optional[list[float]], found_inf: Optional[torch.Tensor], zero_if_inf: bool,
                   backend: str) -> None:
    _direct("scale_pass", backend, grads, coef, inv_scale, _clamp_arg(clamp), found_inf, zero_if_inf)


@_scale_pass_op.register_fake
def _(grads, coef, inv_scale, clamp, found_inf, zero_if_inf, backend):
    return None


@torch.library.custom_op("ampclip::clip_finalize", mutates_args=())
def _clip_finalize_op(per_tensor: torch.Tensor, total: torch.Tensor, max_norm: float,
                      max_norm_tensor: Optional[torch.Tensor], mode: int, group_index: Optional[torch.Tensor],
                      num_groups: int, norm_type: float, eps: float, rule: int,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    bound = max_norm_tensor if max_norm_tensor is not None else max_norm
    return _direct("clip_finalize", backend, per_tensor, total, bound, mode, group_index, num_groups, norm_type,
                   eps, rule)


@_clip_finalize_op.register_fake
def _(per_tensor, total, max_norm, max_norm_tensor, mode, group_index, num_groups, norm_type, eps, rule, backend):
    groups = num_groups if mode == 2 else 0
    coef = per_tensor.new_empty(() if mode == 0 else per_tensor.shape)
    return coef, per_tensor.new_empty(groups), per_tensor.new_empty(groups), per_tensor.new_empty(())


@torch.library.custom_op("ampclip::scaler_update", mutates_args=("state", "history"))
def _scaler_update_op(state: torch.Tensor, history: torch.Tensor, found_inf: Optional[torch.Tensor],
                      grad_norm: Optional[torch.Tensor], slot: int, growth_factor: float, backoff_factor: float,
                      growth_interval: int, hysteresis: int, min_scale: float, max_scale: float, dynamic: bool,
                      backend: str) -> None:
    _direct("scaler_update", backend, state, history, found_inf, grad_norm, slot, growth_factor, backoff_factor,
            growth_interval, hysteresis, min_scale, max_scale, dynamic)


@_scaler_update_op.register_fake
def _(state, history, found_inf, grad_norm, slot, growth_factor, backoff_factor, growth_interval, hysteresis,
      min_scale, max_scale, dynamic, backend):
    return None


@torch.library.custom_op("ampclip::clip_stats_update", mutates_args=("counters", "layer_stats"))
def _clip_stats_update_op(counters: torch.Tensor, layer_stats: Optional[torch.Tensor], per_tensor: torch.Tensor,
                          coef: torch.Tensor, found_inf: torch.Tensor, backend: str) -> None:
    _direct("clip_stats_update", backend, counters, layer_stats, per_tensor, coef, found_inf)


@_clip_stats_update_op.register_fake
def _(counters, layer_stats, per_tensor, coef, found_inf, backend):
    return None


@torch.library.custom_op("ampclip::unit_norm_pass", mutates_args=())
def _unit_norm_pass_op(tensors: list[torch.Tensor], inv_scale: Optional[torch.Tensor], norm_type: float,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _direct("unit_norm_pass", backend, tensors, inv_scale, norm_type)


@_unit_norm_pass_op.register_fake
def _(tensors, inv_scale, norm_type, backend):
    acc = accumulation_dtype(tensors)
    device = tensors[0].device if tensors else torch.device("cpu")
    units = sum(unit_count(t) for t in tensors)
    return (torch.empty(units, dtype=acc, device=device), torch.empty(len(tensors), dtype=acc, device=device),
            torch.empty((), dtype=acc, device=device), torch.empty((), dtype=torch.float32, device=device))


@torch.library.custom_op("ampclip::unit_scale_pass", mutates_args=("grads",))
def _unit_scale_pass_op(grads: list[torch.Tensor], coef: torch.Tensor, inv_scale: Optional[torch.Tensor],
                        found_inf: Optional[torch.Tensor], zero_if_inf: bool, backend: str) -> None:
    _direct("unit_scale_pass", backend, grads, coef, inv_scale, found_inf, zero_if_inf)


@_unit_scale_pass_op.register_fake
def _(grads, coef, inv_scale, found_inf, zero_if_inf, backend):
    return None


@torch.library.custom_op("ampclip::unit_clip_finalize", mutates_args=())
def _unit_clip_finalize_op(param_norms: torch.Tensor, grad_norms: torch.Tensor, clip_factor: float, eps: float,
                           norm_type: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _direct("unit_clip_finalize", backend, param_norms, grad_norms, clip_factor, eps, norm_type)


@_unit_clip_finalize_op.register_fake
def _(param_norms, grad_norms, clip_factor, eps, norm_type, backend):
    return torch.empty_like(grad_norms), grad_norms.new_empty(())


@torch.library.custom_op("ampclip::zclip_update", mutates_args=("state", "warmup"))
def _zclip_update_op(state: torch.Tensor, warmup: torch.Tensor, total: torch.Tensor, found_inf: torch.Tensor,
                     alpha: float, z_thresh: float, max_grad_norm: float, eps: float, rule: int, clip_factor: float,
                     skip_update_on_spike: bool, backend: str) -> torch.Tensor:
    return _direct("zclip_update", backend, state, warmup, total, found_inf, alpha, z_thresh, max_grad_norm, eps,
                   rule, clip_factor, skip_update_on_spike)


@_zclip_update_op.register_fake
def _(state, warmup, total, found_inf, alpha, z_thresh, max_grad_norm, eps, rule, clip_factor,
      skip_update_on_spike, backend):
    return total.new_empty(())


def _run(op: str, name: str, args: tuple, op_args: tuple):
    """Eager: the adapter directly, or the registered op when the adapter cannot take the input; compiled:
    the registered op."""
    if not torch.compiler.is_compiling():
        out = getattr(_impl(name), op)(*args)
        if out is not NotImplemented:
            return out
    return getattr(torch.ops.ampclip, op)(*op_args, name)


# --------------------------------------------------------------------------------------------------------
# the ops, called from Python


def _checked(grads: Sequence[torch.Tensor], backend: Optional[str], writable: bool) -> str:
    """The backend for a pass, with the Python checks of its input unless it validates its own. Traced by
    torch.compile, the checks are left out: they read metadata the compiler cannot trace, and a compiled graph
    runs on the inputs its guards admitted."""
    name = resolve_backend(backend, grads[0].device)
    if not _impl(name).validates_inputs and not torch.compiler.is_compiling():
        check_grads(grads, writable)
    return name


def norm_pass(grads: list[torch.Tensor], inv_scale: Optional[torch.Tensor] = None, norm_type: float = 2.0,
              clip_value=None, backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-tensor norms, total norm and ``found_inf`` of ``clamp(grads * inv_scale)`` in one read.

    ``clip_value`` clamps the unscaled values before they are measured (a number c for ``[-c, c]``, or a
    ``(min, max)`` pair); ``found_inf`` is taken before it. Gradients must share one device (dtypes may mix).
    See the module docstring for the contract.

    Example::

        per_tensor, total, found_inf = ampclip.ops.norm_pass([p.grad for p in model.parameters()])
    """
    clamp = check_clamp(clip_value, "clip_value")
    if not grads:
        acc = torch.float32
        return torch.zeros(0, dtype=acc), torch.zeros((), dtype=acc), torch.zeros((), dtype=torch.float32)
    name = _checked(grads, backend, writable=False)
    return _run("norm_pass", name, (grads, inv_scale, norm_type, clamp),
                (grads, inv_scale, norm_type, None if clamp is None else list(clamp)))


def clip_norm_pass(grads: list[torch.Tensor], inv_scale: Optional[torch.Tensor] = None, norm_type: float = 2.0,
                   clip_value=None, max_norm: float = 1.0, mode: str = "global", eps: float = EPS,
                   rule: str = "torch", backend: Optional[str] = None):
    """:func:`norm_pass` and :func:`clip_finalize` in one call: ``(per_tensor, total, found_inf, coef,
    post_clip_norm, grad_scale)``, where ``grad_scale`` is ``1 / (inv_scale * coef)``, what a fused optimizer
    divides the gradients by to unscale and clip them (global mode).

    ``max_norm`` is a number; ``mode`` "global" (``coef`` 0-d) or "per_tensor" (one per gradient). On the GPU
    backends this is one launch: the norm pass's last program computes the coefficient, so a clip is this and
    a :func:`scale_pass` (see docs/architecture.md).

    Example::

        per_tensor, total, found_inf, coef, post, _ = ampclip.ops.clip_norm_pass(grads, max_norm=1.0)
        ampclip.ops.scale_pass(grads, coef)
    """
    clamp = check_clamp(clip_value, "clip_value")
    bound = check_bound(max_norm, "max_norm")
    if mode not in ("global", "per_tensor"):
        raise ValueError(f"clip_norm_pass clips in global or per_tensor mode, got {mode!r} (per_group: norm_pass and "
                         "clip_finalize)")
    code, rule_code = MODES[mode], RULES[rule]
    if not grads:  # nothing to launch: the reference's torch ops on empty tensors
        return _impl("reference").clip_norm_pass(grads, inv_scale, norm_type, clamp, bound, code, float(eps), rule_code)
    name = _checked(grads, backend, writable=False)
    return _run("clip_norm_pass", name, (grads, inv_scale, norm_type, clamp, bound, code, float(eps), rule_code),
                (grads, inv_scale, norm_type, None if clamp is None else list(clamp), bound, code, float(eps),
                 rule_code))


def scale_pass(grads: list[torch.Tensor], coef: torch.Tensor, inv_scale: Optional[torch.Tensor] = None,
               clip_value=None, found_inf: Optional[torch.Tensor] = None, zero_if_inf: bool = False,
               backend: Optional[str] = None) -> None:
    """In place ``g <- clamp(g * inv_scale, lo, hi) * coef``, skipped or zeroed when ``found_inf``.

    Example::

        ampclip.ops.scale_pass(grads, coef=torch.tensor(0.5))
    """
    clamp = check_clamp(clip_value, "clip_value")
    if not grads:
        return
    if coef.numel() not in (1, len(grads)):
        raise ValueError(f"coef must hold 1 or one per gradient ({len(grads)}) elements, got {coef.numel()}")
    name = _checked(grads, backend, writable=True)
    _run("scale_pass", name, (grads, coef, inv_scale, clamp, found_inf, zero_if_inf),
         (grads, coef, inv_scale, None if clamp is None else list(clamp), found_inf, zero_if_inf))


def clip_finalize(per_tensor: torch.Tensor, total: torch.Tensor, max_norm, mode: str = "global",
                  group_index: Optional[torch.Tensor] = None, num_groups: int = 0, norm_type: float = 2.0,
                  eps: float = EPS, rule: str = "torch", backend: Optional[str] = None):
    """``(coef, group_coef, group_norms, post_clip_norm)`` from the norms and the bound, in one call.

    ``max_norm`` is a number or a 0-d device tensor (a bound computed on the device: no host sync).
    ``mode``: "global" (``coef`` 0-d, from ``total``), "per_tensor" (one per tensor) or "per_group"
    (``group_index`` gives each tensor's group in ``[0, num_groups)``; ``group_norms`` and ``group_coef``
    per group, ``coef`` per tensor). ``rule``: "torch" (``min(1, max_norm / (norm + eps))``, bit for bit
    as torch's ``clip_grad_norm_``) or "max" (``max_norm / max(norm + eps, max_norm)``). Norms and a tensor
    bound of another real dtype than float32/float64 are taken in float32, on every backend.
    """
    name = resolve_backend(backend, per_tensor.device)
    code, rule_code = MODES[mode], RULES[rule]
    per_tensor, total, max_norm = _wide(per_tensor), _wide(total), _wide(max_norm)
    bound_tensor = max_norm if isinstance(max_norm, torch.Tensor) else None
    bound = 0.0 if bound_tensor is not None else float(max_norm)
    return _run("clip_finalize", name,
                (per_tensor, total, max_norm, code, group_index, num_groups, norm_type, eps, rule_code),
                (per_tensor, total, bound, bound_tensor, code, group_index, num_groups, norm_type, eps, rule_code))


def scaler_update(state: torch.Tensor, history: torch.Tensor, found_inf: Optional[torch.Tensor],
                  grad_norm: Optional[torch.Tensor], slot: int, growth_factor: float, backoff_factor: float,
                  growth_interval: int, hysteresis: int, min_scale: float, max_scale: float, dynamic: bool,
                  backend: Optional[str] = None) -> None:
    """One loss-scale update in place (see ``ampclip.reference.scaler_update``), in one call."""
    name = resolve_backend(backend, state.device)
    args = (state, history, found_inf, grad_norm, slot, growth_factor, backoff_factor, growth_interval,
            hysteresis, min_scale, max_scale, dynamic)
    _run("scaler_update", name, args, args)


def clip_stats_update(counters: torch.Tensor, layer_stats: Optional[torch.Tensor], per_tensor: torch.Tensor,
                      coef: torch.Tensor, found_inf: torch.Tensor, backend: Optional[str] = None) -> None:
    """Clipped/skipped counts and per-layer norm statistics in place (see
    ``ampclip.reference.clip_stats_update``), in one call. Norms and coefficients of another real dtype than
    float32/float64 are taken in float32."""
    name = resolve_backend(backend, counters.device)
    args = (counters, layer_stats, _wide(per_tensor), _wide(coef), found_inf)
    _run("clip_stats_update", name, args, args)


def _checked_units(tensors: Sequence[torch.Tensor], backend: Optional[str], writable: bool, op: str) -> str:
    """The backend for a unit-wise pass; the Python checks unless the backend has its own kernel for ``op``
    and validates its input (a backend without one runs the reference, which checks nothing)."""
    name = resolve_backend(backend, tensors[0].device)
    impl = _impl(name)
    if (not impl.validates_inputs or getattr(type(impl), op) is getattr(backends.Backend, op)) \
            and not torch.compiler.is_compiling():
        check_grads(tensors, writable)
    return name


def unit_norm_pass(tensors: list[torch.Tensor], inv_scale: Optional[torch.Tensor] = None, norm_type: float = 2.0,
                   backend: Optional[str] = None):
    """``(unit_norms, per_tensor_norms, total_norm, found_inf)`` of ``tensors * inv_scale`` in one read.

    A tensor's units are its rows along dim 0 when it has more than one dimension, else the whole tensor
    (:func:`unit_count`); ``unit_norms`` lists the units of every tensor in order. Norms are float32 (float64
    when a tensor is float64); ``found_inf`` as in :func:`norm_pass`. Tensors must share one device.

    Example::

        units, per_tensor, total, found_inf = ampclip.ops.unit_norm_pass([p.grad for p in model.parameters()])
    """
    if not tensors:
        empty = torch.zeros(0)
        return empty, empty.clone(), torch.zeros(()), torch.zeros(())
    name = _checked_units(tensors, backend, False, "unit_norm_pass")
    args = (tensors, inv_scale, norm_type)
    return _run("unit_norm_pass", name, args, args)


def unit_scale_pass(grads: list[torch.Tensor], coef: torch.Tensor, inv_scale: Optional[torch.Tensor] = None,
                    found_inf: Optional[torch.Tensor] = None, zero_if_inf: bool = False,
                    backend: Optional[str] = None) -> None:
    """In place ``unit <- unit * inv_scale * coef[unit]`` for every unit of every gradient (``coef``: one entry
    per unit, in :func:`unit_norm_pass`'s order), skipped or zeroed when ``found_inf`` is set.

    Example::

        ampclip.ops.unit_scale_pass(grads, coef)
    """
    if not grads:
        return
    name = _checked_units(grads, backend, True, "unit_scale_pass")
    args = (grads, coef, inv_scale, found_inf, zero_if_inf)
    _run("unit_scale_pass", name, args, args)


def unit_clip_finalize(param_norms: torch.Tensor, grad_norms: torch.Tensor, clip_factor: float, eps: float,
                       norm_type: float = 2.0, backend: Optional[str] = None):
    """``(coef, post_clip_norm)``: adaptive gradient clipping's coefficient of every unit from the unit norms of
    the parameters and of the gradients (``max(param_norm, eps) * clip_factor`` is a unit's bound; see
    ``ampclip.reference.unit_clip_finalize``), and the norm after clipping, in one call. A unit whose parameter
    norm is infinite keeps its gradient (coefficient 1), whatever ``clip_factor``: AGC's ``exclude`` works so."""
    if param_norms.shape != grad_norms.shape:
        raise ValueError(f"param_norms and grad_norms must have one entry per unit each, got "
                         f"{tuple(param_norms.shape)} and {tuple(grad_norms.shape)}")
    name = resolve_backend(backend, grad_norms.device)
    param_norms, grad_norms = _wide(param_norms), _wide(grad_norms)
    args = (param_norms, grad_norms, float(clip_factor), float(eps), float(norm_type))
    coef, post = _run("unit_clip_finalize", name, args, args)
    if clip_factor == 0:  # the kernels' bound inf * 0 is NaN: three more small ops, for this setting only
        coef = torch.where(param_norms.isinf(), torch.ones_like(coef), coef)
        post = combine_norms(grad_norms.double() * coef.double(), norm_type).to(post.dtype)
    return coef, post


def zclip_update(state: torch.Tensor, warmup: torch.Tensor, total: torch.Tensor, found_inf: torch.Tensor,
                 alpha: float, z_thresh: float, max_grad_norm: float, eps: float, rule: str = "adaptive_scaling",
                 clip_factor: float = 1.0, skip_update_on_spike: bool = False,
                 backend: Optional[str] = None) -> torch.Tensor:
    """One ZClip step in place on its device state, returning the step's bound (a 0-d device tensor in
    ``total``'s dtype), in one call: see ``ampclip.reference.zclip_update``. ``rule``: "adaptive_scaling" or
    "mean" (z-score mode), or "percentile"."""
    if state.dtype != torch.float64 or state.shape != (4,) or warmup.dtype != torch.float64 or warmup.dim() != 1 \
            or warmup.numel() < 1:
        raise ValueError("zclip_update needs a float64 state of 4 and a float64 1-D warm-up buffer")
    name = resolve_backend(backend, state.device)
    args = (state, warmup, total, found_inf, float(alpha), float(z_thresh), float(max_grad_norm), float(eps),
            ZCLIP_RULES[rule], float(clip_factor), bool(skip_update_on_spike))
    return _run("zclip_update", name, args, args)


# --------------------------------------------------------------------------------------------------------
# composites: what the drop-in functions do


def clip_coef(max_norm, total_norm: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """``min(1, max_norm / (total_norm + eps))`` on the device, rounded as torch rounds it: no host sync.
    ``total_norm`` of any real dtype is taken in float32 (float64 stays float64)."""
    if not isinstance(total_norm, torch.Tensor):  # torch fails on a number too, with a TypeError
        raise TypeError(f"total_norm must be a one-element tensor (the norm of all gradients), got "
                        f"{type(total_norm).__name__} {total_norm!r}")
    if total_norm.numel() != 1:
        raise GradientValueError(f"total_norm must be a one-element tensor (the norm of all gradients), got shape "
                                 f"{tuple(total_norm.shape)}")
    total = total_norm.reshape(())
    return clip_finalize(total.reshape(1), total, max_norm, backend=backend)[0]


def _torch_formula(grads: list[torch.Tensor], norm_type: float) -> bool:
    """Norms the kernels do not compute, which the drop-ins take as torch does: norm_type 0, negative or
    -inf, and complex gradients. Rare: plain torch ops serve them."""
    return not norm_type > 0 or any(g.is_complex() for g in grads)


def _torch_total(grads: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    first = grads[0].device
    norms = [torch.linalg.vector_norm(g, norm_type).to(first) for g in grads]
    return torch.linalg.vector_norm(torch.stack(norms), norm_type)


def total_norm(grads: list[torch.Tensor], norm_type: float, backend: Optional[str] = None) -> torch.Tensor:
    """The norm of all ``grads`` as one vector, on the first gradient's device; one norm pass per device."""
    if _torch_formula(grads, norm_type):
        return _torch_total(grads, norm_type)
    groups = by_device(grads)
    totals = [norm_pass(device_grads, None, norm_type, backend=backend)[1] for device_grads in groups.values()]
    if len(totals) == 1:
        return totals[0]
    first = grads[0].device
    return combine_norms(torch.stack([t.to(first) for t in totals]), norm_type)


def clip_grad_norm(grads: list[torch.Tensor], max_norm: float, norm_type: float = 2.0,
                   backend: Optional[str] = None) -> torch.Tensor:
    """Norm pass, coefficient and scale pass over gradients on one device; returns the pre-clip total norm.

    A backend with a fused clip (the compiled CPU kernels) runs all three in one call: on 10,000 tiny
    gradients, crossing into the backend once instead of three times saves about 1.5 ms.

    Example::

        total = ampclip.ops.clip_grad_norm([p.grad for p in model.parameters()], max_norm=1.0)
    """
    name = _checked(grads, backend, writable=True)
    if not torch.compiler.is_compiling():
        total = _impl(name).clip_grad_norm(grads, max_norm, norm_type)
        if total is not None:
            return total
    if fuses_coefficient(name):
        _, total, _, coef, _, _ = clip_norm_pass(grads, None, norm_type, max_norm=max_norm, backend=name)
    else:
        total = norm_pass(grads, None, norm_type, backend=name)[1]
        coef = clip_coef(max_norm, total, backend=name)
    scale_pass(grads, coef, backend=name)
    return total


def steady_clip(params: Sequence[torch.Tensor], inv_scale: Optional[torch.Tensor], norm_type: float, clamp: Clamp,
                max_norm: float, mode: str, eps: float, rule: str, zero_if_inf: bool, backend: Optional[str],
                write: bool = True):
    """The clip of a training loop's steady state, where the same parameters are clipped every step: when every
    parameter of ``params`` has a gradient and they are exactly the tensors of the table found last (pointers,
    sizes, strides, dtypes), that table serves as it is. One C++ loop compares each ``.grad`` with it (and bumps
    its version when the clip writes): no list of gradients is made, and the clip's passes run on the table.
    ``zero_grad(set_to_none=True)`` makes new gradients, which the caching allocator may put at the old addresses.

    Returns :func:`clip_norm_pass`'s ``(per_tensor, total, found_inf, coef, post_clip_norm, grad_scale)``; with
    ``write`` the gradients are then scaled in place as :func:`scale_pass` would (skipped, or zeroed with
    ``zero_if_inf``, on found_inf); without, they are left for a fused optimizer to scale by ``grad_scale``.

    None when it does not apply: another table, a missing gradient, a backend without a fused coefficient for
    ``mode``, gradients that are staged, expanded or share memory, a trace, a CUDA graph capture (which keeps
    the tables it reads: the general path). Nothing is written then, though a gradient that differs from the
    table after the first leaves the ones before it bumped once more (``_C.claim_grads``). The caller then
    takes the general path, which finds or builds the table."""
    if torch.compiler.is_compiling():  # a C call is not traced, nor is the table cache
        return None
    table = tensor_table.last_table()
    if (table is None or len(params) != table.num_tensors or table.staging or table.expanded is not None
            or table.aliased):
        return None
    device = table.buffer.device
    if getattr(params[0], "device", None) != device:  # a gradient is on its parameter's device
        return None
    impl = _impl(resolve_backend(backend, device))
    if mode not in impl.fused_clip_modes or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return None
    if not _cpp.claim_grads(params, table.signature, write):
        return None
    out = impl.clip_norm_pass_on_table(table, inv_scale, norm_type, clamp, max_norm, MODES[mode], float(eps),
                                       RULES[rule])
    if write:
        impl.scale_pass_on_table(table, out[3], inv_scale, clamp, out[2], zero_if_inf)
    return out


def raise_if_nonfinite(total: torch.Tensor, norm_type: float) -> None:
    if not torch.isfinite(total).item():  # one host sync, as in torch
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot "
            "be clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`"
        )


def scale_by(grads: list[torch.Tensor], coef: torch.Tensor, clip_value=None, backend: Optional[str] = None) -> None:
    """Every gradient times ``coef`` (clamped first to ``clip_value``), one scale pass per device, every
    device's checks before any write."""
    groups = by_device(grads)
    names = {device: _checked(device_grads, backend, writable=True) for device, device_grads in groups.items()}
    for device, device_grads in groups.items():
        scale_pass(device_grads, coef.to(device, non_blocking=True), None, clip_value, backend=names[device])


def clip_parameters(parameters: Union[torch.Tensor, Iterable[torch.Tensor]], max_norm: float, norm_type: float,
                    error_if_nonfinite: bool = False, backend: Optional[str] = None) -> torch.Tensor:
    """The drop-in ``clip_grad_norm_`` on already checked ``max_norm`` and ``norm_type``: the one place that
    decides its fast path, from the gradients' device (a parameter's: torch keeps a gradient on its
    parameter's device). The backend serving CPU gradients may clip straight from the parameter list (the
    compiled one reads ``.grad`` in C++: 0.72 -> 0.26 ms on 2000 x 512); the GPU backends clip the gradients of
    the last table without gathering them (:func:`steady_clip`); anything else takes the general path: gather,
    check, norm pass per device, coefficient, scale pass."""
    params = as_list(parameters, "parameters")
    device = getattr(params[0], "device", None) if params else None
    if device is not None and not error_if_nonfinite and norm_type > 0 and not torch.compiler.is_compiling():
        if device.type == "cpu":
            total = _impl(resolve_backend(backend, device)).clip_params(params, max_norm, norm_type)
            if total is not None:
                return total
        steady = steady_clip(params, None, norm_type, None, max_norm, "global", EPS, "torch", False, backend)
        if steady is not None:
            return steady[1]
    _, grads, device, ready = gathered(params)
    if not grads:
        return torch.tensor(0.0)
    if ready and device is not None and norm_type > 0 and not error_if_nonfinite:
        return clip_grad_norm(grads, max_norm, norm_type, backend)  # one device, dtypes the kernels take
    if _torch_formula(grads, norm_type):
        total = _torch_total(grads, norm_type)
        if error_if_nonfinite:
            raise_if_nonfinite(total, norm_type)
        coef = (max_norm / (total + EPS)).clamp(max=1.0)
        for g in grads:  # as torch: one multiply per gradient, the coefficient on its device
            g.mul_(coef.to(g.device))
        return total
    if not error_if_nonfinite and len(by_device(grads)) == 1:
        return clip_grad_norm(grads, max_norm, norm_type, backend)
    total = total_norm(grads, norm_type, backend)
    if error_if_nonfinite:
        raise_if_nonfinite(total, norm_type)
    scale_by(grads, clip_coef(max_norm, total, backend), backend=backend)
    return total


# --------------------------------------------------------------------------------------------------------
# what runs here


def dispatched(fn, *args, **kwargs) -> list[str]:
    """The names of the ops ``fn(*args, **kwargs)`` dispatches, in order, views excluded (they launch
    nothing): on a GPU each is a kernel launch of a few microseconds of host time. An ampclip op counts once,
    whatever its backend does inside.

    Example::

        >>> ampclip.ops.dispatched(clipper.clip_)
        ['ampclip.norm_pass.default', 'ampclip.clip_finalize.default', 'ampclip.scale_pass.default', ...]
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            returns = func._schema.returns
            if not (returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)):
                self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    with Recorder() as recorder:
        fn(*args, **kwargs)
    return recorder.names



def backend() -> dict:
    """What is available and what runs: the backend per device type, versions and the GPU name.

    Example::

        >>> ampclip.backend()["in_use"]["cpu"]
        'cpp'
    """
    info = {
        "available": available_backends(),
        "unavailable": {name: backends.unavailable_reason(name) for name in BACKENDS
                        if backends.unavailable_reason(name)},
        "in_use": {"cpu": resolve_backend(None, "cpu")},
        "forced": os.environ.get(ENV_BACKEND) or None,
        "torch_patched": getattr(torch.nn.utils.clip_grad_norm_, "__module__", "").startswith("ampclip"),
        "extension": _cpp.describe(),
        "torch": torch.__version__,
        "triton": None,
        "cuda": torch.version.cuda,
        "cuda_archs": _cpp.cuda_archs(),  # the GPU code of the extension's CUDA kernels, () when not built
        "gpu": None,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["in_use"]["cuda"] = resolve_backend(None, "cuda")
    return info
