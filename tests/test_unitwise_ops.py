"""The ops of adaptive clipping on every backend: the unit-wise norm and scale passes of AGC, AGC's coefficient,
ZClip's step. Against fp64 computations and the reference, with odd shapes, mixed dtypes, strided tensors,
inf/NaN in first, last and middle units; opcheck, torch.compile and the dispatch count.

The Triton kernels run under TRITON_INTERPRET=1 (about a second a pass here): they get a smaller grid."""

import math

import pytest
import torch

import ampclip
from ampclip import ops, reference
from ampclip.backends import unit_layout
from helpers import CPU_BACKENDS, NORMS, bitwise_equal, clone_all, random_grads, rel_close

# Units of every kind: rows of a matrix, of a 3-D and a 4-D tensor, 1-D and 0-d tensors (one unit each),
# zero-size tensors with and without units, a 1-D tensor longer than a Triton segment (two pieces), short rows
# packed several to a segment. About 50,000 elements.
UNIT_SHAPES = [(7, 5), (33, 17), (3,), (), (0,), (4, 0), (0, 3), (2, 3, 5), (36000,), (3, 4097), (5, 1, 1)]
FAST = [b for b in CPU_BACKENDS if b != "triton"]
HAS_TRITON = "triton" in CPU_BACKENDS


def _exact_units(tensors, norm_type, inv_scale=None):
    """Every unit's norm in fp64 on the host."""
    out = []
    for t in tensors:
        u = t.detach().double() * (1.0 if inv_scale is None else inv_scale)
        rows = ops.unit_count(t)
        u = u.reshape(rows, t.numel() // rows if rows else 0)
        out += [0.0 if r.numel() == 0 else float(torch.linalg.vector_norm(r, norm_type)) for r in u]
    return out


def _check_norms(tensors, norm_type, inv_scale, backend, rtol):
    inv = None if inv_scale is None else torch.tensor(inv_scale)
    units, per_tensor, total, found_inf = ops.unit_norm_pass(tensors, inv, norm_type, backend=backend)
    acc = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    assert units.dtype == per_tensor.dtype == total.dtype == acc and found_inf.dtype == torch.float32
    assert units.shape == (sum(ops.unit_count(t) for t in tensors),) and per_tensor.shape == (len(tensors),)
    assert found_inf.item() == 0.0
    for got, want in zip(units.tolist(), _exact_units(tensors, norm_type, inv_scale)):
        assert rel_close(got, want, rtol), (got, want)
    for got, t in zip(per_tensor.tolist(), tensors):
        assert rel_close(got, reference.exact_norm([t], norm_type, inv_scale), rtol)
    assert rel_close(total.item(), reference.exact_norm(tensors, norm_type, inv_scale), rtol)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("norm_type", NORMS)
@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float16,), (torch.bfloat16,), (torch.float64,),
                                    (torch.float32, torch.float16, torch.bfloat16)],
                         ids=["fp32", "fp16", "bf16", "fp64", "mixed"])
@pytest.mark.parametrize("unscale", [None, 1 / 1024], ids=["plain", "unscale"])
def test_unit_norm_pass_matches_fp64(backend, norm_type, dtypes, unscale):
    tensors = random_grads(UNIT_SHAPES, dtypes, scale=3.0, noncontiguous_every=3)
    rtol = 5e-5 if norm_type == 3.0 else 2e-6
    _check_norms(tensors, norm_type, unscale, backend, rtol if backend == "cpp" else 1e-4)


@pytest.mark.skipif(not HAS_TRITON, reason="triton cannot run here")
@pytest.mark.parametrize("norm_type, dtypes, unscale", [
    pytest.param(2.0, (torch.float32, torch.float16, torch.bfloat16), 1 / 1024, id="p2-mixed-unscale"),
    pytest.param(math.inf, (torch.bfloat16,), None, id="pinf-bf16"),
    pytest.param(1.0, (torch.float16,), None, id="p1-fp16"),
    pytest.param(3.0, (torch.float64,), 0.5, id="p3-fp64-unscale"),
])
def test_unit_norm_pass_matches_fp64_triton(norm_type, dtypes, unscale, monkeypatch):
    from ampclip.triton_kernels import unitwise

    monkeypatch.setattr(unitwise.fused_norm, "SCRATCH_FILL", math.nan)  # an unwritten slot would poison a norm
    tensors = random_grads(UNIT_SHAPES, dtypes, scale=3.0, noncontiguous_every=3)
    _check_norms(tensors, norm_type, unscale, "triton", 5e-5 if norm_type == 3.0 else 2e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_rows_longer_than_a_segment(backend):
    # Two rows of 33,000 elements: each row is two Triton segments, reduced slot by slot; on the CPU two work
    # chunks of one span.
    tensors = [torch.randn(2, 33000) * torch.tensor([[1.0], [100.0]]), torch.randn(4, 3)]
    _check_norms(tensors, 2.0, 0.25, backend, 2e-6)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's NumPy, on inf * inf
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("where", ["first", "last", "middle"])
def test_unit_found_inf_is_exact(backend, value, where):
    tensors = random_grads([(9, 40), (37000,), (6,)], (torch.float32, torch.bfloat16))
    index, unit, flat = {"first": (0, 0, 0), "last": (2, 10, 5), "middle": (1, 9, 36999)}[where]
    tensors[index].view(-1)[flat] = value
    units, per_tensor, total, found_inf = ops.unit_norm_pass(tensors, torch.tensor(0.5), 2.0, backend=backend)
    assert found_inf.item() == 1.0
    bad = units.isnan() if math.isnan(value) else units.isinf()
    assert bad.nonzero().flatten().tolist() == [unit]  # the other units keep finite norms
    assert not math.isfinite(per_tensor[index].item()) and not math.isfinite(total.item())
    # a finite value whose square overflows float32 is not inf/NaN, and its norm is right
    big = [torch.full((3, 100), 1e20), torch.randn(5)]
    big[0][1] = torch.randn(100)  # only rows 0 and 2 overflow: each row is re-summed on its own
    units, _, total, found_inf = ops.unit_norm_pass(big, None, 2.0, backend=backend)
    assert found_inf.item() == 0.0 and rel_close(units[0].item(), 1e21, 1e-6) and rel_close(units[2].item(), 1e21, 1e-6)
    assert rel_close(units[1].item(), big[0][1].double().norm().item(), 1e-5)
    # an unscale that overflows is caught: the check sees the unscaled values
    assert ops.unit_norm_pass([torch.full((2, 2), 3e38)], torch.tensor(4.0), 2.0, backend=backend)[3].item() == 1.0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_unit_norm_pass_is_bitwise_deterministic(backend):
    tensors = random_grads([(40, 300), (37000,), (3,)], (torch.float32, torch.bfloat16))
    first = ops.unit_norm_pass(tensors, torch.tensor(0.3), 2.0, backend=backend)
    second = ops.unit_norm_pass(clone_all(tensors), torch.tensor(0.3), 2.0, backend=backend)
    assert all(bitwise_equal(a, b) for a, b in zip(first, second))


# ------------------------------------------------------------------------------------------ the scale pass


def _unit_coefs(tensors, seed=0):
    gen = torch.Generator().manual_seed(seed)
    count = sum(ops.unit_count(t) for t in tensors)
    coef = torch.rand(count, generator=gen) * 0.9 + 0.05
    coef[::3] = 1.0  # units left alone
    return coef


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float16, torch.bfloat16), (torch.float64,)],
                         ids=["mixed", "fp64"])
@pytest.mark.parametrize("unscale", [None, 0.125], ids=["plain", "unscale"])
def test_unit_scale_pass_matches_fp64_and_the_reference_bit_for_bit(backend, dtypes, unscale):
    tensors = random_grads(UNIT_SHAPES, dtypes, scale=2.0, noncontiguous_every=3)
    twin, before = clone_all(tensors), clone_all(tensors)
    coef = _unit_coefs(tensors)
    if torch.float64 in dtypes:
        coef = coef.double()
    inv = None if unscale is None else torch.tensor(unscale)
    ops.unit_scale_pass(tensors, coef, inv, backend=backend)
    ops.unit_scale_pass(twin, coef, inv, backend="reference")
    offset = 0
    for g, g2, g0 in zip(tensors, twin, before):
        rows = ops.unit_count(g0)
        c = coef[offset : offset + rows].double()
        offset += rows
        want = (g0.double().reshape(rows, -1 if rows else 0) * (1.0 if unscale is None else unscale) * c[:, None])
        tol = {torch.float64: 1e-12, torch.float32: 2e-7}.get(g.dtype, 1e-2)
        torch.testing.assert_close(g, want.reshape(g0.shape).to(g.dtype), rtol=tol, atol=1e-30)
        assert bitwise_equal(g, g2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("zero_if_inf", [False, True], ids=["leave", "zero"])
def test_unit_scale_pass_on_found_inf(backend, zero_if_inf):
    tensors = random_grads([(5, 7), (37000,), (1,)], (torch.float32, torch.float16))
    tensors[1][0] = math.nan
    before = clone_all(tensors)
    coef = torch.full((7,), 0.5)
    ops.unit_scale_pass(tensors, coef, torch.tensor(2.0), torch.tensor(1.0), zero_if_inf, backend=backend)
    for g, g0 in zip(tensors, before):
        assert bitwise_equal(g, torch.zeros_like(g0) if zero_if_inf else g0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_unit_scale_pass_with_unit_coefs_leaves_bits_alone(backend):
    tensors = random_grads([(6, 9), (100,)], (torch.float32, torch.bfloat16))
    tensors[0][0, 0] = math.nan
    tensors[1][-1] = -0.0
    before = clone_all(tensors)
    ops.unit_scale_pass(tensors, torch.ones(7), backend=backend)
    assert all(bitwise_equal(g, g0) for g, g0 in zip(tensors, before))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_unit_scale_pass_on_gradients_that_share_memory(backend):
    # As torch's per-tensor ops: a tensor that is the .grad of two parameters is scaled twice, one after the
    # other, and overlapping views see each other's writes.
    base = torch.randn(12, 10)
    shared = torch.randn(3, 4)
    tensors = [shared, base[:8], shared, base[5:]]
    coef = torch.cat([torch.tensor([0.5, 0.25, 2.0]), torch.linspace(0.1, 0.8, 8), torch.tensor([0.5, 0.25, 2.0]),
                      torch.linspace(1.5, 0.2, 7)])
    want_shared, want_base = shared.clone(), base.clone()
    want_shared.mul_(coef[:3, None]).mul_(coef[11:14, None])
    want_base[:8].mul_(coef[3:11, None])
    want_base[5:].mul_(coef[14:, None])
    ops.unit_scale_pass(tensors, coef, backend=backend)
    assert bitwise_equal(shared, want_shared) and bitwise_equal(base, want_base)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_unit_ops_bad_input_raises_before_anything_is_written(backend):
    good = torch.randn(4, 3)
    before = good.clone()
    with pytest.raises((ValueError, RuntimeError), match="coef"):
        ops.unit_scale_pass([good], torch.ones(5), backend=backend)
    with pytest.raises(TypeError, match="dtype|float16"):
        ops.unit_scale_pass([good, torch.ones(3, dtype=torch.int32)], torch.ones(5), backend=backend)
    with pytest.raises(ValueError, match="share memory"):
        ops.unit_scale_pass([good, torch.randn(1).expand(5)], torch.ones(5), backend=backend)
    with pytest.raises(ValueError, match="device|meta|CPU"):
        ops.unit_scale_pass([good, torch.randn(3, device="meta")], torch.ones(5), backend=backend)
    with pytest.raises(TypeError, match="dtype|float16"):
        ops.unit_norm_pass([good, torch.ones(3, dtype=torch.int64)], backend=backend)
    with pytest.raises(ValueError, match="one entry per unit"):
        ops.unit_clip_finalize(torch.ones(3), torch.ones(4), 0.01, 1e-3, backend=backend)
    assert bitwise_equal(good, before)


# ------------------------------------------------------------------------------------------ AGC's coefficient


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 3.0], ids=["p2", "pinf", "p3"])
def test_unit_clip_finalize_follows_timms_rule_bit_for_bit(backend, dtype, norm_type):
    gen = torch.Generator().manual_seed(5)
    n = 3000
    param = (torch.rand(n, generator=gen) * 2).to(dtype)
    param[:10] = 0.0  # below eps: the bound is eps * clip_factor
    param[10] = math.inf  # a unit left out (infinite bound)
    grad = (torch.rand(n, generator=gen) * 0.05).to(dtype)
    grad[20:25] = torch.tensor([0.0, 1e-9, 1e-7, 3e-6, 1e30], dtype=dtype)
    coef, post = ops.unit_clip_finalize(param, grad, 0.01, 1e-3, norm_type, backend=backend)
    bound = param.clamp(min=1e-3) * 0.01
    want = torch.where(grad < bound, torch.ones_like(grad), bound / grad.clamp(min=1e-6))
    assert coef.dtype == dtype and bitwise_equal(coef, want)
    assert coef[10].item() == 1.0 and (coef < 1).any() and (coef == 1).any()
    want_post = reference.exact_norm([grad.double() * want.double()], norm_type)
    assert post.dtype == dtype and rel_close(post.item(), want_post, 1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_unit_clip_finalize_propagates_nan(backend):
    coef, post = ops.unit_clip_finalize(torch.tensor([1.0, 1.0, math.nan]), torch.tensor([math.nan, 0.5, 0.5]),
                                        0.1, 1e-3, 2.0, backend=backend)
    assert math.isnan(coef[0].item()) and coef[1].item() == pytest.approx(0.2) and math.isnan(coef[2].item())
    assert math.isnan(post.item())


# ------------------------------------------------------------------------------------------ ZClip's step


def _zclip_run(backend, rule, skip, warmup, steps, cap):
    gen = torch.Generator().manual_seed(11)
    state = torch.zeros(4, dtype=torch.float64)
    buffer = torch.zeros(max(warmup, 1), dtype=torch.float64)
    bounds, states = [], []
    for step in range(steps):
        norm = 1.0 + 0.2 * torch.rand((), generator=gen)
        if step % 9 == 7:
            norm = norm * 30  # a spike
        found = torch.tensor(1.0 if step == 12 else 0.0)  # an overflowing step: no state change
        total = torch.tensor(math.inf) if step == 15 else norm.float()
        bounds.append(ops.zclip_update(state, buffer, total, found, 0.9, 2.0, cap, 1e-6, rule, 0.8, skip,
                                       backend=backend))
        states.append(state.clone())
    return torch.stack(bounds), torch.stack(states), buffer


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("rule", ["adaptive_scaling", "mean", "percentile"])
@pytest.mark.parametrize("skip", [False, True], ids=["update", "skip"])
def test_zclip_update_agrees_with_the_reference(backend, rule, skip):
    steps = 24 if backend == "triton" else 60
    got = _zclip_run(backend, rule, skip, 5, steps, 20.0)
    want = _zclip_run("reference", rule, skip, 5, steps, 20.0)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-15)
    assert torch.equal(got[2], want[2])
    bounds, states = want[0], want[1]
    assert states[-1, ops.ZCLIP_READY] == 1.0 and states[3, ops.ZCLIP_READY] == 0.0
    assert (bounds[:5] == 20.0).all()  # the warm-up bound is the cap
    spikes = bounds[5:] < 20.0
    assert spikes.any() and not spikes.all()  # spikes clipped below the cap, calm steps not at all
    assert torch.equal(states[12], states[11]) and torch.equal(states[15], states[14])  # no state change


def test_zclip_update_rejects_a_bad_state():
    with pytest.raises(ValueError, match="float64 state"):
        ops.zclip_update(torch.zeros(4), torch.zeros(3, dtype=torch.float64), torch.tensor(1.0), torch.tensor(0.0),
                         0.9, 2.0, 1.0, 1e-6)


# ------------------------------------------------------------------------------------------ registration


@pytest.mark.parametrize("backend", CPU_BACKENDS)  # the Triton kernels under the interpreter: small inputs
@pytest.mark.parametrize("unscale", [False, True], ids=["plain", "unscale"])
def test_opcheck_unit_ops(backend, unscale):
    tensors = random_grads([(5, 3), (7,), (2, 3, 4)], (torch.float32, torch.bfloat16))
    inv = torch.tensor(0.5) if unscale else None
    torch.library.opcheck(torch.ops.ampclip.unit_norm_pass.default, (tensors, inv, 2.0, backend))
    coef = torch.rand(8)
    torch.library.opcheck(torch.ops.ampclip.unit_scale_pass.default,
                          (tensors, coef, inv, torch.tensor(0.0), False, backend))
    torch.library.opcheck(torch.ops.ampclip.unit_clip_finalize.default,
                          (torch.rand(8), torch.rand(8) * 0.02, 0.01, 1e-3, 2.0, backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_zclip_update(backend):
    state = torch.tensor([1.0, 0.04, 1.0, 5.0], dtype=torch.float64)
    args = (state, torch.rand(5, dtype=torch.float64), torch.tensor(3.0), torch.tensor(0.0), 0.97, 2.5, 10.0, 1e-6, 0,
            1.0, False, backend)
    torch.library.opcheck(torch.ops.ampclip.zclip_update.default, args)


def test_an_agc_step_compiles_with_fullgraph():
    def agc(params, grads, inv_scale):
        param_units = ops.unit_norm_pass(params, None, 2.0)[0]
        grad_units, _, total, found_inf = ops.unit_norm_pass(grads, inv_scale, 2.0)
        coef, _ = ops.unit_clip_finalize(param_units, grad_units, 0.01, 1e-3, 2.0)
        ops.unit_scale_pass(grads, coef, inv_scale, found_inf, False)
        return total

    params = random_grads([(6, 4), (5,)], seed=1)
    grads = [g * 0.1 for g in random_grads([(6, 4), (5,)], seed=2)]
    twin = clone_all(grads)
    compiled = torch.compile(agc, fullgraph=True, backend="aot_eager")
    inv = torch.tensor(0.5)
    assert torch.equal(compiled(params, grads, inv), agc(params, twin, inv))
    assert all(torch.equal(a, b) for a, b in zip(grads, twin))


def test_a_zclip_step_compiles_with_fullgraph():
    def step(state, warmup, total):
        return ops.zclip_update(state, warmup, total, torch.zeros(()), 0.97, 2.5, 1.0, 1e-6)

    state, warmup = torch.zeros(4, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    twin_state, twin_warmup = state.clone(), warmup.clone()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for value in (1.0, 1.1, 0.9, 5.0):
        total = torch.tensor(value)
        assert torch.equal(compiled(state, warmup, total), step(twin_state, twin_warmup, total))
    assert torch.equal(state, twin_state) and torch.equal(warmup, twin_warmup)


@pytest.mark.skipif(not HAS_TRITON, reason="triton cannot run here")
def test_unit_layouts_are_cached_per_table():
    from ampclip.backends.tensor_table import tensor_table

    grads = random_grads([(5, 3), (40000,)])
    ops.unit_norm_pass(grads, backend="triton")
    layout = unit_layout.unit_layout(tensor_table(grads), grads)
    ops.unit_norm_pass(grads, backend="triton")
    assert unit_layout.unit_layout(tensor_table(grads), grads) is layout
    assert layout.num_units == 6 and layout.num_segments == 3 and layout.max_slots == 2


def test_backends_without_unit_kernels_fall_back_to_the_reference():
    # A backend that implements only the two gradient passes (the concurrent CUDA C++ one, say) inherits the
    # unit-wise ops and ZClip's step from the base class: the reference's torch ops, on any device.
    from ampclip import backends

    for op in ("unit_norm_pass", "unit_scale_pass", "unit_clip_finalize", "zclip_update"):
        assert callable(getattr(backends.Backend, op))

    class Minimal(backends.Backend):
        name = "minimal"

    tensors = random_grads([(3, 4), (5,)])
    got = Minimal().unit_norm_pass(tensors, None, 2.0)
    want = reference.unit_norm_pass(tensors, None, 2.0)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert ampclip.ops.unit_count(torch.zeros(4, 5, 6)) == 4 and ampclip.ops.unit_count(torch.zeros(7)) == 1
