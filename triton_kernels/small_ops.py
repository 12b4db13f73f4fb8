"""The small ops of the op contract in one program each: the clip coefficient from the norms, one
loss-scale update, and the clip statistics. As torch ops each would be four to twenty launches of a few
microseconds; these read and write a few numbers per tensor in one launch, so a whole training step's
bookkeeping costs three launches whatever the number of tensors.

Arithmetic follows ``ampclip.reference`` (the contract): coefficients in the norms' dtype, rounded as torch's
``clip_grad_norm_`` rounds them (IEEE division); combinations of norms in float64, scaled by the largest so
nothing overflows; scale products in float64 rounded to float32, as torch's ``_amp_update_scale_``.
Python floats arrive as their float64 bits (Triton would pass them as float32).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .clip_math import _as_float, _clipped_norm, _coefficient, _p_root, _power, _store_coefficients
from .fused_norm import NORM_P, _norm_kind, float_bits

BLOCK = 1024  # tensors per step of a loop (10,000 tensors: 10 steps)
# The clip coefficient's steps: 4 norms a thread (4 warps) keep the per-group loop of the float64 p-norms free
# of spills (one coefficient a thread: clip_math.COEF_BLOCK).
CLIP_BLOCK = 512


@triton.jit
def _finalize_groups(per_tensor, bound, eps, group_index, count, num_groups, coef_out, group_coef_out,
                     group_norms_out, post_out, p, inv_p, NORM: tl.constexpr, RULE: tl.constexpr,
                     BLOCK_SIZE: tl.constexpr):
    """Per-group mode: each group's norm from its tensors' norms (scaled by the largest of all), then the
    groups' coefficients, each tensor's (NaN for a group index out of range) and the post-clip norm, each a
    pass over what the one before stored. The divisions stay out of the O(groups x tensors) loop: each is a
    call that makes ptxas spill the registers live across it. Groups are few."""
    offsets = tl.arange(0, BLOCK_SIZE)
    peak = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
    for i in range(0, count, BLOCK_SIZE):
        v = tl.abs(tl.load(per_tensor + i + offsets, mask=i + offsets < count, other=0.0).to(tl.float64))
        peak = tl.maximum(peak, tl.where(v != v, 0.0, v))
    top = tl.max(peak, axis=0)
    scale = tl.where((top > 0.0) & (top < float("inf")), top, 1.0)
    inv_scale = 1.0 / scale  # one division, not one per element
    for g in range(0, num_groups):
        acc = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
        nan = tl.zeros([BLOCK_SIZE], dtype=tl.int32)
        for i in range(0, count, BLOCK_SIZE):
            mask = i + offsets < count
            member = (tl.load(group_index + i + offsets, mask=mask, other=-1) == g) & mask
            v = tl.abs(tl.load(per_tensor + i + offsets, mask=member, other=0.0).to(tl.float64))
            nan = tl.maximum(nan, tl.where(v != v, 1, 0))
            if NORM == 2:
                acc = tl.maximum(acc, tl.where(v != v, 0.0, v))
            else:
                acc += _power(tl.where(v != v, 0.0, v) * inv_scale, p, NORM)
        if NORM == 2:
            group_norm = tl.max(acc, axis=0)
        else:
            group_norm = tl.where(top == float("inf"), top, _p_root(tl.sum(acc, axis=0), inv_p, NORM) * scale)
        group_norm = tl.where(tl.max(nan, axis=0) > 0, float("nan"), group_norm)
        tl.store(group_norms_out + g, group_norm.to(group_norms_out.dtype.element_ty))
    # Each pass reads what the one before stored: the barriers make every thread's stores visible to all.
    tl.debug_barrier()
    _store_coefficients(group_norms_out, group_coef_out, bound, eps, num_groups, RULE)
    tl.debug_barrier()
    for i in range(0, count, BLOCK_SIZE):
        mask = i + offsets < count
        group = tl.load(group_index + i + offsets, mask=mask, other=0)
        known = mask & (group >= 0) & (group < num_groups)
        c = tl.load(group_coef_out + group, mask=known, other=float("nan"))
        tl.store(coef_out + i + offsets, c, mask=mask)
    post = _clipped_norm(group_norms_out, group_coef_out, num_groups, p, inv_p, NORM, BLOCK_SIZE)
    tl.store(post_out, post.to(post_out.dtype.element_ty))


@triton.jit(do_not_specialize=["bound_bits", "eps_bits", "count", "num_groups"], do_not_specialize_on_alignment=[
    "per_tensor", "total", "bound_ptr", "group_index", "coef_out", "group_coef_out", "group_norms_out", "post_out"])
def _clip_finalize_kernel(per_tensor, total, bound_ptr, bound_bits: tl.int64, group_index, count, num_groups,
                          coef_out, group_coef_out, group_norms_out, post_out, p, inv_p, eps_bits: tl.int64,
                          MODE: tl.constexpr,
                          NORM: tl.constexpr, RULE: tl.constexpr, HAS_BOUND_TENSOR: tl.constexpr,
                          BLOCK_SIZE: tl.constexpr):
    eps = _as_float(eps_bits)
    if HAS_BOUND_TENSOR:
        bound = tl.load(bound_ptr).to(tl.float64)
    else:
        bound = _as_float(bound_bits)
    if MODE == 0:
        norm = tl.load(total)
        c = _coefficient(norm, bound, eps, RULE)
        tl.store(coef_out, c)
        tl.store(post_out, (norm.to(tl.float64) * c.to(tl.float64)).to(post_out.dtype.element_ty))
    elif MODE == 1:
        _store_coefficients(per_tensor, coef_out, bound, eps, count, RULE)
        # Read back rather than computed again (a division per norm is a call that makes ptxas spill): the
        # barrier makes every thread's stores visible to the whole program.
        tl.debug_barrier()
        post = _clipped_norm(per_tensor, coef_out, count, p, inv_p, NORM, BLOCK_SIZE)
        tl.store(post_out, post.to(post_out.dtype.element_ty))
    else:
        _finalize_groups(per_tensor, bound, eps, group_index, count, num_groups, coef_out, group_coef_out,
                         group_norms_out, post_out, p, inv_p, NORM, RULE, BLOCK_SIZE)


@triton.jit(do_not_specialize=["slot", "size", "growth_bits", "backoff_bits", "interval", "hysteresis", "min_bits",
                               "max_bits"],
            do_not_specialize_on_alignment=["state", "history", "found_ptr", "norm_ptr"])
def _scaler_update_kernel(state, history, found_ptr, norm_ptr, slot, size, growth_bits: tl.int64,
                          backoff_bits: tl.int64, interval, hysteresis, min_bits: tl.int64, max_bits: tl.int64,
                          HAS_FOUND: tl.constexpr, HAS_NORM: tl.constexpr, DYNAMIC: tl.constexpr):
    """state: float32 [scale, inv_scale, growth tracker, hysteresis tracker]; history: float32 [3, size]."""
    scale = tl.load(state)
    found = float("nan")
    if HAS_FOUND:
        found = tl.load(found_ptr).to(tl.float32)
    if DYNAMIC and HAS_FOUND:
        overflow = found != 0.0
        hyst = tl.load(state + 3)
        counted = tl.where(overflow, 0.0, tl.load(state + 2) + 1.0)
        back_off = overflow & (hyst <= 1.0)
        grow = (found == 0.0) & (counted >= interval.to(tl.float32))
        min_scale = _as_float(min_bits).to(tl.float32)
        max_scale = _as_float(max_bits).to(tl.float32)
        backed = (scale.to(tl.float64) * _as_float(backoff_bits)).to(tl.float32)
        backed = tl.where(backed < min_scale, min_scale, backed)
        grown = (scale.to(tl.float64) * _as_float(growth_bits)).to(tl.float32)
        grown = tl.where(tl.abs(grown) < float("inf"), tl.where(grown > max_scale, max_scale, grown), scale)
        scale = tl.where(back_off, backed, tl.where(grow, grown, scale))
        tl.store(state + 2, tl.where(grow, 0.0, counted))
        tl.store(state + 3, tl.where(overflow, tl.maximum(hyst - 1.0, 1.0), hysteresis.to(tl.float32)))
        tl.store(state, scale)
    tl.store(state + 1, (1.0 / scale.to(tl.float64)).to(tl.float32))
    norm = float("nan")
    if HAS_NORM:
        norm = tl.load(norm_ptr).to(tl.float32)
    tl.store(history + slot, scale)
    tl.store(history + size + slot, found)
    tl.store(history + 2 * size + slot, norm)


@triton.jit(do_not_specialize=["count", "coef_count"],
            do_not_specialize_on_alignment=["counters", "layer_stats", "per_tensor", "coef", "found_ptr"])
def _clip_stats_kernel(counters, layer_stats, per_tensor, coef, found_ptr, count, coef_count,
                       HAS_LAYERS: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """counters: float64 [clipped, skipped]; layer_stats: float64 [3, count] (sum, max, last)."""
    offsets = tl.arange(0, BLOCK_SIZE)
    found = tl.load(found_ptr) != 0.0
    below = tl.zeros([BLOCK_SIZE], dtype=tl.int32)
    for i in range(0, coef_count, BLOCK_SIZE):
        c = tl.load(coef + i + offsets, mask=i + offsets < coef_count, other=1.0)
        below = tl.maximum(below, tl.where(c < 1.0, 1, 0))
    clipped = (tl.max(below, axis=0) > 0) & (found == 0)
    tl.store(counters, tl.load(counters) + tl.where(clipped, 1.0, 0.0).to(tl.float64))
    tl.store(counters + 1, tl.load(counters + 1) + tl.where(found, 1.0, 0.0).to(tl.float64))
    if HAS_LAYERS:
        for i in range(0, count, BLOCK_SIZE):
            mask = i + offsets < count
            n = tl.load(per_tensor + i + offsets, mask=mask, other=0.0).to(tl.float64)
            finite = tl.where((n == n) & (tl.abs(n) < float("inf")), n, 0.0)
            tl.store(layer_stats + i + offsets, tl.load(layer_stats + i + offsets, mask=mask) + finite, mask=mask)
            peak = tl.load(layer_stats + count + i + offsets, mask=mask)
            tl.store(layer_stats + count + i + offsets, tl.maximum(peak, finite), mask=mask)
            tl.store(layer_stats + 2 * count + i + offsets, n, mask=mask)


# ------------------------------------------------------------------------------------------------ launchers
def clip_finalize_triton(per_tensor: torch.Tensor, total: torch.Tensor, max_norm, mode: int,
                         group_index: Optional[torch.Tensor], num_groups: int, norm_type: float, eps: float,
                         rule: int):
    """``(coef, group_coef, group_norms, post_clip_norm)``: ``ampclip::clip_finalize`` in one launch.

    ``max_norm`` is a number or a 0-d device tensor; see ``ampclip.reference.clip_finalize`` for the rest.
    """
    device, dtype = per_tensor.device, per_tensor.dtype
    count = per_tensor.numel()
    coef = torch.empty(() if mode == 0 else (count,), dtype=dtype, device=device)
    groups = num_groups if mode == 2 else 0
    group_coef = torch.empty(groups, dtype=dtype, device=device)
    group_norms = torch.empty(groups, dtype=dtype, device=device)
    post = torch.empty((), dtype=dtype, device=device)
    # The global mode reads no norm kind and no group index: one variant, whatever the caller passes.
    kind = _norm_kind(norm_type) if mode != 0 else 0
    bound_tensor = isinstance(max_norm, torch.Tensor)
    _clip_finalize_kernel[(1,)](
        per_tensor, total, max_norm if bound_tensor else total, 0 if bound_tensor else float_bits(float(max_norm)),
        group_index if mode == 2 else per_tensor, count, groups, coef, group_coef, group_norms, post,
        float(norm_type) if kind == NORM_P else 1.0, 1.0 / norm_type if kind == NORM_P else 1.0,
        float_bits(float(eps)), MODE=mode, NORM=kind, RULE=rule, HAS_BOUND_TENSOR=int(bound_tensor),
        BLOCK_SIZE=CLIP_BLOCK,
    )
    return coef, group_coef, group_norms, post


def scaler_update_triton(state, history, found_inf, grad_norm, slot: int, growth_factor: float,
                         backoff_factor: float, growth_interval: int, hysteresis: int, min_scale: float,
                         max_scale: float, dynamic: bool) -> None:
    """``ampclip::scaler_update`` in one launch (see ``ampclip.reference.scaler_update``)."""
    _scaler_update_kernel[(1,)](
        state, history, found_inf if found_inf is not None else state, grad_norm if grad_norm is not None else state,
        slot, history.shape[1], float_bits(float(growth_factor)), float_bits(float(backoff_factor)),
        int(growth_interval), int(hysteresis), float_bits(float(min_scale)), float_bits(float(max_scale)),
        HAS_FOUND=int(found_inf is not None), HAS_NORM=int(grad_norm is not None), DYNAMIC=int(bool(dynamic)),
    )


def clip_stats_update_triton(counters, layer_stats, per_tensor, coef, found_inf) -> None:
    """``ampclip::clip_stats_update`` in one launch (see ``ampclip.reference.clip_stats_update``)."""
    _clip_stats_kernel[(1,)](
        counters, layer_stats if layer_stats is not None else counters, per_tensor, coef.reshape(-1), found_inf,
        per_tensor.numel(), coef.numel(), HAS_LAYERS=int(layer_stats is not None), BLOCK_SIZE=BLOCK,
    )
