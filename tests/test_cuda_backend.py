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

    @staticmethod
    def _zero_norms(args):
        """(per_tensor, total, found_inf) of zeros, as a norm pass over the table in ``args`` returns them."""
        n, fp64 = args[0].numel(), args[6]
        dtype = torch.float64 if fp64 else torch.float32
        return torch.zeros(n, dtype=dtype), torch.zeros((), dtype=dtype), torch.zeros(())

    def cuda_norm_pass(self, *args):
        self.calls.append(("norm_pass", args))
        return self._zero_norms(args)

    def cuda_clip_norm_pass(self, *args):
        self.calls.append(("clip_norm_pass", args))
        per_tensor, total, found_inf = self._zero_norms(args)
        one = torch.ones((), dtype=total.dtype)
        return per_tensor, total, found_inf, one, total.clone(), one.clone()

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
    ptrs, numels, codes, chunk_begin, chunk_tensor, chunk, fp64, tickets, num_filled, inv, norm_type, lo, hi = args
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
    # the counters of the finishing blocks: one per tensor and one for the launch, drawn by the 4 that own a chunk
    assert tickets is table.tickets and tickets.dtype == torch.int32 and tickets.shape == (n + 1,)
    assert num_filled == 4
    assert inv.dtype == torch.float32 and inv.item() == 0.5  # the kernels read a float32 inv_scale
    assert per_tensor.shape == (n,) and total.shape == () and found_inf.shape == ()
    # staging copies the current values in before every pass
    assert bitwise_equal(table.staging[0][1], grads[-1].contiguous())


def test_norm_pass_without_unscale_or_clamp_and_with_fp64():
    fake = FakeExtension()
    cuda_backend.CudaBackend(fake).norm_pass([torch.randn(5, dtype=torch.float64), torch.randn(3)], None, math.inf,
                                             None)
    args = fake.calls[0][1]
    assert args[6] is True and args[8] == 2 and args[9] is None and args[10] == math.inf and args[11:] == (None, None)
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


def test_a_global_clip_is_one_call_and_a_per_tensor_one_the_norm_pass_and_the_finalize():
    fake = FakeExtension()
    adapter = cuda_backend.CudaBackend(fake)
    grads = random_grads([(5,), (0,), (70000,)])
    out = adapter.clip_norm_pass(grads, torch.tensor(0.25), 2.0, None, 0.75, 0, 1e-6, 1)
    (name, args), = fake.calls
    assert name == "clip_norm_pass" and len(out) == 6
    table = tensor_table.tensor_table(grads)
    assert args[7] is table.tickets and args[8] == 2 and args[9].item() == 0.25 and args[10] == 2.0
    assert args[13:] == (0.75, 1e-6, 1)  # the bound, eps and rule as numbers: no device scalar to fill
    fake.calls.clear()
    adapter.clip_norm_pass(grads, None, 2.0, None, 0.75, 1, 1e-6, 0)
    assert [name for name, _ in fake.calls] == ["norm_pass", "clip_finalize"]


def test_the_passes_on_a_table_take_it_as_it_is_and_bump_nothing():
    grads = random_grads([(5,), (0,), (70000,)])
    table = tensor_table.tensor_table(grads)
    fake = FakeExtension(targets=grads)
    want = [g.clone() * 2 for g in grads]
    adapter = cuda_backend.CudaBackend(fake)
    per_tensor, total, found_inf, coef, post, grad_scale = adapter.clip_norm_pass_on_table(
        table, torch.tensor(0.5), 2.0, (-1.0, 1.0), 0.75, 0, 1e-6, 1)
    adapter.scale_pass_on_table(table, coef, torch.tensor(0.5), (-1.0, 1.0), found_inf, True)
    assert [name for name, _ in fake.calls] == ["clip_norm_pass", "scale_pass"]
    norm_args, scale_args = fake.calls[0][1], fake.calls[1][1]
    assert norm_args[7] is table.tickets and norm_args[9].item() == 0.5 and norm_args[11:] == (-1.0, 1.0, 0.75, 1e-6, 1)
    # the caller bumped the versions as it found the table (ops.steady_clip): the entry is given no gradient
    assert scale_args[0] == () and scale_args[1].data_ptr() == table.exact_sections()[0].data_ptr()
    assert scale_args[7] is coef and scale_args[8].item() == 0.5 and scale_args[9:] == (-1.0, 1.0, found_inf, True)
    assert all(bitwise_equal(g, w) for g, w in zip(grads, want))  # the pass wrote through the table's pointers
    assert per_tensor.shape == (3,) and total.shape == post.shape == grad_scale.shape == ()


def test_clip_finalize_fills_a_number_bound_once():
    fake = FakeExtension()
    adapter = cuda_backend.CudaBackend(fake)
    per_tensor, total = torch.tensor([3.0, 4.0]), torch.tensor(5.0)
    for _ in range(2):
        adapter.clip_finalize(per_tensor, total, 0.5, 2, torch.tensor([0, 1]), 2, 2.0, 1e-6, 0)
    first, second = fake.calls[0][1][2], fake.calls[1][1][2]
    assert first is second and first.item() == 0.5  # the same device scalar: no fill in steady state
    adapter.clip_finalize(per_tensor, total, 0.25, 2, torch.tensor([0, 1]), 2, 2.0, 1e-6, 0)
    assert fake.calls[-1][1][2].item() == 0.25


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

needs_cuda_kernels = pytest.mark.skipif(not (torch.cuda.is_available() and ops.available_backends()["cuda"]),
                                        reason="needs a GPU and ampclip._C built with the CUDA kernels")


def _steady_launches(fn):
    """``(kernels the CUDA functions launched, aten ops that launch a kernel)`` in one call of ``fn``, after a
    first call that builds its tables and caches."""
    from helpers import counted_launches

    fn()
    before = cpp._C.cuda_launch_count()
    with counted_launches() as aten:
        fn()
    return cpp._C.cuda_launch_count() - before, aten


def _cuda_params(count):
    params = [torch.nn.Parameter(torch.randn(7, device="cuda")) for _ in range(count)]
    for p in params:
        p.grad = torch.randn(7, device="cuda") * 10
    return params


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("tensors", [3, 64])
def test_gpu_a_clip_is_two_launches_three_per_tensor_and_per_group_one_deferred(tensors):
    import ampclip

    params = _cuda_params(tensors)
    inv = torch.tensor(0.5, device="cuda")
    assert _steady_launches(lambda: ampclip.clip_grad_norm_(params, 1.0, backend="cuda")) == (2, [])
    want = {"global": 2, "per_tensor": 3, "per_group": 3}  # norm pass (+ clip_finalize per tensor or group) + scale
    for mode, launches in want.items():
        groups = [params[::2], params[1::2]] if mode == "per_group" else None
        clipper = ampclip.FusedClipper(params, max_norm=1.0, mode=mode, groups=groups, backend="cuda")
        assert _steady_launches(lambda clipper=clipper: clipper.clip_(inv)) == (launches, []), mode
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
    clipper = ampclip.FusedClipper(params, max_norm=1.0, backend="cuda")
    assert _steady_launches(lambda: clipper.clip_(inv, defer_to=optimizer)) == (1, [])


@pytest.mark.gpu
@needs_cuda_kernels
def test_gpu_a_steady_clip_gathers_nothing_and_equals_the_general_one(monkeypatch):
    import ampclip

    params, twin = _cuda_params(300), _cuda_params(300)
    for p, q in zip(params, twin):
        q.grad.copy_(p.grad)
    inv = torch.tensor(0.5, device="cuda")
    clipper, twin_clipper = (ampclip.FusedClipper(ps, max_norm=1.0, backend="cuda") for ps in (params, twin))
    with monkeypatch.context() as general_only:
        general_only.setattr(ops, "steady_clip", lambda *args, **kwargs: None)
        want = [twin_clipper.clip_(inv) for _ in range(2)]
    clipper.clip_(inv)  # builds the table
    for name in ("gathered", "present_grads"):
        monkeypatch.setattr(ops, name, lambda *args: pytest.fail("the steady clip gathered the gradients"))
    got = clipper.clip_(inv)
    for field in ("total_norm", "clip_coef", "post_clip_norm", "found_inf", "per_tensor_norms"):
        assert bitwise_equal(getattr(got, field), getattr(want[1], field)), field
    for p, q in zip(params, twin):
        assert bitwise_equal(p.grad, q.grad)


@pytest.mark.gpu
@needs_cuda_kernels
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0], ids=["p2", "p1", "pinf", "p3"])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.bfloat16, torch.float16), (torch.float64, torch.float32)],
                         ids=["mixed", "fp64"])
def test_gpu_the_fused_clip_equals_the_norm_pass_then_the_finalize_and_leaves_its_counters_at_zero(norm_type, dtypes):
    grads = [g.cuda() for g in random_grads([(3,), (0,), (70000,), (33, 17), (0,), (1,), (200000,)], dtypes, seed=5)]
    inv = torch.tensor(0.25, device="cuda")
    exact = reference.exact_norm([g.cpu() for g in grads], norm_type, inv.cpu())
    max_norm = 0.5 * exact
    out = ops.clip_norm_pass(grads, inv, norm_type, max_norm=max_norm, backend="cuda")
    per, total, found, coef, post, grad_scale = out
    per2, total2, found2 = ops.norm_pass(grads, inv, norm_type, backend="cuda")
    coef2, _, _, post2 = ops.clip_finalize(per2, total2, max_norm, "global", norm_type=norm_type, backend="cuda")
    for a, b in ((per, per2), (total, total2), (found, found2), (coef, coef2), (post, post2)):
        assert bitwise_equal(a, b), (a, b)
    assert found.item() == 0.0 and 0 < coef.item() < 1
    assert abs(total.item() - exact) <= 1e-5 * exact
    assert bitwise_equal(grad_scale.cpu(), (inv.cpu().to(coef.dtype) * coef.cpu()).reciprocal())
    table = tensor_table.tensor_table(grads)
    assert int(table.tickets.abs().sum()) == 0, table.tickets  # every finisher reset its counter
    again = ops.clip_norm_pass(grads, inv, norm_type, max_norm=max_norm, backend="cuda")
    assert all(bitwise_equal(a, b) for a, b in zip(out, again))  # deterministic, counters ready for the next
    # inf in the first element of the largest tensor: found, and torch's coefficient of an inf norm
    grads[-1][0] = math.inf
    _, total, found, coef, _, _ = ops.clip_norm_pass(grads, inv, norm_type, max_norm=max_norm, backend="cuda")
    assert found.item() == 1.0 and math.isinf(total.item()) and coef.item() == 0.0


@pytest.mark.gpu
@needs_cuda_kernels
def test_gpu_a_list_of_zero_size_tensors_is_one_launch_of_zero_norms():
    grads = [torch.zeros(0, device="cuda"), torch.zeros(3, 0, device="cuda")]
    launches, aten = _steady_launches(lambda: ops.clip_norm_pass(grads, max_norm=1.0, backend="cuda"))
    assert (launches, aten) == (1, [])
    per, total, found, coef, post, grad_scale = ops.clip_norm_pass(grads, max_norm=1.0, backend="cuda")
    assert per.tolist() == [0.0, 0.0] and total.item() == 0.0 and found.item() == 0.0
    assert coef.item() == 1.0 and post.item() == 0.0 and grad_scale.item() == 1.0
