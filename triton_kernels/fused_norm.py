"""Pass 1: one read of every gradient. Unscale on the fly, flag inf/NaN exactly, clamp when asked, accumulate
a partial of |u|^p (or max |u|) per chunk; then a fixed-order finalize into per-tensor norms, the total norm
and found_inf.

Three launches whatever the number of tensors and dtypes:

1. ``_fused_norm_kernel``, one program per chunk of the tensor table (built by the adapter,
   ``ampclip/backends/tensor_table.py``, and passed in): writes partial[c] (float64) and flag[c] (0 finite,
   1 inf, 2 NaN) into a scratch buffer. Every slot is written by exactly one program.
2. ``_tensor_finalize_kernel``, one program per tensor: reduces the tensor's chunk slots in index order
   (float64, tiny data) and writes the per-tensor norm plus its accumulator and flag.
3. ``_total_finalize_kernel``, one program: reduces the T per-tensor accumulators in index order into the
   total norm and found_inf.

Deterministic: no atomics, a fixed grid and fixed reduction trees, so the same gradients give bitwise
identical outputs run after run. ``found_inf`` is exact: each element's unscaled value u is tested with
``u != u`` and ``|u| > max finite``, never inferred from the accumulator, so a finite value whose square
overflows (|u| > 1.8e19 in fp32) does not set it. The inf-norm replaces NaN by 0 in its running max
(``max`` has no NaN contract in Triton) and restores NaN from the flag in the finalize.
"""

from __future__ import annotations

import math
import struct
from typing import Optional

import torch
import triton
import triton.language as tl

BLOCK = 1024  # elements per loop step: 8 per thread at 4 warps, a 16-byte load for fp16
FINALIZE_BLOCK = 256  # chunk slots per step of the per-tensor finalize (most tensors own 1 chunk)
TOTAL_BLOCK = 1024  # tensors per step of the one-program total finalize (10,000 tensors: 10 steps)
NORM_L2, NORM_L1, NORM_INF, NORM_P = 0, 1, 2, 3
# The table's codes section (ampclip/backends/tensor_table.py): the dtype code in the low bits, and a bit set
# when the tensor's data and every chunk start are 16-byte aligned, so whole blocks can be read in 128-bit loads.
DTYPE_MASK = tl.constexpr(3)
ALIGNED = tl.constexpr(4)
# Tests set this to float("nan") to poison the scratch buffers, proving every slot is written before read.
SCRATCH_FILL: Optional[float] = None
_FP32_MAX = torch.finfo(torch.float32).max
_FP64_MAX = torch.finfo(torch.float64).max


@triton.jit
def _accumulate(x, valid, acc, flag, inv, p, lo, hi, ACC: tl.constexpr, MAX_FINITE: tl.constexpr,
                NORM: tl.constexpr, HAS_INV: tl.constexpr, HAS_CLAMP: tl.constexpr, MASKED: tl.constexpr):
    """One block of elements ``x`` (already in ACC) into the running ``acc`` and ``flag``; with MASKED, the
    lanes outside ``valid`` (loaded as 0) add nothing, whatever the clamp makes of a 0."""
    if HAS_INV:
        x = x * inv
    a = tl.abs(x)
    is_nan = x != x
    flag = tl.maximum(flag, tl.where(is_nan, 2, tl.where(a > MAX_FINITE, 1, 0)))  # before the clamp
    if HAS_CLAMP:
        x = tl.where(x < lo.to(ACC), lo.to(ACC), x)
        x = tl.where(x > hi.to(ACC), hi.to(ACC), x)
        if MASKED:
            x = tl.where(valid, x, 0.0)
        a = tl.abs(x)
    if NORM == 0:
        acc += x * x
    elif NORM == 1:
        acc += a
    elif NORM == 2:
        acc = tl.maximum(acc, tl.where(is_nan, 0.0, a))  # NaN comes back from the flag
    else:
        # |x|^p = 2^(p log2 |x|); 0 stays 0, inf stays inf, NaN stays NaN
        safe = tl.where(a == 0.0, 1.0, a)
        acc += tl.where(a == 0.0, 0.0, tl.exp2(p * tl.log2(safe)))
    return acc, flag


@triton.jit
def _chunk_partial(base, start, n, full, inv, p, lo, hi, ACC: tl.constexpr, MAX_FINITE: tl.constexpr,
                   NORM: tl.constexpr, HAS_INV: tl.constexpr, HAS_CLAMP: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """(partial, flag) of elements start .. start+n of ``base`` (a typed pointer), n <= CHUNK, accumulated in
    ACC; the partial comes back as float64. The first ``full`` elements (whole blocks of a chunk the table
    marked 16-byte aligned; 0 otherwise) are read without a mask through a pointer hinted 16-byte aligned,
    i.e. in 128-bit loads; the rest (the tail, any block of an unaligned chunk) with a mask. Each lane sums
    the same elements in the same order either way, so the result does not depend on the path."""
    acc = tl.zeros([BLOCK_SIZE], dtype=ACC)
    flag = tl.zeros([BLOCK_SIZE], dtype=tl.int32)
    offsets = tl.arange(0, BLOCK_SIZE)
    for i in range(0, full, BLOCK_SIZE):
        block = tl.multiple_of(base + (start + i), 16)  # int64 offsets: tensors may pass 2^31 elements
        x = tl.load(block + offsets).to(ACC)
        acc, flag = _accumulate(x, None, acc, flag, inv, p, lo, hi, ACC, MAX_FINITE, NORM, HAS_INV, HAS_CLAMP, False)
    for i in range(full, n, BLOCK_SIZE):  # a tiny tensor takes one masked step
        mask = i + offsets < n
        x = tl.load(base + (start + i) + offsets, mask=mask, other=0.0).to(ACC)
        acc, flag = _accumulate(x, mask, acc, flag, inv, p, lo, hi, ACC, MAX_FINITE, NORM, HAS_INV, HAS_CLAMP, True)
    if NORM == 2:
        partial = tl.max(acc, axis=0)
    else:
        partial = tl.sum(acc, axis=0)
    return partial.to(tl.float64), tl.max(flag, axis=0)


@triton.jit
def _measure_chunk(base, start, n, full, inv, p, lo, hi, ACC: tl.constexpr, MAX_FINITE: tl.constexpr,
                   NORM: tl.constexpr, HAS_INV: tl.constexpr, HAS_CLAMP: tl.constexpr, WIDEN: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr):
    """:func:`_chunk_partial`; with ``WIDEN``, summed again in float64 when the float32 sum overflowed with
    nothing inf or NaN. That second read is rare and takes the masked path alone (the same sums, bit for bit):
    a second unmasked loop would double the code and make ptxas spill."""
    partial, flag = _chunk_partial(base, start, n, full, inv, p, lo, hi, ACC, MAX_FINITE, NORM, HAS_INV, HAS_CLAMP,
                                   BLOCK_SIZE)
    if WIDEN:
        if (partial == float("inf")) & (flag == 0):
            partial, flag = _chunk_partial(base, start, n, 0, inv, p, lo, hi, tl.float64, MAX_FINITE, NORM,
                                           HAS_INV, HAS_CLAMP, BLOCK_SIZE)
    return partial, flag


@triton.jit
def _chunk_location(pid, t, table_ptrs, table_numels, table_codes, chunk_begin, CHUNK_SIZE: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr):
    """Where chunk ``pid`` of tensor ``t`` lies (tensor_table.py): its first element, its length, how many of
    its elements are whole blocks read without a mask (0 unless the table marked the tensor ALIGNED), the
    tensor's dtype code and data address."""
    start = (pid - tl.load(chunk_begin + t)) * CHUNK_SIZE
    n = tl.minimum(tl.load(table_numels + t) - start, CHUNK_SIZE).to(tl.int32)
    code = tl.load(table_codes + t)
    full = tl.where((code & ALIGNED) != 0, n // BLOCK_SIZE * BLOCK_SIZE, 0)
    return start, n, full, code & DTYPE_MASK, tl.load(table_ptrs + t)


@triton.jit(do_not_specialize=["lo_bits", "hi_bits"], do_not_specialize_on_alignment=[
    "table_ptrs", "table_numels", "table_codes", "chunk_begin", "chunk_tensor", "inv_scale_ptr", "partial_out",
    "flag_out"])
def _fused_norm_kernel(
    table_ptrs, table_numels, table_codes, chunk_begin, chunk_tensor, inv_scale_ptr, partial_out, flag_out, p,
    lo_bits: tl.int64, hi_bits: tl.int64, ACC: tl.constexpr, MAX_FINITE: tl.constexpr, NORM: tl.constexpr,
    HAS_INV: tl.constexpr, HAS_CLAMP: tl.constexpr, WIDEN: tl.constexpr, CHUNK_SIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(chunk_tensor + pid)
    start, n, full, code, addr = _chunk_location(pid, t, table_ptrs, table_numels, table_codes, chunk_begin,
                                                 CHUNK_SIZE, BLOCK_SIZE)
    inv = 1.0
    if HAS_INV:
        inv = tl.load(inv_scale_ptr).to(ACC)
    lo = lo_bits.to(tl.int64).to(tl.float64, bitcast=True)  # the exact Python floats
    hi = hi_bits.to(tl.int64).to(tl.float64, bitcast=True)
    # One branch per dtype (uniform within a program): one launch covers a mixed-dtype list.
    if code == 0:
        partial, flag = _measure_chunk(addr.to(tl.pointer_type(tl.float16)), start, n, full, inv, p, lo, hi,
                                       ACC, MAX_FINITE, NORM, HAS_INV, HAS_CLAMP, WIDEN, BLOCK_SIZE)
    elif code == 1:
        partial, flag = _measure_chunk(addr.to(tl.pointer_type(tl.bfloat16)), start, n, full, inv, p, lo, hi,
                                       ACC, MAX_FINITE, NORM, HAS_INV, HAS_CLAMP, WIDEN, BLOCK_SIZE)
    elif code == 2:
        partial, flag = _measure_chunk(addr.to(tl.pointer_type(tl.float32)), start, n, full, inv, p, lo, hi,
                                       ACC, MAX_FINITE, NORM, HAS_INV, HAS_CLAMP, WIDEN, BLOCK_SIZE)
    else:
        partial, flag = _measure_chunk(addr.to(tl.pointer_type(tl.float64)), start, n, full, inv, p, lo, hi,
                                       ACC, MAX_FINITE, NORM, HAS_INV, HAS_CLAMP, WIDEN, BLOCK_SIZE)
    tl.store(partial_out + pid, partial)
    tl.store(flag_out + pid, flag.to(tl.float64))


@triton.jit
def _root(acc, flag, inv_p, NORM: tl.constexpr):
    """The norm from its accumulator (float64): sqrt, identity, max with NaN restored, or acc^(1/p)."""
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


@triton.jit
def _reduce_slots(values, flags, count, NORM: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """(sum or max of values[0:count], max of flags[0:count]) in float64, in index order: the fixed
    reduction both finalize kernels use."""
    acc = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
    flag = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
    offsets = tl.arange(0, BLOCK_SIZE)
    for i in range(0, count, BLOCK_SIZE):
        mask = i + offsets < count
        v = tl.load(values + i + offsets, mask=mask, other=0.0).to(tl.float64)
        flag = tl.maximum(flag, tl.load(flags + i + offsets, mask=mask, other=0.0).to(tl.float64))
        if NORM == 2:
            acc = tl.maximum(acc, v)
        else:
            acc += v
    if NORM == 2:
        total = tl.max(acc, axis=0)
    else:
        total = tl.sum(acc, axis=0)
    return total, tl.max(flag, axis=0)


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


def _norm_kind(norm_type: float) -> int:
    if math.isinf(norm_type) and norm_type > 0:
        return NORM_INF
    return {2.0: NORM_L2, 1.0: NORM_L1}.get(float(norm_type), NORM_P)


def _scratch(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if SCRATCH_FILL is None:
        return torch.empty(size, dtype=dtype, device=device)
    return torch.full((size,), SCRATCH_FILL, dtype=dtype, device=device)


def on_device(t: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    """``t`` on ``device`` (None stays None): a scalar a launch reads from device memory."""
    return t if t is None or t.device == device else t.to(device)


def float_bits(x: float) -> int:
    """A float64's bit pattern as an int: Triton passes Python floats as float32, which would round a bound
    that float64 gradients compare against."""
    return struct.unpack("<q", struct.pack("<d", x))[0]


def fused_norm_triton(table, inv_scale: Optional[torch.Tensor], norm_type: float,
                      clamp: Optional[tuple[float, float]] = None):
    """``(per_tensor_norms, total_norm, found_inf)`` of the table's tensors: ``ampclip::norm_pass``.

    ``table`` is a tensor table (``ampclip/backends/tensor_table.py``: device sections ``dev_ptrs``,
    ``numels``, ``codes``, ``chunk_begin``, ``chunk_tensor``, and ``num_tensors``, ``num_chunks``, ``chunk``,
    ``has_fp64``) whose non-contiguous tensors are already staged. Each element is unscaled by
    ``inv_scale`` (a 0-d device tensor), checked, clamped to ``clamp`` and measured. Norms are float32
    (float64 when any tensor is float64; then every one accumulates in float64, as the reference does);
    ``found_inf`` is a 0-d float32, 1.0 exactly when some unscaled element is inf or NaN. Three launches
    whatever the number of tensors or dtypes, no host sync, bitwise deterministic.
    """
    if not (norm_type > 0):
        raise ValueError(f"norm_type must be > 0 or inf, got {norm_type}")
    device = table.buffer.device
    acc_dtype = torch.float64 if table.has_fp64 else torch.float32
    norm_kind = _norm_kind(norm_type)
    inv_p = 1.0 / norm_type if norm_kind == NORM_P else 1.0
    inv_scale = on_device(inv_scale, device)
    lo, hi = clamp if clamp is not None else (0.0, 0.0)
    n, c = table.num_tensors, table.num_chunks
    # scratch: chunk partials and flags, then per-tensor accumulators and flags (all float64)
    chunk_scratch = _scratch(2 * c, torch.float64, device)
    tensor_scratch = _scratch(2 * n, torch.float64, device)
    out = torch.empty(n + 1, dtype=acc_dtype, device=device)  # per-tensor norms, then the total
    found_inf = torch.empty((), dtype=torch.float32, device=device)
    if c:  # an all-zero-size list launches no norm programs (a 0-program grid is not launchable)
        _fused_norm_kernel[(c,)](
            table.dev_ptrs, table.numels, table.codes, table.chunk_begin, table.chunk_tensor,
            inv_scale if inv_scale is not None else table.buffer, chunk_scratch[:c], chunk_scratch[c:],
            float(norm_type) if norm_kind == NORM_P else 1.0, float_bits(float(lo)), float_bits(float(hi)),
            ACC=tl.float64 if table.has_fp64 else tl.float32,
            MAX_FINITE=_FP64_MAX if table.has_fp64 else _FP32_MAX, NORM=norm_kind,
            HAS_INV=int(inv_scale is not None), HAS_CLAMP=int(clamp is not None),
            WIDEN=int(not table.has_fp64 and norm_kind != NORM_INF), CHUNK_SIZE=table.chunk,
            BLOCK_SIZE=BLOCK,
        )
    _tensor_finalize_kernel[(n,)](
        chunk_scratch[:c], chunk_scratch[c:], table.chunk_begin, out, tensor_scratch[:n], tensor_scratch[n:],
        inv_p, NORM=norm_kind, BLOCK_SIZE=FINALIZE_BLOCK,
    )
    _total_finalize_kernel[(1,)](
        tensor_scratch[:n], tensor_scratch[n:], n, out[n:], found_inf, inv_p,
        NORM=norm_kind, BLOCK_SIZE=TOTAL_BLOCK,
    )
    return out[:n], out[n], found_inf
