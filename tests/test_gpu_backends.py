"""The GPU backends (triton, cuda) on CUDA tensors at real sizes, against fp64: GPT-2-1.5B shapes, 10,000 tiny
tensors, odd sizes and views, inf/NaN in every position, a tensor past 2^31 elements, bitwise determinism,
CUDA-graph capture and replay, torch.compile, host time per call, and the two backends' agreement. Skipped
without a GPU (``make test-gpu`` runs them with the Triton kernels compiled)."""

import math
import time

import pytest
import torch

from ampclip import ops, reference
from ampclip.backends import tensor_table
from helpers import bitwise_equal

GPU_BACKENDS = ("triton", "cuda")


def on_gpu_backends(test):
    """A GPU test, once per GPU backend (each skipped where it is not available)."""
    backends = [pytest.param(b, marks=pytest.mark.skipif(not ops.available_backends()[b], reason=f"no {b} here"))
                for b in GPU_BACKENDS]
    return pytest.mark.gpu(pytest.mark.parametrize("backend", backends)(test))


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


def _check_norms(backend, grads, norm_type, unscale, rtol):
    """The backend's norms against fp64. CUDA C++ accumulates every element in float64 (``rtol`` as given);
    Triton in float32 lanes folded into float64 per chunk (at least 2e-5)."""
    rtol = rtol if backend == "cuda" else max(rtol, 2e-5)
    inv = None if unscale is None else torch.tensor(unscale, device="cuda")
    per_tensor, total, found_inf = ops.norm_pass(grads, inv, norm_type, backend=backend)
    exact_per, exact_total = _exact(grads, norm_type, unscale)
    assert found_inf.item() == 0.0
    torch.testing.assert_close(per_tensor.double(), exact_per, rtol=rtol, atol=0)
    torch.testing.assert_close(total.double(), exact_total, rtol=rtol, atol=0)
    return per_tensor, total


@on_gpu_backends
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_gpt2_xl_shapes_against_fp64(backend, dtype):
    shapes = _gpt2_xl_shapes() if dtype != torch.float32 else _gpt2_xl_shapes(layers=12)
    grads = _cuda_grads(shapes, (dtype,))
    for norm_type in (2.0, math.inf, 1.0, 3.0):
        # (CUDA C++: float64 accumulation of every element: only the final rounding, and exp2/log2 for p = 3)
        per_tensor, total = _check_norms(backend, grads, norm_type, 0.5, 1e-6 if norm_type != 3.0 else 1e-5)
        again = ops.norm_pass(grads, torch.tensor(0.5, device="cuda"), norm_type, backend=backend)
        assert bitwise_equal(again[0], per_tensor) and bitwise_equal(again[1], total)
    some = grads[:30]
    want = [g.clone() for g in some]
    coef = torch.rand(len(some), device="cuda")
    ops.scale_pass(some, coef, torch.tensor(0.3, device="cuda"), 0.8, backend=backend)
    reference.scale_pass(want, coef, torch.tensor(0.3, device="cuda"), (-0.8, 0.8), None, False)
    assert all(bitwise_equal(g, w) for g, w in zip(some, want))


@on_gpu_backends
def test_gpu_ten_thousand_tiny_mixed_tensors(backend):
    sizes = torch.randint(0, 300, (10_000,), generator=torch.Generator().manual_seed(1)).tolist()
    grads = _cuda_grads([(n,) for n in sizes], (torch.float16, torch.bfloat16, torch.float32))
    _check_norms(backend, grads, 2.0, None, 1e-6)
    want = [g.clone() for g in grads]
    coef = torch.rand(len(grads), device="cuda")
    before = [g._version for g in grads]
    ops.scale_pass(grads, coef, torch.tensor(0.25, device="cuda"), 0.5, backend=backend)
    reference.scale_pass(want, coef, torch.tensor(0.25, device="cuda"), (-0.5, 0.5), None, False)
    assert all(bitwise_equal(g, w) for g, w in zip(grads, want))
    assert all(g._version > v for g, v in zip(grads, before))  # written through raw pointers: versions bumped


ODD = [(1,), (3,), (4097,), (0,), (65537,), (33, 17), (32768,), (32769,), (2, 3, 5)]


@on_gpu_backends
@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float16,), (torch.bfloat16,), (torch.float64,),
                                    (torch.float32, torch.float16, torch.bfloat16, torch.float64)],
                         ids=["fp32", "fp16", "bf16", "fp64", "mixed"])
def test_gpu_odd_sizes_misaligned_views_and_strides(backend, dtypes):
    grads = _cuda_grads(ODD, dtypes)
    grads += [_cuda_grads([(5001,)], dtypes)[0][1:], _cuda_grads([(64, 48)], dtypes)[0].t()]  # offset 1, strided
    for norm_type in (2.0, 1.0, math.inf, 0.5):
        _check_norms(backend, grads, norm_type, 0.125, 1e-12 if dtypes == (torch.float64,) else 1e-5)
    for clamp in (None, (-0.25, 0.75), (0.5, 1.0)):
        got = ops.norm_pass(grads, torch.tensor(0.5, device="cuda"), 2.0, clamp, backend=backend)
        want = reference.norm_pass(grads, torch.tensor(0.5, device="cuda"), 2.0, clamp)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
        twin = [g.clone() for g in grads]
        coef = torch.linspace(0.1, 0.9, len(grads), device="cuda")
        if torch.float64 in dtypes:
            coef = coef.double()
        ops.scale_pass(grads, coef, torch.tensor(0.5, device="cuda"), clamp, backend=backend)
        reference.scale_pass(twin, coef, torch.tensor(0.5, device="cuda"), clamp, None, False)
        assert all(bitwise_equal(g, t) for g, t in zip(grads, twin))


@on_gpu_backends
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
def test_gpu_found_inf_in_every_position(backend, value):
    shapes = [(70001,), (5,), (4097,), (32768 * 2 + 3,)]
    for tensor, position in [(0, 0), (0, 70000), (0, 65536 + 5), (2, 4094), (3, 32768), (3, 65538), (1, 0)]:
        grads = _cuda_grads(shapes, (torch.bfloat16, torch.float32))
        grads[tensor].view(-1)[position] = value
        per_tensor, total, found_inf = ops.norm_pass(grads, torch.tensor(0.5, device="cuda"), 2.0, backend=backend)
        assert found_inf.item() == 1.0 and not math.isfinite(total.item())
        assert not math.isfinite(per_tensor[tensor].item())
        assert all(math.isfinite(per_tensor[i].item()) for i in range(len(grads)) if i != tensor)
        for zero_if_inf in (False, True):
            twin = [g.clone() for g in grads]
            ops.scale_pass(twin, torch.tensor(0.5, device="cuda"), None, None, found_inf, zero_if_inf, backend=backend)
            want = [torch.zeros_like(g) if zero_if_inf else g for g in grads]
            assert all(bitwise_equal(t, w) for t, w in zip(twin, want))
    _, _, found_inf = ops.norm_pass([torch.full((100,), 1e20, device="cuda")], None, 2.0, backend=backend)
    assert found_inf.item() == 0.0  # squares overflow float32, nothing is inf


@on_gpu_backends
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_tensor_past_2_pow_31_elements(backend, dtype):
    numel = 2**31 + 3000
    free, _ = torch.cuda.mem_get_info()
    if free < numel * 2 + (2 << 30):
        pytest.skip(f"needs {(numel * 2 + (2 << 30)) / 2**30:.1f} GiB free on the GPU")
    big = torch.randn(numel, device="cuda", dtype=dtype)
    small = torch.randn(5, device="cuda", dtype=dtype)
    exact = torch.zeros((), dtype=torch.float64, device="cuda")
    for part in big.split(1 << 28):
        exact += part.double().square().sum()
    per_tensor, _, found_inf = ops.norm_pass([small, big], None, 2.0, backend=backend)
    torch.testing.assert_close(per_tensor[1].double(), exact.sqrt(), rtol=1e-6, atol=0)
    assert found_inf.item() == 0.0
    tail = big[-4000:].clone()
    ops.scale_pass([small, big], torch.tensor(0.5, device="cuda"), backend=backend)
    assert bitwise_equal(big[-4000:], tail * 0.5)  # elements past 2^31 were written
    big[-1] = math.inf
    assert ops.norm_pass([small, big], None, 2.0, backend=backend)[2].item() == 1.0


@on_gpu_backends
def test_gpu_bitwise_deterministic_and_clip_finalize_matches_reference(backend):
    grads = _cuda_grads(ODD + [(300000,), (1000, 77)], (torch.float32, torch.bfloat16, torch.float16))
    inv = torch.tensor(0.3, device="cuda")
    runs = [ops.norm_pass(grads, inv, p, backend=backend) for p in (2.0, 2.0, 3.0, 3.0)]
    assert all(bitwise_equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert all(bitwise_equal(a, b) for a, b in zip(runs[2], runs[3]))
    tensor_table.clear_cache()  # a rebuilt table over the same addresses gives the same bits
    assert all(bitwise_equal(a, b) for a, b in zip(runs[0], ops.norm_pass(grads, inv, 2.0, backend=backend)))
    per_tensor, total, _ = runs[0]
    groups = torch.arange(len(grads), device="cuda") % 3
    for mode, kwargs in (("global", {}), ("per_tensor", {}), ("per_group", {"group_index": groups, "num_groups": 3})):
        for rule in ("torch", "max"):
            for bound in (0.5, torch.tensor(0.5, device="cuda")):
                got = ops.clip_finalize(per_tensor, total, bound, mode, norm_type=2.0, rule=rule, backend=backend,
                                        **kwargs)
                want = reference.clip_finalize(per_tensor, total, bound, ops.MODES[mode], kwargs.get("group_index"),
                                               kwargs.get("num_groups", 0), 2.0, ops.EPS, ops.RULES[rule])
                if mode != "per_group":  # the coefficients, rounded as torch rounds them
                    assert bitwise_equal(got[0], want[0])
                for a, b in zip(got, want):  # group norms combine in float64: an ulp of float32 apart at most
                    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


@on_gpu_backends
def test_gpu_cuda_graph_capture_and_replay(backend):
    grads = _cuda_grads([(4097,), (3,), (70000,), (0,)], (torch.float32,)) + _cuda_grads([(1000,)], (torch.float16,))
    grads.append(torch.randn(64, 48, device="cuda").t())  # non-contiguous: its staging buffer is in the graph
    inv = torch.tensor(0.5, device="cuda")

    def step():
        per_tensor, total, found_inf = ops.norm_pass(grads, inv, 2.0, backend=backend)
        coef = ops.clip_finalize(per_tensor, total, 1.0, backend=backend)[0]
        ops.scale_pass(grads, coef, inv, None, found_inf, True, backend=backend)
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
@pytest.mark.skipif(not all(ops.available_backends()[b] for b in GPU_BACKENDS), reason="needs both GPU backends")
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


@on_gpu_backends
def test_host_time_per_call_with_a_cached_table(backend):
    grads = _cuda_grads([(1024,)] * 2000, (torch.float32,))
    coef = torch.tensor(0.5, device="cuda")
    for _ in range(3):  # builds the table, compiles the kernels
        ops.norm_pass(grads, None, 2.0, backend=backend)
        ops.scale_pass(grads, coef, backend=backend)
    torch.cuda.synchronize()
    tables = tensor_table.cache_info()["tables"]
    timings = {}
    for name, call in (("norm", lambda: ops.norm_pass(grads, None, 2.0, backend=backend)),
                       ("scale", lambda: ops.scale_pass(grads, coef, backend=backend))):
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
            torch.cuda.synchronize()
        timings[name] = sorted(times)[len(times) // 2] * 1e6
    print(f"host time per call, 2000 tensors, cached table: {timings} µs (target <= 50)")
    assert tensor_table.cache_info()["tables"] == tables  # no rebuild


@on_gpu_backends
def test_torch_compile_fullgraph(backend):
    grads = _cuda_grads([(4097,), (300, 7), (1,), (1000,)], (torch.float32,) * 3 + (torch.bfloat16,))
    want = [g.clone() for g in grads]

    def clip(gs, max_norm):
        per_tensor, total, found_inf = ops.norm_pass(gs, None, 2.0, backend=backend)
        coef = ops.clip_finalize(per_tensor, total, max_norm, backend=backend)[0]
        ops.scale_pass(gs, coef, None, None, found_inf, False, backend=backend)
        return total

    compiled = torch.compile(clip, fullgraph=True)
    total = compiled(grads, 0.5)
    want_total = clip(want, 0.5)
    assert bitwise_equal(total, want_total)  # the same deterministic kernels, compiled or not
    assert all(bitwise_equal(g, w) for g, w in zip(grads, want))
