"""The ``cuda`` backend: the CUDA C++ kernels of ``csrc/cuda/`` (``cuda_norm_pass``, ``cuda_clip_norm_pass``,
``cuda_scale_pass`` and ``cuda_clip_finalize``, entries of ``ampclip._C`` when it was built with a CUDA toolkit
and a CUDA build of torch), on CUDA tensors, for sm_80 and newer. A global clip is two launches: the norm
pass, whose last block computes the coefficient, and the scale pass; per tensor, three (the norm pass,
clip_finalize and the scale pass).

The default on CUDA tensors where Triton cannot be imported (its priority is below the ``triton`` backend's);
``backend="cuda"`` picks it anywhere it is built. Like the Triton adapter, this one owns what the kernels
should not know about: the cached tensor table of each gradient list (``tensor_table.py``, the same cache, so
both backends share a list's table), the staging of non-contiguous gradients, gradients that must not be
written in place (expanded) or that share memory (scaled one after the other), and the conversion of the
scalars the kernels take as one-element device tensors. The C++ host functions check every argument before
they allocate or launch. ``scaler_update`` and ``clip_stats_update`` are the reference's torch ops (the base
class's), a handful of device ops each.
"""

from __future__ import annotations

import torch

from . import Backend, Unavailable
from . import cpp as _cpp
from .tensor_table import table_to_write, tensor_table

_FLOATS = (torch.float32, torch.float64)


def _on(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as a ``dtype`` tensor on ``device``: itself when it already is one."""
    return t if t.device == device and t.dtype == dtype else t.to(device=device, dtype=dtype)


def _float32(t, device):
    """inv_scale and found_inf: one float32 element on the table's device (GradScaler's own dtype; a float64
    inv_scale is rounded to float32)."""
    return None if t is None else _on(t, device, torch.float32)


class CudaBackend(Backend):
    name = "cuda"
    device_types = frozenset({"cuda"})
    priority = 15  # below triton (20): Triton is the default on CUDA tensors wherever it can be imported
    validates_inputs = True  # the table checks dtypes, layouts and devices; the C++ host functions the rest
    fused_clip_modes = frozenset({"global"})  # in the norm pass's last block (fused_clip_cuda.cu)

    def __init__(self, ext):
        self._C = ext
        self._bounds: dict = {}  # a number bound of clip_finalize as a device scalar, made once

    def _norm_args(self, table, inv_scale, norm_type, clamp) -> tuple:
        """The arguments every norm pass takes: the table (its non-contiguous tensors staged), its ticket
        counters, the scale, the norm and the clamp."""
        if not norm_type > 0:
            raise ValueError(f"norm_type must be > 0 or inf, got {norm_type}")
        lo, hi = clamp if clamp is not None else (None, None)
        return (*table.exact_sections(), table.chunk, table.has_fp64, table.tickets, table.num_filled,
                _float32(inv_scale, table.buffer.device), float(norm_type), lo, hi)

    def _staged_table(self, grads):
        table = tensor_table(grads)
        table.stage_in(grads)
        return table

    def norm_pass(self, grads, inv_scale, norm_type, clamp):
        return self._C.cuda_norm_pass(*self._norm_args(self._staged_table(grads), inv_scale, norm_type, clamp))

    def clip_norm_pass(self, grads, inv_scale, norm_type, clamp, max_norm, mode, eps, rule):
        if mode != 0:  # per tensor: the norm pass, then clip_finalize
            return super().clip_norm_pass(grads, inv_scale, norm_type, clamp, max_norm, mode, eps, rule)
        return self.clip_norm_pass_on_table(self._staged_table(grads), inv_scale, norm_type, clamp, max_norm, mode,
                                            eps, rule)

    def clip_norm_pass_on_table(self, table, inv_scale, norm_type, clamp, max_norm, mode, eps, rule):
        # global mode (fused_clip_modes): the kernel's last block computes the one coefficient
        return self._C.cuda_clip_norm_pass(*self._norm_args(table, inv_scale, norm_type, clamp), float(max_norm),
                                           float(eps), int(rule))

    def scale_pass_on_table(self, table, coef, inv_scale, clamp, found_inf, zero_if_inf):
        self._scale_table((), table, coef, inv_scale, clamp, found_inf, zero_if_inf)  # versions: the caller's

    def scale_pass(self, grads, coef, inv_scale, clamp, found_inf, zero_if_inf):
        table = table_to_write(grads, coef, lambda g, c: self.scale_pass(g, c, inv_scale, clamp, found_inf,
                                                                        zero_if_inf))
        if table is None:
            return
        if coef.numel() not in (1, table.num_tensors):
            raise ValueError(f"coef must hold 1 or {table.num_tensors} elements, got {coef.numel()}")
        table.stage_in(grads)
        self._scale_table(grads, table, coef, inv_scale, clamp, found_inf, zero_if_inf)
        table.stage_out(grads)

    def _scale_table(self, grads, table, coef, inv_scale, clamp, found_inf, zero_if_inf):
        """The scale pass on ``table``, then a version bump of each of ``grads``."""
        device = table.buffer.device
        # float32 or float64, 0-d or [T] (a float16/bfloat16 coefficient widens exactly to float32)
        coef = _on(coef, device, torch.float64 if coef.dtype == torch.float64 else torch.float32)
        if coef.numel() != 1:
            coef = coef.reshape(-1)
        lo, hi = clamp if clamp is not None else (None, None)
        self._C.cuda_scale_pass(grads, *table.exact_sections(), table.chunk, coef, _float32(inv_scale, device), lo, hi,
                                _float32(found_inf, device), bool(zero_if_inf))

    def clip_finalize(self, per_tensor, total, max_norm, mode, group_index, num_groups, norm_type, eps, rule):
        device = per_tensor.device
        fits = (  # a wrong device is the kernel's clear error; these are inputs the reference handles
            per_tensor.dtype in _FLOATS
            and per_tensor.dim() == 1
            and per_tensor.numel() >= 1
            and total.numel() == 1
            and total.dtype == per_tensor.dtype
            and 0.0 <= eps < float("inf")
            and (mode != 2 or (group_index is not None and num_groups >= 1))
        )
        if not fits:  # no norm at all, norms of two dtypes: the reference's torch ops
            return super().clip_finalize(per_tensor, total, max_norm, mode, group_index, num_groups, norm_type, eps,
                                         rule)
        if isinstance(max_norm, torch.Tensor):
            bound = max_norm if max_norm.device == device and max_norm.dtype in _FLOATS else max_norm.to(
                device=device, dtype=torch.float64)
        else:
            bound = self._bound(float(max_norm), device)
        groups = _on(group_index, device, torch.int64).contiguous() if mode == 2 else None
        return self._C.cuda_clip_finalize(per_tensor.contiguous(), total, bound, int(mode), groups,
                                          int(num_groups) if mode == 2 else 0, float(norm_type), float(eps),
                                          int(rule))

    def _bound(self, value: float, device: torch.device) -> torch.Tensor:
        """``value`` as a float64 device scalar, filled once (no copy) and kept: a clip with a fixed bound
        then launches no fill. Never written: the kernel only reads it. Not kept when made during a CUDA
        graph capture, whose fill runs only when the graph is replayed."""
        key = (value, device)
        bound = self._bounds.get(key)
        if bound is None:
            bound = torch.full((), value, dtype=torch.float64, device=device)
            if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
                if len(self._bounds) > 64:  # a bound that changes every step (a schedule): keep the cache small
                    self._bounds.clear()
                self._bounds[key] = bound
        return bound


def load() -> Backend:
    ext = _cpp._C
    if ext is None:
        raise Unavailable(f"the compiled extension ampclip._C is not loaded ({_cpp.ERROR})")
    if not hasattr(ext, "cuda_clip_norm_pass"):
        raise Unavailable("ampclip._C was built without its CUDA kernels (they build with a CUDA toolkit and a CUDA "
                          "build of torch, unless AMPCLIP_SKIP_CUDA_BUILD=1; see docs/install.md)")
    return CudaBackend(ext)
