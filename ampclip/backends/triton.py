"""The ``triton`` backend: the Triton kernels of ``triton_kernels/`` (installed as ``ampclip.triton_kernels``)
on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how the test suite runs them without a GPU).

The adapter owns what the kernels should not know about: the cached tensor table of each gradient list
(``tensor_table.py``) and the staging of non-contiguous gradients in and out of it.
"""

from __future__ import annotations

import os

from . import Backend, Unavailable
from .cpp import bump_versions
from .tensor_table import table_to_write, tensor_table, writable_table
from .unit_layout import unit_layout


def _interpreter_runs_kernels() -> bool:
    """CPU tensors need ``TRITON_INTERPRET=1`` and triton 3.7 or newer: 3.6's interpreter passes scalars
    around as one-element arrays, which NumPy 2 refuses as loop bounds (compiled, the kernels need 3.6)."""
    import triton

    major, minor = (int(part) for part in triton.__version__.split(".")[:2])
    return os.environ.get("TRITON_INTERPRET") == "1" and (major, minor) >= (3, 7)


class TritonBackend(Backend):
    name = "triton"
    device_types = frozenset({"cuda"})
    priority = 20
    validates_inputs = True  # the table checks dtypes, layouts and devices when it is built (tensor_table.py)
    fused_clip_modes = frozenset({"global", "per_tensor"})  # the norm pass's last program (fused_norm.py)

    def __init__(self, kernels):
        self._k = kernels
        self._on_cpu = _interpreter_runs_kernels()

    def runs_on(self, device) -> bool:
        return device.type == "cuda" or (device.type == "cpu" and self._on_cpu)

    def norm_pass(self, grads, inv_scale, norm_type, clamp):
        table = tensor_table(grads)
        table.stage_in(grads)
        return self._k.fused_norm_triton(table, inv_scale, norm_type, clamp)

    def clip_norm_pass(self, grads, inv_scale, norm_type, clamp, max_norm, mode, eps, rule):
        table = tensor_table(grads)
        table.stage_in(grads)
        return self.clip_norm_pass_on_table(table, inv_scale, norm_type, clamp, max_norm, mode, eps, rule)

    def clip_norm_pass_on_table(self, table, inv_scale, norm_type, clamp, max_norm, mode, eps, rule):
        return self._k.fused_norm_triton(table, inv_scale, norm_type, clamp, (max_norm, mode, eps, rule))

    def scale_pass_on_table(self, table, coef, inv_scale, clamp, found_inf, zero_if_inf):
        self._k.fused_scale_triton(table, coef, inv_scale, clamp, found_inf, zero_if_inf)

    def scale_pass(self, grads, coef, inv_scale, clamp, found_inf, zero_if_inf):
        table = table_to_write(grads, coef, lambda g, c: self.scale_pass(g, c, inv_scale, clamp, found_inf,
                                                                        zero_if_inf))
        if table is None:
            return
        table.stage_in(grads)
        self.scale_pass_on_table(table, coef, inv_scale, clamp, found_inf, zero_if_inf)
        table.stage_out(grads)
        bump_versions(grads)  # written through raw pointers: tell autograd, as torch's in-place ops do

    def clip_finalize(self, per_tensor, total, max_norm, mode, group_index, num_groups, norm_type, eps, rule):
        return self._k.clip_finalize_triton(per_tensor, total, max_norm, mode, group_index, num_groups, norm_type,
                                            eps, rule)

    def scaler_update(self, state, history, found_inf, grad_norm, slot, growth_factor, backoff_factor,
                      growth_interval, hysteresis, min_scale, max_scale, dynamic):
        self._k.scaler_update_triton(state, history, found_inf, grad_norm, slot, growth_factor, backoff_factor,
                                     growth_interval, hysteresis, min_scale, max_scale, dynamic)

    def clip_stats_update(self, counters, layer_stats, per_tensor, coef, found_inf):
        self._k.clip_stats_update_triton(counters, layer_stats, per_tensor, coef, found_inf)

    # the unit-wise passes of AGC (triton_kernels/unitwise.py) and ZClip's step (triton_kernels/zclip.py)
    def unit_norm_pass(self, tensors, inv_scale, norm_type):
        table = tensor_table(tensors)
        table.stage_in(tensors)
        return self._k.unit_norm_triton(table, unit_layout(table, tensors), inv_scale, norm_type)

    def unit_scale_pass(self, grads, coef, inv_scale, found_inf, zero_if_inf):
        table = writable_table(grads)
        layout = unit_layout(table, grads)
        if coef.numel() != layout.num_units:
            raise ValueError(f"coef must hold one entry per unit ({layout.num_units}), got {coef.numel()}")
        if table.aliased:  # one tensor after the other, each reading what the ones before it wrote
            for g, c in zip(grads, coef.reshape(-1).split(layout.counts)):
                self.unit_scale_pass([g], c, inv_scale, found_inf, zero_if_inf)
            return
        table.stage_in(grads)
        self._k.unit_scale_triton(table, layout, coef, inv_scale, found_inf, zero_if_inf)
        table.stage_out(grads)
        bump_versions(grads)

    def unit_clip_finalize(self, param_norms, grad_norms, clip_factor, eps, norm_type):
        return self._k.unit_clip_finalize_triton(param_norms, grad_norms, clip_factor, eps, norm_type)

    def zclip_update(self, state, warmup, total, found_inf, alpha, z_thresh, max_grad_norm, eps, rule, clip_factor,
                     skip_update_on_spike):
        return self._k.zclip_update_triton(state, warmup, total, found_inf, alpha, z_thresh, max_grad_norm, eps,
                                           rule, clip_factor, skip_update_on_spike)


def load() -> Backend:
    try:
        from .. import triton_kernels
    except Exception as exc:  # triton missing or too old: the other backends still work
        raise Unavailable(f"triton cannot be imported or compile the kernels ({type(exc).__name__}: {exc})") from None
    return TritonBackend(triton_kernels)
