"""Kernel launches per step on the Triton backend, counted under its interpreter: what a GPU would launch.

The budget (docs/architecture.md): a global clip is two launches, the norm pass (whose last program finishes
the norms and computes the coefficient) and the scale pass (which writes nothing when nothing is clipped);
a per-tensor clip two, a per-group clip three (its group norms need a finalize of their own); a clip deferred
into a fused optimizer one, the norm pass, which also computes the optimizer's ``grad_scale``. Whatever the
number of gradients. Counted in steady state: a step after the first, whose tables are built.
"""

import pytest
import torch

import ampclip
from helpers import CPU_BACKENDS, counted_launches

pytestmark = pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="the Triton interpreter cannot run here")

NORM, SCALE = "triton._fused_norm_kernel", "triton._fused_scale_kernel"


def model(tensors: int):
    params = [torch.nn.Parameter(torch.randn(7)) for _ in range(tensors)]
    for p in params:
        p.grad = torch.randn(7) * 10
    return params


def steady(fn):
    fn()
    with counted_launches() as launches:
        fn()
    return launches


@pytest.mark.parametrize("tensors", [3, 64])
def test_the_drop_in_clip_is_two_launches(tensors):
    params = model(tensors)
    assert steady(lambda: ampclip.clip_grad_norm_(params, 1.0, backend="triton")) == [NORM, SCALE]


@pytest.mark.parametrize("tensors", [3, 64])
@pytest.mark.parametrize("mode, want", [("global", [NORM, SCALE]), ("per_tensor", [NORM, SCALE]),
                                        ("per_group", [NORM, "triton._clip_finalize_kernel", SCALE])])
def test_a_clip_is_two_launches_three_per_group(tensors, mode, want):
    params = model(tensors)
    groups = [params[::2], params[1::2]] if mode == "per_group" else None
    clipper = ampclip.FusedClipper(params, max_norm=1.0, mode=mode, groups=groups, backend="triton")
    inv = torch.tensor(0.5)
    assert steady(lambda: clipper.clip_(inv)) == want


def test_a_clip_deferred_into_a_fused_optimizer_is_one_launch():
    params = model(30)
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
    clipper = ampclip.FusedClipper(params, max_norm=1.0, backend="triton")
    inv = torch.tensor(0.5)
    assert steady(lambda: clipper.clip_(inv, defer_to=optimizer)) == [NORM]
    assert isinstance(optimizer.grad_scale, torch.Tensor) and isinstance(optimizer.found_inf, torch.Tensor)


def test_the_statistics_and_the_scale_update_are_one_launch_each():
    params = model(30)
    clipper = ampclip.GradientClipper(params, "norm", max_norm=1.0, backend="triton")
    assert steady(clipper.clip_) == [NORM, SCALE, "triton._clip_stats_kernel"]
    scaler = ampclip.DynamicLossScaler("cpu", init_scale=4.0, backend="triton")
    optimizer = torch.optim.SGD(params, lr=0.0)
    loss = torch.ones(())

    def step():
        scaler.scale(loss)
        scaler.unscale_and_clip_(optimizer, max_norm=1.0)
        scaler.update()

    launches = [name for name in steady(step) if name != "aten.mul.Tensor"]  # the loss's own scale
    assert launches == [NORM, SCALE, "triton._scaler_update_kernel"]
