"""Properties every backend keeps on random gradient lists (hypothesis): 1 to 200 tensors of random shapes
(0-d and zero-size included), dtypes, layouts (transposed, sliced), magnitudes from 1e-30 to 1e30 and
inf/NaN at random places, with random norm types, unscale factors, clamps and coefficients.

* The norm equals the float64 value within the documented tolerance, or is not finite, exactly when
  found_inf says an unscaled element is inf or NaN.
* The scale pass writes the float64 formula rounded to the gradient's dtype, bit for bit as the reference.
* A rejected call leaves every gradient bit-identical.
* The same input gives the same bits, run after run.

The default profile runs a few dozen examples per property (CI); HYPOTHESIS_PROFILE=thorough runs more.
"""

import math
import os

import pytest
import torch

from ampclip import ops, reference
from helpers import CPU_BACKENDS, bitwise_equal, clone_all

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

hypothesis.settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, database=None,
                                     suppress_health_check=list(hypothesis.HealthCheck))
hypothesis.settings.register_profile("thorough", max_examples=500, deadline=None, database=None,
                                     suppress_health_check=list(hypothesis.HealthCheck))
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# The Triton interpreter runs about 0.7 ms per program: smaller lists keep its examples quick.
MAX_TENSORS = {"triton": 24}


@st.composite
def gradient_lists(draw, max_tensors=200):
    """A list of gradients built from drawn recipes: shape, dtype, layout, magnitude, and where an inf or
    NaN goes (the values themselves come from a seeded generator, so examples stay small)."""
    count = draw(st.integers(1, max_tensors))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for _ in range(count):
        ndim = draw(st.integers(0, 3))
        shape = tuple(draw(st.lists(st.integers(0, 9), min_size=ndim, max_size=ndim)))
        dtype = draw(st.sampled_from(DTYPES))
        info = torch.finfo(dtype)
        exponent = draw(st.integers(-30, 30))
        scale = min(10.0**exponent, info.max / 16)  # the values themselves must fit the dtype
        g = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
        layout = draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
        if layout == "transposed" and g.dim() >= 2:
            g = g.transpose(0, 1).contiguous().transpose(0, 1)
        elif layout == "sliced" and g.dim() >= 1 and g.shape[0] >= 1:
            g = torch.cat([g, g], dim=0)[::2]  # a stride-2 view with the same values
        special = draw(st.sampled_from([None, None, None, math.inf, -math.inf, math.nan]))
        if special is not None and g.numel():
            flat_index = draw(st.integers(0, g.numel() - 1))
            index = torch.unravel_index(torch.tensor(flat_index), g.shape) if g.dim() else ()
            g[tuple(int(i) for i in index)] = special
        grads.append(g)
    return grads


def _acc(grads):
    return torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32


def _unscaled(grads, inv):
    """Each element as the kernels see it: unscaled in the accumulation dtype, then widened exactly."""
    acc = _acc(grads)
    # inv_scale is a float32 tensor: its stored value, widened, is what multiplies
    return [(g.to(acc) * torch.tensor(inv).to(acc)).double() if inv is not None else g.to(acc).double()
            for g in grads]


def _tolerance(norm_type, count, acc):
    """rtol and atol of a norm accumulated in ``acc``: relative rounding, plus the p-th powers of elements
    so small that they fall below the accumulator's range (float32: under 2^-149 each)."""
    if acc == torch.float64:
        return 1e-10, 0.0
    rtol = 3e-6 if norm_type in (1.0, 2.0, math.inf) else 1e-4
    atol = 0.0 if norm_type in (1.0, math.inf) else 2 * (max(count, 1) * 2.0**-149) ** (1 / norm_type)
    return rtol, atol


norm_types = st.sampled_from([1.0, 2.0, 3.0, math.inf])
inv_scales = st.sampled_from([None, 1.0, 2.0**-16, 0.37, 3e4])
clamps = st.sampled_from([None, (-0.5, 0.5), (-1e3, 2.0), (0.0, 1e30)])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@hypothesis.given(data=st.data(), norm_type=norm_types, inv=inv_scales, clamp=clamps)
def test_norm_pass_is_the_float64_norm_or_flags_the_nonfinite(backend, data, norm_type, inv, clamp):
    grads = data.draw(gradient_lists(MAX_TENSORS.get(backend, 200)))
    inv_t = None if inv is None else torch.tensor(inv)
    per_tensor, total, found_inf = ops.norm_pass(grads, inv_t, norm_type, clamp, backend=backend)
    again = ops.norm_pass(grads, inv_t, norm_type, clamp, backend=backend)
    assert all(bitwise_equal(a, b) for a, b in zip((per_tensor, total, found_inf), again))

    unscaled = _unscaled(grads, inv)
    nonfinite = any(not torch.isfinite(u).all() for u in unscaled)
    assert found_inf.item() == float(nonfinite)
    if nonfinite:
        if clamp is None:  # (a clamp may turn an inf into a finite value; found_inf still says it was there)
            assert not math.isfinite(total.item())
        return
    if clamp is not None:
        acc = _acc(grads)
        lo, hi = torch.tensor(clamp, dtype=acc).double().tolist()
        unscaled = [u.clamp(lo, hi) for u in unscaled]
    rtol, atol = _tolerance(norm_type, sum(g.numel() for g in grads), _acc(grads))
    if backend == "reference":
        rtol = max(rtol, 1e-5)  # torch's own kernels round a little more than fp32 lanes folded into fp64
    largest = torch.finfo(_acc(grads)).max
    for got, want in [(total.item(), reference.exact_norm(unscaled, norm_type))] + [
            (got, reference.exact_norm([u], norm_type)) for got, u in zip(per_tensor.tolist(), unscaled)]:
        if want > largest * (1 - rtol):  # not representable in the accumulation dtype: inf, never a wrong number
            assert got == math.inf or abs(got - want) <= rtol * want, (got, want)
        else:
            assert abs(got - want) <= rtol * want + atol, (got, want)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@hypothesis.given(data=st.data(), inv=inv_scales, clamp=clamps, per_tensor=st.booleans(),
                  found=st.sampled_from([None, 0.0, 1.0]), zero=st.booleans())
def test_scale_pass_writes_the_formula_bit_for_bit(backend, data, inv, clamp, per_tensor, found, zero):
    grads = data.draw(gradient_lists(MAX_TENSORS.get(backend, 200)))
    grads = [g for g in grads if torch._debug_has_internal_overlap(g) != 1]
    hypothesis.assume(grads)
    coef_values = data.draw(st.lists(st.floats(1e-3, 1.0), min_size=len(grads), max_size=len(grads)))
    coef = torch.tensor(coef_values if per_tensor else coef_values[:1]).reshape(-1 if per_tensor else ())
    inv_t = None if inv is None else torch.tensor(inv)
    found_t = None if found is None else torch.tensor(found)
    before = clone_all(grads)
    mine, twin = clone_all(grads), clone_all(grads)
    ops.scale_pass(mine, coef, inv_t, clamp, found_t, zero, backend=backend)
    ops.scale_pass(twin, coef, inv_t, clamp, found_t, zero, backend="reference")
    for a, b in zip(mine, twin):
        # NaN stays NaN; its bits may differ between conversions (bf16 0x7fc0 or 0xffff), nothing else may
        assert torch.equal(a.isnan(), b.isnan()) and bitwise_equal(a[~a.isnan()], b[~b.isnan()])
    if found:  # skipped: untouched, or zeroed
        for g, g0 in zip(mine, before):
            assert bitwise_equal(g, torch.zeros_like(g0) if zero else g0)
        return
    # the reference is the float64 formula, rounded once to the compute dtype and once to the gradient's
    coefs = coef.expand(len(grads)) if coef.dim() == 0 else coef
    for g, g0, c in zip(twin, before, coefs.double().tolist()):
        u = g0.double() * (torch.tensor(inv).item() if inv is not None else 1.0)
        if clamp is not None:
            u = u.clamp(*clamp)
        want = (u * c).to(g.dtype)
        finite = torch.isfinite(want) & torch.isfinite(g)
        ulp = {torch.float64: 1e-15, torch.float32: 3e-7}.get(g.dtype, 8e-3)
        torch.testing.assert_close(g[finite].double(), want[finite].double(), rtol=2 * ulp, atol=1e-37)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@hypothesis.given(data=st.data(), bad=st.sampled_from(["int_dtype", "expanded", "coef_size", "clamp_order", "sparse"]))
def test_a_rejected_call_leaves_every_gradient_bit_identical(backend, data, bad):
    grads = data.draw(gradient_lists(MAX_TENSORS.get(backend, 40)))
    grads = [g for g in grads if torch._debug_has_internal_overlap(g) != 1]
    hypothesis.assume(grads)
    position = data.draw(st.integers(0, len(grads)))
    coef, clamp = torch.tensor(0.5), None
    if bad == "int_dtype":
        grads.insert(position, torch.ones(3, dtype=torch.int32))
    elif bad == "expanded":
        grads.insert(position, torch.randn(1).expand(4))
    elif bad == "coef_size":
        coef = torch.ones(len(grads) + 1)
    elif bad == "clamp_order":
        clamp = (1.0, -1.0)
    else:
        grads.insert(position, torch.randn(4).to_sparse())
    before = [g.to_dense().clone() if g.layout != torch.strided else g.clone() for g in grads]
    with pytest.raises((TypeError, ValueError)):
        ops.scale_pass(grads, coef, torch.tensor(0.25), clamp, backend=backend)
    for g, g0 in zip(grads, before):
        if g.layout == torch.strided:
            assert bitwise_equal(g, g0)
