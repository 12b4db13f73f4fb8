"""ZClip's step in one program: the warm-up buffer, the EMA of the global norm's mean and variance, and the
step's bound, in float64 on the device (``ampclip.reference.zclip_update`` is the contract). As torch ops the
step is about forty launches of a few microseconds; here it is one, and nothing waits for the host, so a step
is CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .clip_math import _as_float
from .fused_norm import float_bits

BLOCK = 128  # warm-up slots per step of the initial mean and variance (25 by default)
MEAN, VAR, READY, COUNT = (tl.constexpr(i) for i in range(4))  # the state's layout (ampclip.ops.ZCLIP_*)


@triton.jit(do_not_specialize=["size", "alpha_bits", "z_bits", "cap_bits", "eps_bits", "factor_bits", "no_clip_bits"],
            do_not_specialize_on_alignment=["state", "warmup", "total_ptr", "found_ptr", "bound_out"])
def _zclip_kernel(state, warmup, total_ptr, found_ptr, bound_out, size, alpha_bits, z_bits, cap_bits, eps_bits,
                  factor_bits, no_clip_bits, RULE: tl.constexpr, SKIP_ON_SPIKE: tl.constexpr,
                  BLOCK_SIZE: tl.constexpr):
    alpha = _as_float(alpha_bits)
    z_thresh = _as_float(z_bits)
    cap = _as_float(cap_bits)
    eps = _as_float(eps_bits)
    factor = _as_float(factor_bits)
    no_clip = _as_float(no_clip_bits)
    norm = tl.load(total_ptr).to(tl.float64)
    clean = (tl.load(found_ptr).to(tl.float32) == 0.0) & (tl.abs(norm) < float("inf"))  # NaN fails the test too
    mean = tl.load(state + MEAN)
    var = tl.load(state + VAR)
    ready = tl.load(state + READY) != 0.0
    count = tl.load(state + COUNT)
    std = tl.sqrt(var)
    if RULE == 2:  # percentile
        threshold = mean + z_thresh * std
        spike = norm > threshold
    else:
        z = (norm - mean) / (std + eps)
        spike = z > z_thresh
        if RULE == 0:  # adaptive scaling
            threshold = (mean + (z_thresh * std) / (z / z_thresh)) * factor
        else:  # mean
            threshold = mean
    effective = tl.where(spike, threshold, float("inf"))
    effective = tl.where(effective > cap, cap, effective)
    bound = tl.where(ready, tl.where(norm > effective, effective, no_clip), tl.minimum(cap, no_clip))
    tl.store(bound_out, bound.to(bound_out.dtype.element_ty))
    # the EMA step of a ready run
    x = tl.where(spike, threshold, norm)
    new_mean = alpha * mean + (1.0 - alpha) * x
    new_var = alpha * var + (1.0 - alpha) * ((x - new_mean) * (x - new_mean))
    update = ready & clean
    if SKIP_ON_SPIKE:
        update = update & (spike.to(tl.int32) == 0)
    # the warm-up of a run not ready yet: record the norm, initialise when full
    record = (tl.load(state + READY) == 0.0) & clean
    slot = tl.minimum(count, size - 1.0).to(tl.int64)
    tl.store(warmup + slot, tl.where(record, norm, tl.load(warmup + slot)))
    new_count = count + tl.where(record, 1.0, 0.0)
    filled = record & (new_count >= size)
    # The buffer is read back with this step's norm put in by hand: a program's own stores need not be
    # visible to its loads.
    offsets = tl.arange(0, BLOCK_SIZE)
    recorded = record.to(tl.int32) != 0  # (a scalar flag broadcast against a block)
    sums = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
    for i in range(0, size, BLOCK_SIZE):
        at = i + offsets
        v = tl.load(warmup + at, mask=at < size, other=0.0)
        sums += tl.where((at == slot) & recorded, norm, v)
    first_mean = tl.sum(sums, axis=0) / size
    squares = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
    for i in range(0, size, BLOCK_SIZE):
        at = i + offsets
        v = tl.where((at == slot) & recorded, norm, tl.load(warmup + at, mask=at < size, other=0.0))
        squares += tl.where(at < size, (v - first_mean) * (v - first_mean), 0.0)
    first_var = tl.sum(squares, axis=0) / size
    tl.store(state + MEAN, tl.where(filled, first_mean, tl.where(update, new_mean, mean)))
    tl.store(state + VAR, tl.where(filled, first_var, tl.where(update, new_var, var)))
    tl.store(state + READY, tl.where(ready | filled, 1.0, 0.0).to(tl.float64))
    tl.store(state + COUNT, new_count)


def zclip_update_triton(state: torch.Tensor, warmup: torch.Tensor, total: torch.Tensor, found_inf: torch.Tensor,
                        alpha: float, z_thresh: float, max_grad_norm: float, eps: float, rule: int,
                        clip_factor: float, skip_update_on_spike: bool) -> torch.Tensor:
    """``ampclip::zclip_update`` in one launch: updates ``state`` (float64 [4]) and ``warmup`` (float64
    [size]) in place and returns the step's bound, 0-d in ``total``'s dtype."""
    if state.dtype != torch.float64 or state.numel() != 4 or warmup.dtype != torch.float64 or warmup.numel() < 1:
        raise ValueError("zclip_update needs a float64 state of 4 and a float64 warm-up buffer")
    if rule not in (0, 1, 2):
        raise ValueError(f"rule must be 0, 1 or 2, got {rule}")
    bound = torch.empty((), dtype=total.dtype, device=state.device)
    _zclip_kernel[(1,)](
        state, warmup, total.to(state.device), found_inf.to(state.device), bound, warmup.numel(),
        float_bits(float(alpha)), float_bits(float(z_thresh)), float_bits(float(max_grad_norm)),
        float_bits(float(eps)), float_bits(float(clip_factor)), float_bits(float(torch.finfo(total.dtype).max)),
        RULE=int(rule), SKIP_ON_SPIKE=int(bool(skip_update_on_spike)), BLOCK_SIZE=BLOCK,
    )
    return bound
