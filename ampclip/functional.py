"""Drop-in replacements for ``torch.nn.utils``' gradient clipping functions.

Same signatures and results as torch (eps 1e-6, coefficient clamped at 1, the pre-clip norm returned,
the same ``error_if_nonfinite`` behaviour), computed by the fused ops in :mod:`ampclip.ops`: one read of the
gradients for the norm and one read and write for the clip, whatever the number of tensors.

Deliberate differences from torch, all documented in ``docs/api.md``:

* The total norm is float32 (float64 when a gradient is float64) and accumulates in float32, so fp16
  gradients whose norm passes 65504 get a finite norm and are clipped correctly (torch returns inf and
  zeroes them), and bf16 gradients get an accurate coefficient (torch rounds the norm to bf16 first).
* The inf-norm of a list holding a zero-size tensor works (torch raises).
* A negative or NaN ``max_norm`` (or ``clip_value``) raises ValueError before anything is touched; torch
  silently reverses the gradients (pytorch#31367). ``norm_type`` must be a p > 0 or inf.
* ``foreach`` is accepted and ignored: every path is fused.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Union

import torch

from . import _extension, ops, reference

__all__ = [
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "compute_gradient_norm",
    "get_total_norm",
    "patch_torch",
    "unpatch_torch",
]

TensorOrTensors = Union[torch.Tensor, Iterable[torch.Tensor]]
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _as_list(tensors: TensorOrTensors, what: str) -> list:
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    try:
        return list(tensors)  # a generator is consumed exactly once
    except TypeError:
        raise TypeError(f"{what} must be a Tensor or an iterable of Tensors, got {type(tensors).__name__}") from None


def _grads_of(parameters: TensorOrTensors) -> list[torch.Tensor]:
    params = _as_list(parameters, "parameters")
    try:  # one pass: on 10,000 parameters every extra Python loop costs about a millisecond
        return [p.grad for p in params if p.grad is not None]
    except AttributeError:
        bad = next(p for p in params if not hasattr(p, "grad"))
        raise TypeError(f"parameters must hold Tensors, got {type(bad).__name__}") from None


def _checked_norm_type(norm_type) -> float:
    try:
        p = float(norm_type)
    except (TypeError, ValueError):
        raise ValueError(f"norm_type must be a number > 0 or inf, got {norm_type!r}") from None
    if math.isnan(p) or p <= 0:
        raise ValueError(f"norm_type must be a number > 0 or inf, got {norm_type!r}")
    return p


def _checked_bound(value, name: str) -> float:
    """max_norm or clip_value: a number >= 0 (inf allowed). A negative one would flip the gradients."""
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


def _check_grads(grads: list[torch.Tensor]) -> None:
    """Clear errors for gradients no backend can clip, before anything is modified."""
    for layout, dtype in {(g.layout, g.dtype) for g in grads}:
        if layout != torch.strided:
            raise TypeError(f"ampclip clips dense gradients only; got a gradient with layout {layout}")
        if dtype not in _SUPPORTED_DTYPES:
            raise TypeError(
                f"ampclip clips float16, bfloat16, float32 and float64 gradients; got a {dtype} gradient"
            )


def _by_device(grads: list[torch.Tensor]) -> dict[torch.device, list[torch.Tensor]]:
    # Without an accelerator every gradient is on the CPU; asking each tensor for its device would cost
    # about 0.1 µs a tensor (1 ms for 10,000), more than the clip itself.
    if not torch.cuda.is_available():
        return {grads[0].device: grads}
    groups: dict[torch.device, list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault(g.device, []).append(g)
    return groups


def _validated(op, grads: list[torch.Tensor], *args, backend: Optional[str] = None):
    """Runs ``op(grads, *args)`` with the input checks where they are cheapest.

    The compiled backend checks layout, dtype and device per tensor in C++ before it reads or writes
    anything; in Python the same checks cost about 0.2 µs a tensor (2 ms on 10,000 gradients), so they run
    up front only for the other backends, and after a failure to turn the kernel's error into a clear one.
    """
    if ops.resolve_backend(backend, grads[0].device) != "cpp":
        _check_grads(grads)
        return op(grads, *args, backend=backend)
    try:
        return op(grads, *args, backend=backend)
    except RuntimeError:
        _check_grads(grads)
        raise


def _total_norm(grads: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    groups = _by_device(grads)
    totals = [_validated(ops.norm_pass, device_grads, None, norm_type)[1] for device_grads in groups.values()]
    if len(totals) == 1:
        return totals[0]
    first = grads[0].device
    return reference.combine_norms(torch.stack([t.to(first) for t in totals]), norm_type)


def _raise_if_nonfinite(total: torch.Tensor, norm_type: float) -> None:
    if not torch.isfinite(total).item():  # one host sync, as in torch
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot "
            "be clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`"
        )


def get_total_norm(
    tensors: TensorOrTensors,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: Optional[bool] = None,
) -> torch.Tensor:
    """The norm of all ``tensors`` as if concatenated into one vector, like ``torch.nn.utils.get_total_norm``.

    Returns a 0-d float32 tensor (float64 when a tensor is float64) on the first tensor's device, or
    ``tensor(0.)`` for an empty input. No host sync unless ``error_if_nonfinite``.

    Example::

        >>> grads = [p.grad for p in model.parameters() if p.grad is not None]
        >>> total = ampclip.get_total_norm(grads)
    """
    p = _checked_norm_type(norm_type)
    grads = _as_list(tensors, "tensors")
    if not grads:
        return torch.tensor(0.0)
    total = _total_norm(grads, p)
    if error_if_nonfinite:
        _raise_if_nonfinite(total, p)
    return total


def _scale_by(grads: list[torch.Tensor], coef: torch.Tensor) -> None:
    for device, device_grads in _by_device(grads).items():
        _validated(ops.scale_pass, device_grads, coef.to(device, non_blocking=True))


def clip_grads_with_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    total_norm: torch.Tensor,
    foreach: Optional[bool] = None,
) -> None:
    """Scale the gradients by ``min(1, max_norm / (total_norm + 1e-6))``, like torch's function of that name.

    Example::

        >>> total = ampclip.get_total_norm(grads)          # e.g. after an all-reduce of its square
        >>> ampclip.clip_grads_with_norm_(model.parameters(), 1.0, total)
    """
    bound = _checked_bound(max_norm, "max_norm")
    grads = _grads_of(parameters)
    if not grads:
        return
    _scale_by(grads, ops.clip_coef(bound, total_norm))


def clip_grad_norm_(
    parameters: TensorOrTensors,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: Optional[bool] = None,
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
    bound = _checked_bound(max_norm, "max_norm")
    p = _checked_norm_type(norm_type)
    params = _as_list(parameters, "parameters")
    if not error_if_nonfinite and not torch.compiler.is_compiling():
        total = _extension.clip_params(params, bound, p)
        if total is not None:
            return total
    grads = _grads_of(params)
    if not grads:
        return torch.tensor(0.0)
    devices = _by_device(grads)
    if len(devices) == 1 and not error_if_nonfinite:
        return _validated(ops.clip_grad_norm, grads, bound, p)
    total = _total_norm(grads, p)
    if error_if_nonfinite:
        _raise_if_nonfinite(total, p)
    _scale_by(grads, ops.clip_coef(bound, total))
    return total


def clip_grad_value_(
    parameters: TensorOrTensors, clip_value: float, foreach: Optional[bool] = None
) -> None:
    """Clamp every gradient element to ``[-clip_value, clip_value]`` in place, like torch's function.

    A negative or NaN ``clip_value`` raises ValueError (torch would move every element to ``clip_value``).

    Example::

        >>> ampclip.clip_grad_value_(model.parameters(), clip_value=0.5)
    """
    bound = _checked_bound(clip_value, "clip_value")
    grads = _grads_of(parameters)
    if not grads:
        return
    for device, device_grads in _by_device(grads).items():
        _validated(ops.scale_pass, device_grads, torch.ones((), device=device), None, bound)


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
    p = _checked_norm_type(norm_type)
    grads = _grads_of(model_or_parameters)
    if not grads:
        return 0.0
    return float(_total_norm(grads, p))


_TORCH_NAMES = ("clip_grad_norm_", "clip_grad_value_", "get_total_norm", "clip_grads_with_norm_")
_saved_torch: dict[str, object] = {}


def patch_torch() -> None:
    """Route ``torch.nn.utils.clip_grad_norm_`` & co. to ampclip, so code that calls torch (HF Trainer,
    Accelerate, Lightning) gets the fused path unchanged. ``unpatch_torch()`` restores torch's functions.

    Example::

        >>> ampclip.patch_torch()
        >>> torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)   # runs ampclip's
    """
    import torch.nn.utils as nn_utils
    import torch.nn.utils.clip_grad as clip_grad_module

    for name in _TORCH_NAMES:
        _saved_torch.setdefault(name, getattr(nn_utils, name))
        setattr(nn_utils, name, globals()[name])
        setattr(clip_grad_module, name, globals()[name])


def unpatch_torch() -> None:
    """Undo :func:`patch_torch`."""
    import torch.nn.utils as nn_utils
    import torch.nn.utils.clip_grad as clip_grad_module

    for name, original in _saved_torch.items():
        setattr(nn_utils, name, original)
        setattr(clip_grad_module, name, original)
    _saved_torch.clear()
