"""Every backend against the op contract and an fp64 exact computation: reference, the C++ kernels, and the
Triton kernels (on CPU tensors under TRITON_INTERPRET=1, set in conftest.py)."""

import math

import pytest
import torch

from ampclip import ops, reference
from helpers import (
    CPU_BACKENDS,
    DTYPE_MIXES,
    NORMS,
    ODD_SHAPES,
    bitwise_equal,
    clone_all,
    exact_per_tensor,
    norm_rtol,
    put_nonfinite,
    random_grads,
    rel_close,
)


def _backend(name):
    return pytest.param(name, marks=pytest.mark.skipif(name not in CPU_BACKENDS, reason=f"{name} cannot run here"))


BACKENDS = [_backend(name) for name in ops.BACKENDS]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_type", NORMS)
@pytest.mark.parametrize("dtypes", DTYPE_MIXES)
@pytest.mark.parametrize("unscale", [None, 1 / 1024], ids=["plain", "unscale"])
def test_norm_pass_matches_fp64(backend, norm_type, dtypes, unscale):
    grads = random_grads(ODD_SHAPES, dtypes, scale=3.0, noncontiguous_every=3)
    inv = None if unscale is None else torch.tensor(unscale)
    per_tensor, total, found_inf = ops.norm_pass(grads, inv, norm_type, backend=backend)

    want_dtype = torch.float64 if torch.float64 in dtypes else torch.float32
    assert per_tensor.dtype == total.dtype == want_dtype and found_inf.dtype == torch.float32
    assert per_tensor.shape == (len(grads),) and total.shape == () and found_inf.shape == ()
    assert found_inf.item() == 0.0
    rtol = norm_rtol(norm_type) if backend == "cpp" else 1e-4  # torch's own fp32 norm is less exact
    exact = reference.exact_norm(grads, norm_type, unscale)
    assert rel_close(total.item(), exact, rtol), (total.item(), exact)
    for got, want in zip(per_tensor.tolist(), exact_per_tensor(grads, norm_type, unscale)):
        assert rel_close(got, want, rtol), (got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("position", ["first", "last", "tail", 65536 + 5], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_found_inf_is_exact(backend, value, position, dtype):
    shapes = [(70001,), (5,), (4097,)]
    grads = random_grads(shapes, (dtype,))
    index = 0 if position == 65536 + 5 else 2
    put_nonfinite(grads, index, position, value)
    per_tensor, total, found_inf = ops.norm_pass(grads, None, 2.0, backend=backend)
    assert found_inf.item() == 1.0
    assert not math.isfinite(total.item())
    assert not math.isfinite(per_tensor[index].item())
    assert math.isfinite(per_tensor[1].item())  # the finite tensors keep finite norms


@pytest.mark.parametrize("backend", BACKENDS)
def test_found_inf_not_set_for_finite_overflow(backend):
    # Squares of 1e20 overflow float32, but nothing is inf or NaN: found_inf must stay 0.
    grads = [torch.full((100,), 1e20), torch.randn(10)]
    _, total, found_inf = ops.norm_pass(grads, None, 2.0, backend=backend)
    assert found_inf.item() == 0.0
    # ... and an unscale that overflows to inf is caught, since the check is on the unscaled values.
    _, _, found_inf = ops.norm_pass([torch.full((3,), 1e30)], torch.tensor(1e10), 2.0, backend=backend)
    assert found_inf.item() == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_inv_scale_flags_inf(backend):
    grads = [torch.randn(100)]
    grads[0][7] = math.inf  # inf * 0 is NaN
    assert ops.norm_pass(grads, torch.tensor(0.0), 2.0, backend=backend)[2].item() == 1.0


def test_cpp_norm_is_bitwise_reproducible_across_thread_counts():
    grads = random_grads([(300_000,), (70001,), (3,), (4097,)], (torch.float32, torch.bfloat16))
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(ops.norm_pass(grads, torch.tensor(0.25), 2.0, backend="cpp"))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert bitwise_equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtypes", DTYPE_MIXES)
@pytest.mark.parametrize("clip_value", [None, 0.5], ids=["noclamp", "clamp"])
@pytest.mark.parametrize("unscale", [None, 0.125], ids=["plain", "unscale"])
@pytest.mark.parametrize("per_tensor_coef", [False, True], ids=["global", "per_tensor"])
def test_scale_pass_matches_fp64(backend, dtypes, clip_value, unscale, per_tensor_coef):
    grads = random_grads(ODD_SHAPES, dtypes, scale=2.0, noncontiguous_every=4)
    before = clone_all(grads)
    n = len(grads)
    coef = torch.linspace(0.1, 0.9, n) if per_tensor_coef else torch.tensor(0.3)
    if torch.float64 in dtypes:
        coef = coef.double()
    inv = None if unscale is None else torch.tensor(unscale)
    ops.scale_pass(grads, coef, inv, clip_value, backend=backend)
    coefs = coef.expand(n) if coef.dim() == 0 else coef
    for g, g0, c in zip(grads, before, coefs.tolist()):
        u = g0.double() * (1.0 if unscale is None else unscale)
        if clip_value is not None:
            u = u.clamp(-clip_value, clip_value)
        want = (u * c).to(g.dtype)
        # One rounding to the gradient's dtype, plus float32 arithmetic before it.
        tol = {torch.float64: 1e-12, torch.float32: 2e-7}.get(g.dtype, 1e-2)
        torch.testing.assert_close(g, want, rtol=tol, atol=1e-30)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtypes", DTYPE_MIXES)
@pytest.mark.parametrize("clip_value", [None, 0.5, (-0.25, 0.75)], ids=["noclamp", "clamp", "asymmetric"])
def test_scale_pass_bitwise_equals_reference(backend, dtypes, clip_value):
    grads = random_grads(ODD_SHAPES, dtypes, scale=2.0, noncontiguous_every=4)
    twin = clone_all(grads)
    coef = torch.tensor(0.37, dtype=torch.float64 if torch.float64 in dtypes else torch.float32)
    inv = torch.tensor(0.5)
    versions = [g._version for g in grads]
    ops.scale_pass(grads, coef, inv, clip_value, backend=backend)
    ops.scale_pass(twin, coef, inv, clip_value, backend="reference")
    for a, b in zip(grads, twin):
        assert bitwise_equal(a, b)
    assert all(g._version > v for g, v in zip(grads, versions) if g.numel())  # autograd learns of every write


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_type", NORMS)
def test_norm_pass_is_bitwise_deterministic(backend, norm_type):
    grads = random_grads([(70001,), (4097,), (3,), (9000,)], (torch.float32, torch.bfloat16, torch.float16))
    inv = torch.tensor(0.3)
    first = ops.norm_pass(grads, inv, norm_type, backend=backend)
    second = ops.norm_pass(clone_all(grads), inv, norm_type, backend=backend)
    assert all(bitwise_equal(a, b) for a, b in zip(first, second))


# -------------------------------------------------------------------------- the value clamp and the check


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_clamp_never_hides_an_overflow(backend, value, dtype):
    # inf clamped to 0.1 looks finite; the check must see the unscaled value before the clamp.
    grads = random_grads([(4097,), (5,)], (dtype,))
    grads[0][17] = value
    _, _, found_inf = ops.norm_pass(grads, torch.tensor(0.5), 2.0, 0.1, backend=backend)
    assert found_inf.item() == 1.0
    # an unscale that overflows only on the unscaled value is caught too
    _, _, found_inf = ops.norm_pass([torch.full((3,), 3e38)], torch.tensor(4.0), 2.0, 1.0, backend=backend)
    assert found_inf.item() == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_type", NORMS)
@pytest.mark.parametrize("clamp", [0.3, (-0.1, 0.6)], ids=["symmetric", "asymmetric"])
def test_clamped_norm_matches_fp64(backend, norm_type, clamp):
    grads = random_grads(ODD_SHAPES, (torch.float32, torch.bfloat16), noncontiguous_every=3)
    lo, hi = (-clamp, clamp) if isinstance(clamp, float) else clamp
    clamped = [(g.double() * 0.5).clamp(lo, hi) for g in grads]
    per_tensor, total, found_inf = ops.norm_pass(grads, torch.tensor(0.5), norm_type, clamp, backend=backend)
    assert found_inf.item() == 0.0
    rtol = 1e-4 if backend == "reference" else norm_rtol(norm_type) * 5
    assert rel_close(total.item(), reference.exact_norm(clamped, norm_type), rtol)
    for got, want in zip(per_tensor.tolist(), exact_per_tensor(clamped, norm_type)):
        assert rel_close(got, want, rtol), (got, want)


# -------------------------------------------------------------------------- norms that are right when representable


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0], ids=["p1", "p2", "p3"])
def test_norms_whose_powers_overflow_float32_are_right(backend, dtype, norm_type):
    # 1000 x 1e20: each square (1e40) overflows float32, the norm (3.2e21) does not. found_inf stays 0.
    grads = [torch.full((1000,), 1e20, dtype=dtype), torch.randn(300, dtype=dtype), torch.full((7,), -3e15)]
    per_tensor, total, found_inf = ops.norm_pass(grads, None, norm_type, backend=backend)
    assert found_inf.item() == 0.0
    assert rel_close(total.item(), reference.exact_norm(grads, norm_type), 1e-5)
    for got, want in zip(per_tensor.tolist(), exact_per_tensor(grads, norm_type)):
        assert rel_close(got, want, 1e-5), (got, want)


# -------------------------------------------------------------------------- gradients that share memory


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_that_share_memory_are_scaled_as_torch_does(backend):
    # torch's clip multiplies each parameter's .grad in turn: a tensor that is the .grad of two parameters
    # is scaled twice, overlapping views see each other's writes. Same result every run, never a race.
    base = torch.randn(70001)
    shared = torch.randn(4097)
    grads = [shared, base[:50000], shared, base[30000:], torch.randn(3)]
    coef = torch.tensor([0.5, 0.25, 0.5, 2.0, 0.75])
    want_base, want_shared, want_tail = base.clone(), shared.clone(), grads[4].clone()
    want_shared.mul_(0.5).mul_(0.5)
    want_base[:50000].mul_(0.25)
    want_base[30000:].mul_(2.0)
    want_tail.mul_(0.75)
    ops.scale_pass(grads, coef, backend=backend)
    assert bitwise_equal(shared, want_shared) and bitwise_equal(base, want_base)
    assert bitwise_equal(grads[4], want_tail)


# -------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_raises_before_anything_is_written(backend):
    good = torch.randn(10)
    before = good.clone()
    with pytest.raises(TypeError, match="dtype|float16"):
        ops.norm_pass([good, torch.ones(3, dtype=torch.int32)], backend=backend)
    with pytest.raises((ValueError, RuntimeError), match="coef"):
        ops.scale_pass([good], torch.ones(2), backend=backend)
    with pytest.raises(TypeError, match="dense"):
        ops.scale_pass([good, torch.randn(3).to_sparse()], torch.tensor(0.5), backend=backend)
    with pytest.raises(ValueError, match="device|meta|CPU"):
        ops.scale_pass([good, torch.randn(3, device="meta")], torch.tensor(0.5), backend=backend)
    with pytest.raises(ValueError, match="share memory"):
        ops.scale_pass([good, torch.randn(1).expand(5)], torch.tensor(0.5), backend=backend)
    with pytest.raises(ValueError, match="min <= max|lo <= hi"):
        ops.scale_pass([good], torch.tensor(0.5), clip_value=(1.0, -1.0), backend=backend)
    assert bitwise_equal(good, before)
    # an expanded gradient can still be measured, as torch measures it
    _, total, _ = ops.norm_pass([torch.full((1,), 2.0).expand(4)], backend=backend)
    assert total.item() == 4.0


@pytest.mark.skipif(not ops.available_backends()["cpp"], reason="no _C")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cpp_half_conversions_equal_torch_on_special_values(dtype):
    # The 16-bit paths convert in hardware (F16C) or on raw bits: rounding, overflow to inf, subnormals and
    # NaN must come out as torch's own conversions give them. 8-wide loops: the odd length leaves a tail.
    info = torch.finfo(dtype)
    special = torch.tensor([math.nan, math.inf, -math.inf, info.max, -info.max, info.tiny, info.tiny / 8,
                            -info.tiny / 3, 0.0, -0.0, 1 / 3, 1e-3, 3.0], dtype=torch.float32)
    values = torch.cat([torch.randn(1000) * 5, special, torch.randn(20)]).to(dtype)
    for inv, coef in [(2.0, 0.37), (0.5, 1.0 / 3), (1.0, 0.999)]:
        grads = [values.clone(), values[3:].clone()]
        twin = clone_all(grads)
        ops.scale_pass(grads, torch.tensor(coef), torch.tensor(inv), backend="cpp")
        ops.scale_pass(twin, torch.tensor(coef), torch.tensor(inv), backend="reference")
        for a, b in zip(grads, twin):
            # NaN stays NaN; its bits are not compared: torch's own bf16 rounding gives 0x7fc0 in scalar
            # code (c10::BFloat16, which ampclip follows) and 0xffff in its AVX2 code.
            assert torch.equal(a.isnan(), b.isnan())
            assert bitwise_equal(a[~a.isnan()], b[~b.isnan()])
    finite = values[values.abs() < 1e4]  # bf16's largest squares would overflow the float32 lanes
    per_tensor, total, found_inf = ops.norm_pass([finite, values], torch.tensor(0.5), 2.0, backend="cpp")
    assert found_inf.item() == 1.0
    assert rel_close(per_tensor[0].item(), reference.exact_norm([finite], 2.0, 0.5), 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("zero_if_inf", [False, True], ids=["leave", "zero"])
def test_scale_pass_on_found_inf(backend, zero_if_inf):
    grads = random_grads([(100,), (70001,), (1,)], (torch.float32, torch.float16))
    grads[1][0] = math.nan
    before = clone_all(grads)
    ops.scale_pass(grads, torch.tensor(0.5), torch.tensor(2.0), 1.0, torch.tensor(1.0), zero_if_inf, backend=backend)
    for g, g0 in zip(grads, before):
        if zero_if_inf:
            assert bitwise_equal(g, torch.zeros_like(g0))
        else:
            assert bitwise_equal(g, g0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_pass_with_unit_coef_leaves_bits_alone(backend):
    grads = random_grads(ODD_SHAPES, (torch.float32, torch.bfloat16))
    grads[0][0] = math.nan
    grads[2][-1] = -0.0
    before = clone_all(grads)
    ops.scale_pass(grads, torch.tensor(1.0), backend=backend)
    assert all(bitwise_equal(g, g0) for g, g0 in zip(grads, before))


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_tiny_tensors(backend):
    # The Triton interpreter runs about 2 ms per tensor here (three launches of one program each).
    grads = random_grads([(4,)] * (1000 if backend == "triton" else 3000), (torch.float32, torch.float16))
    per_tensor, total, _ = ops.norm_pass(grads, None, 2.0, backend=backend)
    assert rel_close(total.item(), reference.exact_norm(grads, 2.0), 1e-5)
    want = torch.tensor(exact_per_tensor(grads, 2.0), dtype=torch.float32)
    torch.testing.assert_close(per_tensor, want, rtol=1e-5, atol=0)
    before = clone_all(grads)
    ops.scale_pass(grads, torch.tensor(0.25), backend=backend)
    for g, g0 in zip(grads, before):
        torch.testing.assert_close(g, g0 * 0.25, rtol=0, atol=0)  # a power of two scales exactly


needs_cpp = pytest.mark.skipif(not ops.available_backends()["cpp"], reason="no _C")


@needs_cpp
@pytest.mark.parametrize("dtypes", DTYPE_MIXES)
@pytest.mark.parametrize("norm_type", NORMS)
def test_cpp_direct_entries_equal_the_dispatched_ops_bit_for_bit(dtypes, norm_type):
    # Eager cpp calls skip the dispatcher (ampclip._C.norm_pass / scale_pass); they must equal the
    # registered ops exactly, per-tensor coefficients, unscale and clamp included.
    from ampclip.backends.cpp import _C

    grads = random_grads(ODD_SHAPES * 3, dtypes, scale=2.0, noncontiguous_every=4)
    twin = clone_all(grads)
    inv = torch.tensor(0.5)
    direct = _C.norm_pass(grads, inv, norm_type, None)
    dispatched = torch.ops.ampclip.norm_pass(twin, inv, norm_type, None, "cpp")
    assert direct is not None and all(bitwise_equal(a, b) for a, b in zip(direct, dispatched))
    coef = torch.rand(len(grads), dtype=direct[0].dtype) + 0.1
    found_inf = torch.tensor(0.0)
    assert _C.scale_pass(grads, coef, inv, (-0.75, 0.75), found_inf, False) is True
    torch.ops.ampclip.scale_pass(twin, coef, inv, [-0.75, 0.75], found_inf, False, "cpp")
    assert all(bitwise_equal(a, b) for a, b in zip(grads, twin))


@needs_cpp
def test_cpp_passes_over_a_million_elements_let_other_threads_run():
    # A C function that keeps the GIL is never interrupted, so the counting thread advances during the call
    # only if the kernel released it (with the GIL kept, no attempt advances it). The long switch interval
    # keeps the interpreter from handing the GIL over in the few bytecodes between reading the counter and
    # entering the call.
    import sys
    import threading

    from ampclip.backends.cpp import _C

    grads = random_grads([(1 << 22,), (3000,)], (torch.float32, torch.bfloat16))
    params, inv, coef = reference.parameters_of(grads), torch.tensor(0.5), torch.tensor(0.5)
    calls = [lambda: _C.norm_pass(grads, inv, 2.0, None), lambda: _C.scale_pass(grads, coef, inv, None, None, False),
             lambda: _C.clip_params(params, 1.0, 2.0)]
    counter, stop = [0], threading.Event()

    def count():
        while not stop.is_set():
            counter[0] += 1

    # One kernel thread leaves a core to the counting thread: on a 2-core machine two OpenMP threads could
    # keep it off the CPU for the whole call.
    interval, threads = sys.getswitchinterval(), torch.get_num_threads()
    sys.setswitchinterval(0.2)
    torch.set_num_threads(1)
    thread = threading.Thread(target=count)
    thread.start()
    try:
        advanced = []
        for call in calls:
            for _ in range(20):  # a busy machine may keep the counting thread off the CPU through a call
                before = counter[0]
                assert call() is not None
                if counter[0] > before:
                    break
            advanced.append(counter[0] - before)
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
        torch.set_num_threads(threads)
    assert all(n > 0 for n in advanced), advanced


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown ampclip backend"):
        ops.norm_pass([torch.randn(3)], backend="cuda-magic")


def test_the_environment_forces_a_backend_where_none_is_asked_for(monkeypatch):
    monkeypatch.setenv("AMPCLIP_BACKEND", "reference")
    assert ops.resolve_backend(None, "cpu") == "reference"
    assert ops.resolve_backend("cpp", "cpu") == "cpp" if "cpp" in CPU_BACKENDS else True
    monkeypatch.setenv("AMPCLIP_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown ampclip backend"):
        ops.resolve_backend(None, "cpu")


# -------------------------------------------------------------------------- the small ops


def _torch_coefficient(norms: torch.Tensor, bound: float, eps: float, rule: int) -> torch.Tensor:
    """The coefficient as torch's clip_grad_norm_ computes it (rule 0) and seed 004's rule (rule 1)."""
    if rule == 0:
        return (bound / (norms + eps)).clamp(max=1.0)
    shifted = norms + eps
    bound = torch.full_like(shifted, bound)
    return bound / torch.maximum(shifted, bound)  # true division: m / m is exactly 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("rule", [0, 1], ids=["torch_rule", "max_rule"])
@pytest.mark.parametrize("norm_type", NORMS)
@pytest.mark.parametrize("bound_as_tensor", [False, True], ids=["float_bound", "tensor_bound"])
def test_clip_finalize_matches_the_formulas(backend, dtype, rule, norm_type, bound_as_tensor):
    gen = torch.Generator().manual_seed(3)
    per_tensor = torch.cat([torch.rand(2000, generator=gen) * 3, torch.tensor([0.0, 1e-30, 1e30, 0.7])]).to(dtype)
    total = ops.combine_norms(per_tensor, norm_type)
    group_index = torch.randint(0, 5, (len(per_tensor),), generator=gen)
    group_index[group_index == 3] = 4  # group 3 has no member: norm 0, coefficient 1
    for bound in (0.5, 1e31, 0.0):
        max_norm = torch.tensor(bound, dtype=dtype) if bound_as_tensor else bound
        for mode in ("global", "per_tensor", "per_group"):
            coef, group_coef, group_norms, post = ops.clip_finalize(
                per_tensor, total, max_norm, mode, group_index, 5, norm_type, 1e-6, ("torch", "max")[rule],
                backend=backend)
            if mode == "per_group":
                want_norms = torch.stack([ops.combine_norms(per_tensor[group_index == g], norm_type)
                                          for g in range(5)])
                torch.testing.assert_close(group_norms, want_norms, rtol=1e-6, atol=0)
                want_coef = _torch_coefficient(group_norms, bound, 1e-6, rule)
                assert bitwise_equal(group_coef, want_coef)
                assert bitwise_equal(coef, want_coef[group_index])
                units, unit_coef = want_norms.double(), want_coef.double()
            else:
                assert group_coef.numel() == 0 and group_norms.numel() == 0
                units = total.reshape(1) if mode == "global" else per_tensor
                want_coef = _torch_coefficient(units, bound, 1e-6, rule)
                assert coef.dtype == dtype and coef.shape == (() if mode == "global" else per_tensor.shape)
                assert bitwise_equal(coef.reshape(-1), want_coef)
                units, unit_coef = units.double(), want_coef.double()
            want_post = reference.exact_norm([units * unit_coef], norm_type)
            assert post.dtype == dtype and rel_close(post.item(), want_post, 1e-6), (mode, bound, post, want_post)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_finalize_propagates_nan_like_torch(backend):
    per_tensor = torch.tensor([1.0, math.nan, 2.0])
    for mode in ("global", "per_tensor"):
        total = torch.tensor(math.nan)
        coef, _, _, post = ops.clip_finalize(per_tensor, total, 5.0, mode, backend=backend)
        if mode == "global":
            assert math.isnan(coef.item()) and math.isnan(post.item())
        else:
            assert math.isnan(coef[1].item()) and coef[0].item() == 1.0 and math.isnan(post.item())
    coef, _, _, _ = ops.clip_finalize(per_tensor, torch.tensor(math.inf), 1.0, backend=backend)
    assert coef.item() == 0.0  # an infinite norm scales by 0, as torch does


def _python_scaler(found_sequence, scale, growth_factor, backoff_factor, interval, hysteresis, min_scale, max_scale):
    """torch.amp.GradScaler's update rule (float64 products rounded to float32), with hysteresis and bounds."""
    import numpy as np

    f32 = np.float32
    scale, growth, hyst, out = f32(scale), f32(0), f32(hysteresis), []
    for found in found_sequence:
        if found:
            growth = f32(0)
            if hyst <= 1:
                scale = max(f32(float(scale) * backoff_factor), f32(min_scale))
            hyst = max(hyst - 1, f32(1))
        else:
            growth = growth + 1
            hyst = f32(hysteresis)
            if growth >= interval:
                grown = f32(float(scale) * growth_factor)
                scale = min(grown, f32(max_scale)) if np.isfinite(grown) else scale
                growth = f32(0)
        out.append((float(scale), float(f32(1.0 / float(scale))), float(growth), float(hyst)))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("settings", [(2.0, 0.5, 3, 1, 0.0, math.inf), (1.7, 0.3, 2, 3, 1.0, 4096.0)],
                         ids=["torch_defaults", "hysteresis_and_bounds"])
def test_scaler_update_follows_the_rule_bit_for_bit(backend, settings):
    growth_factor, backoff_factor, interval, hysteresis, min_scale, max_scale = settings
    gen = torch.Generator().manual_seed(7)
    found_sequence = (torch.rand(120, generator=gen) < 0.3).tolist()
    want = _python_scaler(found_sequence, 1024.0, *settings)
    state = torch.tensor([1024.0, 1 / 1024, 0.0, float(hysteresis)])
    history = torch.full((3, 16), math.nan)
    for step, (found, expected) in enumerate(zip(found_sequence, want)):
        norm = torch.tensor(float(step))
        ops.scaler_update(state, history, torch.tensor(float(found)), norm, step % 16, growth_factor,
                          backoff_factor, interval, hysteresis, min_scale, max_scale, True, backend=backend)
        assert state.tolist() == list(expected), (step, state.tolist(), expected)
        assert history[:, step % 16].tolist() == [expected[0], float(found), float(step)]
    # a scale set by hand: no found_inf, nothing updated but the inverse and the history
    state[0] = 3.0
    ops.scaler_update(state, history, None, None, 0, 2.0, 0.5, 3, 1, 0.0, math.inf, True, backend=backend)
    assert state[1].item() == torch.tensor(1 / 3.0, dtype=torch.float32).item()
    assert history[0, 0].item() == 3.0 and math.isnan(history[1, 0].item()) and math.isnan(history[2, 0].item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_stats_update_counts_and_accumulates(backend):
    counters = torch.zeros(2, dtype=torch.float64)
    layers = torch.zeros(3, 3, dtype=torch.float64)
    steps = [([1.0, 2.0, 3.0], 0.5, 0.0), ([4.0, math.inf, 0.5], 1.0, 1.0), ([2.0, 1.0, 9.0], 1.0, 0.0),
             ([0.5, 0.5, 0.5], [1.0, 0.3, 1.0], 0.0)]
    for norms, coef, found in steps:
        ops.clip_stats_update(counters, layers, torch.tensor(norms), torch.tensor(coef), torch.tensor(found),
                              backend=backend)
    assert counters.tolist() == [2.0, 1.0]  # clipped: steps 0 and 3; skipped: step 1
    assert layers[0].tolist() == [7.5, 3.5, 13.0]  # sums of the finite norms
    assert layers[1].tolist() == [4.0, 2.0, 9.0]
    assert layers[2].tolist() == [0.5, 0.5, 0.5]
    ops.clip_stats_update(counters, None, torch.tensor([1.0]), torch.tensor(0.2), torch.tensor(0.0), backend=backend)
    assert counters.tolist() == [3.0, 1.0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool], ids=str)
def test_the_small_ops_take_norms_and_coefficients_of_any_real_dtype(backend, dtype):
    # Values that the narrow dtype holds exactly, so that the float32 results are the reference bit for bit.
    gen = torch.Generator().manual_seed(5)
    if dtype == torch.bool:
        values = torch.rand(40, generator=gen) < 0.5
    elif dtype.is_floating_point:
        values = (torch.rand(40, generator=gen) * 4).to(dtype)
    else:
        values = torch.randint(0, 9, (40,), generator=gen, dtype=dtype)
    wide = values.float()
    total, wide_total = values.float().norm().to(dtype), values.float().norm().to(dtype).float()

    assert bitwise_equal(ops.clip_coef(1.5, total, backend=backend), ops.clip_coef(1.5, wide_total, backend=backend))
    group_index = torch.arange(40) % 3
    bound = torch.tensor(2, dtype=dtype)
    for mode in ("global", "per_tensor", "per_group"):
        got = ops.clip_finalize(values, total, bound, mode, group_index, 3, backend=backend)
        want = ops.clip_finalize(wide, wide_total, bound.float(), mode, group_index, 3, backend=backend)
        assert all(bitwise_equal(a, b) for a, b in zip(got, want)), mode
    params = (torch.rand(40, generator=gen) * 4).to(dtype) if dtype.is_floating_point else values.flip(0)
    got = ops.unit_clip_finalize(params, values, 0.5, 1e-3, backend=backend)
    want = ops.unit_clip_finalize(params.float(), wide, 0.5, 1e-3, backend=backend)
    assert all(bitwise_equal(a, b) for a, b in zip(got, want))
    counters, layers = torch.zeros(2, dtype=torch.float64), torch.zeros(3, 40, dtype=torch.float64)
    coef = values if dtype == torch.bool else (values.float() / 4).to(dtype)
    ops.clip_stats_update(counters, layers, values, coef, torch.tensor(0.0), backend=backend)
    want_counters, want_layers = torch.zeros(2, dtype=torch.float64), torch.zeros(3, 40, dtype=torch.float64)
    ops.clip_stats_update(want_counters, want_layers, wide, coef.float(), torch.tensor(0.0), backend=backend)
    assert bitwise_equal(counters, want_counters) and bitwise_equal(layers, want_layers)
