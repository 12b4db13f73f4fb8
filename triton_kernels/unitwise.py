"""Unit-wise passes of adaptive gradient clipping (AGC): the norm of every unit (a row along dim 0, or the whole
tensor when it has one dimension or none) of every tensor in one read, every unit scaled by its own
coefficient in one read and write, and AGC's coefficients from the unit norms. One launch per kernel whatever
the number of tensors, units or dtypes.

The launchers take a tensor table (``ampclip/backends/tensor_table.py``: data pointers, dtype codes, staged
non-contiguous tensors) and a unit layout (``ampclip/backends/unit_layout.py``): a program handles one
*segment*, at most 32,768 elements of one tensor covering whole units (several rows of a weight) or a piece of
a unit longer than that. The norm pass is four launches:

1. ``_unit_norm_kernel``, one program per segment: one partial of |u|^p (or max |u|) and one flag (0 finite,
   1 inf, 2 NaN) per unit or piece it covers, each into a slot of its own (float64).
2. ``_unit_finalize_kernel``: each unit's slots in order (one, unless the unit is longer than a segment) into
   its norm, accumulator and flag.
3. ``_tensor_finalize_kernel``, one program per tensor: its units' accumulators in order.
4. ``_total_finalize_kernel``, one program: the tensors' accumulators in order, and found_inf.

Deterministic (no atomics, fixed reduction trees) and exact about inf/NaN: the element arithmetic, the
fixed-order reduction (``_reduce_slots``) are ``fused_norm.py``'s own, the coefficient arithmetic
``small_ops.py``'s.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from . import fused_norm
from .clip_math import COEF_BLOCK, _as_float, _clipped_norm, _divide
from .fused_norm import (
    _FP32_MAX,
    _FP64_MAX,
    NORM_INF,
    NORM_P,
    TINY_PARTIAL,
    _chunk_partial,
    _norm_kind,
    _reduce_slots,
    _root,
    float_bits,
    on_device,
)

BLOCK = 1024  # elements per loop step
UNIT_BLOCK = 1024  # units per program of the unit finalize
TENSOR_BLOCK = 256  # units per step of the per-tensor finalize
TOTAL_BLOCK = 1024  # tensors (or units) per step of the one-program reductions
# The interpreter truncates float32 -> bfloat16; the GPU rounds to nearest even (see fused_scale.py).
_SOFT_BF16 = int(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def _measure_units(base, start, n, length, slot, partial_out, flag_out, inv, p, ACC: tl.constexpr,
                   MAX_FINITE: tl.constexpr, NORM: tl.constexpr, HAS_INV: tl.constexpr, WIDEN: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr):
    """The partial of every unit of a segment (or of its one piece of a long unit), each into its slot; a
    float32 sum that, with nothing inf or NaN, overflowed or is tiny (fused_norm.TINY_PARTIAL: its squares may
    have underflowed; an all-zero unit is read again too, as its slot does not keep ``nonzero``) is taken again
    in float64. That re-sum is a loop of its own over what the first stored (a barrier makes the stores visible
    to the whole program): in the first loop, both accumulations would be live at once and ptxas would spill."""
    # whole rows, or one piece of a row longer than the segment: n // step is 1. In int32 (n <= SEGMENT): a
    # 64-bit division is a call, and ptxas spills the registers live across it.
    step = tl.minimum(n, length).to(tl.int32)
    rows = n.to(tl.int32) // step
    for r in range(0, rows):
        partial, flag, _ = _chunk_partial(base, start + r * step, step, 0, inv, p, inv, inv, ACC, MAX_FINITE, NORM,
                                          HAS_INV, 0, BLOCK_SIZE)  # (no clamp: lo and hi are unused)
        tl.store(partial_out + slot + r, partial)
        tl.store(flag_out + slot + r, flag.to(tl.float64))
    if WIDEN:
        tl.debug_barrier()
        for r in range(0, rows):
            stored = tl.load(partial_out + slot + r)
            if ((stored == float("inf")) | (stored < TINY_PARTIAL)) & (tl.load(flag_out + slot + r) == 0.0):
                partial, flag, _ = _chunk_partial(base, start + r * step, step, 0, inv, p, inv, inv, tl.float64,
                                                  MAX_FINITE, NORM, HAS_INV, 0, BLOCK_SIZE)
                tl.store(partial_out + slot + r, partial)
                tl.store(flag_out + slot + r, flag.to(tl.float64))


@triton.jit(do_not_specialize_on_alignment=[
    "table_ptrs", "table_codes", "seg_tensor", "seg_start", "seg_len", "seg_slot", "row_len", "inv_scale_ptr",
    "partial_out", "flag_out"])
def _unit_norm_kernel(table_ptrs, table_codes, seg_tensor, seg_start, seg_len, seg_slot, row_len, inv_scale_ptr,
                      partial_out, flag_out, p, ACC: tl.constexpr, MAX_FINITE: tl.constexpr, NORM: tl.constexpr,
                      HAS_INV: tl.constexpr, WIDEN: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(seg_tensor + pid)
    start = tl.load(seg_start + pid)
    n = tl.load(seg_len + pid)
    slot = tl.load(seg_slot + pid)
    length = tl.load(row_len + t)
    code = tl.load(table_codes + t) & 3  # the dtype code, without the table's ALIGNED bit
    addr = tl.load(table_ptrs + t)
    inv = 1.0
    if HAS_INV:
        inv = tl.load(inv_scale_ptr).to(ACC)
    if code == 0:
        _measure_units(addr.to(tl.pointer_type(tl.float16)), start, n, length, slot, partial_out, flag_out, inv, p,
                       ACC, MAX_FINITE, NORM, HAS_INV, WIDEN, BLOCK_SIZE)
    elif code == 1:
        _measure_units(addr.to(tl.pointer_type(tl.bfloat16)), start, n, length, slot, partial_out, flag_out, inv, p,
                       ACC, MAX_FINITE, NORM, HAS_INV, WIDEN, BLOCK_SIZE)
    elif code == 2:
        _measure_units(addr.to(tl.pointer_type(tl.float32)), start, n, length, slot, partial_out, flag_out, inv, p,
                       ACC, MAX_FINITE, NORM, HAS_INV, WIDEN, BLOCK_SIZE)
    else:
        _measure_units(addr.to(tl.pointer_type(tl.float64)), start, n, length, slot, partial_out, flag_out, inv, p,
                       ACC, MAX_FINITE, NORM, HAS_INV, WIDEN, BLOCK_SIZE)


@triton.jit(do_not_specialize=["num_units", "max_slots"], do_not_specialize_on_alignment=[
    "partials", "flags", "unit_slot_begin", "norm_out", "acc_out", "flag_out"])
def _unit_finalize_kernel(partials, flags, unit_slot_begin, num_units, max_slots, norm_out, acc_out, flag_out,
                          inv_p, NORM: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    units = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = units < num_units
    begin = tl.load(unit_slot_begin + units, mask=mask, other=0)
    end = tl.load(unit_slot_begin + units + 1, mask=mask, other=0)
    acc = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
    flag = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
    for k in range(0, max_slots):  # 1 unless a unit is longer than a segment
        present = mask & (begin + k < end)
        v = tl.load(partials + begin + k, mask=present, other=0.0)
        flag = tl.maximum(flag, tl.load(flags + begin + k, mask=present, other=0.0))
        if NORM == 2:
            acc = tl.maximum(acc, v)
        else:
            acc += v
    tl.store(norm_out + units, _root(acc, flag, inv_p, NORM).to(norm_out.dtype.element_ty), mask=mask)
    tl.store(acc_out + units, acc, mask=mask)
    tl.store(flag_out + units, flag, mask=mask)


@triton.jit(do_not_specialize_on_alignment=["partials", "flags", "chunk_begin", "norm_out", "acc_out", "flag_out"])
def _tensor_finalize_kernel(partials, flags, chunk_begin, norm_out, acc_out, flag_out, inv_p,
                            NORM: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    begin = tl.load(chunk_begin + t)
    count = (tl.load(chunk_begin + t + 1) - begin).to(tl.int32)  # zero-size tensor: no slot, norm 0
    total, f = _reduce_slots(partials + begin, flags + begin, count, NORM, BLOCK_SIZE)
    norm = _root(total, f, inv_p, NORM)
    tl.store(norm_out + t, norm.to(norm_out.dtype.element_ty))
    tl.store(acc_out + t, total)
    tl.store(flag_out + t, f)


@triton.jit(do_not_specialize=["num_tensors"],
            do_not_specialize_on_alignment=["accs", "flags", "total_out", "found_out"])
def _total_finalize_kernel(accs, flags, num_tensors, total_out, found_out, inv_p,
                           NORM: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    total, f = _reduce_slots(accs, flags, num_tensors, NORM, BLOCK_SIZE)
    tl.store(total_out, _root(total, f, inv_p, NORM).to(total_out.dtype.element_ty))
    tl.store(found_out, tl.where(f > 0.0, 1.0, 0.0).to(tl.float32))


@triton.jit
def _scale_run(base, start, n, coef, inv, zero, COMPUTE: tl.constexpr, HAS_INV: tl.constexpr,
               SOFT_BF16: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """x <- x * inv * coef (or 0 when ``zero``) over elements start .. start+n, rounded once."""
    c = coef.to(COMPUTE)
    offsets = tl.arange(0, BLOCK_SIZE)
    for i in range(0, n, BLOCK_SIZE):
        mask = i + offsets < n
        idx = start + i + offsets
        u = tl.load(base + idx, mask=mask, other=0.0).to(COMPUTE)
        if HAS_INV:
            u = u * inv.to(COMPUTE)
        u = tl.where(zero, 0.0, u * c)
        if SOFT_BF16:
            bits = u.to(tl.uint32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            rounded = tl.where(u != u, 0x7FC0, rounded).to(tl.uint16)
            tl.store(base + idx, rounded.to(tl.bfloat16, bitcast=True), mask=mask)
        else:
            tl.store(base + idx, u.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _scale_units(base, start, n, length, unit, coef_ptr, inv, clean, zero, COMPUTE: tl.constexpr,
                 HAS_INV: tl.constexpr, SOFT_BF16: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    step = tl.minimum(n, length).to(tl.int32)
    rows = n.to(tl.int32) // step  # (as in _measure_units)
    for r in range(0, rows):
        coef = tl.load(coef_ptr + unit + r)
        if HAS_INV:
            write = clean
        else:
            write = clean & (coef.to(tl.float64) != 1.0)  # * exactly 1 changes nothing: no read, no write
        if write | zero:
            _scale_run(base, start + r * step, step, coef, inv, zero, COMPUTE, HAS_INV, SOFT_BF16, BLOCK_SIZE)


@triton.jit(do_not_specialize_on_alignment=[
    "table_ptrs", "table_codes", "seg_tensor", "seg_start", "seg_len", "seg_unit", "row_len", "coef_ptr",
    "inv_scale_ptr", "found_inf_ptr"])
def _unit_scale_kernel(table_ptrs, table_codes, seg_tensor, seg_start, seg_len, seg_unit, row_len, coef_ptr,
                       inv_scale_ptr, found_inf_ptr, HAS_INV: tl.constexpr, HAS_FOUND: tl.constexpr,
                       ZERO_IF_INF: tl.constexpr, SOFT_BF16: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    found = 0.0
    if HAS_FOUND:
        found = tl.load(found_inf_ptr).to(tl.float32)
    clean = found == 0.0
    zero = (found != 0.0) & (ZERO_IF_INF != 0)
    if clean | zero:
        t = tl.load(seg_tensor + pid)
        start = tl.load(seg_start + pid)
        n = tl.load(seg_len + pid)
        unit = tl.load(seg_unit + pid)
        length = tl.load(row_len + t)
        code = tl.load(table_codes + t) & 3  # the dtype code, without the table's ALIGNED bit
        addr = tl.load(table_ptrs + t)
        inv = 1.0
        if HAS_INV:
            inv = tl.load(inv_scale_ptr)
        if code == 0:
            _scale_units(addr.to(tl.pointer_type(tl.float16)), start, n, length, unit, coef_ptr, inv, clean, zero,
                         tl.float32, HAS_INV, 0, BLOCK_SIZE)
        elif code == 1:
            _scale_units(addr.to(tl.pointer_type(tl.bfloat16)), start, n, length, unit, coef_ptr, inv, clean, zero,
                         tl.float32, HAS_INV, SOFT_BF16, BLOCK_SIZE)
        elif code == 2:
            _scale_units(addr.to(tl.pointer_type(tl.float32)), start, n, length, unit, coef_ptr, inv, clean, zero,
                         tl.float32, HAS_INV, 0, BLOCK_SIZE)
        else:
            _scale_units(addr.to(tl.pointer_type(tl.float64)), start, n, length, unit, coef_ptr, inv, clean, zero,
                         tl.float64, HAS_INV, 0, BLOCK_SIZE)


@triton.jit
def _agc_coefficient(param_norm, grad_norm, factor, eps):
    """AGC's coefficient in grad_norm's dtype: bound = max(param_norm, eps) * factor; 1 below it, else
    bound / max(grad_norm, 1e-6). The comparisons keep NaN, as torch.clamp does."""
    dtype = grad_norm.dtype
    floor = eps.to(dtype)
    pn = param_norm.to(dtype)
    bound = tl.where(pn < floor, floor, pn) * factor.to(dtype)
    tiny = tl.full(grad_norm.shape, 1e-6, tl.float64).to(dtype)
    denominator = tl.where(grad_norm < tiny, tiny, grad_norm)
    return tl.where(grad_norm < bound, 1.0, _divide(bound, denominator)).to(dtype)


@triton.jit(do_not_specialize=["count", "factor_bits", "eps_bits"],
            do_not_specialize_on_alignment=["param_norms", "grad_norms", "coef_out", "post_out"])
def _unit_clip_finalize_kernel(param_norms, grad_norms, coef_out, post_out, count, factor_bits, eps_bits, p, inv_p,
                               NORM: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """One program: every unit's coefficient, then the p-norm of the clipped units (small_ops' arithmetic)."""
    factor = _as_float(factor_bits)
    eps = _as_float(eps_bits)
    offsets = tl.arange(0, COEF_BLOCK)
    for i in range(0, count, COEF_BLOCK):
        mask = i + offsets < count
        g = tl.load(grad_norms + i + offsets, mask=mask, other=0.0)
        c = _agc_coefficient(tl.load(param_norms + i + offsets, mask=mask, other=1.0), g, factor, eps)
        tl.store(coef_out + i + offsets, c, mask=mask)
    # Read back rather than computed again (a division is a call that makes ptxas spill the registers live
    # across it): the barrier makes every thread's stores visible to the whole program.
    tl.debug_barrier()
    post = _clipped_norm(grad_norms, coef_out, count, p, inv_p, NORM, BLOCK_SIZE)
    tl.store(post_out, post.to(post_out.dtype.element_ty))


# ------------------------------------------------------------------------------------------------ launchers
def unit_norm_triton(table, layout, inv_scale: Optional[torch.Tensor], norm_type: float):
    """``(unit_norms, per_tensor_norms, total_norm, found_inf)``: ``ampclip::unit_norm_pass``.

    ``table``: the tensors' table (non-contiguous ones staged in); ``layout``: their unit layout. Norms are
    float32 (float64 when a tensor is float64); four launches, no host sync, bitwise deterministic.
    """
    if not (norm_type > 0):
        raise ValueError(f"norm_type must be > 0 or inf, got {norm_type}")
    device = table.buffer.device
    acc_dtype = torch.float64 if table.has_fp64 else torch.float32
    kind = _norm_kind(norm_type)
    inv_p = 1.0 / norm_type if kind == NORM_P else 1.0
    inv_scale = on_device(inv_scale, device)
    n, u, s = table.num_tensors, layout.num_units, layout.num_slots
    slots = fused_norm._scratch(2 * s, torch.float64, device)  # partials, flags
    units = fused_norm._scratch(2 * u, torch.float64, device)  # unit accumulators, flags
    tensors = fused_norm._scratch(2 * n, torch.float64, device)  # tensor accumulators, flags
    # outputs of their own: a registered op's outputs may not alias one another (torch.compile refuses it)
    unit_norms = torch.empty(u, dtype=acc_dtype, device=device)
    per_tensor = torch.empty(n, dtype=acc_dtype, device=device)
    total = torch.empty((), dtype=acc_dtype, device=device)
    found_inf = torch.empty((), dtype=torch.float32, device=device)
    if layout.num_segments:
        _unit_norm_kernel[(layout.num_segments,)](
            table.dev_ptrs, table.codes, layout.seg_tensor, layout.seg_start, layout.seg_len, layout.seg_slot,
            layout.row_len, inv_scale if inv_scale is not None else table.buffer, slots[:s], slots[s:],
            float(norm_type) if kind == NORM_P else 1.0, ACC=tl.float64 if table.has_fp64 else tl.float32,
            MAX_FINITE=_FP64_MAX if table.has_fp64 else _FP32_MAX, NORM=kind, HAS_INV=int(inv_scale is not None),
            WIDEN=int(not table.has_fp64 and kind != NORM_INF), BLOCK_SIZE=BLOCK,
        )
    if u:
        _unit_finalize_kernel[(triton.cdiv(u, UNIT_BLOCK),)](
            slots[:s], slots[s:], layout.unit_slot_begin, u, layout.max_slots, unit_norms, units[:u], units[u:], inv_p,
            NORM=kind, BLOCK_SIZE=UNIT_BLOCK,
        )
    _tensor_finalize_kernel[(n,)](
        units[:u], units[u:], layout.tensor_unit_begin, per_tensor, tensors[:n], tensors[n:], inv_p, NORM=kind,
        BLOCK_SIZE=TENSOR_BLOCK,
    )
    _total_finalize_kernel[(1,)](
        tensors[:n], tensors[n:], n, total, found_inf, inv_p, NORM=kind, BLOCK_SIZE=TOTAL_BLOCK,
    )
    return unit_norms, per_tensor, total, found_inf


def unit_scale_triton(table, layout, coef: torch.Tensor, inv_scale: Optional[torch.Tensor],
                      found_inf: Optional[torch.Tensor], zero_if_inf: bool) -> None:
    """In place ``unit <- unit * inv_scale * coef[unit]``: ``ampclip::unit_scale_pass``, one launch.

    ``coef`` has one entry per unit; with ``found_inf`` non-zero the tensors are zeroed (``zero_if_inf``) or
    left alone, decided on the device. Units with a coefficient of exactly 1 and nothing to unscale are not
    touched. Non-contiguous tensors are staged in before and copied back out by the caller.
    """
    if coef.numel() != layout.num_units:
        raise ValueError(f"coef must hold one entry per unit ({layout.num_units}), got {coef.numel()}")
    if layout.num_segments == 0:
        return
    device = table.buffer.device
    coef = coef.reshape(-1).to(device).contiguous()
    inv_scale, found_inf = on_device(inv_scale, device), on_device(found_inf, device)
    _unit_scale_kernel[(layout.num_segments,)](
        table.dev_ptrs, table.codes, layout.seg_tensor, layout.seg_start, layout.seg_len, layout.seg_unit,
        layout.row_len, coef, inv_scale if inv_scale is not None else coef,
        found_inf if found_inf is not None else coef, HAS_INV=int(inv_scale is not None),
        HAS_FOUND=int(found_inf is not None), ZERO_IF_INF=int(bool(zero_if_inf)), SOFT_BF16=_SOFT_BF16,
        BLOCK_SIZE=BLOCK,
    )


def unit_clip_finalize_triton(param_norms: torch.Tensor, grad_norms: torch.Tensor, clip_factor: float, eps: float,
                              norm_type: float):
    """``(coef, post_clip_norm)``: ``ampclip::unit_clip_finalize`` in one launch (see
    ``ampclip.reference.unit_clip_finalize``)."""
    if param_norms.numel() != grad_norms.numel():
        raise ValueError(f"param_norms and grad_norms must have one entry per unit each, got {param_norms.numel()} "
                         f"and {grad_norms.numel()}")
    grad_norms = grad_norms.contiguous()
    param_norms = param_norms.to(grad_norms.device).contiguous()
    coef = torch.empty_like(grad_norms)
    post = torch.empty((), dtype=grad_norms.dtype, device=grad_norms.device)
    kind = _norm_kind(norm_type)
    _unit_clip_finalize_kernel[(1,)](
        param_norms, grad_norms, coef, post, grad_norms.numel(), float_bits(float(clip_factor)),
        float_bits(float(eps)), float(norm_type) if kind == NORM_P else 1.0,
        1.0 / norm_type if kind == NORM_P else 1.0, NORM=kind, BLOCK_SIZE=TOTAL_BLOCK,
    )
    return coef, post
