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


def _fused_or_torch(fused, tensors: list, name: str, *args):
    """``fused()``; when a backend refuses tensors (parameters or gradients) that are on several devices, torch's
    own ``name(*args)`` instead, so that such a mix gets torch's result or torch's error.

    Without an accelerator ``ops`` takes every gradient to be on the first one's device rather than ask each
    (0.1 us a tensor, 1 ms for 10,000); a meta tensor beside CPU ones then reaches a backend, which refuses it
    (a ValueError) before writing anything. torch measures each device on its own and fails copying a meta
    norm to the CPU (NotImplementedError), or clamps and scales each device alone. The devices are asked on
    this error path only; with an accelerator ``ops`` groups by device itself, and a ValueError is the input's."""
    try:
        return fused()
    except ValueError:
        first = tensors[0].device
        if torch.cuda.is_available() or all(t.device == first for t in tensors):
            raise
    original = _saved_torch.get(("torch.nn.utils", name), _MISSING)  # torch's, whether patched or not
    return (getattr(torch.nn.utils, name) if original is _MISSING else original)(*args)


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
    sharded = distributed.sharded(grads) if p > 0 else None  # torch's rare norms: torch's ops, which take DTensors
    if sharded:
        total = sharded.total_norm(p, backend)
    else:
        total = _fused_or_torch(lambda: ops.total_norm(grads, p, backend), grads, "get_total_norm", grads, p,
                                error_if_nonfinite, foreach)
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

    ``total_norm``: a one-element tensor of any real dtype (torch's ``get_total_norm`` of float16 gradients is
    float16), taken in float32 (float64 stays float64); a number raises TypeError, as in torch.

    Example::

        >>> total = ampclip.get_total_norm(grads)          # e.g. after an all-reduce of its square
        >>> ampclip.clip_grads_with_norm_(model.parameters(), 1.0, total)
    """
    bound = ops.check_bound(max_norm, "max_norm")
    params = _parameters(parameters)
    grads = ops.grads_of(params)
    if not grads:
        return
    sharded = distributed.sharded(grads)
    if sharded:
        return sharded.scale_by(ops.clip_coef(bound, distributed.local(total_norm), backend), backend=backend)
    coef = ops.clip_coef(bound, total_norm, backend)
    _fused_or_torch(lambda: ops.scale_by(grads, coef, backend=backend), grads, "clip_grads_with_norm_", params,
                    bound, total_norm, foreach)


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
    sharded = distributed.sharded(params, of_grads=True) if p > 0 else None  # as in get_total_norm
    if sharded:  # FSDP2: the local shards, one reduction per mesh dimension
        total = sharded.total_norm(p, backend)
        if error_if_nonfinite:
            ops.raise_if_nonfinite(distributed.local(total), p)
        sharded.scale_by(ops.clip_coef(bound, distributed.local(total), backend), backend=backend)
        return total
    return _fused_or_torch(lambda: ops.clip_parameters(params, bound, p, error_if_nonfinite, backend), params,
                           "clip_grad_norm_", params, bound, p, error_if_nonfinite, foreach)


def clip_grad_value_(
    parameters: TensorOrTensors, clip_value: float, foreach: Optional[bool] = None, backend: Optional[str] = None
) -> None:
    """Clamp every gradient element to ``[-clip_value, clip_value]`` in place, like torch's function.

    A negative or NaN ``clip_value`` raises ValueError (torch would move every element to ``clip_value``).

    Example::

        >>> ampclip.clip_grad_value_(model.parameters(), clip_value=0.5)
    """
    bound = ops.check_bound(clip_value, "clip_value")
    params = _parameters(parameters)
    grads = ops.grads_of(params)
    if not grads:
        return
    sharded = distributed.sharded(grads)
    if sharded:
        return sharded.scale_by(torch.ones((), device=sharded.locals[0].device), clip_value=bound, backend=backend)
    if any(g.is_complex() for g in grads):  # torch refuses too, with these words
        raise NotImplementedError("clamp is not supported for complex types")
    one = torch.ones((), device=grads[0].device)
    _fused_or_torch(lambda: ops.scale_by(grads, one, clip_value=bound, backend=backend), grads, "clip_grad_value_",
                    params, bound, foreach)


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
