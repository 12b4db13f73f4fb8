"""Drop-in parity of ampclip.clip_grad_norm_ & co. with torch.nn.utils, and the documented differences."""

import math
import os
import subprocess
import sys

import pytest
import torch

import ampclip
from ampclip import backends, ops, reference
from ampclip.errors import GradientTypeError
from helpers import CPU_BACKENDS, DTYPE_MIXES, NORMS, ODD_SHAPES, bitwise_equal, random_grads, rel_close

# torch keeps per-tensor norms in the gradient dtype, so its result carries that dtype's rounding.
TORCH_RTOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_params(grads, none_every=0):
    """Parameters carrying ``grads``; every ``none_every``-th one gets no gradient at all."""
    params = []
    for i, g in enumerate(grads):
        p = torch.nn.Parameter(torch.empty(g.shape, dtype=g.dtype, device=g.device))  # a gradient's own device
        p.grad = g.clone() if g.is_contiguous() else g.clone(memory_format=torch.preserve_format)
        params.append(p)
        if none_every and i % none_every == 0:
            params.append(torch.nn.Parameter(torch.randn(3)))  # grad stays None
    return params


def twin_params(grads, none_every=0):
    ours, theirs = make_params(grads, none_every), make_params(grads, none_every)
    for a, b in zip(ours, theirs):
        if a.grad is not None and not a.grad.is_contiguous():
            # keep the strided layout: a strided view into a larger buffer
            a.grad = torch.stack([a.grad, a.grad], dim=-1)[..., 0]
            b.grad = torch.stack([b.grad, b.grad], dim=-1)[..., 0]
    return ours, theirs


def loosest_rtol(dtypes):
    return max(TORCH_RTOL[d] for d in dtypes)


@pytest.mark.parametrize("norm_type", NORMS)
@pytest.mark.parametrize("dtypes", DTYPE_MIXES)
@pytest.mark.parametrize("clipping", [True, False], ids=["clip", "noclip"])
def test_clip_grad_norm_matches_torch_and_fp64(norm_type, dtypes, clipping):
    # Shapes without zero-size tensors: torch's inf-norm raises on them (tested separately below).
    shapes = [s for s in ODD_SHAPES if math.prod(s) > 0] * 3
    grads = random_grads(shapes, dtypes, scale=0.5, noncontiguous_every=5)
    exact = reference.exact_norm(grads, norm_type)
    max_norm = exact / 3 if clipping else exact * 3
    ours, theirs = twin_params(grads, none_every=4)

    got = ampclip.clip_grad_norm_(ours, max_norm, norm_type)
    want = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)

    assert got.dtype == (torch.float64 if torch.float64 in dtypes else torch.float32)
    assert rel_close(got.item(), exact, 5e-5 if norm_type == 3.0 else 2e-6)
    torch_overflowed = not math.isfinite(want.item())  # fp16 per-tensor norms past 65504: documented
    assert not torch_overflowed or (torch.float16 in dtypes and exact > 65504)
    if not torch_overflowed:
        assert rel_close(got.item(), want.item(), loosest_rtol(dtypes) + 5e-5)
    coef = min(1.0, max_norm / (exact + 1e-6))
    for a, b, g in zip((p for p in ours if p.grad is not None), (p for p in theirs if p.grad is not None), grads):
        if not clipping:
            assert bitwise_equal(a.grad, g)  # coefficient 1: not touched at all
        # atol: one step of fp16's subnormals, where relative precision runs out.
        atol = 6e-8 if g.dtype == torch.float16 else 1e-30
        torch.testing.assert_close(a.grad.double(), g.double() * coef, rtol=TORCH_RTOL[g.dtype], atol=atol)
        if not torch_overflowed:  # torch's coefficient carries the rounding of its loosest dtype
            torch.testing.assert_close(a.grad, b.grad, rtol=2 * loosest_rtol(dtypes), atol=atol)


@pytest.mark.parametrize("norm_type", NORMS)
def test_get_total_norm_and_clip_grads_with_norm_match_torch(norm_type):
    grads = random_grads([s for s in ODD_SHAPES if math.prod(s) > 0], (torch.float32,))
    total = ampclip.get_total_norm(grads, norm_type)
    want = torch.nn.utils.get_total_norm(grads, norm_type)
    assert rel_close(total.item(), want.item(), 1e-4 if norm_type == 3.0 else 1e-5)
    ours, theirs = twin_params(grads)
    ampclip.clip_grads_with_norm_(ours, 0.7, total)
    torch.nn.utils.clip_grads_with_norm_(theirs, 0.7, total)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=2e-6, atol=1e-30)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("total_dtype", [torch.float16, torch.bfloat16, torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("patched", [False, True], ids=["direct", "patched"])
def test_clip_grads_with_norm_takes_a_total_of_any_real_dtype(backend, total_dtype, patched):
    # torch's get_total_norm returns a float16 total for float16 gradients; code written for torch hands it on.
    grads = random_grads([(10,), (3, 4), (1,)], (torch.float32, torch.float16), scale=2.0)
    exact = reference.exact_norm(grads, 2.0)
    if total_dtype.is_floating_point:
        total = torch.tensor(exact / 3).to(total_dtype)
    else:
        total = torch.tensor(7, dtype=total_dtype)
    ours, theirs = twin_params(grads)
    torch.nn.utils.clip_grads_with_norm_(theirs, 1.0, total)
    if patched:
        ampclip.patch_torch(backend=backend)
        try:
            torch.nn.utils.clip_grads_with_norm_(ours, 1.0, total)
        finally:
            ampclip.unpatch_torch()
    else:
        ampclip.clip_grads_with_norm_(ours, 1.0, total, backend=backend)
    coef = min(1.0, 1.0 / (float(total) + 1e-6))  # the same total, taken exactly
    for a, b, g in zip(ours, theirs, grads):
        # torch computes the coefficient in the total's dtype (float16: 3 digits); ampclip in float32
        torch.testing.assert_close(a.grad, b.grad, rtol=4e-3 if total_dtype.is_floating_point else 2e-6, atol=0)
        torch.testing.assert_close(a.grad.double(), (g.double() * coef).to(g.dtype).double(),
                                   rtol=1e-3 if g.dtype == torch.float16 else 2e-6, atol=0)


def test_edge_cases_empty_single_generator():
    assert ampclip.clip_grad_norm_([], 1.0).item() == 0.0
    assert ampclip.clip_grad_norm_([torch.nn.Parameter(torch.randn(3))], 1.0).item() == 0.0  # no grads
    assert ampclip.get_total_norm([]).item() == 0.0
    p = torch.nn.Parameter(torch.randn(5))
    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0, 0.0])
    assert ampclip.clip_grad_norm_(p, 1.0).item() == 5.0  # a single tensor
    torch.testing.assert_close(p.grad, torch.tensor([0.6, 0.8, 0.0, 0.0, 0.0]), rtol=1e-6, atol=0)
    params = make_params(random_grads([(10,), (20,)]))
    expected = reference.exact_norm([q.grad for q in params], 2.0)
    got = ampclip.clip_grad_norm_((q for q in params), 1e9)  # a generator, consumed once
    assert rel_close(got.item(), expected, 1e-6)


@pytest.mark.parametrize("value", [math.inf, math.nan], ids=["inf", "nan"])
@pytest.mark.parametrize("position", ["first", "last", "tail"])
def test_nonfinite_gradients_match_torch(value, position):
    grads = random_grads([(70001,), (17,), (4097,)])
    flat = grads[2].view(-1)
    flat[{"first": 0, "last": -1, "tail": 4094}[position]] = value
    ours, theirs = twin_params(grads)
    got = ampclip.clip_grad_norm_(ours, 1.0)
    want = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert (math.isnan(got.item()) and math.isnan(want.item())) or got.item() == want.item()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, equal_nan=True, rtol=0, atol=0)


def test_error_if_nonfinite_raises_before_touching_anything():
    grads = random_grads([(100,), (7,)])
    grads[1][3] = math.nan
    params = make_params(grads)
    before = [p.grad.clone() for p in params]
    with pytest.raises(RuntimeError, match="non-finite"):
        ampclip.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    assert all(bitwise_equal(p.grad, b) for p, b in zip(params, before))
    with pytest.raises(RuntimeError, match="non-finite"):
        ampclip.get_total_norm([p.grad for p in params], error_if_nonfinite=True)


def test_fp16_norm_past_65504_is_finite_and_clips():
    # 10,000 elements of 1000: the norm is 1e5, past fp16's largest value.
    grads = [torch.full((10_000,), 1000.0, dtype=torch.float16)]
    ours, theirs = make_params(grads), make_params(grads)
    got = ampclip.clip_grad_norm_(ours, 1.0)
    want = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert got.dtype == torch.float32 and rel_close(got.item(), 1e5, 1e-6)
    assert math.isinf(want.item())  # torch: inf, and its gradients are zeroed
    clipped = reference.exact_norm([ours[0].grad], 2.0)
    assert rel_close(clipped, 1.0, 1e-3)  # fp16 rounding of 0.01


def test_bf16_gets_an_accurate_coefficient():
    grads = random_grads([(50_000,), (3000,)], (torch.bfloat16,), scale=0.37)
    exact = reference.exact_norm(grads, 2.0)
    ours = make_params(grads)
    got = ampclip.clip_grad_norm_(ours, exact / 2)
    assert got.dtype == torch.float32 and rel_close(got.item(), exact, 2e-6)
    for p, g in zip(ours, grads):  # each element is the exact product, rounded once to bf16
        want = (g.double() * (exact / 2) / (exact + 1e-6)).to(torch.bfloat16)
        diff = (p.grad.float() - want.float()).abs() / want.float().abs().clamp_min(1e-30)
        assert diff.max().item() <= 2 ** -8


def test_inf_norm_with_zero_size_tensor_works():
    grads = [torch.randn(5), torch.empty(0), torch.randn(3)]
    expected = max(g.abs().max().item() for g in grads if g.numel())
    assert ampclip.get_total_norm(grads, math.inf).item() == expected
    params = make_params(grads)
    assert ampclip.clip_grad_norm_(params, 0.1, math.inf).item() == expected


@pytest.mark.parametrize("max_norm", [-1.0, math.nan, "x"], ids=["negative", "nan", "string"])
def test_invalid_max_norm_raises_before_touching(max_norm):
    params = make_params(random_grads([(10,), (3,)]))
    before = [p.grad.clone() for p in params]
    with pytest.raises((ValueError, TypeError), match="max_norm"):
        ampclip.clip_grad_norm_(params, max_norm)
    with pytest.raises((ValueError, TypeError), match="max_norm"):
        ampclip.clip_grads_with_norm_(params, max_norm, torch.tensor(1.0))
    assert all(bitwise_equal(p.grad, b) for p, b in zip(params, before))


def _raised(fn, *args, **kwargs):
    """The exception ``fn(*args, **kwargs)`` raises (a test failure when it raises none)."""
    with pytest.raises(Exception) as info:
        fn(*args, **kwargs)
    return info.value


@pytest.mark.parametrize("norm_type", [None, "fro", [2.0]], ids=str)
def test_a_norm_type_that_is_no_number_raises_what_torch_raises(norm_type):
    grads = random_grads([(10,)])
    params = make_params(grads)
    theirs = _raised(torch.nn.utils.clip_grad_norm_, make_params(grads), 1.0, norm_type)
    assert type(_raised(torch.nn.utils.get_total_norm, grads, norm_type)) is type(theirs)
    for ours in (_raised(ampclip.clip_grad_norm_, params, 1.0, norm_type),
                 _raised(ampclip.get_total_norm, grads, norm_type)):
        assert type(ours) is type(theirs) and "norm_type" in str(ours), (ours, theirs)
    assert bitwise_equal(params[0].grad, grads[0])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_nan_norm_type_gives_nan_as_torch_does(backend):
    grads = random_grads([(10,), (3, 4)])
    assert math.isnan(torch.nn.utils.get_total_norm(grads, math.nan).item())
    assert math.isnan(ampclip.get_total_norm(grads, math.nan, backend=backend).item())
    ours, theirs = twin_params(grads)
    got = ampclip.clip_grad_norm_(ours, 1.0, math.nan, backend=backend)
    want = torch.nn.utils.clip_grad_norm_(theirs, 1.0, math.nan)
    assert math.isnan(got.item()) and math.isnan(want.item())
    for a, b in zip(ours, theirs):  # torch scales by a NaN coefficient
        torch.testing.assert_close(a.grad, b.grad, equal_nan=True, rtol=0, atol=0)
    params = make_params(grads)
    with pytest.raises(RuntimeError, match="non-finite"):
        ampclip.clip_grad_norm_(params, 1.0, math.nan, error_if_nonfinite=True, backend=backend)
    assert all(bitwise_equal(p.grad, g) for p, g in zip(params, grads))


def _meta_beside_cpu(meta_first):
    grads = random_grads([(10,), (3, 4)])
    meta = torch.nn.Parameter(torch.empty(5, device="meta"))
    meta.grad = torch.empty(5, device="meta")
    params = make_params(grads)
    return [meta, *params] if meta_first else [*params, meta]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_integer_gradients_and_a_number_for_total_norm_raise_what_torch_raises(backend):
    integer, boolean = torch.tensor([1, 2, 3]), torch.tensor([True, False])
    for tensors in ([integer], [boolean], [torch.randn(4), integer]):
        theirs = _raised(torch.nn.utils.get_total_norm, tensors)
        ours = _raised(ampclip.get_total_norm, tensors, backend=backend)
        assert isinstance(ours, type(theirs)) and isinstance(ours, TypeError), (ours, theirs)
        assert isinstance(ours, GradientTypeError), ours
    for total in (2.5, 2):
        params = make_params(random_grads([(10,)]))
        before = params[0].grad.clone()
        theirs = _raised(torch.nn.utils.clip_grads_with_norm_, make_params([before]), 1.0, total)
        ours = _raised(ampclip.clip_grads_with_norm_, params, 1.0, total, backend=backend)
        assert isinstance(ours, type(theirs)) and "total_norm" in str(ours), (ours, theirs)
        assert bitwise_equal(params[0].grad, before)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_meta_gradients_beside_cpu_ones_get_what_torch_gives(backend):
    # A meta gradient first: torch measures on the meta device; a CPU one first: copying the meta norm to it
    # fails with NotImplementedError, before any gradient is written.
    for call in ("get_total_norm", "clip_grad_norm_"):
        params = _meta_beside_cpu(meta_first=False)
        before = [p.grad.clone() for p in params[:-1]]
        if call == "get_total_norm":
            args = ([p.grad for p in params],)
        else:
            args = (params, 0.1)
        theirs = _raised(getattr(torch.nn.utils, call), *args)
        ours = _raised(getattr(ampclip, call), *args, backend=backend)
        assert type(ours) is type(theirs) is NotImplementedError, (ours, theirs)
        assert all(bitwise_equal(p.grad, b) for p, b in zip(params, before))
    params = _meta_beside_cpu(meta_first=True)  # measured on the meta device: no backend but the default there
    total = ampclip.get_total_norm([p.grad for p in params])
    assert total.device.type == torch.nn.utils.get_total_norm([p.grad for p in params]).device.type == "meta"
    # clamping and scaling take each device alone, in torch and here
    ours, theirs = _meta_beside_cpu(meta_first=False), _meta_beside_cpu(meta_first=False)
    for a, b in zip(ours[:-1], theirs[:-1]):
        b.grad.copy_(a.grad)
    ampclip.clip_grad_value_(ours, 0.3, backend=backend)
    torch.nn.utils.clip_grad_value_(theirs, 0.3)
    ampclip.clip_grads_with_norm_(ours, 1.0, torch.tensor(4.0), backend=backend)
    torch.nn.utils.clip_grads_with_norm_(theirs, 1.0, torch.tensor(4.0))
    assert all(bitwise_equal(a.grad, b.grad) for a, b in zip(ours[:-1], theirs[:-1]))


def test_norm_type_string_inf_is_accepted_like_torch():
    params = make_params(random_grads([(10,)]))
    assert ampclip.clip_grad_norm_(params, 1e9, "inf").item() == params[0].grad.abs().max().item()


def test_bad_parameters_give_clear_errors_with_nothing_modified():
    good = make_params(random_grads([(10,)]))[0]
    before = good.grad.clone()
    with pytest.raises(TypeError, match="iterable"):
        ampclip.clip_grad_norm_(5, 1.0)
    with pytest.raises(TypeError, match="Tensors"):
        ampclip.clip_grad_norm_([good, "weight"], 1.0)
    sparse = torch.nn.Parameter(torch.randn(4))
    sparse.grad = torch.randn(4).to_sparse()
    with pytest.raises(TypeError, match="dense"):
        ampclip.clip_grad_norm_([good, sparse], 0.01)
    integer = torch.ones(4, dtype=torch.int32)  # a tensor whose .grad is an integer tensor
    integer.grad = torch.ones(4, dtype=torch.int32)
    with pytest.raises(TypeError, match="dtype"):
        ampclip.clip_grad_norm_([good, integer], 0.01)
    assert bitwise_equal(good.grad, before)


@pytest.mark.parametrize("dtypes", DTYPE_MIXES)
def test_clip_grad_value_matches_torch(dtypes):
    grads = random_grads(ODD_SHAPES, dtypes, scale=2.0, noncontiguous_every=3)
    ours, theirs = twin_params(grads)
    ampclip.clip_grad_value_(ours, 0.75)
    torch.nn.utils.clip_grad_value_(theirs, 0.75)
    for a, b in zip(ours, theirs):
        assert bitwise_equal(a.grad, b.grad)


def test_clip_grad_value_rejects_negative():
    params = make_params(random_grads([(10,)]))
    with pytest.raises(ValueError, match="clip_value"):
        ampclip.clip_grad_value_(params, -0.5)


def test_compute_gradient_norm():
    model = torch.nn.Sequential(torch.nn.Linear(10, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    assert ampclip.compute_gradient_norm(model) == 0.0  # before any backward pass
    model(torch.randn(4, 10)).pow(2).sum().backward()
    norm = ampclip.compute_gradient_norm(model)
    assert isinstance(norm, float) and norm > 0
    grads = [p.grad for p in model.parameters()]
    assert rel_close(norm, reference.exact_norm(grads, 2.0), 1e-6)
    torch_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e9).item()
    assert abs(norm - torch_norm) <= 1e-6 * norm
    assert norm == ampclip.clip_grad_norm_(model.parameters(), max_norm=1e9).item()
    half = make_params([g.half() for g in grads])
    assert rel_close(ampclip.compute_gradient_norm(half), reference.exact_norm([p.grad for p in half], 2.0), 1e-6)


def test_float64_gradients_give_a_float64_norm():
    grads = random_grads([(100,), (5,)], (torch.float64,))
    got = ampclip.get_total_norm(grads)
    assert got.dtype == torch.float64 and rel_close(got.item(), reference.exact_norm(grads, 2.0), 1e-12)


def test_unpatch_restores_torchs_modules_exactly_and_a_backend_can_be_forced(monkeypatch):
    import torch.nn.utils as nn_utils
    import torch.nn.utils.clip_grad as clip_grad_module

    before = [dict(vars(m)) for m in (nn_utils, clip_grad_module)]
    ampclip.patch_torch(backend="reference")
    try:
        assert ampclip.is_patched() and ampclip.backend()["torch_patched"]
        used = []
        real = ops.clip_parameters
        monkeypatch.setattr(ops, "clip_parameters", lambda *a: used.append(a[-1]) or real(*a))
        torch.nn.utils.clip_grad_norm_(make_params(random_grads([(10,)])), 1.0)
        assert used == ["reference"]
    finally:
        ampclip.unpatch_torch()
    assert not ampclip.is_patched() and not ampclip.backend()["torch_patched"]
    after = [dict(vars(m)) for m in (nn_utils, clip_grad_module)]
    assert [set(d) for d in after] == [set(d) for d in before]
    assert all(a[k] is b[k] for a, b in zip(after, before) for k in a)
    with pytest.raises(ValueError, match="unknown ampclip backend"):
        ampclip.patch_torch(backend="nonsense")
    assert not ampclip.is_patched()


def test_patch_torch_routes_calls_and_unpatch_restores():
    original = torch.nn.utils.clip_grad_norm_
    ampclip.patch_torch()
    try:
        assert torch.nn.utils.clip_grad_norm_ is ampclip.clip_grad_norm_
        assert torch.nn.utils.clip_grad.clip_grad_norm_ is ampclip.clip_grad_norm_
        fp16 = make_params([torch.full((10_000,), 1000.0, dtype=torch.float16)])
        assert math.isfinite(torch.nn.utils.clip_grad_norm_(fp16, 1.0).item())
    finally:
        ampclip.unpatch_torch()
    assert torch.nn.utils.clip_grad_norm_ is original


needs_extension = pytest.mark.skipif(not ops.available_backends()["cpp"], reason="needs the compiled extension")


@needs_extension
@pytest.mark.parametrize("norm_type", NORMS)
def test_fast_path_equals_the_dispatched_kernel_bit_for_bit(norm_type):
    # The drop-in reads .grad in C++ and calls the kernel directly; it must equal the op through the
    # dispatcher exactly: thousands of tiny gradients, mixed dtypes, strided views, zero-size, None grads.
    shapes = [(3,), (1,), (0,), (5, 2)] * 600 + [(4097,), (33, 17)]
    grads = random_grads(shapes, (torch.float32, torch.bfloat16, torch.float16, torch.float32),
                         noncontiguous_every=7)
    fast, dispatched = twin_params(grads, none_every=9)
    exact = reference.exact_norm(grads, norm_type)
    total = backends.load("cpp").clip_params(fast, exact / 4, norm_type)
    assert total is not None, "plain CPU Parameters must take the fast path"
    want = ops.clip_grad_norm([p.grad for p in dispatched if p.grad is not None], exact / 4, norm_type)
    assert bitwise_equal(total, want)
    assert rel_close(total.item(), exact, 5e-5 if norm_type == 3.0 else 2e-6)
    for a, b in zip(fast, dispatched):
        assert (a.grad is None and b.grad is None) or bitwise_equal(a.grad, b.grad)


@needs_extension
@pytest.mark.parametrize("dtypes", DTYPE_MIXES)
def test_fused_coefficient_equals_the_two_step_path_bit_for_bit(dtypes):
    # The fused clip computes min(1, max_norm / (norm + 1e-6)) in C++; get_total_norm followed by
    # clip_grads_with_norm_ computes it with tensor ops. Same norm, same coefficient, same gradients.
    grads = random_grads([(300,), (17, 5), (4097,)], dtypes)
    exact = reference.exact_norm(grads, 2.0)
    for i, fraction in enumerate((0.9999, 0.5, 1 / 3, 1e-3, 0.123456789)):
        fused, two_step = twin_params([g * (1 + i / 7) for g in grads])
        got = ampclip.clip_grad_norm_(fused, exact * fraction)
        total = ampclip.get_total_norm([p.grad for p in two_step])
        ampclip.clip_grads_with_norm_(two_step, exact * fraction, total)
        assert bitwise_equal(got, total)
        assert all(bitwise_equal(a.grad, b.grad) for a, b in zip(fused, two_step))


@needs_extension
def test_fast_path_above_a_million_elements_runs_without_the_gil_and_stays_correct():
    grads = random_grads([(1 << 20,), (4097,), (3, 7)], (torch.float32, torch.bfloat16), noncontiguous_every=3)
    exact = reference.exact_norm(grads, 2.0)
    params = make_params(grads)
    got = backends.load("cpp").clip_params(params, exact / 2, 2.0)
    assert got is not None and rel_close(got.item(), exact, 2e-6)
    assert rel_close(reference.exact_norm([p.grad for p in params], 2.0), exact / 2, 5e-3)


@needs_extension
def test_fast_path_bumps_the_version_of_what_it_writes():
    params = make_params(random_grads([(100,), (7, 3)]))
    before = [p.grad._version for p in params]
    ampclip.clip_grad_norm_(params, 1e9)  # coefficient 1: nothing written
    assert [p.grad._version for p in params] == before
    ampclip.clip_grad_norm_(params, 1e-3)
    assert all(p.grad._version > v for p, v in zip(params, before))


class _TaggedTensor(torch.Tensor):
    """A tensor subclass (as DTensor or a quantised parameter is): its .grad may mean something else."""


@needs_extension
def test_fast_path_leaves_what_it_does_not_know_to_the_general_path():
    plain = make_params(random_grads([(50,)]))[0]
    before = plain.grad.clone()
    subclass = torch.nn.Parameter(torch.randn(4).as_subclass(_TaggedTensor))
    subclass.grad = torch.randn(4)
    sparse = torch.nn.Parameter(torch.randn(4))
    sparse.grad = torch.randn(4).to_sparse()
    for other in (subclass, sparse):
        assert backends.load("cpp").clip_params([plain, other], 1e-3, 2.0) is None
        assert bitwise_equal(plain.grad, before)  # nothing changed before the hand-over
    assert backends.load("cpp").clip_params([torch.nn.Parameter(torch.randn(3))], 1.0, 2.0) is None  # no gradient
    exact = reference.exact_norm([plain.grad, subclass.grad], 2.0)
    got = ampclip.clip_grad_norm_([plain, subclass], exact / 2)  # the general path gives the same result
    assert rel_close(got.item(), exact, 2e-6)
    assert rel_close(reference.exact_norm([plain.grad, subclass.grad], 2.0), exact / 2, 2e-6)


def test_import_without_extension_warns_once_and_falls_back():
    code = (
        "import sys, warnings\n"
        "sys.modules['ampclip._C'] = None\n"  # makes `from . import _C` raise ImportError
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import ampclip, ampclip.ops, ampclip.functional\n"
        "import torch\n"
        "msgs = [str(w.message) for w in caught if 'ampclip._C' in str(w.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert ampclip.backend()['in_use']['cpu'] == 'reference'\n"
        "p = torch.nn.Parameter(torch.randn(3)); p.grad = torch.tensor([3.0, 4.0, 0.0])\n"
        "assert ampclip.clip_grad_norm_([p], 1.0).item() == 5.0\n"
        "print('ok')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.gpu
def test_mixed_device_gradients_give_the_right_result():
    grads = [torch.randn(1000), torch.randn(300, device="cuda"), torch.randn(7, device="cuda").half()]
    exact = reference.exact_norm(grads, 2.0)
    params = make_params(grads)
    got = ampclip.clip_grad_norm_(params, exact / 2)
    assert got.device == grads[0].device and rel_close(got.item(), exact, 1e-5)
    assert rel_close(reference.exact_norm([p.grad for p in params], 2.0), exact / 2, 2e-3)
