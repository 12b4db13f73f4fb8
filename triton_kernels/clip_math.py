"""The clip arithmetic the Triton kernels share: the coefficient of a norm, p-th powers and roots in float64,
and the norm after clipping. Used by the norm pass's finish (fused_norm.py), the small ops (small_ops.py) and
the unit-wise passes (unitwise.py); it imports nothing of theirs.

Arithmetic follows ``ampclip.reference`` (the contract): coefficients in the norms' dtype, rounded as torch's
``clip_grad_norm_`` rounds them (IEEE division); combinations of norms in float64, scaled by the largest so
nothing overflows. Python floats arrive as their float64 bits (Triton would pass them as float32).
"""

from __future__ import annotations

import triton
import triton.language as tl

# One coefficient a thread (4 warps): each IEEE division is a call across which ptxas keeps (or spills) every
# live register.
COEF_BLOCK = tl.constexpr(128)


@triton.jit
def _as_float(bits):
    """A float64 from the bits of a Python float."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _coefficient(norm, bound, eps, RULE: tl.constexpr):
    """The clip coefficient in norm's dtype: rule 0 ``min(1, bound / (norm + eps))`` as torch computes it
    (``(1 / (norm + eps)) * bound``), rule 1 ``bound / max(norm + eps, bound)``, 1 unless ``norm + eps > bound``
    (an infinite bound gives 1, not inf / inf); a NaN norm gives NaN."""
    shifted = norm + eps.to(norm.dtype)
    b = bound.to(norm.dtype)
    if RULE == 0:
        c = _divide(tl.full(shifted.shape, 1.0, norm.dtype), shifted) * b
        c = tl.where(c > 1.0, 1.0, c).to(norm.dtype)
    else:
        q = _divide(b + tl.zeros(shifted.shape, norm.dtype), shifted)
        c = tl.where(shifted > b, q, 1.0)
        c = tl.where(shifted != shifted, q, c)  # a NaN norm (or bound) gives NaN
        c = tl.where(b != b, q, c).to(norm.dtype)
    return c


@triton.jit
def _divide(a, b):
    """a / b rounded to nearest, as the CPU divides (Triton's float32 division may be approximate)."""
    if a.dtype.is_fp64():
        out = a / b
    else:
        out = tl.math.div_rn(a, b)
    return out


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


@triton.jit
def _p_root(s, inv_p, NORM: tl.constexpr):
    """s^(1/p) for s >= 0 (float64)."""
    if NORM == 0:
        out = tl.sqrt(s)
    elif NORM == 1:
        out = s
    else:
        safe = tl.where(s == 0.0, 1.0, s)
        out = tl.where(s == 0.0, 0.0, tl.exp2(tl.log2(safe) * inv_p))
    return out


@triton.jit
def _clipped(per_tensor, coef, index, count):
    """|norm * coefficient| in float64 at ``index`` (0 past ``count``), read from L2 (".cg"): other programs of
    the launch may have stored them."""
    mask = index < count
    n = tl.load(per_tensor + index, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float64)
    return tl.abs(n * tl.load(coef + index, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float64))


@triton.jit
def _clipped_norm(per_tensor, coef, count, p, inv_p, NORM: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """The p-norm over tensors of norm * coefficient, in float64 scaled by the largest, NaN propagating: two
    reads of the norms and their coefficients (stored before a barrier, by this program or by others of the
    launch), the largest first, then the scaled sum."""
    offsets = tl.arange(0, BLOCK_SIZE)
    peak = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
    nan = tl.zeros([BLOCK_SIZE], dtype=tl.int32)
    for i in range(0, count, BLOCK_SIZE):
        v = _clipped(per_tensor, coef, i + offsets, count)
        nan = tl.maximum(nan, tl.where(v != v, 1, 0))
        peak = tl.maximum(peak, tl.where(v != v, 0.0, v))
    top = tl.max(peak, axis=0)
    if NORM == 2:
        out = top
    else:
        scale = tl.where((top > 0.0) & (top < float("inf")), top, 1.0)
        inv_scale = 1.0 / scale  # one division, not one per element (each is a call that spills registers)
        acc = tl.zeros([BLOCK_SIZE], dtype=tl.float64)
        for i in range(0, count, BLOCK_SIZE):
            v = _clipped(per_tensor, coef, i + offsets, count)
            acc += _power(tl.where(v != v, 0.0, v) * inv_scale, p, NORM)
        out = tl.where(top == float("inf"), top, _p_root(tl.sum(acc, axis=0), inv_p, NORM) * scale)
    return tl.where(tl.max(nan, axis=0) > 0, float("nan"), out)


@triton.jit
def _store_coefficients(norms, coef_out, bound, eps, count, RULE: tl.constexpr):
    """coef_out[i] = the coefficient of norms[i], i < count, one per thread and step (COEF_BLOCK)."""
    offsets = tl.arange(0, COEF_BLOCK)
    for i in range(0, count, COEF_BLOCK):
        mask = i + offsets < count
        n = tl.load(norms + i + offsets, mask=mask, other=0.0)
        tl.store(coef_out + i + offsets, _coefficient(n, bound, eps, RULE), mask=mask)


@triton.jit
def _coefficient_by_rule(norm, bound, eps, rule):
    """:func:`_coefficient` with the rule a run-time value (0 or 1): one compiled variant for both, and one
    division on the way taken (each is a call across which ptxas keeps the live registers)."""
    if rule == 0:
        c = _coefficient(norm, bound, eps, 0)
    else:
        c = _coefficient(norm, bound, eps, 1)
    return c
