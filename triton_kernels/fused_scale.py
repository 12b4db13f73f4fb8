"""Pass 2: g <- clamp(g * inv_scale, -clip, clip) * coef, in place: one read and one write per element,
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

import math
import os
import struct
from typing import Optional

import torch
import triton
import triton.language as tl

from .fused_norm import BLOCK, _chunk_location
from .tensor_table import CHUNK, tensor_table

# Triton's interpreter (TRITON_INTERPRET=1, how CI runs these kernels on CPU) truncates float32 -> bfloat16
# instead of rounding to nearest even as the GPU does, which would make CPU results differ from the
# reference by one bf16 ulp. Under the interpreter the kernel rounds by hand; compiled, it uses the hardware
# conversion.
_SOFT_BF16 = int(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def _scale_chunk(base, start, n, coef, inv, clip, zero, COMPUTE: tl.constexpr, HAS_INV: tl.constexpr,
                 HAS_CLIP: tl.constexpr, SOFT_BF16: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    c = coef.to(COMPUTE)
    lim = clip.to(COMPUTE)  # rounded once to the compute dtype, as torch.clamp rounds its scalar
    offsets = tl.arange(0, BLOCK_SIZE)
    for i in range(0, n, BLOCK_SIZE):
        mask = i + offsets < n
        idx = start + i + offsets  # int64: tensors may pass 2^31 elements
        u = tl.load(base + idx, mask=mask, other=0.0).to(COMPUTE)
        if HAS_INV:
            u = u * inv.to(COMPUTE)
        if HAS_CLIP:
            u = tl.where(u < -lim, -lim, u)
            u = tl.where(u > lim, lim, u)
        u = tl.where(zero, 0.0, u * c)
        if SOFT_BF16:
            # round to nearest even by hand (what cvt.rn.bf16.f32 does on the GPU); NaN -> 0x7FC0 as in c10
            bits = u.to(tl.uint32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            rounded = tl.where(u != u, 0x7FC0, rounded).to(tl.uint16)
            tl.store(base + idx, rounded.to(tl.bfloat16, bitcast=True), mask=mask)
        else:
            tl.store(base + idx, u.to(base.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["clip_bits"])
def _fused_scale_kernel(
    table_ptrs, table_numels, table_codes, chunk_begin, chunk_tensor, coef_ptr, inv_scale_ptr, found_inf_ptr,
    clip_bits, PER_TENSOR_COEF: tl.constexpr, HAS_INV: tl.constexpr, HAS_CLIP: tl.constexpr,
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
        start, n, code, addr = _chunk_location(pid, t, table_ptrs, table_numels, table_codes, chunk_begin,
                                               CHUNK_SIZE)
        inv = 1.0
        if HAS_INV:
            inv = tl.load(inv_scale_ptr)
        clip = clip_bits.to(tl.int64).to(tl.float64, bitcast=True)  # the exact Python float
        if code == 0:
            _scale_chunk(addr.to(tl.pointer_type(tl.float16)), start, n, coef, inv, clip, zero,
                         tl.float32, HAS_INV, HAS_CLIP, 0, BLOCK_SIZE)
        elif code == 1:
            _scale_chunk(addr.to(tl.pointer_type(tl.bfloat16)), start, n, coef, inv, clip, zero,
                         tl.float32, HAS_INV, HAS_CLIP, SOFT_BF16, BLOCK_SIZE)
        elif code == 2:
            _scale_chunk(addr.to(tl.pointer_type(tl.float32)), start, n, coef, inv, clip, zero,
                         tl.float32, HAS_INV, HAS_CLIP, 0, BLOCK_SIZE)
        else:
            _scale_chunk(addr.to(tl.pointer_type(tl.float64)), start, n, coef, inv, clip, zero,
                         tl.float64, HAS_INV, HAS_CLIP, 0, BLOCK_SIZE)


def _float_bits(x: float) -> int:
    """A float64's bit pattern as an int: Triton passes Python floats as float32, which would round a clip
    value that float64 gradients compare against."""
    return struct.unpack("<q", struct.pack("<d", x))[0]


def fused_scale_triton(grads: list[torch.Tensor], coef: torch.Tensor, inv_scale: Optional[torch.Tensor],
                       clip_value: Optional[float], found_inf: Optional[torch.Tensor], zero_if_inf: bool,
                       chunk: int = CHUNK) -> None:
    """In place ``g <- clamp(g * inv_scale, ±clip_value) * coef``: ``ampclip::scale_pass``.

    ``coef`` is a device tensor, 0-d or one entry per gradient. With ``found_inf`` non-zero the gradients
    are zeroed (``zero_if_inf``) or left untouched, decided on the device. One launch for the whole list;
    no host sync. Bad input raises before anything is written.

    Example::

        fused_scale_triton(grads, coef=clip_coef, inv_scale=None, clip_value=None, found_inf=None,
                           zero_if_inf=False)
    """
    if not grads:
        return
    n = len(grads)
    if coef.numel() != 1 and coef.numel() != n:
        raise ValueError(f"coef must hold 1 or {n} elements, got {coef.numel()}")
    if clip_value is not None and not (clip_value >= 0):  # also rejects NaN
        raise ValueError(f"clip_value must be >= 0, got {clip_value}")
    table = tensor_table(grads, chunk)  # validates dtypes and devices
    if table.num_chunks == 0:
        return
    device = grads[0].device
    if coef.device != device:
        coef = coef.to(device)
    if not coef.is_contiguous():
        coef = coef.contiguous()
    if inv_scale is not None and inv_scale.device != device:
        inv_scale = inv_scale.to(device)
    if found_inf is not None and found_inf.device != device:
        found_inf = found_inf.to(device)
    clip = math.inf if clip_value is None else float(clip_value)
    table.stage_in(grads)
    _fused_scale_kernel[(table.num_chunks,)](
        table.dev_ptrs, table.numels, table.codes, table.chunk_begin, table.chunk_tensor, coef,
        inv_scale if inv_scale is not None else coef, found_inf if found_inf is not None else coef,
        _float_bits(clip),
        PER_TENSOR_COEF=int(coef.numel() != 1), HAS_INV=int(inv_scale is not None),
        HAS_CLIP=int(clip_value is not None), HAS_FOUND=int(found_inf is not None),
        ZERO_IF_INF=int(bool(zero_if_inf)), SOFT_BF16=_SOFT_BF16, CHUNK_SIZE=chunk, BLOCK_SIZE=BLOCK,
    )
    table.stage_out(grads)
