"""Backends: one adapter module per way of running the op contract of :mod:`ampclip.ops`.

Each adapter module (``reference.py``, ``cpp.py``, ``triton.py``, ``cuda.py``) has a ``load()`` that returns a
:class:`Backend`, or raises :class:`Unavailable` saying why it cannot run here. Only :mod:`ampclip.ops` and
the adapters import the compiled extension or ``ampclip.triton_kernels``; the public layer reaches a backend
through ``ops`` alone. Adding a backend is its kernels, one adapter module and its name in ``NAMES``.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from ..contract import SUPPORTED_DTYPES, check_grads

__all__ = ["NAMES", "SUPPORTED_DTYPES", "Backend", "Unavailable", "available", "check_grads", "load",
           "unavailable_reason"]

# Every backend ampclip knows, in the order `ampclip env` lists them.
NAMES = ("reference", "cpp", "triton", "cuda")


class Unavailable(RuntimeError):
    """A backend that cannot run here (not built, a dependency missing or too old)."""


class Backend:
    """The op contract one backend implements (see :mod:`ampclip.ops` for the exact semantics).

    ``norm_pass`` and ``scale_pass`` read the gradients; every backend has its own. The small ops
    (``clip_finalize``, ``scaler_update``, ``clip_stats_update``) touch a few numbers per tensor; a backend
    that has no kernel for them inherits the reference's, which are a handful of torch ops each.

    An eager method may return ``NotImplemented`` when it cannot take its input directly (a tensor subclass,
    an active dispatch mode): ``ops`` then calls the registered op, whose dispatcher unwraps the input and
    calls the method again.

    Attributes:
        name: the name users pass as ``backend=``.
        device_types: the device types whose tensors it takes (see also :meth:`runs_on`).
        priority: the backend with the highest priority that runs on a device is the default there.
        validates_inputs: it checks dtypes, layouts and devices itself before writing anything (else
            ``ops`` checks them in Python first).
        fused_clip_modes: the clip modes ("global", "per_tensor") whose ``clip_norm_pass`` is one pass of its
            own (the GPU backends' last-block norm pass), so a clip takes it; in the others a clip runs the
            norm pass and ``clip_finalize``, as the default ``clip_norm_pass`` would, without computing a
            ``grad_scale`` it does not need. A backend with such modes runs on tensor tables
            (``tensor_table.py``) and has :meth:`clip_norm_pass_on_table` and :meth:`scale_pass_on_table`.
    """

    name: str = ""
    device_types: frozenset = frozenset()
    priority: int = 0
    validates_inputs: bool = False
    fused_clip_modes: frozenset = frozenset()

    def runs_on(self, device: torch.device) -> bool:
        return device.type in self.device_types

    # ---------------------------------------------------------------------------- the gradient passes
    def norm_pass(self, grads, inv_scale, norm_type, clamp):
        raise NotImplementedError

    def scale_pass(self, grads, coef, inv_scale, clamp, found_inf, zero_if_inf):
        raise NotImplementedError

    def clip_norm_pass(self, grads, inv_scale, norm_type, clamp, max_norm, mode, eps, rule):
        """The norm pass and the clip coefficient in one call (global or per-tensor mode, a number as the
        bound): ``(per_tensor, total, found_inf, coef, post_clip_norm, grad_scale)``. A backend without a fused
        kernel runs its norm pass and its clip_finalize, one after the other."""
        from .. import reference

        measured = self.norm_pass(grads, inv_scale, norm_type, clamp)
        if measured is NotImplemented:
            return NotImplemented
        per_tensor, total, found_inf = measured
        finalized = self.clip_finalize(per_tensor, total, max_norm, mode, None, 0, norm_type, eps, rule)
        if finalized is NotImplemented:
            return NotImplemented
        coef, _, _, post = finalized
        return per_tensor, total, found_inf, coef, post, reference.grad_scale(inv_scale, coef, mode)

    # The two passes of a fused clip on the tensors of a table whose layout and versions the caller has seen to
    # (``ops.steady_clip``: nothing staged, no version bumped here). Only for backends with ``fused_clip_modes``.
    def clip_norm_pass_on_table(self, table, inv_scale, norm_type, clamp, max_norm, mode, eps, rule):
        raise NotImplementedError

    def scale_pass_on_table(self, table, coef, inv_scale, clamp, found_inf, zero_if_inf):
        raise NotImplementedError

    # ---------------------------------------------------------------------------- small ops
    def clip_finalize(self, per_tensor, total, max_norm, mode, group_index, num_groups, norm_type, eps, rule):
        from .. import reference

        return reference.clip_finalize(per_tensor, total, max_norm, mode, group_index, num_groups, norm_type, eps,
                                       rule)

    def scaler_update(self, state, history, found_inf, grad_norm, slot, growth_factor, backoff_factor,
                      growth_interval, hysteresis, min_scale, max_scale, dynamic):
        from .. import reference

        reference.scaler_update(state, history, found_inf, grad_norm, slot, growth_factor, backoff_factor,
                                growth_interval, hysteresis, min_scale, max_scale, dynamic)

    def clip_stats_update(self, counters, layer_stats, per_tensor, coef, found_inf):
        from .. import reference

        reference.clip_stats_update(counters, layer_stats, per_tensor, coef, found_inf)

    # ---------------------------------------------------------------------------- unit-wise passes, ZClip
    # A backend without kernels of its own for these inherits the reference's: torch ops on any device, no
    # host sync, a few launches per tensor instead of one per call (ops checks the input for them).
    def unit_norm_pass(self, tensors, inv_scale, norm_type):
        from .. import reference

        return reference.unit_norm_pass(tensors, inv_scale, norm_type)

    def unit_scale_pass(self, grads, coef, inv_scale, found_inf, zero_if_inf):
        from .. import reference

        reference.unit_scale_pass(grads, coef, inv_scale, found_inf, zero_if_inf)

    def unit_clip_finalize(self, param_norms, grad_norms, clip_factor, eps, norm_type):
        from .. import reference

        return reference.unit_clip_finalize(param_norms, grad_norms, clip_factor, eps, norm_type)

    def zclip_update(self, state, warmup, total, found_inf, alpha, z_thresh, max_grad_norm, eps, rule, clip_factor,
                     skip_update_on_spike):
        from .. import reference

        return reference.zclip_update(state, warmup, total, found_inf, alpha, z_thresh, max_grad_norm, eps, rule,
                                      clip_factor, skip_update_on_spike)

    # ---------------------------------------------------------------------------- eager shortcuts
    def clip_grad_norm(self, grads, max_norm, norm_type):
        """Norm pass, coefficient and scale pass in one call, or None where the backend has no such entry."""
        return None

    def clip_params(self, params, max_norm, norm_type):
        """The drop-in clip straight from a list of parameters (their ``.grad`` read by the backend), or
        None, having changed nothing, when the input needs the general path."""
        return None


_loaded: dict[str, Backend] = {}
_reasons: dict[str, str] = {}


def load(name: str) -> Optional[Backend]:
    """The backend called ``name``, or None when it cannot run here (:func:`unavailable_reason` says why).
    Raises ValueError for a name that is not in :data:`NAMES`."""
    if name not in NAMES:
        raise ValueError(f"unknown ampclip backend {name!r}; expected one of {NAMES} or 'auto'")
    if name not in _loaded and name not in _reasons:
        try:
            _loaded[name] = importlib.import_module(f"{__name__}.{name}").load()
        except Unavailable as exc:
            _reasons[name] = str(exc)
    return _loaded.get(name)


def unavailable_reason(name: str) -> Optional[str]:
    """Why backend ``name`` cannot run here, or None when it can."""
    load(name)
    return _reasons.get(name)


def available() -> dict[str, bool]:
    """``{name: loaded}`` for every backend."""
    return {name: load(name) is not None for name in NAMES}
