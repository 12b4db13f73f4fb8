"""Pure-PyTorch reference of every ampclip op: the source of truth for tests, the baseline for benchmarks
and the ``reference`` backend (``ampclip/backends/reference.py``), which runs on any device.

It follows the op contract of :mod:`ampclip.ops` exactly, favouring clarity over speed:

* ``norm_pass`` reads each gradient in its accumulation dtype (float32, or float64 when a gradient is
  float64), multiplies by ``inv_scale`` when given, flags inf/NaN on those unscaled values (before any
  clamp), clamps them when asked, and returns per-tensor norms, the total norm and ``found_inf``.
* ``scale_pass`` rewrites ``g <- clamp(g * inv_scale, lo, hi) * coef``, and when ``found_inf`` is set
  leaves the gradients alone or zeroes them.
* ``clip_finalize``, ``scaler_update`` and ``clip_stats_update`` are the small ops that turn the norms
  into a clip coefficient, step the loss scale, and count statistics, all on the device.

Nothing here synchronises with the host, so the fallback keeps the sync-free contract on a GPU.

The torch baselines that benchmarks and parity tests compare against live here too, so that the two
cannot drift apart.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from .contract import (
    GROWTH_TRACKER,
    HYSTERESIS_TRACKER,
    INV_SCALE,
    LAYER_LAST,
    LAYER_MAX,
    LAYER_SUM,
    SCALE,
    ZCLIP_COUNT,
    ZCLIP_MEAN,
    ZCLIP_READY,
    ZCLIP_VAR,
    Clamp,
    accumulation_dtype,
    combine_groups,
    combine_norms,
    unit_count,
)

__all__ = [
    "clip_finalize",
    "clip_stats_update",
    "exact_norm",
    "norm_pass",
    "parameters_of",
    "scale_pass",
    "scaler_update",
    "timm_adaptive_clip_grad",
    "torch_clip_grad_norm",
    "torch_unscale_and_clip",
    "unit_clip_finalize",
    "unit_norm_pass",
    "unit_scale_pass",
    "zclip_update",
]


def _unscaled(g: torch.Tensor, acc: torch.dtype, inv_scale: Optional[torch.Tensor]) -> torch.Tensor:
    u = g.to(acc)
    return u * inv_scale.to(acc) if inv_scale is not None else u


def _norm(u: torch.Tensor, norm_type: float) -> torch.Tensor:
    """The p-norm of u in u's dtype, right whenever it is representable: float32 sums of p-th powers are
    taken in float64 (|u| above 1.8e19 would overflow a float32 sum of squares), float64 ones are scaled
    by the largest |u|. No host sync."""
    if u.numel() == 0:
        return u.new_zeros(())
    if math.isinf(norm_type):
        return torch.linalg.vector_norm(u, norm_type)
    if u.dtype != torch.float64:
        return torch.linalg.vector_norm(u, norm_type, dtype=torch.float64).to(u.dtype)
    peak = u.abs().amax()
    safe = torch.where((peak > 0) & peak.isfinite(), peak, torch.ones_like(peak))
    return torch.linalg.vector_norm(u / safe, norm_type) * safe


def norm_pass(grads: list[torch.Tensor], inv_scale: Optional[torch.Tensor], norm_type: float, clamp: Clamp = None):
    """Returns ``(per_tensor_norms, total_norm, found_inf)`` of the unscaled (and clamped) gradients.

    ``per_tensor_norms`` has one entry per gradient (0 for a zero-size one); all norms are in
    :func:`accumulation_dtype`; ``found_inf`` is 0-d float32, 1.0 exactly when an unscaled element is not
    finite, whatever the clamp would make of it.
    """
    acc = accumulation_dtype(grads)
    device = grads[0].device if grads else torch.device("cpu")
    found_inf = torch.zeros((), dtype=torch.float32, device=device)
    if not grads:
        empty = torch.zeros(0, dtype=acc, device=device)
        return empty, torch.zeros((), dtype=acc, device=device), found_inf
    norms = []
    for g in grads:
        u = _unscaled(g, acc, inv_scale)
        found_inf = torch.maximum(found_inf, (~torch.isfinite(u)).any().to(torch.float32))
        if clamp is not None:
            u = u.clamp(*clamp)
        norms.append(_norm(u, norm_type))
    per_tensor = torch.stack(norms)
    return per_tensor, combine_norms(per_tensor, norm_type), found_inf


def scale_pass(
    grads: list[torch.Tensor],
    coef: torch.Tensor,
    inv_scale: Optional[torch.Tensor],
    clamp: Clamp,
    found_inf: Optional[torch.Tensor],
    zero_if_inf: bool,
) -> None:
    """In place: ``g <- clamp(g * inv_scale, lo, hi) * coef``.

    ``coef`` is 0-d (one coefficient for all) or has one entry per gradient. When ``found_inf`` is given and
    non-zero the gradients are zeroed (``zero_if_inf``) or left untouched.
    """
    if not grads:
        return
    coefs = coef.reshape(-1).expand(len(grads)) if coef.numel() == 1 else coef
    for i, g in enumerate(grads):
        if g.numel() == 0:
            continue
        acc = torch.float64 if g.dtype == torch.float64 else torch.float32
        u = _unscaled(g, acc, inv_scale)
        if clamp is not None:
            u = u.clamp(*clamp)
        new = (u * coefs[i].to(acc)).to(g.dtype)  # one rounding to the gradient's dtype
        if found_inf is not None:  # selected in the gradient's own dtype: a skipped gradient keeps its bits
            kept = torch.zeros_like(g) if zero_if_inf else g
            new = torch.where(found_inf.to(g.device) != 0, kept, new)
        g.copy_(new)


def coefficient(norms: torch.Tensor, max_norm, eps: float, rule: int) -> torch.Tensor:
    """The clip coefficient of each norm, in the norms' dtype.

    rule 0 (torch's): ``min(1, max_norm / (norm + eps))``, rounded as torch's ``clip_grad_norm_`` rounds it
    (``max_norm / t`` is ``t.reciprocal() * max_norm``); rule 1: ``max_norm / max(norm + eps, max_norm)``,
    taken as 1 unless ``norm + eps > max_norm`` (an infinite max_norm gives 1, not inf / inf).
    A NaN norm gives a NaN coefficient, as in torch.
    """
    shifted = norms + eps
    if not isinstance(max_norm, torch.Tensor):
        max_norm = torch.tensor(max_norm, dtype=norms.dtype, device=norms.device)
    bound = max_norm.to(norms.dtype)
    if rule == 0:
        return (shifted.reciprocal() * bound).clamp(max=1.0)
    divide = (shifted > bound) | shifted.isnan() | bound.isnan()
    return torch.where(divide, bound / shifted, torch.ones_like(shifted))


def clip_finalize(per_tensor, total, max_norm, mode: int, group_index, num_groups: int, norm_type: float,
                  eps: float, rule: int):
    """``(coef, group_coef, group_norms, post_clip_norm)`` from the norms and the bound.

    ``mode`` 0 (global): ``coef`` is 0-d, from ``total``. 1 (per tensor): one per tensor. 2 (per group):
    ``group_norms[G]`` combine the per-tensor norms of each group (``group_index[t]`` in ``[0, G)``),
    ``group_coef[G]`` come from them and ``coef[t] = group_coef[group_index[t]]``. ``group_coef`` and
    ``group_norms`` are empty unless per group. ``post_clip_norm`` is the norm of the clipped units.
    """
    empty = per_tensor.new_zeros(0)
    if mode == 0:
        coef = coefficient(total, max_norm, eps, rule)
        return coef, empty, empty.clone(), (total.double() * coef.double()).to(total.dtype)
    if mode == 1:
        coef = coefficient(per_tensor, max_norm, eps, rule)
        return coef, empty, empty.clone(), combine_norms(per_tensor.double() * coef.double(), norm_type).to(total.dtype)
    group_norms = combine_groups(per_tensor, group_index, num_groups, norm_type)
    group_coef = coefficient(group_norms, max_norm, eps, rule)
    post = combine_norms(group_norms.double() * group_coef.double(), norm_type).to(total.dtype)
    return group_coef[group_index], group_coef, group_norms, post


def grad_scale(inv_scale: Optional[torch.Tensor], coef: torch.Tensor, mode: int) -> torch.Tensor:
    """What a fused optimizer divides the gradients by to unscale and clip them (global mode): ``1 / (inv_scale *
    coef)`` in the coefficient's dtype; ``1 / inv_scale`` in per-tensor mode, whose coefficients it cannot take."""
    scale = torch.ones((), dtype=coef.dtype, device=coef.device) if inv_scale is None else inv_scale.to(coef.dtype)
    return (scale * coef if mode == 0 else scale).reshape(()).reciprocal()


def scaler_update(state, history, found_inf, grad_norm, slot: int, growth_factor: float, backoff_factor: float,
                  growth_interval: int, hysteresis: int, min_scale: float, max_scale: float, dynamic: bool) -> None:
    """One update of a dynamic loss scale, in place, and its history entry at ``slot``.

    With ``found_inf`` set the scale backs off (``scale * backoff_factor``, at least ``min_scale``) once
    ``hysteresis`` consecutive overflowing steps are reached; after ``growth_interval`` clean steps in a row
    it grows (``scale * growth_factor``, at most ``max_scale``, kept when that is not finite). Products are
    computed in float64 and rounded to float32, as torch's ``_amp_update_scale_`` does. Without
    ``found_inf`` (a scale set by hand) or when not ``dynamic`` the scale stays. The inverse is
    ``float32(1 / float64(scale))``, as torch's GradScaler computes it. History rows: scale after the
    update, found_inf, grad_norm (NaN when not measured).
    """
    scale = state[SCALE]
    if dynamic and found_inf is not None:
        found = found_inf.reshape(()) != 0
        growth = state[GROWTH_TRACKER]
        hyst = state[HYSTERESIS_TRACKER]
        back_off = found & (hyst <= 1)
        counted = torch.where(found, torch.zeros_like(growth), growth + 1)
        grow = ~found & (counted >= growth_interval)
        backed = (scale.double() * backoff_factor).float().clamp(min=min_scale)
        grown = (scale.double() * growth_factor).float()
        grown = torch.where(torch.isfinite(grown), grown.clamp(max=max_scale), scale)
        new_scale = torch.where(back_off, backed, torch.where(grow, grown, scale))
        state[GROWTH_TRACKER] = torch.where(grow, torch.zeros_like(counted), counted)
        state[HYSTERESIS_TRACKER] = torch.where(found, (hyst - 1).clamp(min=1), torch.full_like(hyst, hysteresis))
        state[SCALE] = new_scale
    state[INV_SCALE] = state[SCALE].double().reciprocal().float()
    nan = torch.full((), math.nan, device=state.device)
    scale_row, found_row, norm_row = history
    scale_row[slot] = state[SCALE]
    found_row[slot] = nan if found_inf is None else found_inf.reshape(()).float()
    norm_row[slot] = nan if grad_norm is None else grad_norm.reshape(()).float()


def clip_stats_update(counters, layer_stats, per_tensor, coef, found_inf) -> None:
    """In place: count a clipped step (some coefficient below 1, nothing non-finite) or a skipped one
    (found_inf), and add the per-tensor norms to the per-layer sum, max (finite norms only) and last."""
    found = found_inf.reshape(()).double() != 0
    clipped = (coef < 1).any() & ~found
    counters += torch.stack([clipped, found]).double()
    if layer_stats is not None:
        norms = per_tensor.double()
        finite = torch.where(torch.isfinite(norms), norms, torch.zeros_like(norms))
        layer_stats[LAYER_SUM] += finite
        layer_stats[LAYER_MAX] = torch.maximum(layer_stats[LAYER_MAX], finite)
        layer_stats[LAYER_LAST] = norms


# ------------------------------------------------------------------------------------- unit-wise (AGC)
def _rows(u: torch.Tensor) -> torch.Tensor:
    """u as a 2-D tensor of its units (see :func:`ampclip.ops.unit_count`), one per row."""
    rows = unit_count(u)
    return u.reshape(rows, u.numel() // rows if rows else 0)


def _row_norms(rows: torch.Tensor, norm_type: float) -> torch.Tensor:
    """The p-norm of every row, in rows' dtype, right whenever representable (as :func:`_norm`)."""
    if rows.shape[1] == 0:
        return rows.new_zeros(rows.shape[0])
    if math.isinf(norm_type):
        return torch.linalg.vector_norm(rows, norm_type, dim=1)
    if rows.dtype != torch.float64:
        return torch.linalg.vector_norm(rows, norm_type, dim=1, dtype=torch.float64).to(rows.dtype)
    peak = rows.abs().amax(dim=1, keepdim=True)
    safe = torch.where((peak > 0) & peak.isfinite(), peak, torch.ones_like(peak))
    return torch.linalg.vector_norm(rows / safe, norm_type, dim=1) * safe[:, 0]


def unit_norm_pass(tensors: list[torch.Tensor], inv_scale: Optional[torch.Tensor], norm_type: float):
    """Returns ``(unit_norms, per_tensor_norms, total_norm, found_inf)`` of the unscaled tensors.

    A tensor's units are its rows along dim 0 when it has more than one dimension, else the whole tensor
    (timm's ``unitwise_norm``); ``unit_norms`` holds every tensor's units in order. Dtypes and found_inf as in
    :func:`norm_pass`.
    """
    acc = accumulation_dtype(tensors)
    device = tensors[0].device if tensors else torch.device("cpu")
    found_inf = torch.zeros((), dtype=torch.float32, device=device)
    units, norms = [], []
    for t in tensors:
        u = _unscaled(t, acc, inv_scale)
        found_inf = torch.maximum(found_inf, (~torch.isfinite(u)).any().to(torch.float32))
        units.append(_row_norms(_rows(u), norm_type))
        norms.append(_norm(u, norm_type))
    if not tensors:
        empty = torch.zeros(0, dtype=acc, device=device)
        return empty, empty.clone(), torch.zeros((), dtype=acc, device=device), found_inf
    per_tensor = torch.stack(norms)
    return torch.cat(units), per_tensor, combine_norms(per_tensor, norm_type), found_inf


def unit_scale_pass(grads: list[torch.Tensor], coef: torch.Tensor, inv_scale: Optional[torch.Tensor],
                    found_inf: Optional[torch.Tensor], zero_if_inf: bool) -> None:
    """In place: every unit (row) of every gradient ``<- unit * inv_scale * coef[unit]``, computed in float32
    (float64 for float64 gradients) and rounded once. ``coef`` has one entry per unit, in
    :func:`unit_norm_pass`'s order. When ``found_inf`` is non-zero the gradients are zeroed (``zero_if_inf``)
    or left untouched."""
    counts = [unit_count(g) for g in grads]
    if coef.numel() != sum(counts):
        raise ValueError(f"coef must hold one entry per unit ({sum(counts)}), got {coef.numel()}")
    coefs = coef.reshape(-1).split(counts)
    for g, c in zip(grads, coefs):
        if g.numel() == 0:
            continue
        acc = torch.float64 if g.dtype == torch.float64 else torch.float32
        u = (_rows(_unscaled(g, acc, inv_scale)) * c.to(acc)[:, None]).reshape(g.shape)
        if found_inf is not None:
            skipped = torch.zeros_like(u) if zero_if_inf else g.to(acc)
            u = torch.where(found_inf.to(g.device) != 0, skipped, u)
        g.copy_(u)


def unit_clip_finalize(param_norms: torch.Tensor, grad_norms: torch.Tensor, clip_factor: float, eps: float,
                       norm_type: float):
    """``(coef, post_clip_norm)`` of adaptive gradient clipping (AGC), one coefficient per unit, in
    ``grad_norms``' dtype: a unit may keep ``max_norm = max(param_norm, eps) * clip_factor``; one whose
    gradient norm is not below it is scaled by ``max_norm / max(grad_norm, 1e-6)`` (timm's
    ``adaptive_clip_grad``). An infinite param norm leaves its unit alone. ``post_clip_norm``: the p-norm of
    the clipped units."""
    dtype = grad_norms.dtype
    bound = param_norms.to(dtype).clamp(min=eps) * clip_factor
    coef = torch.where(grad_norms < bound, torch.ones_like(grad_norms), bound / grad_norms.clamp(min=1e-6))
    post = combine_norms(grad_norms.double() * coef.double(), norm_type).to(dtype)
    return coef, post


# ------------------------------------------------------------------------------------------------ ZClip
def zclip_update(state: torch.Tensor, warmup: torch.Tensor, total: torch.Tensor, found_inf: torch.Tensor,
                 alpha: float, z_thresh: float, max_grad_norm: float, eps: float, rule: int, clip_factor: float,
                 skip_update_on_spike: bool) -> torch.Tensor:
    """One step of ZClip (Kumar et al. 2025, arXiv:2504.02507; the ``zclip`` package's arithmetic, in float64 on
    the device): returns the bound for this step's total norm and updates ``state`` (float64 [4]: EMA mean,
    EMA variance, ready, warm-up count) and ``warmup`` (float64, one slot per warm-up step) in place.

    While not ready the bound is ``max_grad_norm`` (inf: none) and each clean norm is recorded; when the
    warm-up is full, mean and variance are initialised from it. Once ready, with ``std = var ** 0.5``:
    rule 2 (percentile) flags a spike when ``norm > mean + z_thresh * std`` and clips to that; rules 0 and 1
    (z-score) flag one when ``z = (norm - mean) / (std + eps) > z_thresh`` and clip to
    ``(mean + z_thresh * std / (z / z_thresh)) * clip_factor`` (0, adaptive scaling) or ``mean`` (1). The
    bound is that threshold, at most ``max_grad_norm``, when the norm exceeds it, else the largest finite
    value of ``total``'s dtype (no clip under either coefficient rule). Then mean and variance move towards
    the threshold on a spike (unless ``skip_update_on_spike``), towards the norm otherwise:
    ``mean = alpha * mean + (1 - alpha) * x``, ``var = alpha * var + (1 - alpha) * (x - mean) ** 2``. A step
    whose norm is not finite or whose ``found_inf`` is set changes no state.
    """
    dtype = total.dtype
    norm = total.reshape(()).double()
    clean = (found_inf.reshape(()) == 0) & norm.isfinite()
    mean, var, count = state[ZCLIP_MEAN], state[ZCLIP_VAR], state[ZCLIP_COUNT]
    ready = state[ZCLIP_READY] != 0
    std = var ** 0.5
    if rule == 2:
        threshold = mean + z_thresh * std
        spike = norm > threshold
    else:
        z = (norm - mean) / (std + eps)
        spike = z > z_thresh
        threshold = (mean + (z_thresh * std) / (z / z_thresh)) * clip_factor if rule == 0 else mean
    effective = torch.where(spike, threshold, math.inf).clamp(max=max_grad_norm)
    no_clip = torch.finfo(dtype).max
    bound = torch.where(ready, torch.where(norm > effective, effective, no_clip), min(max_grad_norm, no_clip))
    # the EMA step of a ready run
    x = torch.where(spike, threshold, norm)
    new_mean = alpha * mean + (1 - alpha) * x
    new_var = alpha * var + (1 - alpha) * (x - new_mean) ** 2
    update = ready & clean
    if skip_update_on_spike:
        update = update & ~spike
    # the warm-up of a run not ready yet
    record = ~ready & clean
    slot = count.clamp(max=warmup.numel() - 1).long().reshape(1)
    warmup.index_copy_(0, slot, torch.where(record, norm, warmup.index_select(0, slot)[0]).reshape(1))
    new_count = count + record.double()
    filled = record & (new_count >= warmup.numel())
    first_mean = warmup.sum() / warmup.numel()
    first_var = ((warmup - first_mean) ** 2).sum() / warmup.numel()
    new_state = [None] * 4
    new_state[ZCLIP_MEAN] = torch.where(filled, first_mean, torch.where(update, new_mean, mean))
    new_state[ZCLIP_VAR] = torch.where(filled, first_var, torch.where(update, new_var, var))
    new_state[ZCLIP_READY] = (ready | filled).double()
    new_state[ZCLIP_COUNT] = new_count
    state.copy_(torch.stack(new_state))
    return bound.to(dtype)


# ------------------------------------------------------------------------------------------------ oracles
def exact_norm(grads: list[torch.Tensor], norm_type: float, inv_scale: float | None = None) -> float:
    """The total norm in float64 on the host: the yardstick tests compare every backend with."""
    if not grads:
        return 0.0
    flat = torch.cat([g.detach().double().reshape(-1).cpu() for g in grads])
    if inv_scale is not None:
        flat = flat * inv_scale
    if flat.numel() == 0:
        return 0.0
    return float(torch.linalg.vector_norm(flat, norm_type))


def parameters_of(grads: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    """Parameters whose ``.grad`` are ``grads``, so the parameter-based clip functions (torch's and
    ampclip's) act on bare gradient tensors as they would on a model's. A parameter's data is a zero-stride
    view of one element: it costs no memory."""
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros((), dtype=g.dtype, device=g.device).expand(g.shape))
        p.grad = g
        params.append(p)
    return params


def torch_clip_grad_norm(grads: list[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """torch's own ``clip_grad_norm_(foreach=True)`` on a list of gradients (the drop-in baseline)."""
    return torch.nn.utils.clip_grad_norm_(parameters_of(grads), max_norm, norm_type, foreach=True)


def torch_unscale_and_clip(
    grads: list[torch.Tensor], inv_scale: torch.Tensor, max_norm: float, norm_type: float = 2.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch chain that ampclip replaces: ``GradScaler.unscale_`` then ``clip_grad_norm_(foreach=True)``.

    5N bytes: the unscale reads and writes, the norm reads, the clip reads and writes. Returns
    ``(total_norm, found_inf)``.
    """
    found_inf = torch.zeros((), dtype=torch.float32, device=inv_scale.device)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for group in by_dtype.values():
        torch._amp_foreach_non_finite_check_and_unscale_(group, found_inf, inv_scale)
    return torch_clip_grad_norm(grads, max_norm, norm_type), found_inf


@functools.lru_cache(maxsize=None)
def timm_adaptive_clip_grad():
    """timm's ``adaptive_clip_grad(parameters, clip_factor, eps, norm_type)`` (the AGC baseline of the tests
    and benchmarks), or None when timm is not installed.

    ``import timm`` imports torchvision, whose wheel may not load beside the torch installed here ("operator
    torchvision::nms does not exist"); ``timm/utils/agc.py`` itself needs torch only, so it is then loaded by
    its path.
    """
    import importlib.util

    try:
        from timm.utils.agc import adaptive_clip_grad

        return adaptive_clip_grad
    except Exception:  # not installed, or torchvision failing to import
        pass
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return None
    import os

    path = os.path.join(list(spec.submodule_search_locations)[0], "utils", "agc.py")
    if not os.path.exists(path):
        return None
    module_spec = importlib.util.spec_from_file_location("_timm_agc", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.adaptive_clip_grad
