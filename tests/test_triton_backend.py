"""The Triton backend's own machinery (``triton_kernels/`` and its adapter), beyond the op contract that
tests/test_backends.py checks on every backend: chunks and their tails, staging of strided gradients, the
float64 bits of a clamp, scratch that must be written before it is read.

On CPU the kernels run under TRITON_INTERPRET=1 (set in conftest.py) at about 0.7 ms per program, so every
CPU test stays under 64K elements; a table with a small ``chunk`` (elements per program) gives multi-chunk
tensors and tail chunks at those sizes. ``@pytest.mark.gpu`` tests repeat the checks at real sizes on CUDA
(GPT-2 1.5B shapes, 10,000 tensors, a tensor past 2^31 elements, torch.compile, CUDA graphs).
"""

import math

import pytest
import torch

from ampclip import backends, ops, reference
from ampclip.backends import tensor_table
from helpers import DTYPE_MIXES, NORMS, bitwise_equal, clone_all, exact_per_tensor, random_grads

pytestmark = pytest.mark.skipif(not ops.available_backends()["triton"], reason="triton is not installed")


@pytest.fixture(autouse=True)
def _cpu_tests_need_the_interpreter(request):
    if "gpu" not in request.keywords and not ops.runs_on("triton", "cpu"):
        pytest.skip("the triton backend cannot take CPU tensors here (see ampclip.ops.runs_on)")


SMALL_CHUNK = 1024  # a 4097-element tensor is 5 programs, the last one holding 1 element


def rtol_for(norm_type, dtypes):
    # fp32 accumulation against fp64: 1e-5 for sums and max; |x|^p through exp2/log2 rounds more.
    rtol = 1e-5 if norm_type in (1.0, 2.0, math.inf) else 5e-5
    return 1e-12 if dtypes == (torch.float64,) else rtol


def small_chunk_norm(grads, inv=None, norm_type=2.0, clamp=None):
    """The norm pass straight through the launcher, on a table of small chunks."""
    from ampclip import triton_kernels as tk

    table = tensor_table.tensor_table(grads, SMALL_CHUNK)
    table.stage_in(grads)
    return tk.fused_norm_triton(table, inv, norm_type, clamp)


def small_chunk_scale(grads, coef, inv=None, clamp=None, found_inf=None, zero_if_inf=False):
    from ampclip import triton_kernels as tk

    table = tensor_table.tensor_table(grads, SMALL_CHUNK)
    table.stage_in(grads)
    tk.fused_scale_triton(table, coef, inv, clamp, found_inf, zero_if_inf)
    table.stage_out(grads)


def assert_norms(per_tensor, total, grads, norm_type, unscale, rtol):
    exact_total = reference.exact_norm(grads, norm_type, unscale)
    exact = torch.tensor(exact_per_tensor(grads, norm_type, unscale), dtype=torch.float64)
    torch.testing.assert_close(per_tensor.double(), exact, rtol=rtol, atol=0)
    torch.testing.assert_close(total.double(), torch.tensor(exact_total, dtype=torch.float64), rtol=rtol, atol=0)


# ------------------------------------------------------------------------------------------------ norm pass


@pytest.mark.parametrize("norm_type", NORMS)
@pytest.mark.parametrize("dtypes", DTYPE_MIXES[:1] + DTYPE_MIXES[-1:])
@pytest.mark.parametrize("clamp", [None, (-0.5, 1.0)], ids=["noclamp", "clamp"])
def test_norm_multi_chunk_matches_reference(norm_type, dtypes, clamp):
    grads = random_grads([(20000,), (4097,), (1,), (0,), (1025,)], dtypes)
    inv = torch.tensor(0.5)
    small = small_chunk_norm(grads, inv, norm_type, clamp)
    default = ops.norm_pass(grads, inv, norm_type, clamp, backend="triton")
    want = reference.norm_pass(grads, inv, norm_type, clamp)
    rtol = rtol_for(norm_type, dtypes)
    for a, b, w in zip(small, default, want):
        torch.testing.assert_close(a, w, rtol=rtol, atol=0)
        torch.testing.assert_close(b, w, rtol=rtol, atol=0)


@pytest.mark.parametrize("value", [math.inf, math.nan], ids=["inf", "nan"])
@pytest.mark.parametrize("position", ["first", "last", "tail", "middle_chunk"])
@pytest.mark.parametrize("norm_type", [pytest.param(2.0, id="p2"), pytest.param(math.inf, id="pinf")])
def test_found_inf_in_every_chunk_position(value, position, norm_type):
    grads = random_grads([(3,), (5000,), (7,)], (torch.bfloat16,))
    # 5000 elements in chunks of 1024: the tail chunk holds elements 4096..4999
    index = {"first": 0, "last": 4999, "tail": 4500, "middle_chunk": 2500}[position]
    grads[1][index] = value
    per_tensor, total, found_inf = small_chunk_norm(grads, torch.tensor(0.5), norm_type)
    want = reference.norm_pass(grads, torch.tensor(0.5), norm_type)
    assert found_inf.item() == 1.0
    torch.testing.assert_close(per_tensor, want[0], rtol=1e-5, atol=0, equal_nan=True)
    torch.testing.assert_close(total, want[1], rtol=1e-5, atol=0, equal_nan=True)
    assert math.isfinite(per_tensor[0].item()) and math.isfinite(per_tensor[2].item())


def test_an_overflowing_chunk_is_summed_again_in_float64_alone():
    # only the chunk whose float32 sum overflows takes the float64 branch; its neighbours keep their sums
    big = torch.randn(5000)
    big[2100:2200] = 1e20
    grads = [big, torch.randn(30)]
    per_tensor, total, found_inf = small_chunk_norm(grads)
    assert found_inf.item() == 0.0
    assert_norms(per_tensor, total, grads, 2.0, None, 1e-6)


@pytest.mark.parametrize("norm_type", [pytest.param(2.0, id="p2"), pytest.param(math.inf, id="pinf")])
def test_non_contiguous_norm_is_staged_every_call(norm_type):
    base = torch.randn(64, 96)
    grads = [base.t(), base[:, 5:40], base[::3], torch.randn(50, 2)[:, 1], torch.randn(77)]
    assert not any(g.is_contiguous() for g in grads[:4])
    per_tensor, total, _ = small_chunk_norm(grads, torch.tensor(0.25), norm_type)
    assert_norms(per_tensor, total, grads, norm_type, 0.25, 1e-5)
    # the staging copy is refreshed on every call: new values in the same tensors give the new norm
    base.mul_(3.0)
    grads[3].mul_(-2.0)
    per_tensor, total, _ = small_chunk_norm(grads, torch.tensor(0.25), norm_type)
    assert_norms(per_tensor, total, grads, norm_type, 0.25, 1e-5)


def test_a_clamp_that_excludes_zero_counts_no_masked_lane():
    # the masked lanes of a tail block load 0, which a clamp to [0.5, 1] would turn into 0.5
    grads = random_grads([(5,), (4097,), (1024,)], (torch.float32, torch.bfloat16))
    for clamp in [(0.5, 1.0), (-1.0, -0.25)]:
        for norm_type in (2.0, 1.0, math.inf, 3.0):
            got = small_chunk_norm(grads, torch.tensor(0.5), norm_type, clamp)
            want = reference.norm_pass(grads, torch.tensor(0.5), norm_type, clamp)
            for a, w in zip(got, want):
                torch.testing.assert_close(a, w, rtol=rtol_for(norm_type, ()), atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_aligned_and_unaligned_chunks_give_the_same_bits(dtype):
    # An aligned tensor reads whole blocks without a mask, a misaligned view of the same values with one;
    # each lane sums the same elements in the same order either way.
    values = random_grads([(5000,)], (dtype,))[0]
    shifted = torch.empty(5001, dtype=dtype)[1:]
    shifted.copy_(values)
    grads = [values, shifted]
    codes = tensor_table.tensor_table(grads, SMALL_CHUNK).codes[:2].tolist()
    assert [bool(c & tensor_table.ALIGNED) for c in codes] == [True, False]
    for norm_type in (2.0, 1.0, math.inf, 3.0):
        for clamp in (None, (-0.5, 1.0)):
            per_tensor, _, _ = small_chunk_norm(grads, torch.tensor(0.25), norm_type, clamp)
            assert bitwise_equal(per_tensor[0], per_tensor[1])
    small_chunk_scale(grads, torch.tensor(0.3), torch.tensor(0.5), (-0.2, 0.7))
    assert bitwise_equal(grads[0], grads[1])


def test_every_output_is_written_over_poisoned_scratch(monkeypatch):
    from ampclip.triton_kernels import fused_norm

    monkeypatch.setattr(fused_norm, "SCRATCH_FILL", math.nan)
    grads = random_grads([(4097,), (0,), (1,), (3000,)], (torch.float32, torch.float16))
    for norm_type in (2.0, math.inf, 3.0):
        per_tensor, total, found_inf = small_chunk_norm(grads, None, norm_type)
        assert torch.isfinite(per_tensor).all() and math.isfinite(total.item()) and found_inf.item() == 0.0
        assert_norms(per_tensor, total, grads, norm_type, None, rtol_for(norm_type, ()))


def test_zero_size_only_launches_no_norm_program():
    per_tensor, total, found_inf = ops.norm_pass([torch.empty(0), torch.empty(3, 0)], backend="triton")
    assert torch.equal(per_tensor, torch.zeros(2)) and total.item() == 0.0 and found_inf.item() == 0.0


# ----------------------------------------------------------------------------------------------- scale pass


def test_scale_multi_chunk_and_tail():
    grads = random_grads([(5000,), (4097,), (1,), (1025,)], (torch.bfloat16, torch.float32))
    want = clone_all(grads)
    coef = torch.tensor([0.5, 0.25, 3.0, 0.7])
    small_chunk_scale(grads, coef, torch.tensor(0.3), (-1.0, 1.0))
    reference.scale_pass(want, coef, torch.tensor(0.3), (-1.0, 1.0), None, False)
    assert all(bitwise_equal(g, w) for g, w in zip(grads, want))


def test_unit_coef_leaves_bits_alone_even_a_nan_payload():
    grads = random_grads([(4097,), (3,), (1,), (0,)], (torch.float32, torch.bfloat16, torch.float16))
    grads[1].view(torch.int16)[0] = 0x7F81  # a bf16 NaN with a payload: any rewrite would canonicalise it
    before = clone_all(grads)
    small_chunk_scale(grads, torch.ones(len(grads)))
    assert all(bitwise_equal(g, g0) for g, g0 in zip(grads, before))


@pytest.mark.parametrize("clip_value", [None, 0.5], ids=["noclamp", "clamp"])
def test_non_contiguous_scale(clip_value):
    a, b, c = torch.randn(64, 96), torch.randn(60, 40), torch.randn(50, 2)
    grads = [a.t(), b[::3, 7:], c[:, 1], torch.randn(77).half(), torch.randn(40, 30).bfloat16().t()]
    assert sum(g.is_contiguous() for g in grads) == 1
    want = [g.clone() for g in grads]  # contiguous copies: the reference on plain tensors
    b_rest, c_rest = b[1::3].clone(), c[:, 0].clone()
    coef = torch.tensor([0.5, 0.3, 2.0, 0.9, 0.7])
    clamp = None if clip_value is None else (-clip_value, clip_value)
    for _ in range(2):  # the second call goes through the cached table and its staging buffers
        ops.scale_pass(grads, coef, torch.tensor(0.25), clip_value, backend="triton")
        reference.scale_pass(want, coef, torch.tensor(0.25), clamp, None, False)
        assert all(bitwise_equal(g, w) for g, w in zip(grads, want))
    assert bitwise_equal(b[1::3], b_rest) and bitwise_equal(c[:, 0], c_rest)  # outside the views


def test_fp64_clamp_is_not_rounded_to_fp32():
    grads = [torch.randn(3000, dtype=torch.float64), torch.randn(100)]
    want = clone_all(grads)
    ops.scale_pass(grads, torch.tensor(0.9, dtype=torch.float64), None, 0.1, backend="triton")
    reference.scale_pass(want, torch.tensor(0.9, dtype=torch.float64), None, (-0.1, 0.1), None, False)
    assert all(bitwise_equal(g, w) for g, w in zip(grads, want))
    per_tensor, _, _ = ops.norm_pass([torch.randn(3000, dtype=torch.float64)], None, math.inf, 0.1, backend="triton")
    assert per_tensor[0].item() == 0.1  # the float64 0.1, not float32's 0.10000000149


# ------------------------------------------------------------------- the compile proof covers every launch


def _triton_check():
    import importlib.util
    import pathlib
    import sys

    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "triton_check.py"
    spec = importlib.util.spec_from_file_location("triton_check", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["triton_check"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_every_launch_is_a_specialisation_the_compile_check_compiles(monkeypatch):
    """scripts/triton_check.py (make cuda-check) compiles a list of specialisations; every launch the
    backend makes here, over dtypes, flags, bounds and modes, must be one of them."""
    from ampclip import triton_kernels as tk

    check = _triton_check()
    seen = []

    class Recorder:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launch = self.kernel[grid]

            def run(*args, **kwargs):
                seen.append(check.launch_spec(self.name, self.kernel.fn, args, kwargs))
                return launch(*args, **kwargs)

            return run

    for module in set(check.KERNELS.values()):  # also where a module imported another's kernel
        mod = getattr(tk, module)
        for name in check.KERNELS:
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, Recorder(name, getattr(mod, name)))
    for dtypes in [(torch.float32, torch.bfloat16), (torch.float16, torch.float64)]:
        grads = random_grads([(3000,), (5,), (0,)], dtypes)
        fp64 = torch.float64 in dtypes
        for norm_type in (2.0, 1.0, math.inf, 3.0):
            for inv, clamp in ((None, None), (torch.tensor(0.5), (-1.0, 0.0))):
                per_tensor, total, found = small_chunk_norm(grads, inv, norm_type, clamp)
                for mode, rule in ((0, 0), (1, 1), (2, 0)):
                    groups = torch.tensor([0, 1, 1]) if mode == 2 else None
                    for bound in (0.5, torch.tensor(0.5), torch.tensor(0.5, dtype=torch.float64)):
                        tk.clip_finalize_triton(per_tensor, total, bound, mode, groups, 2 if mode == 2 else 0,
                                                norm_type, 1e-6, rule)
        coef = torch.tensor([0.5, 0.25, 2.0], dtype=torch.float64 if fp64 else torch.float32)
        for c, inv, clamp, found_inf, zero in ((coef, None, None, None, False),
                                               (coef[0], torch.tensor(0.5), (-1.0, 1.0), torch.tensor(0.0), True),
                                               (coef, None, None, torch.tensor(0.0), False)):
            small_chunk_scale(grads, c, inv, clamp, found_inf, zero)
        counters, stats = torch.zeros(2, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64)
        tk.clip_stats_update_triton(counters, stats, per_tensor, coef, found)
        tk.clip_stats_update_triton(counters, None, per_tensor, coef[0], found)
    state, history = torch.tensor([1024.0, 1 / 1024, 0.0, 2.0]), torch.zeros(3, 8)
    for found_inf, norm in ((None, None), (torch.tensor(1.0), torch.tensor(3.0, dtype=torch.float64))):
        for dynamic in (True, False):
            tk.scaler_update_triton(state, history, found_inf, norm, 1, 2.0, 0.5, 2000, 2, 1.0, 2.0**24, dynamic)
    triton = backends.load("triton")  # AGC's unit-wise passes and ZClip's step
    for dtypes in [(torch.float32, torch.bfloat16), (torch.float16, torch.float64)]:
        grads = random_grads([(3000,), (5,), (7, 40), (0,)], dtypes)
        for norm_type in (2.0, 1.0, math.inf, 3.0):
            for inv in (None, torch.tensor(0.5)):
                units, _, total, found = triton.unit_norm_pass(grads, inv, norm_type)
            for param_norms in (units.float(), units.double()):
                coef, _ = triton.unit_clip_finalize(param_norms, units, 0.01, 1e-3, norm_type)
        for inv, found_inf, zero in ((None, None, False), (torch.tensor(0.5), found, True),
                                     (torch.tensor(0.5), found, False)):
            for c in (coef.float(), coef.double()):
                triton.unit_scale_pass(grads, c, inv, found_inf, zero)
        for rule, skip in ((0, False), (1, True), (2, False)):
            state, warmup = torch.zeros(4, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
            triton.zclip_update(state, warmup, total, found, 0.97, 2.5, 1.0, 1e-6, rule, 1.0, skip)
    # Here the tables have small chunks and the interpreter rounds bfloat16 by hand; compiled, neither.
    compiled = {"CHUNK_SIZE": tensor_table.CHUNK, "SOFT_BF16": 0}
    seen = [check.Spec(s.kernel, s.types, tuple((k, compiled.get(k, v)) for k, v in s.constexprs)) for s in seen]
    listed = set(check.specializations())
    missing = {spec.label() for spec in seen if spec not in listed}
    assert not missing, f"launched but not compiled by scripts/triton_check.py: {sorted(missing)}"
    assert {spec.kernel for spec in seen} == set(check.KERNELS)
