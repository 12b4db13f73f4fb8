"""The ``cuda`` backend (the CUDA C++ kernels of csrc/cuda/ and their adapter, ampclip/backends/cuda.py).

Without a GPU (CI), the adapter's host logic runs against a stand-in for the extension's CUDA entries: the
table sections and scalars it passes, staging, aliased and expanded gradients, the bound of clip_finalize,
the choice of backend and the errors. tests/test_backends.py runs the op contract on CPU tensors and skips
``cuda``, which takes CUDA tensors only. ``@pytest.mark.gpu`` tests run the kernels against fp64 at real sizes
(GPT-2-1.5B shapes, 10,000 tensors, a tensor past 2^31 elements), check bitwise determinism, CUDA-graph
capture and replay, and agreement with the Triton backend.
"""

import math

import pytest
import torch

from ampclip import backends, ops, reference
from ampclip.backends import cpp, tensor_table
from ampclip.backends import cuda as cuda_backend
from helpers import bitwise_equal, random_grads

# ------------------------------------------------------------------------------------ host logic, no GPU


class FakeExtension:
    """Stands in for ampclip._C built with the CUDA kernels: records every call; its scale pass doubles the
    tensors whose data the table points at (found by address), so staging in and out can be seen."""

    def __init__(self, targets=()):
        self.calls = []
        self.targets = {t.data_ptr(): t for t in targets}

    def cuda_archs(self):
        return ("sm_80", "sm_86", "sm_89", "compute_90", "sm_90")

    def cuda_norm_pass(self, *args):
        self.calls.append(("norm_pass", args))
        n, fp64 = args[0].numel(), args[6]
        dtype = torch.float64 if fp64 else torch.float32
        return torch.zeros(n, dtype=dtype), torch.zeros((), dtype=dtype), torch.zeros(())

    def cuda_scale_pass(self, grads, *args):
        self.calls.append(("scale_pass", (grads, *args)))
        for ptr in args[0].tolist():
            if ptr in self.targets:
                self.targets[ptr].mul_(2)

    def cuda_clip_finalize(self, *args):
        self.calls.append(("clip_finalize", args))
        per_tensor = args[0]
        return per_tensor.new_ones(()), per_tensor.new_empty(0), per_tensor.new_empty(0), per_tensor.new_zeros(())


@pytest.fixture
def fake_cuda(monkeypatch):
    """The cuda backend loaded over a FakeExtension, as the registry would load it from a CUDA build."""
    fake = FakeExtension()
    monkeypatch.setattr(cpp, "_C", fake)
    monkeypatch.setitem(backends._loaded, "cuda", cuda_backend.load())
    monkeypatch.delitem(backends._reasons, "cuda", raising=False)
    monkeypatch.setattr(ops, "_default", {})
    return fake


def test_a_build_without_the_cuda_kernels_says_so():
    if hasattr(cpp._C, "cuda_norm_pass"):
        pytest.skip("this build has the CUDA kernels")
    assert ops.available_backends()["cuda"] is False
    assert "built without its CUDA kernels" in backends.unavailable_reason("cuda") or cpp._C is None
    with pytest.raises(RuntimeError, match="'cuda' is not available here"):
        ops.norm_pass([torch.randn(3)], backend="cuda")
    assert cpp.cuda_archs() == ()
    assert ops.backend()["cuda_archs"] == ()


def test_load_needs_the_cuda_entries(monkeypatch):
    monkeypatch.setattr(cpp, "_C", object())  # an extension without them
    with pytest.raises(backends.Unavailable, match="AMPCLIP_SKIP_CUDA_BUILD"):
        cuda_backend.load()
    monkeypatch.setattr(cpp, "_C", None)
    with pytest.raises(backends.Unavailable, match="not loaded"):
        cuda_backend.load()
    monkeypatch.setattr(cpp, "_C", FakeExtension())
    assert isinstance(cuda_backend.load(), cuda_backend.CudaBackend)


def test_triton_is_the_default_on_cuda_tensors_and_cuda_cpp_without_it(fake_cuda, monkeypatch):
    assert backends.load("cuda").priority == 15  # below the triton backend's 20, above none on CUDA tensors
    if backends.load("triton") is not None:
        assert backends.load("triton").priority == 20
        assert ops.resolve_backend(None, "cuda") == "triton"
    monkeypatch.setitem(backends._loaded, "triton", None)
    monkeypatch.setitem(backends._reasons, "triton", "not importable here")
    monkeypatch.setattr(ops, "_default", {})
    assert ops.resolve_backend(None, "cuda") == "cuda"
    assert ops.resolve_backend(None, "cpu") != "cuda"  # it never serves CPU tensors
    assert ops.backend()["cuda_archs"] == fake_cuda.cuda_archs()


def test_cpu_tensors_are_a_clear_error(fake_cuda):
    with pytest.raises(RuntimeError, match="'cuda' does not take cpu tensors"):
        ops.norm_pass([torch.randn(3)], backend="cuda")
    with pytest.raises(RuntimeError, match="'cuda' does not take cpu tensors"):
        ops.clip_finalize(torch.ones(2), torch.tensor(1.0), 1.0, backend="cuda")


def test_norm_pass_passes_exact_sections_and_converted_scalars():
    grads = random_grads([(70000,), (3,), (0,), (5, 7)], (torch.float32, torch.bfloat16))
    grads.append(torch.randn(40, 30).t())  # non-contiguous: staged
    fake = FakeExtension()
    per_tensor, total, found_inf = cuda_backend.CudaBackend(fake).norm_pass(
        grads, torch.tensor(0.5, dtype=torch.float64), 3, (-1.0, 2.0))
    (name, args), = fake.calls
    ptrs, numels, codes, chunk_begin, chunk_tensor, chunk, fp64, inv, norm_type, lo, hi = args
    table = tensor_table.tensor_table(grads)
    n, c = len(grads), table.num_chunks
    lengths = (ptrs.numel(), numels.numel(), codes.numel(), chunk_begin.numel(), chunk_tensor.numel())
    assert lengths == (n, n, n, n + 1, c)
    assert c == 6 and chunk == tensor_table.CHUNK  # 70000 elements: 3 chunks; 0 elements: none
    assert numels.tolist() == [g.numel() for g in grads]
    assert ptrs[-1].item() == table.staging[0][1].data_ptr() != grads[-1].data_ptr()
    assert chunk_begin.tolist() == [0, 3, 4, 4, 5, 6]
    assert chunk_tensor.tolist() == [0, 0, 0, 1, 3, 4]
    assert [code & 3 for code in codes.tolist()] == [2, 1, 2, 1, 2]
    assert fp64 is False and norm_type == 3.0 and (lo, hi) == (-1.0, 2.0)
    assert inv.dtype == torch.float32 and inv.item() == 0.5  # the kernels read a float32 inv_scale
    assert per_tensor.shape == (n,) and total.shape == () and found_inf.shape == ()
    # staging copies the current values in before every pass
    assert bitwise_equal(table.staging[0][1], grads[-1].contiguous())


def test_norm_pass_without_unscale_or_clamp_and_with_fp64():
    fake = FakeExtension()
    cuda_backend.CudaBackend(fake).norm_pass([torch.randn(5, dtype=torch.float64), torch.randn(3)], None, math.inf,
                                             None)
    args = fake.calls[0][1]
    assert args[6] is True and args[7] is None and args[8] == math.inf and args[9:] == (None, None)
    with pytest.raises(ValueError, match="norm_type"):
        cuda_backend.CudaBackend(fake).norm_pass([torch.randn(5)], None, 0.0, None)


def test_scale_pass_stages_in_and_out_and_converts_coef():
    base = torch.randn(64, 48)
    grads = [torch.randn(1000), base.t(), torch.randn(7).bfloat16()]
    table = tensor_table.tensor_table(grads)
    fake = FakeExtension(targets=[grads[0], table.staging[0][1], grads[2]])
    want = [g.clone() * 2 for g in grads]
    coef = torch.tensor([[0.5, 0.25, 0.125]], dtype=torch.bfloat16)  # [1, T]: flattened, widened to float32
    cuda_backend.CudaBackend(fake).scale_pass(grads, coef, torch.tensor(0.5), (-1.0, 1.0), torch.tensor(0.0), True)
    (name, args), = fake.calls
    passed_grads, ptrs, numels, codes, chunk_begin, chunk_tensor, chunk, c, inv, lo, hi, found, zero = args
    assert passed_grads is grads  # the entry bumps these tensors' version counters
    assert ptrs.numel() == 3 and chunk_begin.numel() == 4 and chunk_tensor.numel() == table.num_chunks
    assert c.dtype == torch.float32 and c.shape == (3,) and c.tolist() == [0.5, 0.25, 0.125]
    assert inv.dtype == found.dtype == torch.float32 and (lo, hi, zero) == (-1.0, 1.0, True)
    for g, w in zip(grads, want):  # the strided gradient got the staging buffer's doubled values back
        assert bitwise_equal(g, w)


def test_scale_pass_keeps_a_float64_coef_and_passes_none_for_absent_scalars():
    fake = FakeExtension()
    cuda_backend.CudaBackend(fake).scale_pass([torch.randn(5, dtype=torch.float64)],
                                              torch.tensor(0.3, dtype=torch.float64), None, None, None, False)
    args = fake.calls[0][1]
    assert args[7].dtype == torch.float64 and args[8:] == (None, None, None, None, False)


def test_scale_pass_refuses_expanded_and_splits_aliased_gradients():
    fake = FakeExtension()
    adapter = cuda_backend.CudaBackend(fake)
    with pytest.raises(ValueError, match="share memory"):
        adapter.scale_pass([torch.randn(3), torch.randn(1).expand(4)], torch.tensor(0.5), None, None, None, False)
    assert fake.calls == []
    base = torch.randn(100)
    grads = [base[:60], base[40:], torch.randn(8)]
    adapter.scale_pass(grads, torch.tensor([0.5, 0.25, 2.0]), None, None, None, False)
    assert [call[1][0] for call in fake.calls] == [[g] for g in grads]  # one after the other, in order
    assert [call[1][7].item() for call in fake.calls] == [0.5, 0.25, 2.0]


def test_clip_finalize_passes_the_bound_as_a_float64_device_tensor():
    fake = FakeExtension()
    adapter = cuda_backend.CudaBackend(fake)
    per_tensor, total = torch.tensor([3.0, 4.0]), torch.tensor(5.0)
    adapter.clip_finalize(per_tensor, total, 1.5, 0, torch.tensor([0, 1]), 2, 2.0, 1e-6, 1)
    args = fake.calls[-1][1]
    assert args[2].dtype == torch.float64 and args[2].shape == () and args[2].item() == 1.5
    assert args[3:] == (0, None, 0, 2.0, 1e-6, 1)  # no groups outside per-group mode
    adapter.clip_finalize(per_tensor, total, torch.tensor(2.0, dtype=torch.float16), 2,
                          torch.tensor([1, 0], dtype=torch.int32), 2, math.inf, 0.0, 0)
    args = fake.calls[-1][1]
    assert args[2].dtype == torch.float64 and args[2].item() == 2.0
    assert args[4].dtype == torch.int64 and args[4].tolist() == [1, 0] and args[5] == 2
    bound = torch.tensor(0.5)
    adapter.clip_finalize(per_tensor, total, bound, 1, None, 0, 2.0, 1e-6, 0)
    assert fake.calls[-1][1][2] is bound  # float32 on the device already: no copy


def test_clip_finalize_falls_back_to_the_reference_where_the_kernel_cannot_go():
    fake = FakeExtension()
    adapter = cuda_backend.CudaBackend(fake)
    empty = adapter.clip_finalize(torch.zeros(0), torch.tensor(0.0), 1.0, 1, None, 0, 2.0, 1e-6, 0)
    want = reference.clip_finalize(torch.zeros(0), torch.tensor(0.0), 1.0, 1, None, 0, 2.0, 1e-6, 0)
    assert all(bitwise_equal(a, b) for a, b in zip(empty, want))
    adapter.clip_finalize(torch.ones(2), torch.tensor(1.0, dtype=torch.float64), 1.0, 0, None, 0, 2.0, 1e-6, 0)
    assert fake.calls == []  # mixed dtypes: the reference's torch ops, not the kernel


@pytest.mark.skipif(not ops.available_backends()["cuda"], reason="ampclip._C was built without the CUDA kernels")
def test_the_cuda_entries_refuse_cpu_tensors_before_writing():
    # runs on a CUDA build without a GPU too: the host functions check every argument before any launch
    adapter = backends.load("cuda")
    grads = [torch.randn(100)]
    before, version = grads[0].clone(), grads[0]._version
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        adapter.norm_pass(grads, None, 2.0, None)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        adapter.scale_pass(grads, torch.tensor(0.5), None, None, None, False)
    assert bitwise_equal(grads[0], before) and grads[0]._version == version
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        adapter.clip_finalize(torch.ones(2), torch.tensor(1.0), 1.0, 0, None, 0, 2.0, 1e-6, 0)


def test_the_contract_tests_skip_the_cuda_backend_on_cpu_tensors():
    from helpers import CPU_BACKENDS

    assert "cuda" in ops.BACKENDS and "cuda" not in CPU_BACKENDS


# --------------------------------------------------------------------------------------------------- GPU

needs_cuda_kernels = pytest.mark.skipif(not ops.available_backends()["cuda"],
                                        reason="ampclip._C was built without the CUDA kernels")


def _gpt2_xl_shapes(layers=48, d=1600, vocab=50257, ctx=1024):
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d),
                   (d,)]
    return shapes + [(d,), (d,)]


def _cuda_grads(shapes, dtypes, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(s, device="cuda", generator=gen).to(dtypes[i % len(dtypes)]) for i, s in enumerate(shapes)]


def _exact(grads, norm_type, unscale=None):
    """fp64 per-tensor and total norms on the GPU, one tensor at a time."""
    per = []
    for g in grads:
        u = g.double() if unscale is None else g.double() * unscale
        per.append(torch.linalg.vector_norm(u, norm_type) if g.numel() else u.new_zeros(()))
    per = torch.stack(per)
    return per, torch.linalg.vector_norm(per, norm_type)


def _check_norms(grads, norm_type, unscale, rtol):
    inv = None if unscale is None else torch.tensor(unscale, device="cuda")
    per_tensor, total, found_inf = ops.norm_pass(grads, inv, norm_type, backend="cuda")
    exact_per, exact_total = _exact(grads, norm_type, unscale)
    assert found_inf.item() == 0.0
    torch.testing.assert_close(per_tensor.double(), exact_per, rtol=rtol, atol=0)
    torch.testing.assert_close(total.double(), exact_total, rtol=rtol, atol=0)
    return per_tensor, total


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_gpt2_xl_shapes_against_fp64(dtype):
    shapes = _gpt2_xl_shapes() if dtype != torch.float32 else _gpt2_xl_shapes(layers=12)
    grads = _cuda_grads(shapes, (dtype,))
    for norm_type in (2.0, math.inf, 1.0, 3.0):
        # float64 accumulation of every element: only the final rounding to float32 (and exp2/log2 for p = 3)
        per_tensor, total = _check_norms(grads, norm_type, 0.5, 1e-6 if norm_type != 3.0 else 1e-5)
        again = ops.norm_pass(grads, torch.tensor(0.5, device="cuda"), norm_type, backend="cuda")
        assert bitwise_equal(again[0], per_tensor) and bitwise_equal(again[1], total)
    some = grads[:30]
    want = [g.clone() for g in some]
    coef = torch.rand(len(some), device="cuda")
    ops.scale_pass(some, coef, torch.tensor(0.3, device="cuda"), 0.8, backend="cuda")
    reference.scale_pass(want, coef, torch.tensor(0.3, device="cuda"), (-0.8, 0.8), None, False)
    assert all(bitwise_equal(g, w) for g, w in zip(some, want))


@pytest.mark.gpu
@needs_cuda_kernels
def test_gpu_ten_thousand_tiny_mixed_tensors():
    sizes = torch.randint(0, 300, (10_000,), generator=torch.Generator().manual_seed(1)).tolist()
    grads = _cuda_grads([(n,) for n in sizes], (torch.float16, torch.bfloat16, torch.float32))
    _check_norms(grads, 2.0, None, 1e-6)
    want = [g.clone() for g in grads]
    coef = torch.rand(len(grads), device="cuda")
    before = [g._version for g in grads]
    ops.scale_pass(grads, coef, torch.tensor(0.25, device="cuda"), 0.5, backend="cuda")
    reference.scale_pass(want, coef, torch.tensor(0.25, device="cuda"), (-0.5, 0.5), None, False)
    assert all(bitwise_equal(g, w) for g, w in zip(grads, want))
    assert all(g._version > v for g, v in zip(grads, before))  # written through raw pointers: versions bumped


ODD = [(1,), (3,), (4097,), (0,), (65537,), (33, 17), (32768,), (32769,), (2, 3, 5)]


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float16,), (torch.bfloat16,), (torch.float64,),
                                    (torch.float32, torch.float16, torch.bfloat16, torch.float64)],
                         ids=["fp32", "fp16", "bf16", "fp64", "mixed"])
def test_gpu_odd_sizes_misaligned_views_and_strides(dtypes):
    grads = _cuda_grads(ODD, dtypes)
    grads += [_cuda_grads([(5001,)], dtypes)[0][1:], _cuda_grads([(64, 48)], dtypes)[0].t()]  # offset 1, strided
    for norm_type in (2.0, 1.0, math.inf, 0.5):
        _check_norms(grads, norm_type, 0.125, 1e-12 if dtypes == (torch.float64,) else 1e-5)
    for clamp in (None, (-0.25, 0.75), (0.5, 1.0)):
        got = ops.norm_pass(grads, torch.tensor(0.5, device="cuda"), 2.0, clamp, backend="cuda")
        want = reference.norm_pass(grads, torch.tensor(0.5, device="cuda"), 2.0, clamp)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
        twin = [g.clone() for g in grads]
        coef = torch.linspace(0.1, 0.9, len(grads), device="cuda")
        if torch.float64 in dtypes:
            coef = coef.double()
        ops.scale_pass(grads, coef, torch.tensor(0.5, device="cuda"), clamp, backend="cuda")
        reference.scale_pass(twin, coef, torch.tensor(0.5, device="cuda"), clamp, None, False)
        assert all(bitwise_equal(g, t) for g, t in zip(grads, twin))


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
def test_gpu_found_inf_in_every_position(value):
    shapes = [(70001,), (5,), (4097,), (32768 * 2 + 3,)]
    for tensor, position in [(0, 0), (0, 70000), (0, 65536 + 5), (2, 4094), (3, 32768), (3, 65538), (1, 0)]:
        grads = _cuda_grads(shapes, (torch.bfloat16, torch.float32))
        grads[tensor].view(-1)[position] = value
        per_tensor, total, found_inf = ops.norm_pass(grads, torch.tensor(0.5, device="cuda"), 2.0, backend="cuda")
        assert found_inf.item() == 1.0 and not math.isfinite(total.item())
        assert not math.isfinite(per_tensor[tensor].item())
        assert all(math.isfinite(per_tensor[i].item()) for i in range(len(grads)) if i != tensor)
        for zero_if_inf in (False, True):
            twin = [g.clone() for g in grads]
            ops.scale_pass(twin, torch.tensor(0.5, device="cuda"), None, None, found_inf, zero_if_inf, backend="cuda")
            want = [torch.zeros_like(g) if zero_if_inf else g for g in grads]
            assert all(bitwise_equal(t, w) for t, w in zip(twin, want))
    _, _, found_inf = ops.norm_pass([torch.full((100,), 1e20, device="cuda")], None, 2.0, backend="cuda")
    assert found_inf.item() == 0.0  # squares overflow float32, nothing is inf


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_tensor_past_2_pow_31_elements(dtype):
    numel = 2**31 + 3000
    free, _ = torch.cuda.mem_get_info()
    if free < numel * 2 + (2 << 30):
        pytest.skip(f"needs {(numel * 2 + (2 << 30)) / 2**30:.1f} GiB free on the GPU")
    big = torch.randn(numel, device="cuda", dtype=dtype)
    small = torch.randn(5, device="cuda", dtype=dtype)
    exact = torch.zeros((), dtype=torch.float64, device="cuda")
    for part in big.split(1 << 28):
        exact += part.double().square().sum()
    per_tensor, _, found_inf = ops.norm_pass([small, big], None, 2.0, backend="cuda")
    torch.testing.assert_close(per_tensor[1].double(), exact.sqrt(), rtol=1e-6, atol=0)
    assert found_inf.item() == 0.0
    tail = big[-4000:].clone()
    ops.scale_pass([small, big], torch.tensor(0.5, device="cuda"), backend="cuda")
    assert bitwise_equal(big[-4000:], tail * 0.5)  # elements past 2^31 were written
    big[-1] = math.inf
    assert ops.norm_pass([small, big], None, 2.0, backend="cuda")[2].item() == 1.0


@pytest.mark.gpu
@needs_cuda_kernels
def test_gpu_bitwise_deterministic_and_clip_finalize_matches_reference():
    grads = _cuda_grads(ODD + [(300000,), (1000, 77)], (torch.float32, torch.bfloat16, torch.float16))
    inv = torch.tensor(0.3, device="cuda")
    runs = [ops.norm_pass(grads, inv, p, backend="cuda") for p in (2.0, 2.0, 3.0, 3.0)]
    assert all(bitwise_equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert all(bitwise_equal(a, b) for a, b in zip(runs[2], runs[3]))
    tensor_table.clear_cache()  # a rebuilt table over the same addresses gives the same bits
    assert all(bitwise_equal(a, b) for a, b in zip(runs[0], ops.norm_pass(grads, inv, 2.0, backend="cuda")))
    per_tensor, total, _ = runs[0]
    groups = torch.arange(len(grads), device="cuda") % 3
    for mode, kwargs in (("global", {}), ("per_tensor", {}), ("per_group", {"group_index": groups, "num_groups": 3})):
        for rule in ("torch", "max"):
            for bound in (0.5, torch.tensor(0.5, device="cuda")):
                got = ops.clip_finalize(per_tensor, total, bound, mode, norm_type=2.0, rule=rule, backend="cuda",
                                        **kwargs)
                want = reference.clip_finalize(per_tensor, total, bound, ops.MODES[mode], kwargs.get("group_index"),
                                               kwargs.get("num_groups", 0), 2.0, ops.EPS, ops.RULES[rule])
                if mode != "per_group":  # the coefficients, rounded as torch rounds them
                    assert bitwise_equal(got[0], want[0])
                for a, b in zip(got, want):  # group norms combine in float64: an ulp of float32 apart at most
                    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


@pytest.mark.gpu
@needs_cuda_kernels
def test_gpu_cuda_graph_capture_and_replay():
    grads = _cuda_grads([(4097,), (3,), (70000,), (0,)], (torch.float32,)) + _cuda_grads([(1000,)], (torch.float16,))
    grads.append(torch.randn(64, 48, device="cuda").t())  # non-contiguous: its staging buffer is in the graph
    inv = torch.tensor(0.5, device="cuda")

    def step():
        per_tensor, total, found_inf = ops.norm_pass(grads, inv, 2.0, backend="cuda")
        coef = ops.clip_finalize(per_tensor, total, 1.0, backend="cuda")[0]
        ops.scale_pass(grads, coef, inv, None, found_inf, True, backend="cuda")
        return total, found_inf

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: builds and caches the table
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        total, found_inf = step()
    for trial in range(3):
        new = [torch.randn(g.shape, device="cuda").to(g.dtype) for g in grads]
        if trial == 2:
            new[2][123] = math.inf
        for g, v in zip(grads, new):
            g.copy_(v)
        want = [v.clone() for v in new]
        graph.replay()
        torch.cuda.synchronize()
        _, want_total, want_found = reference.norm_pass(want, inv, 2.0)
        reference.scale_pass(want, (1.0 / (total + 1e-6)).clamp(max=1.0), inv, None, want_found, True)
        assert found_inf.item() == want_found.item() == (1.0 if trial == 2 else 0.0)
        if trial < 2:
            torch.testing.assert_close(total, want_total, rtol=1e-6, atol=0)
        assert all(bitwise_equal(g, w) for g, w in zip(grads, want))


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.skipif(not ops.available_backends()["triton"], reason="triton is not installed")
@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.bfloat16, torch.float16, torch.float32)],
                         ids=["fp32", "mixed"])
def test_gpu_triton_and_cuda_agree(dtypes):
    grads = _cuda_grads(_gpt2_xl_shapes(layers=4) + ODD, dtypes)
    grads.append(torch.randn(64, 48, device="cuda").t())
    inv = torch.tensor(1 / 1024, device="cuda")
    for norm_type in (2.0, 1.0, math.inf, 3.0):
        for clamp in (None, 2e-3):
            a = ops.norm_pass(grads, inv, norm_type, clamp, backend="triton")
            b = ops.norm_pass(grads, inv, norm_type, clamp, backend="cuda")
            rtol = 2e-5 if norm_type != 3.0 else 1e-4  # Triton accumulates in float32, CUDA C++ in float64
            torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=0)
            torch.testing.assert_close(a[1], b[1], rtol=rtol, atol=0)
            assert bitwise_equal(a[2], b[2])
    coef = torch.rand(len(grads), device="cuda")
    twin = [g.clone() for g in grads]
    ops.scale_pass(grads, coef, inv, 1e-3, backend="triton")
    ops.scale_pass(twin, coef, inv, 1e-3, backend="cuda")
    assert all(bitwise_equal(g, t) for g, t in zip(grads, twin))  # both round once, as the reference does
