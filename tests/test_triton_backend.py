"""The Triton backend (``triton_kernels/``) against the reference and an fp64 computation.

On CPU the kernels run under TRITON_INTERPRET=1 (set in conftest.py) at about 0.7 ms per program, so every
CPU test stays under 64K elements; a small ``chunk`` (elements per program, a launcher argument) gives
multi-chunk tensors and tail chunks at those sizes. ``@pytest.mark.gpu`` tests repeat the checks at real
sizes on CUDA (GPT-2 1.5B shapes, 10,000 tensors, a tensor past 2^31 elements, torch.compile, CUDA graphs).
"""

import gc
import importlib
import math
import time

import pytest
import torch

from ampclip import _extension, ops, reference
from ampclip import triton_kernels as tk
from helpers import DTYPE_MIXES, NORMS, bitwise_equal, clone_all, exact_per_tensor, random_grads

pytestmark = pytest.mark.skipif(not ops.available_backends()["triton"], reason="triton is not installed")


@pytest.fixture(autouse=True)
def _cpu_tests_need_the_interpreter(request):
    if "gpu" not in request.keywords and not ops.triton_runs_on("cpu"):
        pytest.skip("the triton backend cannot take CPU tensors here (see ampclip.ops.triton_runs_on)")

HAS_CUDA = torch.cuda.is_available()
SMALL_CHUNK = 1024  # CPU tests: a 4097-element tensor is 5 programs, the last one holding 1 element
SHAPES = [(1,), (3,), (4097,), (0,), (33, 17), (2, 3, 5), (5000,)]


def rtol_for(norm_type, dtypes):
    # fp32 accumulation against fp64: 1e-5 for sums and max; |x|^p through exp2/log2 rounds more.
    rtol = 1e-5 if norm_type in (1.0, 2.0, math.inf) else 5e-5
    return 1e-12 if dtypes == (torch.float64,) else rtol


def norm(grads, inv=None, norm_type=2.0, chunk=None):
    """Through the op layer, or straight to the launcher when a test needs a small chunk."""
    if chunk is None:
        return ops.norm_pass(grads, inv, norm_type, backend="triton")
    return tk.fused_norm_triton(grads, inv, norm_type, chunk=chunk)


def assert_norms(per_tensor, total, grads, norm_type, unscale, rtol):
    exact_total = reference.exact_norm(grads, norm_type, unscale)
    exact = torch.tensor(exact_per_tensor(grads, norm_type, unscale), dtype=torch.float64)
    torch.testing.assert_close(per_tensor.double(), exact, rtol=rtol, atol=0)
    torch.testing.assert_close(total.double(), torch.tensor(exact_total, dtype=torch.float64), rtol=rtol, atol=0)


# ------------------------------------------------------------------------------------------------ norm pass


@pytest.mark.parametrize("norm_type", NORMS)
@pytest.mark.parametrize("dtypes", DTYPE_MIXES)
@pytest.mark.parametrize("unscale", [None, 1 / 1024, 0.3], ids=["plain", "unscale_pow2", "unscale_0.3"])
def test_norm_matches_fp64(norm_type, dtypes, unscale):
    grads = random_grads(SHAPES, dtypes, scale=3.0)
    acc = torch.float64 if torch.float64 in dtypes else torch.float32
    inv = None if unscale is None else torch.tensor(unscale, dtype=acc)
    unscale = None if inv is None else inv.item()  # the value the kernel multiplies by
    per_tensor, total, found_inf = norm(grads, inv, norm_type)
    assert per_tensor.dtype == total.dtype == acc and found_inf.dtype == torch.float32
    assert per_tensor.shape == (len(grads),) and total.shape == () and found_inf.shape == ()
    assert torch.equal(found_inf, torch.tensor(0.0))
    assert per_tensor[3].item() == 0.0  # the zero-size gradient
    # exact_norm multiplies in fp64; the kernel rounds g * inv to the accumulation dtype first (as the
    # reference does), one more fp32 rounding for non-power-of-two scales
    assert_norms(per_tensor, total, grads, norm_type, unscale, rtol_for(norm_type, dtypes))


@pytest.mark.parametrize("norm_type", NORMS)
@pytest.mark.parametrize("dtypes", DTYPE_MIXES[:1] + DTYPE_MIXES[-1:])
def test_norm_multi_chunk_matches_reference(norm_type, dtypes):
    grads = random_grads([(20000,), (4097,), (1,), (0,), (1025,)], dtypes)
    inv = torch.tensor(0.5)
    small = norm(grads, inv, norm_type, chunk=SMALL_CHUNK)
    default = norm(grads, inv, norm_type)
    want = reference.norm_pass(grads, inv, norm_type)
    rtol = rtol_for(norm_type, dtypes)
    for a, b, w in zip(small, default, want):
        torch.testing.assert_close(a, w, rtol=rtol, atol=0)
        torch.testing.assert_close(b, w, rtol=rtol, atol=0)
    assert_norms(small[0], small[1], grads, norm_type, 0.5, rtol)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("position", ["first", "last", "tail", "middle_chunk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm_type", [pytest.param(2.0, id="p2"), pytest.param(math.inf, id="pinf")])
def test_found_inf_is_exact(value, position, dtype, norm_type):
    grads = random_grads([(3,), (5000,), (7,)], (dtype,))
    # 5000 elements in chunks of 1024: the tail chunk holds elements 4096..4999
    index = {"first": 0, "last": 4999, "tail": 4500, "middle_chunk": 2500}[position]
    grads[1][index] = value
    per_tensor, total, found_inf = norm(grads, torch.tensor(0.5), norm_type, chunk=SMALL_CHUNK)
    want = reference.norm_pass(grads, torch.tensor(0.5), norm_type)
    torch.testing.assert_close(found_inf, torch.tensor(1.0), rtol=0, atol=0)
    torch.testing.assert_close(found_inf, want[2], rtol=0, atol=0)
    # inf gives an inf norm, NaN a NaN norm (also for the inf-norm, as torch.linalg.vector_norm)
    torch.testing.assert_close(per_tensor, want[0], rtol=1e-5, atol=0, equal_nan=True)
    torch.testing.assert_close(total, want[1], rtol=1e-5, atol=0, equal_nan=True)
    assert math.isfinite(per_tensor[0].item()) and math.isfinite(per_tensor[2].item())


@pytest.mark.parametrize("norm_type", NORMS)
def test_finite_overflow_is_not_found_inf(norm_type):
    # 1e20^2 overflows fp32, but every value is finite: found_inf stays 0 (the check is per element)
    grads = [torch.full((100,), 1e20) * (1 + torch.rand(100)), torch.randn(10)]
    _, _, found_inf = norm(grads, None, norm_type)
    assert torch.equal(found_inf, torch.tensor(0.0))
    # an unscale that overflows to inf is caught, since the check is on the unscaled values
    _, _, found_inf = norm([torch.full((3,), 1e30)], torch.tensor(1e10), norm_type)
    assert torch.equal(found_inf, torch.tensor(1.0))


def test_fp16_norm_above_fp16_max_is_finite():
    grads = [torch.full((4096,), 60000.0, dtype=torch.float16) * (1 - 0.1 * torch.rand(4096)).half()]
    per_tensor, total, found_inf = norm(grads)
    assert per_tensor.dtype == torch.float32 and math.isfinite(total.item()) and total.item() > 65504
    assert found_inf.item() == 0.0
    assert_norms(per_tensor, total, grads, 2.0, None, 1e-5)


def test_odd_sizes_and_zero_size_only():
    per_tensor, total, found_inf = norm([torch.empty(0), torch.empty(3, 0)])
    assert torch.equal(per_tensor, torch.zeros(2)) and total.item() == 0.0 and found_inf.item() == 0.0
    grads = [torch.randn(1), torch.randn(3), torch.randn(4097), torch.empty(0)]
    per_tensor, total, _ = norm(grads, chunk=SMALL_CHUNK)
    assert_norms(per_tensor, total, grads, 2.0, None, 1e-5)


@pytest.mark.parametrize("norm_type", [pytest.param(2.0, id="p2"), pytest.param(math.inf, id="pinf")])
def test_non_contiguous_norm(norm_type):
    base = torch.randn(64, 96)
    grads = [base.t(), base[:, 5:40], base[::3], torch.randn(50, 2)[:, 1], torch.randn(77)]
    assert not any(g.is_contiguous() for g in grads[:4])
    per_tensor, total, _ = norm(grads, torch.tensor(0.25), norm_type, chunk=SMALL_CHUNK)
    assert_norms(per_tensor, total, grads, norm_type, 0.25, 1e-5)
    # the staging copy is refreshed on every call: new values in the same tensors give the new norm
    base.mul_(3.0)
    grads[3].mul_(-2.0)
    per_tensor, total, _ = norm(grads, torch.tensor(0.25), norm_type, chunk=SMALL_CHUNK)
    assert_norms(per_tensor, total, grads, norm_type, 0.25, 1e-5)


def test_many_tiny_tensors():
    grads = random_grads([(4,)] * 300, (torch.float32, torch.float16, torch.bfloat16))
    per_tensor, total, found_inf = norm(grads, torch.tensor(2.0))
    assert found_inf.item() == 0.0
    assert_norms(per_tensor, total, grads, 2.0, 2.0, 1e-5)
    before = clone_all(grads)
    coef = torch.rand(300) + 0.1
    ops.scale_pass(grads, coef, torch.tensor(0.5), backend="triton")
    reference.scale_pass(before, coef, torch.tensor(0.5), None, None, False)
    assert all(bitwise_equal(g, w) for g, w in zip(grads, before))


def test_norm_is_bitwise_deterministic():
    grads = random_grads([(20000,), (4097,), (3,), (9000,)], (torch.float32, torch.bfloat16, torch.float16))
    inv = torch.tensor(0.3)
    first = norm(grads, inv, 2.0, chunk=SMALL_CHUNK)
    tk.clear_cache()  # a rebuilt table gives the same bits too
    second = norm(grads, inv, 2.0, chunk=SMALL_CHUNK)
    for a, b in zip(first, second):
        assert bitwise_equal(a, b)


def test_every_output_is_written_over_poisoned_scratch(monkeypatch):
    from ampclip.triton_kernels import fused_norm

    monkeypatch.setattr(fused_norm, "SCRATCH_FILL", math.nan)
    grads = random_grads([(4097,), (0,), (1,), (3000,)], (torch.float32, torch.float16))
    for norm_type in (2.0, math.inf, 3.0):
        per_tensor, total, found_inf = norm(grads, None, norm_type, chunk=SMALL_CHUNK)
        assert torch.isfinite(per_tensor).all() and math.isfinite(total.item()) and found_inf.item() == 0.0
        assert_norms(per_tensor, total, grads, norm_type, None, rtol_for(norm_type, ()))


# ----------------------------------------------------------------------------------------------- scale pass


@pytest.mark.parametrize("dtypes", DTYPE_MIXES)
@pytest.mark.parametrize("clip_value", [None, 0.5, 0.1], ids=["noclamp", "clamp0.5", "clamp0.1"])
@pytest.mark.parametrize("unscale", [None, 0.3], ids=["plain", "unscale"])
@pytest.mark.parametrize("per_tensor_coef", [False, True], ids=["coef0d", "coef_per_tensor"])
def test_scale_bitwise_equals_reference(dtypes, clip_value, unscale, per_tensor_coef):
    grads = random_grads(SHAPES, dtypes, scale=2.0)
    want = clone_all(grads)
    coef = torch.rand(len(grads)) + 0.05 if per_tensor_coef else torch.tensor(0.37)
    inv = None if unscale is None else torch.tensor(unscale)
    ops.scale_pass(grads, coef, inv, clip_value, backend="triton")
    reference.scale_pass(want, coef, inv, clip_value, None, False)
    for g, w in zip(grads, want):
        assert bitwise_equal(g, w), (g.dtype, (g - w).abs().max())


def test_scale_multi_chunk_and_tail():
    grads = random_grads([(5000,), (4097,), (1,), (1025,)], (torch.bfloat16, torch.float32))
    want = clone_all(grads)
    coef = torch.tensor([0.5, 0.25, 3.0, 0.7])
    tk.fused_scale_triton(grads, coef, torch.tensor(0.3), 1.0, None, False, chunk=SMALL_CHUNK)
    reference.scale_pass(want, coef, torch.tensor(0.3), 1.0, None, False)
    assert all(bitwise_equal(g, w) for g, w in zip(grads, want))


@pytest.mark.parametrize("zero_if_inf", [False, True], ids=["untouched", "zeroed"])
@pytest.mark.parametrize("unscale_clip", [(None, None), (0.5, 1.0)], ids=["coef_only", "unscale_clamp"])
def test_scale_on_found_inf(zero_if_inf, unscale_clip):
    grads = random_grads([(100,), (4097,), (1,), (0,)], (torch.float32, torch.float16, torch.bfloat16))
    grads[1][7] = math.nan
    grads[0][-1] = -0.0
    before = clone_all(grads)
    unscale, clip = unscale_clip
    inv = None if unscale is None else torch.tensor(unscale)
    found = torch.tensor(1.0)
    ops.scale_pass(grads, torch.tensor(0.5), inv, clip, found, zero_if_inf, backend="triton")
    for g, g0 in zip(grads, before):
        if zero_if_inf:
            assert bitwise_equal(g, torch.zeros_like(g0))
        else:
            assert torch.equal(g.nan_to_num(), g0.nan_to_num()) and bitwise_equal(g, g0)
    # found_inf == 0: a normal scale
    grads = clone_all(before)
    want = clone_all(before)
    ops.scale_pass(grads, torch.tensor(0.5), inv, clip, torch.tensor(0.0), zero_if_inf, backend="triton")
    reference.scale_pass(want, torch.tensor(0.5), inv, clip, torch.tensor(0.0), zero_if_inf)
    assert all(bitwise_equal(g, w) for g, w in zip(grads, want))


@pytest.mark.parametrize("per_tensor_coef", [False, True], ids=["coef0d", "coef_per_tensor"])
def test_unit_coef_leaves_bits_alone(per_tensor_coef):
    grads = random_grads([(4097,), (3,), (1,), (0,)], (torch.float32, torch.bfloat16, torch.float16))
    grads[0][0] = math.nan
    grads[1][-1] = -0.0
    grads[1].view(torch.int16)[0] = 0x7F81  # a bf16 NaN with a payload: any rewrite would canonicalise it
    before = clone_all(grads)
    coef = torch.ones(len(grads)) if per_tensor_coef else torch.tensor(1.0)
    ops.scale_pass(grads, coef, backend="triton")
    assert all(bitwise_equal(g, g0) for g, g0 in zip(grads, before))


@pytest.mark.parametrize("clip_value", [None, 0.5], ids=["noclamp", "clamp"])
def test_non_contiguous_scale(clip_value):
    a, b, c = torch.randn(64, 96), torch.randn(60, 40), torch.randn(50, 2)
    grads = [a.t(), b[::3, 7:], c[:, 1], torch.randn(77).half(), torch.randn(40, 30).bfloat16().t()]
    assert sum(g.is_contiguous() for g in grads) == 1
    want = [g.clone() for g in grads]  # contiguous copies: the reference on plain tensors
    b_rest, c_rest = b[1::3].clone(), c[:, 0].clone()
    coef = torch.tensor([0.5, 0.3, 2.0, 0.9, 0.7])
    for _ in range(2):  # the second call goes through the cached table and its staging buffers
        ops.scale_pass(grads, coef, torch.tensor(0.25), clip_value, backend="triton")
        reference.scale_pass(want, coef, torch.tensor(0.25), clip_value, None, False)
        assert all(bitwise_equal(g, w) for g, w in zip(grads, want))
    assert bitwise_equal(b[1::3], b_rest) and bitwise_equal(c[:, 0], c_rest)  # outside the views


def test_non_contiguous_scale_writes_back_only_the_view():
    base = torch.randn(40, 30)
    keep = base[:, 1::2].clone()
    grads = [base[:, ::2]]
    want = [grads[0].clone()]
    ops.scale_pass(grads, torch.tensor(0.3), torch.tensor(0.5), None, backend="triton")
    reference.scale_pass(want, torch.tensor(0.3), torch.tensor(0.5), None, None, False)
    assert bitwise_equal(base[:, ::2], want[0]) and bitwise_equal(base[:, 1::2], keep)


def test_fp64_clip_value_is_not_rounded_to_fp32():
    grads = [torch.randn(3000, dtype=torch.float64), torch.randn(100)]
    want = clone_all(grads)
    ops.scale_pass(grads, torch.tensor(0.9, dtype=torch.float64), None, 0.1, backend="triton")
    reference.scale_pass(want, torch.tensor(0.9, dtype=torch.float64), None, 0.1, None, False)
    assert all(bitwise_equal(g, w) for g, w in zip(grads, want))


# --------------------------------------------------------------------------------------- table, cache, input


def test_table_is_cached_and_invalidated():
    grads = [torch.randn(100), torch.randn(3000).half()]
    table = tk.tensor_table(grads)
    assert tk.tensor_table(grads) is table  # same tensors: a hit
    assert tk.tensor_table(list(grads)) is table  # a new list of the same tensors: a hit
    grads[0].set_(torch.randn(100))  # storage moved under the same tensor object: rebuilt
    moved = tk.tensor_table(grads)
    assert moved is not table
    per_tensor, total, _ = norm(grads)
    assert_norms(per_tensor, total, grads, 2.0, None, 1e-5)
    # the cache holds no gradient alive; a table keyed on identities goes when its tensors die
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_extension, "tensor_signature", lambda tensors: None)
        tk.tensor_table(grads)
        before = tk.cache_info()["tables"]
        del grads, table, moved
        gc.collect()
        assert tk.cache_info()["tables"] < before


@pytest.mark.skipif(not _extension.AVAILABLE, reason="needs the compiled extension")
def test_new_gradients_at_the_old_addresses_reuse_the_table():
    # zero_grad(set_to_none=True) and a backward: new tensor objects, usually at the same addresses
    storage = [torch.randn(4097), torch.randn(3, 5).half()]
    table = tk.tensor_table([s.view_as(s) for s in storage])
    gc.collect()
    again = [s.view_as(s) for s in storage]
    assert tk.tensor_table(again) is table
    per_tensor, total, _ = norm(again)
    assert_norms(per_tensor, total, again, 2.0, None, 1e-5)
    assert tk.tensor_table([storage[0].view_as(storage[0]), storage[1].view(5, 3)]) is not table  # other shape
    assert tk.tensor_table([storage[0][1:], storage[1]]) is not table  # other address
    strided = [torch.randn(40, 30)[:, :20]]  # its table owns a staging buffer as large as the gradient
    tk.tensor_table(strided)
    before = tk.cache_info()["tables"]
    del strided
    gc.collect()
    assert tk.cache_info()["tables"] == before - 1


@pytest.mark.skipif(not _extension.AVAILABLE, reason="needs the compiled extension")
def test_table_sees_a_changed_view_under_the_same_pointer():
    base = torch.randn(40, 30)
    grads = [base[:, :20], torch.randn(50)]  # a strided view: staged through a buffer of its shape
    table = tk.tensor_table(grads)
    grads[0].t_()  # same data pointer and element count, other sizes and strides
    assert tk.tensor_table(grads) is not table
    per_tensor, total, _ = norm(grads)
    assert_norms(per_tensor, total, grads, 2.0, None, 1e-5)
    grads[1].resize_(20)  # a smaller resize keeps the pointer
    per_tensor, total, _ = norm(grads)
    assert_norms(per_tensor, total, grads, 2.0, None, 1e-5)


def test_a_table_used_in_a_cuda_graph_capture_outlives_the_cache(monkeypatch):
    tensor_table_module = importlib.import_module("ampclip.triton_kernels.tensor_table")
    grads = [torch.randn(300), torch.randn(70)]
    table = tk.tensor_table(grads)  # built before capture, as a capture cannot copy host to device
    monkeypatch.setattr(tensor_table_module, "_capturing", lambda grads: True)
    assert tk.tensor_table(grads) is table  # the lookup inside the capture
    monkeypatch.undo()
    for i in range(tk.cache_info()["max"] + 1):  # evicts it from the lookup cache
        tk.tensor_table([torch.randn(i + 1)])
    tk.clear_cache()
    assert any(t is table for t in tensor_table_module._captured.values())


def test_table_cache_without_the_extension(monkeypatch):
    monkeypatch.setattr(_extension, "tensor_signature", lambda tensors: None)
    grads = [torch.randn(100), torch.randn(3000).half()]
    table = tk.tensor_table(grads)
    assert tk.tensor_table(list(grads)) is table
    grads[0].set_(torch.randn(100))
    assert tk.tensor_table(grads) is not table


def test_new_tensors_with_same_sizes_get_correct_results():
    for step in range(3):  # zero_grad(set_to_none=True) then backward: new tensors every step
        grads = random_grads([(4097,), (3,)], (torch.float32,), seed=step)
        per_tensor, total, _ = norm(grads)
        assert_norms(per_tensor, total, grads, 2.0, None, 1e-5)


def test_bad_input_raises_before_writing():
    good = torch.randn(10)
    before = good.clone()
    with pytest.raises(TypeError, match="dtype"):
        ops.norm_pass([good, torch.ones(3, dtype=torch.int32)], backend="triton")
    with pytest.raises(TypeError, match="dtype"):
        ops.scale_pass([good, torch.ones(3, dtype=torch.int32)], torch.tensor(0.5), backend="triton")
    with pytest.raises(ValueError, match="coef"):
        ops.scale_pass([good], torch.ones(2), backend="triton")
    with pytest.raises(ValueError, match="clip_value"):
        ops.scale_pass([good], torch.tensor(0.5), None, -1.0, backend="triton")
    assert bitwise_equal(good, before)


# --------------------------------------------------------------------------------------------------- CUDA

cuda = pytest.mark.gpu


def _gpt2_xl_shapes(layers=48, d=1600, vocab=50257, ctx=1024):
    """The parameter shapes of GPT-2 1.5B (GPT-2 XL): 1.56e9 elements in 580 tensors."""
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,),
                   (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def _cuda_grads(shapes, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(s, device="cuda", dtype=dtype, generator=gen) for s in shapes]


def _exact_cuda(grads, norm_type, unscale=None):
    """Per-tensor and total norms in fp64 on the GPU, one tensor at a time (a host cat would need 12 GB)."""
    per = []
    for g in grads:
        if g.numel() == 0:
            per.append(torch.zeros((), dtype=torch.float64, device=g.device))
            continue
        u = g.double() if unscale is None else g.double() * unscale
        per.append(torch.linalg.vector_norm(u, norm_type))
        del u
    per = torch.stack(per)
    return per, torch.linalg.vector_norm(per, norm_type)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_cuda_gpt2_xl_shapes(dtype):
    shapes = _gpt2_xl_shapes() if dtype != torch.float32 else _gpt2_xl_shapes(layers=12)
    grads = _cuda_grads(shapes, dtype)
    for norm_type in (2.0, math.inf, 1.0):
        per_tensor, total, found_inf = ops.norm_pass(grads, torch.tensor(0.5, device="cuda"), norm_type,
                                                     backend="triton")
        exact_per, exact_total = _exact_cuda(grads, norm_type, 0.5)
        assert found_inf.item() == 0.0
        torch.testing.assert_close(per_tensor.double(), exact_per, rtol=2e-5, atol=0)
        torch.testing.assert_close(total.double(), exact_total, rtol=2e-5, atol=0)
        again = ops.norm_pass(grads, torch.tensor(0.5, device="cuda"), norm_type, backend="triton")
        assert bitwise_equal(again[1], total) and bitwise_equal(again[0], per_tensor)
    some = grads[:30]
    want = [g.clone() for g in some]
    coef = torch.rand(len(some), device="cuda")
    ops.scale_pass(some, coef, torch.tensor(0.3, device="cuda"), 0.8, backend="triton")
    reference.scale_pass(want, coef, torch.tensor(0.3, device="cuda"), 0.8, None, False)
    assert all(bitwise_equal(g, w) for g, w in zip(some, want))
    grads[-3][-1] = math.nan
    _, _, found_inf = ops.norm_pass(grads, None, 2.0, backend="triton")
    assert found_inf.item() == 1.0


@cuda
def test_cuda_ten_thousand_tiny_tensors():
    shapes = [(int(n),) for n in torch.randint(0, 300, (10_000,), generator=torch.Generator().manual_seed(1))]
    grads = _cuda_grads(shapes, torch.float32)
    grads = [g.half() if i % 3 == 0 else g.bfloat16() if i % 3 == 1 else g for i, g in enumerate(grads)]
    per_tensor, total, found_inf = ops.norm_pass(grads, None, 2.0, backend="triton")
    exact_per, exact_total = _exact_cuda(grads, 2.0)
    torch.testing.assert_close(per_tensor.double(), exact_per, rtol=1e-5, atol=0)
    torch.testing.assert_close(total.double(), exact_total, rtol=1e-5, atol=0)
    assert found_inf.item() == 0.0
    want = [g.clone() for g in grads]
    coef = torch.rand(len(grads), device="cuda")
    ops.scale_pass(grads, coef, torch.tensor(0.25, device="cuda"), 0.5, backend="triton")
    reference.scale_pass(want, coef, torch.tensor(0.25, device="cuda"), 0.5, None, False)
    assert all(bitwise_equal(g, w) for g, w in zip(grads, want))


@cuda
def test_cuda_cached_host_overhead_2000_tensors():
    grads = _cuda_grads([(1024,)] * 2000, torch.float32)
    coef = torch.tensor(0.5, device="cuda")
    for _ in range(3):  # builds the table, compiles the kernels
        ops.norm_pass(grads, None, 2.0, backend="triton")
        ops.scale_pass(grads, coef, backend="triton")
    torch.cuda.synchronize()
    tables = tk.cache_info()["tables"]
    timings = {}
    for name, call in (("norm", lambda: ops.norm_pass(grads, None, 2.0, backend="triton")),
                       ("scale", lambda: ops.scale_pass(grads, coef, backend="triton"))):
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
            torch.cuda.synchronize()
        timings[name] = sorted(times)[len(times) // 2] * 1e6
    print(f"host time per call, 2000 tensors, cached table: {timings} µs (target <= 50)")
    assert tk.cache_info()["tables"] == tables  # no rebuild


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_tensor_past_2_pow_31_elements(dtype):
    numel = 2**31 + 3000
    need = numel * 2 * 2 + (1 << 30)  # the tensor, the fp64-chunk exact norm scratch, slack
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB free on the GPU, {free / 2**30:.1f} GiB available")
    big = torch.randn(numel, device="cuda", dtype=dtype)
    small = torch.randn(5, device="cuda", dtype=dtype)
    exact = torch.zeros((), dtype=torch.float64, device="cuda")
    for part in big.split(1 << 28):
        exact += part.double().square().sum()
    per_tensor, total, found_inf = ops.norm_pass([small, big], None, 2.0, backend="triton")
    torch.testing.assert_close(per_tensor[1].double(), exact.sqrt(), rtol=1e-5, atol=0)
    assert found_inf.item() == 0.0
    tail = big[-4000:].clone()  # elements past 2^31
    ops.scale_pass([small, big], torch.tensor(0.5, device="cuda"), backend="triton")
    assert bitwise_equal(big[-4000:], tail * 0.5)  # a power of two scales exactly
    big[-1] = math.inf
    _, _, found_inf = ops.norm_pass([small, big], None, 2.0, backend="triton")
    assert found_inf.item() == 1.0


@cuda
def test_cuda_torch_compile_fullgraph():
    grads = _cuda_grads([(4097,), (300, 7), (1,)], torch.float32) + _cuda_grads([(1000,)], torch.bfloat16)
    want = [g.clone() for g in grads]

    def clip(gs, max_norm):
        _, total, found_inf = torch.ops.ampclip.norm_pass(gs, None, 2.0, "triton")
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        torch.ops.ampclip.scale_pass(gs, coef, None, None, found_inf, False, "triton")
        return total

    compiled = torch.compile(clip, fullgraph=True)
    total = compiled(grads, 0.5)
    want_total = clip(want, 0.5)
    assert bitwise_equal(total, want_total)  # the same deterministic kernels, compiled or not
    for g, w in zip(grads, want):  # the coefficient is computed by Inductor: allow an ulp
        torch.testing.assert_close(g, w, rtol=1e-6 if g.dtype == torch.float32 else 8e-3, atol=1e-30)


@cuda
def test_cuda_graph_capture_and_replay():
    grads = _cuda_grads([(4097,), (3,), (70000,), (0,)], torch.float32) + _cuda_grads([(1000,)], torch.float16)
    grads.append(torch.randn(64, 48, device="cuda").t())  # non-contiguous: a staging buffer in the graph
    inv = torch.tensor(0.5, device="cuda")

    def step():
        _, total, found_inf = ops.norm_pass(grads, inv, 2.0, backend="triton")
        coef = (1.0 / (total + 1e-6)).clamp(max=1.0)
        ops.scale_pass(grads, coef, inv, None, found_inf, True, backend="triton")
        return total, found_inf

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles kernels, builds and caches the table
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        total, found_inf = step()

    for trial in range(3):
        new = [torch.randn(g.shape, device="cuda", generator=None).to(g.dtype) for g in grads]
        if trial == 2:
            new[2][123] = math.inf
        for g, v in zip(grads, new):
            g.copy_(v)
        want = [v.clone() for v in new]
        graph.replay()
        torch.cuda.synchronize()
        _, want_total, want_found = reference.norm_pass(want, inv, 2.0)
        # the reference scale with the graph's own total, so that only the scale pass is compared
        reference.scale_pass(want, (1.0 / (total + 1e-6)).clamp(max=1.0), inv, None, want_found, True)
        assert found_inf.item() == want_found.item() == (1.0 if trial == 2 else 0.0)
        if trial < 2:
            torch.testing.assert_close(total, want_total, rtol=1e-5, atol=0)
            for g, w in zip(grads, want):
                assert bitwise_equal(g, w)
        else:
            assert all(bitwise_equal(g, torch.zeros_like(g)) for g in grads)
