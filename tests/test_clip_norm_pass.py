"""``ops.clip_norm_pass``: the norm pass and the clip coefficient in one op, on every backend; on the Triton
backend one launch, whose last program finishes the norms and computes the coefficient (a global clip is that
launch and the scale pass).

Each backend's fused op must give what its own ``norm_pass`` then ``clip_finalize`` give, bit for bit (the
reductions keep their order), every output must be written over poisoned scratch, the ticket counters must be
back at zero after every launch, and inf/NaN anywhere must come out as found_inf with torch's coefficient.
"""

import math

import pytest
import torch

from ampclip import ops, reference
from ampclip.backends import tensor_table
from helpers import CPU_BACKENDS, DTYPE_MIXES, ODD_SHAPES, bitwise_equal, put_nonfinite, random_grads, rel_close

MODES = ["global", "per_tensor"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtypes", DTYPE_MIXES)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0], ids=["p2", "p1", "pinf", "p3"])
def test_the_fused_pass_equals_the_norm_pass_then_the_finalize(backend, mode, dtypes, norm_type):
    grads = random_grads(ODD_SHAPES, dtypes, seed=4)
    inv = torch.tensor(0.25)
    max_norm = 0.5 * reference.exact_norm(grads, norm_type, inv)  # a bound that clips
    per, total, found, coef, post, grad_scale = ops.clip_norm_pass(grads, inv, norm_type, max_norm=max_norm, mode=mode,
                                                                   backend=backend)
    per2, total2, found2 = ops.norm_pass(grads, inv, norm_type, backend=backend)
    coef2, _, _, post2 = ops.clip_finalize(per2, total2, max_norm, mode, norm_type=norm_type, backend=backend)
    for a, b in ((per, per2), (total, total2), (found, found2), (coef, coef2)):
        assert bitwise_equal(a, b), (a, b)
    assert rel_close(post.item(), post2.item(), 1e-12)
    assert rel_close(total.item(), reference.exact_norm(grads, norm_type, inv), 1e-5)
    if mode == "global":
        assert bitwise_equal(grad_scale, (inv.to(coef.dtype) * coef).reciprocal())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("value", [math.inf, math.nan], ids=["inf", "nan"])
@pytest.mark.parametrize("where", [(0, "first"), (3, "last"), (4, "tail")], ids=["first", "last", "tail"])
def test_a_nonfinite_value_anywhere_is_found(backend, value, where):
    grads = random_grads([(5,), (4097,), (3, 7), (65536 + 1000,), (1500,)], seed=2)
    put_nonfinite(grads, *where, value)
    _, total, found, coef, _, _ = ops.clip_norm_pass(grads, max_norm=1.0, backend=backend)
    want = torch.nn.utils.get_total_norm(grads)
    assert found.item() == 1.0 and (math.isnan(total.item()) if value != value else math.isinf(total.item()))
    assert bitwise_equal(coef, torch.clamp(1.0 / (want + 1e-6) * 1.0, max=1.0).to(coef.dtype)) or math.isnan(coef)


@pytest.mark.parametrize("mode", MODES)
def test_triton_is_one_launch_that_writes_every_output_and_leaves_its_counters_at_zero(monkeypatch, mode):
    if "triton" not in CPU_BACKENDS:
        pytest.skip("the Triton interpreter cannot run here")
    from ampclip.triton_kernels import fused_norm
    from helpers import counted_launches

    grads = random_grads([(3,), (0,), (70000,), (33, 17), (0,), (1,)], (torch.float32, torch.bfloat16))
    ops.clip_norm_pass(grads, max_norm=0.1, mode=mode, backend="triton")  # builds the table
    with counted_launches() as launches:
        ops.clip_norm_pass(grads, max_norm=0.1, mode=mode, backend="triton")
    assert launches == ["triton._fused_norm_kernel"]
    monkeypatch.setattr(fused_norm, "SCRATCH_FILL", math.nan)  # an unwritten partial would poison the result
    out = ops.clip_norm_pass(grads, max_norm=0.1, mode=mode, backend="triton")
    want = ops.clip_norm_pass(grads, max_norm=0.1, mode=mode, backend="reference")
    for got, ref in zip(out, want):
        assert torch.allclose(got.double(), ref.double(), rtol=1e-6, equal_nan=False), (got, ref)
    table = tensor_table.tensor_table(grads)
    assert int(table.tickets.abs().sum()) == 0, table.tickets
    again = ops.clip_norm_pass(grads, max_norm=0.1, mode=mode, backend="triton")
    assert all(bitwise_equal(a, b) for a, b in zip(out, again))  # deterministic, counters ready for the next


def test_only_zero_size_tensors_and_no_tensor_give_zero_norms():
    for backend in CPU_BACKENDS:
        for grads in ([torch.zeros(0), torch.zeros(3, 0)], []):
            per, total, found, coef, post, grad_scale = ops.clip_norm_pass(grads, max_norm=1.0, backend=backend)
            assert total.item() == 0.0 and found.item() == 0.0 and post.item() == 0.0
            assert coef.item() == 1.0 and grad_scale.item() == 1.0 and per.numel() == len(grads)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_clip_norm_pass(backend):
    grads = random_grads([(5,), (1025,), (3, 7)], (torch.float32, torch.bfloat16))
    for mode, clamp, inv in ((0, None, None), (1, [-0.25, 0.5], torch.tensor(0.5))):
        torch.library.opcheck(torch.ops.ampclip.clip_norm_pass.default,
                              (grads, inv, 2.0, clamp, 0.75, mode, 1e-6, 0, backend))


def test_bad_arguments_are_clear_errors():
    grads = random_grads([(5,)])
    with pytest.raises(ValueError, match="per_group"):
        ops.clip_norm_pass(grads, mode="per_group")
    with pytest.raises(ValueError, match="max_norm"):
        ops.clip_norm_pass(grads, max_norm=-1.0)
