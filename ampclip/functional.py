"""Drop-in replacements for ``torch.nn.utils``' gradient clipping functions.

Same signatures and results as torch (eps 1e-6, coefficient clamped at 1, the pre-clip norm returned,
the same ``error_if_nonfinite`` behaviour), computed by the fused ops of :mod:`ampclip.ops`: one read of the
gradients for the norm and one read and write for the clip, whatever the number of tensors.

Deliberate differences from torch, all documented in ``docs/api.md``:

* The total norm is float32 (float64 when a gradient is float64) and accumulates in float32, so fp16
  gradients whose norm passes 65504 get a finite norm and are clipped correctly (torch returns inf and
  zeroes them), and bf16 gradients get an accurate coefficient (torch rounds the norm to bf16 first).
* The inf-norm of a list holding a zero-size tensor works (torch raises).
* A negative or NaN ``max_norm`` (or ``clip_value``) raises ValueError before anything is touched; torch
  silently reverses the gradients (pytorch#31367).
* DTensor gradients (FSDP2) are measured on their local shards with one reduction per mesh dimension for
  the whole list, and clipped in place; the norm comes back as a replicated DTensor.
* ``foreach`` is accepted and ignored: every path is fused. ``backend`` picks a backend (default: the
  ``AMPCLIP_BACKEND`` environment variable, else the fastest here).
"""

from __future__ import annotations

import functools
import types
import warnings
from typing import Iterable, Optional, Union

import torch

from . import distributed, ops

__all__ = [
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "compute_gradient_norm",
    "get_total_norm",
    "is_patched",
    "patch_torch",
    "unpatch_torch",
]

TensorOrTensors = Union[torch.Tensor, Iterable[torch.Tensor]]


def _parameters(parameters: TensorOrTensors) -> list:
    """The parameters as a list; an empty generator warns as torch does (it was most likely consumed)."""
    if isinstance(parameters, torch.Tensor):
        return [parameters]
    params = ops.as_list(parameters, "parameters")
    if not params and isinstance(parameters, types.GeneratorType):
        warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=3)
    return params


def get_total_norm(
    tensors: TensorOrTensors,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: Optional[bool] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """The norm of all ``tensors`` as if concatenated into one vector, like ``torch.nn.utils.get_total_norm``.

    Returns a 0-d float32 tensor (float64 when a tensor is float64) on the first tensor's device, or
    ``tensor(0.)`` for an empty input. No host sync unless ``error_if_nonfinite``.

    Example::

        >>> grads = [p.grad for p in model.parameters() if p.grad is not None]
        >>> total = ampclip.get_total_norm(grads)
    """
    p = ops.check_norm_type(norm_type, kernels=False)
    grads = ops.as_list(tensors, "tensors")
    if not grads:
        return torch.tensor(0.0)
    sharded = distributed.sharded(grads)
    total = sharded.total_norm(p, backend) if sharded else ops.total_norm(grads, p, backend)
    if error_if_nonfinite:
        ops.raise_if_nonfinite(total, p)
    return total


def clip_grads_with_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    total_norm: torch.Tensor,
    foreach: Optional[bool] = None,
    backend: Optional[str] = None,
) -> None:
    """Scale the gradients by ``min(1, max_norm / (total_norm + 1e-6))``, like torch's function of that name.

    Example::

        >>> total = ampclip.get_total_norm(grads)          # e.g. after an all-reduce of its square
        >>> ampclip.clip_grads_with_norm_(model.parameters(), 1.0, total)
    """
    bound = ops.check_bound(max_norm, "max_norm")
    grads = ops.grads_of(parameters)
    if not grads:
        return
    sharded = distributed.sharded(grads)
    if sharded:
        return sharded.scale_by(ops.clip_coef(bound, distributed.local(total_norm), backend), backend=backend)
    ops.scale_by(grads, ops.clip_coef(bound, total_norm, backend), backend=backend)


def clip_grad_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: Optional[bool] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Clip the gradients of ``parameters`` to a total norm of ``max_norm``, in place.

    A drop-in for ``torch.nn.utils.clip_grad_norm_``: returns the total norm of the gradients before
    clipping, as a 0-d float32 tensor (float64 for float64 gradients). Gradients that are None are skipped.
    No host sync unless ``error_if_nonfinite``, in which case a non-finite norm raises RuntimeError with
    the gradients untouched.

    Example::

        >>> loss.backward()
        >>> norm = ampclip.clip_grad_norm_(model.parameters(), max_norm=1.0)
        >>> optimizer.step()
    """
    bound = ops.check_bound(max_norm, "max_norm")
    p = ops.check_norm_type(norm_type, kernels=False)
    params = _parameters(parameters)
    sharded = distributed.sharded(params, of_grads=True)
    if sharded:  # FSDP2: the local shards, one reduction per mesh dimension
        total = sharded.total_norm(p, backend)
        if error_if_nonfinite:
            ops.raise_if_nonfinite(distributed.local(total), p)
        sharded.scale_by(ops.clip_coef(bound, distributed.local(total), backend), backend=backend)
        return total
    return ops.clip_parameters(params, bound, p, error_if_nonfinite, backend)


def clip_grad_value_(
    parameters: TensorOrTensors, clip_value: float, foreach: Optional[bool] = None, backend: Optional[str] = None
) -> None:
    """Clamp every gradient element to ``[-clip_value, clip_value]`` in place, like torch's function.

    A negative or NaN ``clip_value`` raises ValueError (torch would move every element to ``clip_value``).

    Example::

        >>> ampclip.clip_grad_value_(model.parameters(), clip_value=0.5)
    """
    bound = ops.check_bound(clip_value, "clip_value")
    grads = ops.grads_of(_parameters(parameters))
    if not grads:
        return
    sharded = distributed.sharded(grads)
    if sharded:
        return sharded.scale_by(torch.ones((), device=sharded.locals[0].device), clip_value=bound, backend=backend)
    if any(g.is_complex() for g in grads):  # torch refuses too, with these words
        raise NotImplementedError("clamp is not supported for complex types")
    ops.scale_by(grads, torch.ones((), device=grads[0].device), clip_value=bound, backend=backend)


def compute_gradient_norm(model_or_parameters, norm_type: float = 2.0) -> float:
    """The total gradient norm of a model (or of parameters) as a Python float, for logging.

    Returns 0.0 before any backward pass (no gradients) and equals the value ``clip_grad_norm_`` returns.
    One host sync.

    Example::

        >>> loss.backward()
        >>> tracker.log_scalar("gradients/l2_norm", ampclip.compute_gradient_norm(model), step)
    """
    if isinstance(model_or_parameters, torch.nn.Module):
        model_or_parameters = model_or_parameters.parameters()
    grads = ops.grads_of(model_or_parameters)
    if not grads:
        return 0.0
    return float(distributed.local(get_total_norm(grads, norm_type)))


# --------------------------------------------------------------------------------------------------------
# routing torch's own functions here

_TORCH_NAMES = ("clip_grad_norm_", "clip_grad_value_", "get_total_norm", "clip_grads_with_norm_")
_MISSING = object()
_saved_torch: dict[tuple[str, str], object] = {}  # (module, name) -> torch's attribute, or _MISSING


def _torch_modules():
    import torch.nn.utils as nn_utils
    import torch.nn.utils.clip_grad as clip_grad_module

    return {"torch.nn.utils": nn_utils, "torch.nn.utils.clip_grad": clip_grad_module}


def _bound_to(fn, backend: Optional[str]):
    if backend is None:
        return fn

    @functools.wraps(fn)
    def routed(*args, **kwargs):
        kwargs.setdefault("backend", backend)
        return fn(*args, **kwargs)

    return routed


def patch_torch(backend: Optional[str] = None) -> None:
    """Route ``torch.nn.utils.clip_grad_norm_`` & co. to ampclip, so code that calls torch (HF Trainer,
    Accelerate, Lightning) gets the fused path unchanged. ``backend`` forces one for every routed call.
    :func:`unpatch_torch` restores torch's module exactly; :func:`is_patched` tells.

    Example::

        >>> ampclip.patch_torch()
        >>> torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)   # runs ampclip's
    """
    ops.check_backend(backend)
    for module_name, module in _torch_modules().items():
        for name in _TORCH_NAMES:
            _saved_torch.setdefault((module_name, name), getattr(module, name, _MISSING))
            setattr(module, name, _bound_to(globals()[name], backend))


def unpatch_torch() -> None:
    """Undo :func:`patch_torch`: torch's functions back, no attribute left behind."""
    modules = _torch_modules()
    for (module_name, name), original in _saved_torch.items():
        if original is _MISSING:
            delattr(modules[module_name], name)
        else:
            setattr(modules[module_name], name, original)
    _saved_torch.clear()


def is_patched() -> bool:
    """Whether :func:`patch_torch` routes ``torch.nn.utils.clip_grad_norm_`` to ampclip now."""
    return bool(_saved_torch)
