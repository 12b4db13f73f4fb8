"""Norms at the ends of the float range, on every backend and through every public entry point.

* Finite gradients whose norm passes float32's range (``[3e38, 3e38]``: a diverging run before any inf
  appears): torch returns an inf norm and zeroes the gradients (coefficient ``max_norm / inf = 0``), and so
  must every backend and every caller of the norm, instead of raising after the gradients were written.
* Gradients so small that their squares underflow in float32 (|g| < 1e-19): the norm must still be right, as
  the float64 reference gives it, where torch's own float32 norm underflows.
"""

import math

import pytest
import torch

import ampclip
from ampclip import ops, reference
from helpers import CPU_BACKENDS, bitwise_equal, params_with, rel_close

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def huge(dtype):
    return [torch.tensor([3e38, 3e38], dtype=dtype), torch.tensor([1.0, -2.0], dtype=dtype)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_norm_past_float32s_range_is_inf_and_clips_as_torch(backend, dtype):
    per_tensor, total, found_inf = ops.norm_pass(huge(dtype), None, 2.0, backend=backend)
    assert math.isinf(total.item()) and math.isinf(per_tensor[0].item()) and found_inf.item() == 0.0
    assert rel_close(per_tensor[1].item(), math.sqrt(5.0), 1e-6)  # the other norms stay right
    mine, theirs = params_with(huge(dtype)), params_with(huge(dtype))
    total = ampclip.clip_grad_norm_(mine, 1.0, backend=backend)
    want = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert math.isinf(total.item()) and math.isinf(want.item())
    for p, q in zip(mine, theirs):
        assert bitwise_equal(p.grad, q.grad), (p.grad, q.grad)  # zeroed, as torch zeroes them


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_caller_reports_an_inf_norm_instead_of_raising(backend):
    grads = huge(torch.float32)
    assert math.isinf(ampclip.get_total_norm(grads, backend=backend).item())
    stats = ampclip.FusedClipper(params_with(huge(torch.float32)), max_norm=1.0, backend=backend).clip_()
    assert math.isinf(stats.total_norm.item()) and stats.found_inf.item() == 0.0
    clipper = ampclip.GradientClipper(params_with(huge(torch.float32)), "norm", max_norm=1.0, backend=backend)
    assert math.isinf(clipper.clip_().total_norm.item())
    zclip = ampclip.ZClip(params_with(huge(torch.float32)), warmup_steps=2, backend=backend)
    assert math.isinf(zclip.clip_().total_norm.item())
    params = [torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))]
    params[0].grad, params[1].grad = torch.full((2, 2), 3e38), torch.ones(2)
    ampclip.adaptive_clip_grad_(params, clip_factor=0.01, backend=backend)
    assert torch.isfinite(params[0].grad).all()


def test_a_trainer_step_survives_a_norm_past_float32s_range():
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    trainer = ampclip.create_amp_trainer(model, loss_fn=lambda out, target: (out * target).sum(),
                                         amp_config=ampclip.create_default_amp_config(precision="fp32",
                                                                                      gradient_clip_max_norm=1.0))
    x = torch.tensor([[3e38, 3e38]])  # the weight's gradient is x: finite, its norm 4.2e38 is not
    loss = trainer.training_step((x, torch.ones(1, 1)))
    assert math.isinf(loss) or math.isfinite(loss)
    assert math.isinf(trainer.last_clipping_stats["pre_clip_norm"])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1e-21, 1e-25, 1e-30], ids=["1e-21", "1e-25", "1e-30"])
def test_norms_whose_squares_underflow_float32_are_right(backend, dtype, scale):
    gen = torch.Generator().manual_seed(3)
    grads = [(torch.randn(70000, generator=gen, dtype=torch.float64) * scale).to(dtype),
             (torch.randn(33, generator=gen, dtype=torch.float64) * scale).to(dtype), torch.zeros(100, dtype=dtype)]
    per_tensor, total, _ = ops.norm_pass(grads, None, 2.0, backend=backend)
    assert rel_close(total.item(), reference.exact_norm(grads, 2.0), 1e-5), (total.item(),
                                                                            reference.exact_norm(grads, 2.0))
    for got, g in zip(per_tensor.tolist(), grads):
        assert rel_close(got, reference.exact_norm([g], 2.0), 1e-5) or got == reference.exact_norm([g], 2.0) == 0
    params = params_with(grads)
    exact = reference.exact_norm(grads, 2.0)
    ampclip.clip_grad_norm_(params, scale, backend=backend)  # torch's eps (1e-6) dominates the coefficient here
    want = exact * scale / (exact + ops.EPS)
    assert rel_close(reference.exact_norm([p.grad for p in params], 2.0), want, 1e-2)
