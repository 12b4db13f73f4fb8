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

Deterministic (no atomics, fixed reduction trees) and exact about inf/NaN, as ``fused_norm.py``, whose
arithmetic these kernels follow (they are kept apart so that either file can change alone).
"""

from __future__ import annotations

import os
import struct
from typing import Optional

import torch
import triton
import triton.language as tl

BLOCK = 1024  # elements per loop step
UNIT_BLOCK = 1024  # units per program of the unit finalize
TENSOR_BLOCK = 256  # units per step of the per-tensor finalize
TOTAL_BLOCK = 1024  # tensors (or units) per step of the one-program reductions
NORM_L2, NORM_L1, NORM_INF, NORM_P = 0, 1, 2, 3
# Tests set this to float("nan") to poison the scratch buffers, proving every slot is written before read.
SCRATCH_FILL: Optional[float] = None
_FP32_MAX = torch.finfo(torch.float32).max
_FP64_MAX = torch.finfo(torch.float64).max
# The interpreter truncates float32 -> bfloat16; the GPU rounds to nearest even (see fused_scale.py).
_SOFT_BF16 = int(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def _partial(base, start, n, inv, p, ACC: tl.constexpr, MAX_FINITE: tl.constexpr, NORM: tl.constexpr,
             HAS_INV: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """(partial as float64, flag) of elements start .. start+n of ``base``, accumulated in ACC."""
    acc = tl.zeros([BLOCK_SIZE], dtype=ACC)
    flag = tl.zeros([BLOCK_SIZE], dtype=tl.int32)
    offsets = tl.arange(0, BLOCK_SIZE)
    for i in range(0, n, BLOCK_SIZE):
        mask = i + offsets < n
        x = tl.load(base + (start + i + offsets), mask=mask, other=0.0).to(ACC)
        if HAS_INV:
            x = x * inv
        a = tl.abs(x)
        is_nan = x != x
        flag = tl.maximum(flag, tl.where(is_nan, 2, tl.where(a > MAX_FINITE, 1, 0)))
        if NORM == 0:
            acc += x * x
        elif NORM == 1:
            acc += a
        elif NORM == 2:
            acc = tl.maximum(acc, tl.where(is_nan, 0.0, a))  # NaN comes back from the flag
        else:
            safe = tl.where(a == 0.0, 1.0, a)
            acc += tl.where(a == 0.0, 0.0, tl.exp2(p * tl.log2(safe)))
    if NORM == 2:
        partial = tl.max(acc, axis=0)
    else:
        partial = tl.sum(acc, axis=0)
    return partial.to(tl.float64), tl.max(flag, axis=0)


@triton.jit
def _measure_units(base, start, n, length, slot, partial_out, flag_out, inv, p, ACC: tl.constexpr,
                   MAX_FINITE: tl.constexpr, NORM: tl.constexpr, HAS_INV: tl.constexpr, WIDEN: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr):
    """The partial of every unit of a segment (or of its one piece of a long unit), each into its slot; a
    float32 sum that overflowed with nothing inf or NaN is taken again in float64."""
    rows = tl.maximum(n // length, 1)
    step = tl.minimum(n, length).to(tl.int32)
    for r in range(0, rows):
        first = start + r * step
        partial, flag = _partial(base, first, step, inv, p, ACC, MAX_FINITE, NORM, HAS_INV, BLOCK_SIZE)
        if WIDEN:
            if (partial == float("inf")) & (flag == 0):
                partial, flag = _partial(base, first, step, inv, p, tl.float64, MAX_FINITE, NORM, HAS_INV,
                                         BLOCK_SIZE)
        tl.store(partial_out + slot + r, partial)
        tl.store(flag_out + slot + r, flag.to(tl.float64))


@triton.jit
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


@triton.jit
def _root(acc, flag, inv_p, NORM: tl.constexpr):
    """The norm from its float64 accumulator: sqrt, identity, max with NaN restored, or acc^(1/p)."""
    if NORM == 0:
        out = tl.sqrt(acc)
    elif NORM == 1:
        out = acc
    elif NORM == 2:
        out = tl.where(flag == 2.0, float("nan"), acc)
    else:
        safe = tl.where(acc == 0.0, 1.0, acc)
        out = tl.where(acc == 0.0, 0.0, tl.exp2(tl.log2(safe) * inv_p))
    return out


@triton.jit(do_not_specialize=["num_units", "max_slots"])
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


@triton.jit
def _reduce(values, flags, count, NORM: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """(sum or max of values[0:count], max of flags[0:count]) in float64, in index order."""
    acc = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
    flag = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
    offsets = tl.arange(0, BLOCK_SIZE)
    for i in range(0, count, BLOCK_SIZE):
        mask = i + offsets < count
        v = tl.load(values + i + offsets, mask=mask, other=0.0)
        flag = tl.maximum(flag, tl.load(flags + i + offsets, mask=mask, other=0.0))
        if NORM == 2:
            acc = tl.maximum(acc, v)
        else:
            acc += v
    if NORM == 2:
        total = tl.max(acc, axis=0)
    else:
        total = tl.sum(acc, axis=0)
    return total, tl.max(flag, axis=0)


@triton.jit
def _tensor_finalize_kernel(unit_accs, unit_flags, tensor_unit_begin, norm_out, acc_out, flag_out, inv_p,
                            NORM: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    begin = tl.load(tensor_unit_begin + t)
    count = (tl.load(tensor_unit_begin + t + 1) - begin).to(tl.int32)
    total, flag = _reduce(unit_accs + begin, unit_flags + begin, count, NORM, BLOCK_SIZE)
    tl.store(norm_out + t, _root(total, flag, inv_p, NORM).to(norm_out.dtype.element_ty))
    tl.store(acc_out + t, total)
    tl.store(flag_out + t, flag)


@triton.jit
def _total_finalize_kernel(accs, flags, num_tensors, total_out, found_out, inv_p, NORM: tl.constexpr,
                           BLOCK_SIZE: tl.constexpr):
    total, flag = _reduce(accs, flags, num_tensors, NORM, BLOCK_SIZE)
    tl.store(total_out, _root(total, flag, inv_p, NORM).to(total_out.dtype.element_ty))
    tl.store(found_out, tl.where(flag > 0.0, 1.0, 0.0).to(tl.float32))


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
    rows = tl.maximum(n // length, 1)
    step = tl.minimum(n, length).to(tl.int32)
    for r in range(0, rows):
        coef = tl.load(coef_ptr + unit + r)
        if HAS_INV:
            write = clean
        else:
            write = clean & (coef.to(tl.float64) != 1.0)  # * exactly 1 changes nothing: no read, no write
        if write | zero:
            _scale_run(base, start + r * step, step, coef, inv, zero, COMPUTE, HAS_INV, SOFT_BF16, BLOCK_SIZE)


@triton.jit
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
def _as_float(bits):
    """A float64 from the bits of a Python float (Triton passes Python floats as float32)."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _divide(a, b):
    """a / b rounded to nearest, as the CPU divides (Triton's float32 division may be approximate)."""
    if a.dtype.is_fp64():
        out = a / b
    else:
        out = tl.math.div_rn(a, b)
    return out


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


@triton.jit
def _power(x, p, NORM: tl.constexpr):
    """|x|^p for x >= 0 (float64)."""
    if NORM == 0:
        out = x * x
    elif NORM == 1:
        out = x
    else:
        safe = tl.where(x == 0.0, 1.0, x)
        out = tl.where(x == 0.0, 0.0, tl.exp2(p * tl.log2(safe)))
    return out


@triton.jit(do_not_specialize=["count", "factor_bits", "eps_bits"])
def _unit_clip_finalize_kernel(param_norms, grad_norms, coef_out, post_out, count, factor_bits, eps_bits, p, inv_p,
                               NORM: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """One program: every unit's coefficient, then the p-norm of the clipped units, in float64 scaled by the
    largest (the coefficients are computed again, not read back: a program's stores need not be visible to its
    own loads)."""
    factor = _as_float(factor_bits)
    eps = _as_float(eps_bits)
    offsets = tl.arange(0, BLOCK_SIZE)
    peak = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
    nan = tl.zeros([BLOCK_SIZE], dtype=tl.int32)
    for i in range(0, count, BLOCK_SIZE):
        mask = i + offsets < count
        g = tl.load(grad_norms + i + offsets, mask=mask, other=0.0)
        c = _agc_coefficient(tl.load(param_norms + i + offsets, mask=mask, other=1.0), g, factor, eps)
        tl.store(coef_out + i + offsets, c, mask=mask)
        v = tl.abs(g.to(tl.float64) * c.to(tl.float64))
        nan = tl.maximum(nan, tl.where(v != v, 1, 0))
        peak = tl.maximum(peak, tl.where(v != v, 0.0, v))
    top = tl.max(peak, axis=0)
    if NORM == 2:
        out = top
    else:
        scale = tl.where((top > 0.0) & (top < float("inf")), top, 1.0)
        acc = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
        for i in range(0, count, BLOCK_SIZE):
            mask = i + offsets < count
            g = tl.load(grad_norms + i + offsets, mask=mask, other=0.0)
            c = _agc_coefficient(tl.load(param_norms + i + offsets, mask=mask, other=1.0), g, factor, eps)
            v = tl.abs(g.to(tl.float64) * c.to(tl.float64))
            acc += _power(tl.where(v != v, 0.0, v) / scale, p, NORM)
        total = tl.sum(acc, axis=0)
        if NORM == 0:
            root = tl.sqrt(total)
        elif NORM == 1:
            root = total
        else:
            root = tl.where(total == 0.0, 0.0, tl.exp2(tl.log2(tl.where(total == 0.0, 1.0, total)) * inv_p))
        out = tl.where(top == float("inf"), top, root * scale)
    out = tl.where(tl.max(nan, axis=0) > 0, float("nan"), out)
    tl.store(post_out, out.to(post_out.dtype.element_ty))


# ------------------------------------------------------------------------------------------------ launchers
def _norm_kind(norm_type: float) -> int:
    if norm_type == float("inf"):
        return NORM_INF
    return {2.0: NORM_L2, 1.0: NORM_L1}.get(float(norm_type), NORM_P)


def _scratch(size: int, device: torch.device) -> torch.Tensor:
    if SCRATCH_FILL is None:
        return torch.empty(size, dtype=torch.float64, device=device)
    return torch.full((size,), SCRATCH_FILL, dtype=torch.float64, device=device)


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


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
    if inv_scale is not None and inv_scale.device != device:
        inv_scale = inv_scale.to(device)
    n, u, s = table.num_tensors, layout.num_units, layout.num_slots
    slots = _scratch(2 * s, device)  # partials, flags
    units = _scratch(2 * u, device)  # unit accumulators, flags
    tensors = _scratch(2 * n, device)  # tensor accumulators, flags
    out = torch.empty(u + n + 1, dtype=acc_dtype, device=device)  # unit norms, tensor norms, total
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
            slots[:s], slots[s:], layout.unit_slot_begin, u, layout.max_slots, out[:u], units[:u], units[u:], inv_p,
            NORM=kind, BLOCK_SIZE=UNIT_BLOCK,
        )
    _tensor_finalize_kernel[(n,)](
        units[:u], units[u:], layout.tensor_unit_begin, out[u : u + n], tensors[:n], tensors[n:], inv_p, NORM=kind,
        BLOCK_SIZE=TENSOR_BLOCK,
    )
    _total_finalize_kernel[(1,)](
        tensors[:n], tensors[n:], n, out[u + n :], found_inf, inv_p, NORM=kind, BLOCK_SIZE=TOTAL_BLOCK,
    )
    return out[:u], out[u : u + n], out[u + n], found_inf


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
    if inv_scale is not None and inv_scale.device != device:
        inv_scale = inv_scale.to(device)
    if found_inf is not None and found_inf.device != device:
        found_inf = found_inf.to(device)
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
        param_norms, grad_norms, coef, post, grad_norms.numel(), _float_bits(float(clip_factor)),
        _float_bits(float(eps)), float(norm_type) if kind == NORM_P else 1.0,
        1.0 / norm_type if kind == NORM_P else 1.0, NORM=kind, BLOCK_SIZE=TOTAL_BLOCK,
    )
    return coef, post
