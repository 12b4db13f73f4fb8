"""Pass 2: g <- clamp(g * inv_scale, lo, hi) * coef, in place: one read and one write per element,
one launch for the whole list (all dtypes: a program branches on its tensor's dtype code).

Every decision is read from device memory inside the kernel, so nothing waits for the host and the launch
is CUDA-graph capturable: with ``found_inf`` set a program leaves its chunk alone or zeroes it; with no
unscale and no clamp a coefficient of exactly 1 makes the program exit before touching the gradient
(the common "norm below max_norm" step costs one 4-byte read per program instead of 2N bytes).

Arithmetic matches ``reference.scale_pass`` bit for bit: float32 (float64 for float64 gradients)
``u = g * inv``, clamp by compare-and-select (keeps NaN, as ``torch.clamp`` does), ``u * coef``, one
rounding on the store.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .fused_norm import BLOCK, _chunk_location, float_bits, on_device

# Triton's interpreter (TRITON_INTERPRET=1, how CI runs these kernels on CPU) truncates float32 -> bfloat16
# instead of rounding to nearest even as the GPU does, which would make CPU results differ from the
# reference by one bf16 ulp. Under the interpreter the kernel rounds by hand; compiled, it uses the hardware
# conversion.
_SOFT_BF16 = int(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def _scale_block(ptrs, mask, c, inv, low, high, zero, COMPUTE: tl.constexpr, HAS_INV: tl.constexpr,
                 HAS_CLIP: tl.constexpr, SOFT_BF16: tl.constexpr, MASKED: tl.constexpr):
    """One block in place: the elements at ``ptrs`` (``mask`` of them when MASKED, else all)."""
    if MASKED:
        u = tl.load(ptrs, mask=mask, other=0.0).to(COMPUTE)
    else:
        u = tl.load(ptrs).to(COMPUTE)
    if HAS_INV:
        u = u * inv.to(COMPUTE)
    if HAS_CLIP:
        u = tl.where(u < low, low, u)
        u = tl.where(u > high, high, u)
    u = tl.where(zero, 0.0, u * c)
    if SOFT_BF16:
        # round to nearest even by hand (what cvt.rn.bf16.f32 does on the GPU); NaN -> 0x7FC0 as in c10
        bits = u.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        out = tl.where(u != u, 0x7FC0, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = u.to(ptrs.dtype.element_ty)
    if MASKED:
        tl.store(ptrs, out, mask=mask)
    else:
        tl.store(ptrs, out)


@triton.jit
def _scale_chunk(base, start, n, full, coef, inv, lo, hi, zero, COMPUTE: tl.constexpr, HAS_INV: tl.constexpr,
                 HAS_CLIP: tl.constexpr, SOFT_BF16: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Elements start .. start+n of ``base``: the first ``full`` (whole blocks of a 16-byte aligned chunk)
    without a mask through a pointer hinted 16-byte aligned, i.e. 128-bit loads and stores; the rest masked."""
    c = coef.to(COMPUTE)
    low = lo.to(COMPUTE)  # rounded once to the compute dtype, as torch.clamp rounds its scalars
    high = hi.to(COMPUTE)
    offsets = tl.arange(0, BLOCK_SIZE)
    for i in range(0, full, BLOCK_SIZE):
        block = tl.multiple_of(base + (start + i), 16)  # int64 offsets: tensors may pass 2^31 elements
        _scale_block(block + offsets, None, c, inv, low, high, zero, COMPUTE, HAS_INV, HAS_CLIP, SOFT_BF16, False)
    for i in range(full, n, BLOCK_SIZE):
        _scale_block(base + (start + i) + offsets, i + offsets < n, c, inv, low, high, zero, COMPUTE, HAS_INV,
                     HAS_CLIP, SOFT_BF16, True)


@triton.jit(do_not_specialize=["lo_bits", "hi_bits"], do_not_specialize_on_alignment=[
    "table_ptrs", "table_numels", "table_codes", "chunk_begin", "chunk_tensor", "coef_ptr", "inv_scale_ptr",
    "found_inf_ptr"])
def _fused_scale_kernel(
    table_ptrs, table_numels, table_codes, chunk_begin, chunk_tensor, coef_ptr, inv_scale_ptr, found_inf_ptr,
    lo_bits: tl.int64, hi_bits: tl.int64, PER_TENSOR_COEF: tl.constexpr, HAS_INV: tl.constexpr, HAS_CLIP: tl.constexpr,
    HAS_FOUND: tl.constexpr, ZERO_IF_INF: tl.constexpr, SOFT_BF16: tl.constexpr, CHUNK_SIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(chunk_tensor + pid)
    if PER_TENSOR_COEF:
        coef = tl.load(coef_ptr + t)
    else:
        coef = tl.load(coef_ptr)
    found = 0.0
    if HAS_FOUND:
        found = tl.load(found_inf_ptr).to(tl.float32)
    clean = found == 0.0
    if HAS_INV or HAS_CLIP:
        write = clean
    else:
        write = clean & (coef.to(tl.float64) != 1.0)  # * exactly 1 changes nothing: no read, no write
    zero = (found != 0.0) & (ZERO_IF_INF != 0)
    if write | zero:
        start, n, full, code, addr = _chunk_location(pid, t, table_ptrs, table_numels, table_codes, chunk_begin,
                                                     CHUNK_SIZE, BLOCK_SIZE)
        inv = 1.0
        if HAS_INV:
            inv = tl.load(inv_scale_ptr)
        lo = lo_bits.to(tl.int64).to(tl.float64, bitcast=True)  # the exact Python floats
        hi = hi_bits.to(tl.int64).to(tl.float64, bitcast=True)
        if code == 0:
            _scale_chunk(addr.to(tl.pointer_type(tl.float16)), start, n, full, coef, inv, lo, hi, zero,
                         tl.float32, HAS_INV, HAS_CLIP, 0, BLOCK_SIZE)
        elif code == 1:
            _scale_chunk(addr.to(tl.pointer_type(tl.bfloat16)), start, n, full, coef, inv, lo, hi, zero,
                         tl.float32, HAS_INV, HAS_CLIP, SOFT_BF16, BLOCK_SIZE)
        elif code == 2:
            _scale_chunk(addr.to(tl.pointer_type(tl.float32)), start, n, full, coef, inv, lo, hi, zero,
                         tl.float32, HAS_INV, HAS_CLIP, 0, BLOCK_SIZE)
        else:
            _scale_chunk(addr.to(tl.pointer_type(tl.float64)), start, n, full, coef, inv, lo, hi, zero,
                         tl.float64, HAS_INV, HAS_CLIP, 0, BLOCK_SIZE)


def fused_scale_triton(table, coef: torch.Tensor, inv_scale: Optional[torch.Tensor],
                       clamp: Optional[tuple[float, float]], found_inf: Optional[torch.Tensor],
                       zero_if_inf: bool) -> None:
    """In place ``g <- clamp(g * inv_scale, lo, hi) * coef`` over the table's tensors: ``ampclip::scale_pass``.

    ``table`` as for ``fused_norm_triton`` (non-contiguous tensors staged in before, and copied back out
    by the caller after). ``coef`` is a device tensor, 0-d or one entry per tensor. With ``found_inf``
    non-zero the gradients are zeroed (``zero_if_inf``) or left untouched, decided on the device. One launch
    for the whole list; no host sync.
    """
    n = table.num_tensors
    if coef.numel() != 1 and coef.numel() != n:
        raise ValueError(f"coef must hold 1 or {n} elements, got {coef.numel()}")
    if table.num_chunks == 0:
        return
    device = table.buffer.device
    coef = on_device(coef, device).contiguous()
    inv_scale, found_inf = on_device(inv_scale, device), on_device(found_inf, device)
    lo, hi = clamp if clamp is not None else (0.0, 0.0)
    # ZERO_IF_INF only matters with a found_inf: without one it is 0, so the flag does not double the variants.
    _fused_scale_kernel[(table.num_chunks,)](
        table.dev_ptrs, table.numels, table.codes, table.chunk_begin, table.chunk_tensor, coef,
        inv_scale if inv_scale is not None else coef, found_inf if found_inf is not None else coef,
        float_bits(float(lo)), float_bits(float(hi)),
        PER_TENSOR_COEF=int(coef.numel() != 1), HAS_INV=int(inv_scale is not None),
        HAS_CLIP=int(clamp is not None), HAS_FOUND=int(found_inf is not None),
        ZERO_IF_INF=int(bool(zero_if_inf) and found_inf is not None), SOFT_BF16=_SOFT_BF16, CHUNK_SIZE=table.chunk,
        BLOCK_SIZE=BLOCK,
    )
