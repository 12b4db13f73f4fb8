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

import math
from typing import Optional

import torch

from .ops import (
    GROWTH_TRACKER,
    HYSTERESIS_TRACKER,
    INV_SCALE,
    LAYER_LAST,
    LAYER_MAX,
    LAYER_SUM,
    SCALE,
    accumulation_dtype,
    combine_groups,
    combine_norms,
)

__all__ = [
    "clip_finalize",
    "clip_stats_update",
    "exact_norm",
    "norm_pass",
    "parameters_of",
    "scale_pass",
    "scaler_update",
    "torch_clip_grad_norm",
    "torch_unscale_and_clip",
]

Clamp = Optional[tuple[float, float]]


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
    (``max_norm / t`` is ``t.reciprocal() * max_norm``); rule 1: ``max_norm / max(norm + eps, max_norm)``.
    A NaN norm gives a NaN coefficient, as in torch.
    """
    shifted = norms + eps
    if not isinstance(max_norm, torch.Tensor):
        max_norm = torch.tensor(max_norm, dtype=norms.dtype, device=norms.device)
    bound = max_norm.to(norms.dtype)
    if rule == 0:
        return (shifted.reciprocal() * bound).clamp(max=1.0)
    return bound / torch.maximum(shifted, bound.expand_as(shifted))


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
