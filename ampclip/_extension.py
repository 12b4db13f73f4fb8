"""Loads the optional compiled extension ``ampclip._C`` and exposes its kernels as a backend.

``import ampclip`` works without it: a missing or broken build warns once and the reference backend runs.
"""

from __future__ import annotations

import warnings

import torch

AVAILABLE = False
HAS_CUDA = False
ERROR: str | None = None
_C = None

try:
    from . import _C  # registers the ampclip_C:: ops with the dispatcher

    AVAILABLE = True
    HAS_CUDA = bool(torch.ops.ampclip_C.built_with_cuda())
except Exception as exc:  # ImportError, or an undefined symbol from a build against another torch
    ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        f"ampclip: the compiled extension ampclip._C could not be loaded ({ERROR}); CPU gradients use the "
        "pure-PyTorch reference backend. Build it with `pip install -e . --no-build-isolation`.",
        RuntimeWarning,
        stacklevel=2,
    )


# Eager calls go straight into the kernels (see csrc/python_entry.cpp); the entries return None when the
# call needs the dispatcher (tensor subclasses, fake tensors, dispatch modes), which the registered op handles.
def norm_pass(grads, inv_scale, norm_type):
    out = _C.norm_pass(grads, inv_scale, norm_type)
    return out if out is not None else torch.ops.ampclip_C.norm_pass(grads, inv_scale, norm_type)


def scale_pass(grads, coef, inv_scale, clip_value, found_inf, zero_if_inf):
    if _C.scale_pass(grads, coef, inv_scale, clip_value, found_inf, zero_if_inf) is None:
        torch.ops.ampclip_C.scale_pass(grads, coef, inv_scale, clip_value, found_inf, zero_if_inf)


def clip_grad_norm(grads, max_norm, norm_type):
    return torch.ops.ampclip_C.clip_grad_norm_(grads, max_norm, norm_type)


def clip_params(params, max_norm, norm_type):
    """The drop-in clip straight from a list of parameters, or None when they need the general path.

    Reads ``.grad`` in C++ and calls the CPU kernel without the dispatcher: on 2000 small gradients that
    saves more time than the kernel takes. Returns None, having changed nothing, for anything but dense
    CPU float gradients of plain Tensors or Parameters, and when no gradient exists.
    """
    if _C is None:
        return None
    return _C.clip_params(params, max_norm, norm_type)


def present_grads(params):
    """``(gradients that exist, their parameter indices or None when all exist)``, read in C++; None
    without the extension or when a parameter is not a plain Tensor or Parameter."""
    return None if _C is None else _C.present_grads(params)


def tensor_signature(tensors):
    """``(hash, bytes)`` that change when any tensor's data pointer, size, dtype, device or layout does (not
    its identity); None without the extension or for tensor subclasses."""
    return None if _C is None else _C.tensor_signature(tensors)
