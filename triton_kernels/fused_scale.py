"""Pass 2: g <- clamp(g * inv_scale, -clip, clip) * coef, in place, one read and one write.

Every decision is read from device memory inside the kernel, so nothing waits for the host: with
``found_inf`` set the program leaves the gradients alone or zeroes them; with no unscale and no clamp a
coefficient of exactly 1 makes the program exit without touching memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fused_norm import _TL_DTYPES, BLOCK
from .tensor_table import CHUNK, tensor_table


@triton.jit
def _fused_scale_kernel(
    ptrs, numels, chunk_tensor, chunk_start, coef_ptr, coef_index, inv_scale_ptr, found_inf_ptr, clip_value,
    DTYPE: tl.constexpr, ACC: tl.constexpr, PER_TENSOR_COEF: tl.constexpr, HAS_INV: tl.constexpr,
    HAS_CLIP: tl.constexpr, HAS_FOUND: tl.constexpr, ZERO_IF_INF: tl.constexpr,
    CHUNK_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(chunk_tensor + pid)
    start = tl.load(chunk_start + pid)
    numel = tl.load(numels + t)
    base = tl.load(ptrs + t).to(tl.pointer_type(DTYPE))
    if PER_TENSOR_COEF:
        coef = tl.load(coef_ptr + tl.load(coef_index + t)).to(ACC)
    else:
        coef = tl.load(coef_ptr).to(ACC)
    found = 0.0
    if HAS_FOUND:
        found = tl.load(found_inf_ptr).to(tl.float32)
    clean = found == 0.0
    if HAS_INV or HAS_CLIP:
        write = clean
    else:
        write = clean & (coef != 1.0)  # multiplying by exactly 1 changes nothing: skip the read and write
    zero = (found != 0.0) & ZERO_IF_INF
    if write | zero:
        if HAS_INV:
            inv = tl.load(inv_scale_ptr).to(ACC)
        offsets = tl.arange(0, BLOCK_SIZE).to(tl.int64)
        for i in range(0, tl.minimum(numel - start, CHUNK_SIZE), BLOCK_SIZE):  # tiny tensors: one step
            idx = start + i + offsets
            mask = idx < numel
            u = tl.load(base + idx, mask=mask, other=0.0).to(ACC)
            if HAS_INV:
                u = u * inv
            if HAS_CLIP:  # compares and selects keep a NaN, as torch.clamp does
                u = tl.where(u < -clip_value, -clip_value, u)
                u = tl.where(u > clip_value, clip_value, u)
            u = tl.where(zero, 0.0, u * coef)
            tl.store(base + idx, u.to(DTYPE), mask=mask)


def fused_scale_triton(grads, coef, inv_scale, clip_value, found_inf, zero_if_inf, chunk: int = CHUNK) -> None:
    """In place ``g <- clamp(g * inv_scale, ±clip_value) * coef``: the op contract of ``ampclip::scale_pass``.
    One launch per dtype in the list; no host sync."""
    device = grads[0].device
    per_tensor = coef.numel() != 1
    if per_tensor and coef.numel() != len(grads):
        raise ValueError(f"coef must hold 1 or {len(grads)} elements, got {coef.numel()}")
    if clip_value is not None and clip_value < 0:
        raise ValueError(f"clip_value must be >= 0, got {clip_value}")
    coef = coef.to(device).reshape(-1).contiguous()
    inv = None if inv_scale is None else inv_scale.to(device=device, dtype=torch.float32).reshape(1)
    found = None if found_inf is None else found_inf.to(device).reshape(1)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, g in enumerate(grads):
        if g.numel():
            by_dtype.setdefault(g.dtype, []).append(i)
    for dtype, indices in by_dtype.items():
        targets = [grads[i] if grads[i].is_contiguous() else grads[i].contiguous() for i in indices]
        table = tensor_table(targets, chunk)
        index = torch.tensor(indices, dtype=torch.int64).to(device, non_blocking=True) if per_tensor else coef
        _fused_scale_kernel[(table.num_chunks,)](
            table.ptrs, table.numels, table.chunk_tensor, table.chunk_start, coef, index,
            inv if inv is not None else coef, found if found is not None else coef,
            0.0 if clip_value is None else float(clip_value),
            DTYPE=_TL_DTYPES[dtype], ACC=tl.float64 if dtype == torch.float64 else tl.float32,
            PER_TENSOR_COEF=per_tensor, HAS_INV=inv is not None, HAS_CLIP=clip_value is not None,
            HAS_FOUND=found is not None, ZERO_IF_INF=bool(zero_if_inf), CHUNK_SIZE=chunk, BLOCK_SIZE=BLOCK,
        )
        for i, target in zip(indices, targets):
            if target is not grads[i]:  # a strided gradient was scaled through a copy
                grads[i].copy_(target)
