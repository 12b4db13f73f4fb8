"""The op contract's fixed parts: what every layer above the kernels agrees on, with nothing of ampclip below it.

The constants of the small ops' state layouts, the coefficient rules, the dtypes a gradient may have and the
one check of a gradient list, the dtype norms are accumulated in, how partial norms combine, and a tensor's
units for unit-wise norms. ``ops`` (the way down), the adapters in ``backends/`` and the reference all import
them from here, so the layers read public API -> ops -> backends -> reference and kernels -> contract, with no
circle; ``ops`` re-exports each name (``ampclip.ops.EPS`` and so on). The semantics of the ops themselves are
in the docstring of :mod:`ampclip.ops`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .errors import GradientTypeError, GradientValueError

__all__ = [
    "CLIPPED", "EPS", "GROWTH_TRACKER", "HISTORY_ROWS", "HYSTERESIS_TRACKER", "INV_SCALE", "LAYER_LAST", "LAYER_MAX",
    "LAYER_SUM", "MODES", "RULES", "SCALE", "SKIPPED", "SUPPORTED_DTYPES", "ZCLIP_COUNT", "ZCLIP_MEAN",
    "ZCLIP_READY", "ZCLIP_RULES", "ZCLIP_VAR", "Clamp", "accumulation_dtype", "check_grads", "combine_groups",
    "combine_norms", "unit_count",
]

EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s eps, kept for identical coefficients
MODES = {"global": 0, "per_tensor": 1, "per_group": 2}
RULES = {"torch": 0, "max": 1}  # min(1, m / (n + eps)), and m / max(n + eps, m)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

Clamp = Optional[tuple[float, float]]

# The layouts the small ops read and write. A loss scaler's state: float32 [4] (the trackers are small
# integers, exact in float32 up to 2^24); its history: float32 [3, history_size].
SCALE, INV_SCALE, GROWTH_TRACKER, HYSTERESIS_TRACKER = range(4)
HISTORY_ROWS = ("scale", "found_inf", "grad_norm")
# Clip statistics: counters float64 [2]; per-layer statistics float64 [3, tensors].
CLIPPED, SKIPPED = range(2)
LAYER_SUM, LAYER_MAX, LAYER_LAST = range(3)
# ZClip's state: float64 [4]; its warm-up buffer: float64 [max(warmup_steps, 1)]. The rules of its bound.
ZCLIP_MEAN, ZCLIP_VAR, ZCLIP_READY, ZCLIP_COUNT = range(4)
ZCLIP_RULES = {"adaptive_scaling": 0, "mean": 1, "percentile": 2}


def check_grads(grads, writable: bool = False) -> None:
    """Dense float16/bfloat16/float32/float64 tensors on one device; for a write, no element shares memory
    with another of the same tensor (an expanded, zero-stride gradient). A clear error before anything runs:
    ops checks what a backend does not (``validates_inputs``), a table when it is built. The errors are
    :class:`ampclip.errors.GradientTypeError` and ``GradientValueError``: RuntimeError, as torch raises for
    such a gradient, and TypeError or ValueError."""
    device = grads[0].device
    for i, g in enumerate(grads):
        if g.layout != torch.strided or g.is_nested:  # a nested tensor is no run of elements to read
            layout = "nested" if g.is_nested else g.layout
            raise GradientTypeError(f"ampclip clips dense gradients only; gradient {i} has layout {layout}")
        if g.dtype not in SUPPORTED_DTYPES:
            raise GradientTypeError(f"ampclip clips float16, bfloat16, float32 and float64 gradients; gradient {i} "
                                    f"is {g.dtype}")
        if g.device != device:
            raise GradientValueError(f"ampclip needs the gradients of one call on one device; gradient {i} is "
                                     f"on {g.device}, gradient 0 on {device}")
        if writable and torch._debug_has_internal_overlap(g) == 1:
            raise GradientValueError(f"gradient {i} has elements that share memory (an expanded, stride-0 tensor): "
                                     "it cannot be written in place; clone it first")


def accumulation_dtype(tensors) -> torch.dtype:
    """float64 when any tensor is float64, else float32: the dtype of every norm ampclip returns."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def combine_groups(norms: torch.Tensor, group_index: torch.Tensor, num_groups: int, norm_type: float):
    """``out[g]``: the p-norm of ``norms[group_index == g]`` (0 for an empty group), in ``norms``' dtype.

    Computed in float64 and scaled by the largest norm, so partial norms whose p-th powers overflow still
    combine (the p-norm of p-norms is the p-norm of all their elements; the max for the inf-norm). NaN
    propagates. Device ops only: no host sync.
    """
    wide = norms.double()
    if math.isinf(norm_type):
        out = wide.new_zeros(num_groups).scatter_reduce(0, group_index, wide, reduce="amax", include_self=True)
        nan = wide.new_zeros(num_groups).index_add(0, group_index, wide.isnan().double()) > 0
        return torch.where(nan, math.nan, out).to(norms.dtype)
    peak = wide.abs().amax() if wide.numel() else wide.new_zeros(())
    scale = torch.where((peak > 0) & peak.isfinite(), peak, torch.ones_like(peak))
    sums = wide.new_zeros(num_groups).index_add(0, group_index, (wide / scale).abs().pow(norm_type))
    return (sums.pow(1.0 / norm_type) * scale).to(norms.dtype)


def combine_norms(norms: torch.Tensor, norm_type: float) -> torch.Tensor:
    """The p-norm of a 1-D tensor of partial norms (per tensor, per device or per rank); 0 when empty.
    See :func:`combine_groups`."""
    if norms.numel() == 0:
        return norms.new_zeros(())
    return combine_groups(norms, torch.zeros(norms.shape, dtype=torch.int64, device=norms.device), 1, norm_type)[0]


def unit_count(t: torch.Tensor) -> int:
    """The units of ``t`` for unit-wise norms: its rows along dim 0 when it has more than one dimension (the
    output units of a Linear or Conv weight), else one, the whole tensor (timm's ``unitwise_norm``)."""
    return t.shape[0] if t.dim() > 1 else 1
