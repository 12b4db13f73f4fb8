"""Every backend against the op contract and an fp64 exact computation: reference, the C++ kernels, and the
Triton kernels (on CPU tensors under TRITON_INTERPRET=1, set in conftest.py)."""

import math

import pytest
import torch

import ampclip
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


@pytest.mark.parametrize("dtypes", DTYPE_MIXES)
@pytest.mark.parametrize("clip_value", [None, 0.5], ids=["noclamp", "clamp"])
def test_cpp_scale_pass_bitwise_equals_reference(dtypes, clip_value):
    if not ops.available_backends()["cpp"]:
        pytest.skip("no _C")
    grads = random_grads(ODD_SHAPES, dtypes, scale=2.0, noncontiguous_every=4)
    twin = clone_all(grads)
    coef = torch.tensor(0.37, dtype=torch.float64 if torch.float64 in dtypes else torch.float32)
    inv = torch.tensor(0.5)
    ops.scale_pass(grads, coef, inv, clip_value, backend="cpp")
    ops.scale_pass(twin, coef, inv, clip_value, backend="reference")
    for a, b in zip(grads, twin):
        assert bitwise_equal(a, b)


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


def test_cpp_rejects_bad_input_before_writing():
    if not ops.available_backends()["cpp"]:
        pytest.skip("no _C")
    good = torch.randn(10)
    before = good.clone()
    with pytest.raises(RuntimeError, match="dtype"):
        ops.norm_pass([good, torch.ones(3, dtype=torch.int32)], backend="cpp")
    with pytest.raises(RuntimeError, match="coef"):
        ops.scale_pass([good], torch.ones(2), backend="cpp")
    with pytest.raises(RuntimeError, match="not dense|SparseCPU"):
        ops.scale_pass([good, torch.randn(3).to_sparse()], torch.tensor(0.5), backend="cpp")
    assert bitwise_equal(good, before)


needs_cpp = pytest.mark.skipif(not ops.available_backends()["cpp"], reason="no _C")


@needs_cpp
@pytest.mark.parametrize("dtypes", DTYPE_MIXES)
@pytest.mark.parametrize("norm_type", NORMS)
def test_cpp_direct_entries_equal_the_dispatched_ops_bit_for_bit(dtypes, norm_type):
    # Eager cpp calls skip the dispatcher (ampclip._C.norm_pass / scale_pass); they must equal the
    # registered ops exactly, per-tensor coefficients, unscale and clamp included.
    from ampclip import _C

    grads = random_grads(ODD_SHAPES * 3, dtypes, scale=2.0, noncontiguous_every=4)
    twin = clone_all(grads)
    inv = torch.tensor(0.5)
    direct = _C.norm_pass(grads, inv, norm_type)
    dispatched = torch.ops.ampclip_C.norm_pass(twin, inv, norm_type)
    assert direct is not None and all(bitwise_equal(a, b) for a, b in zip(direct, dispatched))
    coef = torch.rand(len(grads), dtype=direct[0].dtype) + 0.1
    found_inf = torch.tensor(0.0)
    assert _C.scale_pass(grads, coef, inv, 0.75, found_inf, False) is True
    torch.ops.ampclip_C.scale_pass(twin, coef, inv, 0.75, found_inf, False)
    assert all(bitwise_equal(a, b) for a, b in zip(grads, twin))


@needs_cpp
def test_cpp_passes_over_a_million_elements_let_other_threads_run():
    # A C function that keeps the GIL is never interrupted, so the counting thread advances during the call
    # only if the kernel released it (with the GIL kept, no attempt advances it). The long switch interval
    # keeps the interpreter from handing the GIL over in the few bytecodes between reading the counter and
    # entering the call.
    import sys
    import threading

    from ampclip import _C

    grads = random_grads([(1 << 22,), (3000,)], (torch.float32, torch.bfloat16))
    params, inv, coef = reference.parameters_of(grads), torch.tensor(0.5), torch.tensor(0.5)
    calls = [lambda: _C.norm_pass(grads, inv, 2.0), lambda: _C.scale_pass(grads, coef, inv, None, None, False),
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


@needs_cpp
def test_cpp_calls_under_a_dispatch_mode_go_through_the_dispatcher():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    grads = random_grads([(300,), (7, 3)])
    want = reference.exact_norm(grads, 2.0)
    with Recorder() as recorder:
        total = ops.norm_pass(grads, None, 2.0, backend="cpp")[1]
        ops.scale_pass(grads, torch.tensor(0.5), backend="cpp")
    assert any("ampclip_C.norm_pass" in op for op in recorder.ops)
    assert any("ampclip_C.scale_pass" in op for op in recorder.ops)
    assert rel_close(total.item(), want, 1e-6)
    assert rel_close(reference.exact_norm(grads, 2.0), want / 2, 1e-6)
    with Recorder() as recorder:  # the drop-in's own fast path steps aside too
        ampclip.clip_grad_norm_(reference.parameters_of(grads), want / 4)
    assert any("ampclip_C" in op for op in recorder.ops)
    assert rel_close(reference.exact_norm(grads, 2.0), want / 4, 1e-5)


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown ampclip backend"):
        ops.norm_pass([torch.randn(3)], backend="cuda-magic")
