"""Pass 1: one read of every gradient. Unscale on the fly, flag inf/NaN exactly, clamp when asked, accumulate
a partial of |u|^p (or max |u|) per chunk; then a fixed-order finish into per-tensor norms, the total norm,
found_inf and, for a clip, the coefficient: all in ONE launch, whatever the number of tensors and dtypes.

``_fused_norm_kernel`` runs one program per chunk of the tensor table (built by the adapter,
``ampclip/backends/tensor_table.py``, and passed in). Each program writes partial[c] (float64) and flag[c]
(0 finite, 1 inf, 2 NaN) into a scratch buffer, then draws a ticket of its tensor (an atomic counter in the
table): the program that draws the tensor's last ticket reduces the tensor's slots in index order into its norm
and accumulator, then draws a ticket of the launch; the program that draws the launch's last ticket reduces the
per-tensor accumulators in index order into the total and found_inf, and computes the clip coefficient (global
or per tensor), the norm after clipping and the scale a fused optimizer divides by. Each finisher resets the
counter it drew from, so the table is ready for the next launch (and a CUDA graph replays it). The last-block
pattern replaces two finalize launches; its reductions run in a fixed order, so the result is bitwise the same
run after run.

Deterministic: no floating-point atomics, fixed reduction trees. ``found_inf`` is exact: each element's
unscaled value u is tested with ``u != u`` and ``|u| > max finite``, never inferred from the accumulator, so a
finite value whose square overflows (|u| > 1.8e19 in fp32) does not set it; such a chunk, and one whose squares
underflow (|u| < 1e-19), is summed again in float64, so the norm is right wherever float64 holds its sum. The
inf-norm replaces NaN by 0 in its running max (``max`` has no NaN contract in Triton) and restores NaN from the
flag in the finish.

The finishers read what other programs stored: each program makes its stores visible before its ticket (a
barrier, then an atomic with release semantics at GPU scope), the finisher acquires with the same atomic and
reads the slots from L2 (``.cg``), never from a stale L1 line.
"""

from __future__ import annotations

import math
import struct
from typing import Optional

import torch
import triton
import triton.language as tl

from .clip_math import _as_float, _clipped_norm, _coefficient_by_rule, _divide

BLOCK = 1024  # elements per loop step: 8 per thread at 4 warps, a 16-byte load for fp16
# Slots, then tensors, per step of the norm pass's own finish: narrow, so that the finish needs no more registers
# than the element loop (a kernel's registers are those of its hungriest part, and the loop streams at full
# occupancy only with few).
FINISH_BLOCK = 128
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
    # before the clamp: 3 NaN, 2 inf, 1 a finite non-zero value, 0 only zeros (the chunk's max of these)
    flag = tl.maximum(flag, tl.where(is_nan, 3, tl.where(a > MAX_FINITE, 2, tl.where(a > 0.0, 1, 0))))
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
    """(partial, flag, nonzero) of elements start .. start+n of ``base`` (a typed pointer), n <= CHUNK,
    accumulated in ACC; the partial comes back as float64, the flag as 0 finite, 1 inf, 2 NaN, and ``nonzero``
    tells whether any element is not 0. The first ``full`` elements (whole blocks of a chunk the table
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
    seen = tl.max(flag, axis=0)
    return partial.to(tl.float64), tl.maximum(seen - 1, 0), seen > 0


# A float32 sum of |u|^p below this, from elements that are not all 0, is taken again in float64: p-th powers
# under float32's smallest normal (1.2e-38) lose their bits or flush to 0 (the square of |u| < 1.1e-19 does),
# and at a sum past 2^-64 such terms move a chunk's sum by at most 2^15 * 2^-126 / 2^-64 = 2^-47 of itself.
TINY_PARTIAL = tl.constexpr(5.421010862427522e-20)  # 2^-64


@triton.jit
def _measure_chunk(base, start, n, full, inv, p, lo, hi, ACC: tl.constexpr, MAX_FINITE: tl.constexpr,
                   NORM: tl.constexpr, HAS_INV: tl.constexpr, HAS_CLAMP: tl.constexpr, WIDEN: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr):
    """:func:`_chunk_partial`'s (partial, flag); with ``WIDEN``, summed again in float64 when, with nothing inf
    or NaN, the float32 sum overflowed, or is tiny (TINY_PARTIAL) although some element is not 0. That second
    read is rare and takes the masked path alone (the same sums, bit for bit): a second unmasked loop would
    double the code and make ptxas spill."""
    partial, flag, nonzero = _chunk_partial(base, start, n, full, inv, p, lo, hi, ACC, MAX_FINITE, NORM, HAS_INV,
                                            HAS_CLAMP, BLOCK_SIZE)
    if WIDEN:
        if ((partial == float("inf")) | ((partial < TINY_PARTIAL) & nonzero)) & (flag == 0):
            partial, flag, nonzero = _chunk_partial(base, start, n, 0, inv, p, lo, hi, tl.float64, MAX_FINITE, NORM,
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


@triton.jit(do_not_specialize=["lo_bits", "hi_bits", "bound_bits", "eps_bits", "num_tensors", "num_filled", "mode",
                               "rule"],
            do_not_specialize_on_alignment=[
                "table_ptrs", "table_numels", "table_codes", "chunk_begin", "chunk_tensor", "inv_scale_ptr",
                "partial_out", "flag_out", "tensor_acc", "tensor_flag", "tickets", "norm_out", "total_out",
                "found_out", "coef_out", "post_out", "grad_scale_out"])
def _fused_norm_kernel(
    table_ptrs, table_numels, table_codes, chunk_begin, chunk_tensor, inv_scale_ptr, partial_out, flag_out,
    tensor_acc, tensor_flag, tickets, norm_out, total_out, found_out, coef_out, post_out, grad_scale_out, p, inv_p,
    lo_bits: tl.int64, hi_bits: tl.int64, bound_bits: tl.int64, eps_bits: tl.int64, num_tensors, num_filled, mode,
    rule, ACC: tl.constexpr, MAX_FINITE: tl.constexpr, NORM: tl.constexpr, HAS_INV: tl.constexpr,
    HAS_CLAMP: tl.constexpr, WIDEN: tl.constexpr, CHUNK_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    FINISH_BLOCK: tl.constexpr, TOTAL_BLOCK_SIZE: tl.constexpr,
):
    """One program per chunk; ``mode`` -1 measures only, 0 also clips the global norm, 1 each tensor's norm (to
    the bound given as float64 bits, by ``rule``: see clip_math._coefficient)."""
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
    # The last chunk of tensor t to finish reduces t's slots; the last tensor to finish, the whole list.
    tl.debug_barrier()  # every store of this program before its ticket
    begin = tl.load(chunk_begin + t)
    count = tl.load(chunk_begin + t + 1) - begin
    if tl.atomic_add(tickets + t, 1, sem="acq_rel", scope="gpu") == count - 1:
        tl.store(tickets + t, 0)  # drawn by all of t's programs: ready for the next launch
        bound = _as_float(bound_bits)
        eps = _as_float(eps_bits)
        acc, f = _reduce_slots(partial_out + begin, flag_out + begin, count.to(tl.int32), NORM, FINISH_BLOCK)
        norm = _root(acc, f, inv_p, NORM).to(norm_out.dtype.element_ty)
        tl.store(norm_out + t, norm)
        tl.store(tensor_acc + t, acc)
        tl.store(tensor_flag + t, f)
        if mode == 1:
            tl.store(coef_out + t, _coefficient_by_rule(norm, bound, eps, rule))
        tl.debug_barrier()
        if tl.atomic_add(tickets + num_tensors, 1, sem="acq_rel", scope="gpu") == num_filled - 1:
            tl.store(tickets + num_tensors, 0)
            _finish(chunk_begin, tensor_acc, tensor_flag, num_tensors, norm_out, total_out, found_out, coef_out,
                    post_out, grad_scale_out, inv_scale_ptr, p, inv_p, bound, eps, mode, rule, NORM, HAS_INV,
                    TOTAL_BLOCK_SIZE)


@triton.jit
def _finish(chunk_begin, tensor_acc, tensor_flag, num_tensors, norm_out, total_out, found_out, coef_out, post_out,
            grad_scale_out, inv_scale_ptr, p, inv_p, bound, eps, mode, rule, NORM: tl.constexpr,
            HAS_INV: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """The launch's last finisher: the total and found_inf from the per-tensor accumulators (a zero-size
    tensor owns no chunk, so its norm, 0, is written here), then, for a clip, the coefficient, the norm after
    clipping and ``grad_scale`` = 1 / (inv_scale * coef), what a fused optimizer divides the gradients by."""
    offsets = tl.arange(0, BLOCK_SIZE)
    acc = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
    flag = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
    for i in range(0, num_tensors, BLOCK_SIZE):
        index = i + offsets
        mask = index < num_tensors
        empty = tl.load(chunk_begin + index + 1, mask=mask, other=0) == tl.load(chunk_begin + index, mask=mask, other=0)
        filled = mask & (empty == 0)
        v = tl.load(tensor_acc + index, mask=filled, other=0.0, cache_modifier=".cg")
        flag = tl.maximum(flag, tl.load(tensor_flag + index, mask=filled, other=0.0, cache_modifier=".cg"))
        if NORM == 2:
            acc = tl.maximum(acc, v)
        else:
            acc += v
        zero = tl.zeros([BLOCK_SIZE], dtype=norm_out.dtype.element_ty)
        tl.store(norm_out + index, zero, mask=mask & empty)
        if mode == 1:
            tl.store(coef_out + index, _coefficient_by_rule(zero, bound, eps, rule), mask=mask & empty)
    if NORM == 2:
        total_acc = tl.max(acc, axis=0)
    else:
        total_acc = tl.sum(acc, axis=0)
    f = tl.max(flag, axis=0)
    total = _root(total_acc, f, inv_p, NORM).to(total_out.dtype.element_ty)
    tl.store(total_out, total)
    tl.store(found_out, tl.where(f > 0.0, 1.0, 0.0).to(tl.float32))
    inv = 1.0
    if HAS_INV:
        inv = tl.load(inv_scale_ptr)
    if mode == 0:
        c = _coefficient_by_rule(total, bound, eps, rule)
        tl.store(coef_out, c)
        tl.store(post_out, (total.to(tl.float64) * c.to(tl.float64)).to(post_out.dtype.element_ty))
        tl.store(grad_scale_out, _divide(tl.full(c.shape, 1.0, c.dtype), inv.to(c.dtype) * c))
    elif mode == 1:
        tl.debug_barrier()  # the coefficients this program stored above, before they are read back
        post = _clipped_norm(norm_out, coef_out, num_tensors, p, inv_p, NORM, BLOCK_SIZE)
        tl.store(post_out, post.to(post_out.dtype.element_ty))
        tl.store(grad_scale_out, _divide(tl.full(total.shape, 1.0, total.dtype), inv.to(total.dtype)))


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
    """(sum or max of values[0:count], max of flags[0:count]) in float64, in index order: the fixed reduction
    of every finish. Read from L2 (".cg"): other programs of the launch may have stored them."""
    acc = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
    flag = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
    offsets = tl.arange(0, BLOCK_SIZE)
    for i in range(0, count, BLOCK_SIZE):
        mask = i + offsets < count
        v = tl.load(values + i + offsets, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float64)
        f = tl.load(flags + i + offsets, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float64)
        flag = tl.maximum(flag, f)
        if NORM == 2:
            acc = tl.maximum(acc, v)
        else:
            acc += v
    if NORM == 2:
        total = tl.max(acc, axis=0)
    else:
        total = tl.sum(acc, axis=0)
    return total, tl.max(flag, axis=0)


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
                      clamp: Optional[tuple[float, float]] = None,
                      clip: Optional[tuple[float, int, float, int]] = None):
    """``(per_tensor_norms, total_norm, found_inf)`` of the table's tensors: ``ampclip::norm_pass``; with
    ``clip = (max_norm, mode, eps, rule)`` (mode 0 global, 1 per tensor) also ``(coef, post_clip_norm,
    grad_scale)``: ``ampclip::clip_norm_pass``.

    ``table`` is a tensor table (``ampclip/backends/tensor_table.py``: device sections ``dev_ptrs``,
    ``numels``, ``codes``, ``chunk_begin``, ``chunk_tensor``, its ``tickets``, and ``num_tensors``, ``num_filled``,
    ``num_chunks``, ``chunk``, ``has_fp64``) whose non-contiguous tensors are already staged. Each element is
    unscaled by ``inv_scale`` (a 0-d device tensor), checked, clamped to ``clamp`` and measured. Norms are float32
    (float64 when any tensor is float64; then every one accumulates in float64, as the reference does);
    ``found_inf`` is a 0-d float32, 1.0 exactly when some unscaled element is inf or NaN. One launch whatever the
    number of tensors or dtypes (a list of zero-size tensors only: none, or one for the coefficient), no host
    sync, bitwise deterministic.
    """
    if not (norm_type > 0):
        raise ValueError(f"norm_type must be > 0 or inf, got {norm_type}")
    device = table.buffer.device
    acc_dtype = torch.float64 if table.has_fp64 else torch.float32
    norm_kind = _norm_kind(norm_type)
    inv_p = 1.0 / norm_type if norm_kind == NORM_P else 1.0
    inv_scale = on_device(inv_scale, device)
    lo, hi = clamp if clamp is not None else (0.0, 0.0)
    max_norm, mode, eps, rule = clip if clip is not None else (0.0, -1, 0.0, 0)
    n, c = table.num_tensors, table.num_chunks
    # outputs of their own: a registered op's outputs may not alias one another (torch.compile refuses it)
    per_tensor = torch.empty(n, dtype=acc_dtype, device=device)
    total = torch.empty((), dtype=acc_dtype, device=device)
    found_inf = torch.empty((), dtype=torch.float32, device=device)
    coef = torch.empty(() if mode == 0 else n, dtype=acc_dtype, device=device)
    post = torch.empty((), dtype=acc_dtype, device=device)
    grad_scale = torch.empty((), dtype=acc_dtype, device=device)
    if c == 0:  # only zero-size tensors: no program to launch (a 0-program grid is not launchable)
        return _measured_nothing(per_tensor, total, found_inf, coef, post, grad_scale, inv_scale, clip)
    # scratch: chunk partials and flags, then per-tensor accumulators and flags (all float64)
    chunk_scratch = _scratch(2 * c, torch.float64, device)
    tensor_scratch = _scratch(2 * n, torch.float64, device)
    _fused_norm_kernel[(c,)](
        table.dev_ptrs, table.numels, table.codes, table.chunk_begin, table.chunk_tensor,
        inv_scale if inv_scale is not None else table.buffer, chunk_scratch[:c], chunk_scratch[c:],
        tensor_scratch[:n], tensor_scratch[n:], table.tickets, per_tensor, total, found_inf, coef, post, grad_scale,
        float(norm_type) if norm_kind == NORM_P else 1.0, inv_p, float_bits(float(lo)), float_bits(float(hi)),
        float_bits(float(max_norm)), float_bits(float(eps)), n, table.num_filled, mode, rule,
        ACC=tl.float64 if table.has_fp64 else tl.float32,
        MAX_FINITE=_FP64_MAX if table.has_fp64 else _FP32_MAX, NORM=norm_kind,
        HAS_INV=int(inv_scale is not None), HAS_CLAMP=int(clamp is not None),
        WIDEN=int(not table.has_fp64 and norm_kind != NORM_INF), CHUNK_SIZE=table.chunk,
        BLOCK_SIZE=BLOCK, FINISH_BLOCK=FINISH_BLOCK, TOTAL_BLOCK_SIZE=FINISH_BLOCK,
    )
    if clip is None:
        return per_tensor, total, found_inf
    return per_tensor, total, found_inf, coef, post, grad_scale


def _measured_nothing(per_tensor, total, found_inf, coef, post, grad_scale, inv_scale, clip):
    """The norm pass of zero-size tensors only: every norm 0, nothing found, and for a clip the coefficient
    of a zero norm (the small ops' kernel: one launch)."""
    from .small_ops import clip_finalize_triton

    for t in (per_tensor, total, found_inf):
        t.zero_()
    if clip is None:
        return per_tensor, total, found_inf
    max_norm, mode, eps, rule = clip
    coef, _, _, post = clip_finalize_triton(per_tensor, total, max_norm, mode, None, 0, 2.0, eps, rule)
    one = torch.ones((), dtype=total.dtype, device=total.device)
    scale = one if inv_scale is None else inv_scale.to(total.dtype)
    grad_scale = (scale * coef if mode == 0 else scale).reciprocal()
    return per_tensor, total, found_inf, coef, post, grad_scale
