"""Pass 1: one read of every gradient. Unscale on the fly, flag inf/NaN, accumulate per-chunk partials of
|g|^p (or max |g|); then a fixed-order finalize into per-tensor norms, the total norm and found_inf.

Deterministic: every chunk writes its own partial slot and the finalize sums the slots of a tensor in
order, so the same gradients give a bitwise identical norm run after run (no float atomics).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .tensor_table import CHUNK, tensor_table

BLOCK = 1024
FINALIZE_BLOCK = 256
NORM_L2, NORM_L1, NORM_INF, NORM_P = 0, 1, 2, 3
# found flags per chunk: 0 finite, 1 inf (no NaN), 2 NaN. The inf-norm needs to tell NaN from inf.
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              torch.float64: tl.float64}


@triton.jit
def _fused_norm_kernel(
    ptrs, numels, chunk_tensor, chunk_start, inv_scale_ptr, partial_out, flag_out, p,
    DTYPE: tl.constexpr, ACC: tl.constexpr, MAX_FINITE: tl.constexpr, NORM: tl.constexpr,
    HAS_INV: tl.constexpr, CHUNK_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(chunk_tensor + pid)
    start = tl.load(chunk_start + pid)
    numel = tl.load(numels + t)
    base = tl.load(ptrs + t).to(tl.pointer_type(DTYPE))
    acc = tl.zeros([BLOCK_SIZE], dtype=ACC)
    flag = tl.zeros([BLOCK_SIZE], dtype=tl.int32)
    offsets = tl.arange(0, BLOCK_SIZE).to(tl.int64)
    if HAS_INV:
        inv = tl.load(inv_scale_ptr).to(ACC)
    for i in range(0, tl.minimum(numel - start, CHUNK_SIZE), BLOCK_SIZE):  # tiny tensors: one step
        idx = start + i + offsets
        mask = idx < numel
        x = tl.load(base + idx, mask=mask, other=0.0).to(ACC)
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
            acc = tl.maximum(acc, tl.where(is_nan, 0.0, a))  # NaN is carried by the flag
        else:
            acc += tl.where(a == 0.0, 0.0, tl.exp2(p * tl.log2(tl.where(a == 0.0, 1.0, a))))
    if NORM == 2:
        partial = tl.max(acc, axis=0)
    else:
        partial = tl.sum(acc, axis=0)
    tl.store(partial_out + pid, partial)
    tl.store(flag_out + pid, tl.max(flag, axis=0))


@triton.jit
def _finalize_kernel(partials, flags, chunk_begin, acc_out, flag_out,
                     ACC: tl.constexpr, NORM: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    t = tl.program_id(0)
    begin = tl.load(chunk_begin + t)
    end = tl.load(chunk_begin + t + 1)
    acc = tl.zeros([BLOCK_SIZE], dtype=ACC)
    flag = tl.zeros([BLOCK_SIZE], dtype=tl.int32)
    offsets = tl.arange(0, BLOCK_SIZE)
    for i in range(begin, end, BLOCK_SIZE):
        idx = i + offsets
        mask = idx < end
        v = tl.load(partials + idx, mask=mask, other=0.0)
        flag = tl.maximum(flag, tl.load(flags + idx, mask=mask, other=0))
        if NORM == 2:
            acc = tl.maximum(acc, v)
        else:
            acc += v
    f = tl.max(flag, axis=0)
    if NORM == 2:
        total = tl.max(acc, axis=0)
        total = tl.where(f == 2, float("nan"), total)
    else:
        total = tl.sum(acc, axis=0)
    tl.store(acc_out + t, total)
    tl.store(flag_out + t, f)


def _norm_kind(norm_type: float) -> int:
    if math.isinf(norm_type):
        return NORM_INF
    return {2.0: NORM_L2, 1.0: NORM_L1}.get(norm_type, NORM_P)


def _group_accumulators(tensors, inv_scale, norm_kind, norm_type, acc_dtype, chunk):
    """Per-tensor accumulators (sum of |u|^p, or max |u|) and found flags of one dtype group."""
    table = tensor_table(tensors, chunk)
    device = tensors[0].device
    dtype = tensors[0].dtype
    partials = torch.empty(table.num_chunks, dtype=acc_dtype, device=device)
    chunk_flags = torch.empty(table.num_chunks, dtype=torch.int32, device=device)
    tl_acc = tl.float64 if acc_dtype == torch.float64 else tl.float32
    max_finite = torch.finfo(acc_dtype).max
    if table.num_chunks:
        _fused_norm_kernel[(table.num_chunks,)](
            table.ptrs, table.numels, table.chunk_tensor, table.chunk_start,
            inv_scale if inv_scale is not None else partials, partials, chunk_flags, float(norm_type),
            DTYPE=_TL_DTYPES[dtype], ACC=tl_acc, MAX_FINITE=max_finite, NORM=norm_kind,
            HAS_INV=inv_scale is not None, CHUNK_SIZE=chunk, BLOCK_SIZE=BLOCK,
        )
    accs = torch.empty(len(tensors), dtype=acc_dtype, device=device)
    flags = torch.empty(len(tensors), dtype=torch.int32, device=device)
    _finalize_kernel[(len(tensors),)](partials, chunk_flags, table.chunk_begin, accs, flags,
                                      ACC=tl_acc, NORM=norm_kind, BLOCK_SIZE=FINALIZE_BLOCK)
    return accs, flags


def fused_norm_triton(grads: list[torch.Tensor], inv_scale, norm_type: float, chunk: int = CHUNK):
    """``(per_tensor_norms, total_norm, found_inf)`` of ``grads * inv_scale``: the op contract of
    ``ampclip::norm_pass``. One norm launch and one finalize launch per dtype in the list, whatever the
    number of tensors; no host sync.
    """
    acc_dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    device = grads[0].device
    norm_kind = _norm_kind(norm_type)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, g in enumerate(grads):
        by_dtype.setdefault(g.dtype, []).append(i)
    inv = None if inv_scale is None else inv_scale.to(device=device, dtype=torch.float32).reshape(1)
    accs = torch.empty(len(grads), dtype=acc_dtype, device=device)
    flags = torch.empty(len(grads), dtype=torch.int32, device=device)
    for dtype, indices in by_dtype.items():
        tensors = [grads[i].contiguous() for i in indices]  # a strided view is read through a copy
        group_acc = torch.float64 if dtype == torch.float64 else torch.float32
        a, f = _group_accumulators(tensors, inv, norm_kind, norm_type, group_acc, chunk)
        if len(by_dtype) == 1:
            accs, flags = a.to(acc_dtype), f
        else:
            index = torch.tensor(indices, device=device)
            accs.index_copy_(0, index, a.to(acc_dtype))
            flags.index_copy_(0, index, f)
    if norm_kind == NORM_INF:
        per_tensor = accs
        total = per_tensor.max()  # NaN-propagating, like the per-tensor finalize
    else:
        root = {NORM_L2: 0.5, NORM_L1: 1.0}.get(norm_kind, 1.0 / norm_type)
        per_tensor = accs.pow(root)
        total = accs.sum().pow(root)
    found_inf = (flags.max() > 0).to(torch.float32)
    return per_tensor, total, found_inf
