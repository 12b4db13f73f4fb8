"""The cost of a step's bookkeeping: time per call and device ops dispatched, for the per-step APIs on many
small cached parameters, and the whole step (scale, unscale and clip, optimizer step, update) beside
torch's chain doing the same work (GradScaler.unscale_ + clip_grad_norm_ + step + update).

On a CPU the time is the whole call; on a GPU it is the host time until the call returns (the launches
queued, not finished), which is what bounds a small model's step. The op count is deterministic: each
dispatched op is a kernel launch on a GPU.
"""

import pytest
import torch

import ampclip
from ampclip import ops

PARAMETERS = 2000
ELEMENTS = 64  # small, so that the bookkeeping, not the arithmetic, is what is measured


def _model(settings):
    params = [torch.nn.Parameter(torch.randn(ELEMENTS, device=settings.device)) for _ in range(PARAMETERS)]
    for p in params:
        p.grad = torch.randn(ELEMENTS, device=settings.device) * 100
    return params


def _fused_clipper(params):
    return ampclip.FusedClipper(params, max_norm=1.0).clip_


def _gradient_clipper(params):
    return ampclip.GradientClipper(params, "norm", max_norm=1.0).clip_


def _scaler_step(params):
    scaler = ampclip.DynamicLossScaler(params[0].device, init_scale=1024.0)
    optimizer = torch.optim.SGD(params, lr=0.0)

    def step():
        scaler.unscale_and_clip_(optimizer, max_norm=1.0)
        scaler.update()

    return step


def _scaler_full_step(params):
    """The same work as torch's chain below: scale, unscale and clip, optimizer step, update."""
    scaler = ampclip.DynamicLossScaler(params[0].device, init_scale=1024.0)
    optimizer = torch.optim.SGD(params, lr=0.0)
    loss = torch.ones((), device=params[0].device)

    def step():
        scaler.scale(loss)
        scaler.unscale_and_clip_(optimizer, max_norm=1.0)
        scaler.step(optimizer)  # lr 0, as below
        scaler.update()

    return step


def _torch_step(params):
    scaler = torch.amp.GradScaler(params[0].device.type, init_scale=1024.0)
    optimizer = torch.optim.SGD(params, lr=0.0)
    loss = torch.ones((), device=params[0].device)

    def step():
        scaler.scale(loss)
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)  # lr 0: the parameters stay, so every step does the same work
        scaler.update()

    return step


STEPS = {
    "FusedClipper.clip_": _fused_clipper,
    "GradientClipper.clip_": _gradient_clipper,
    "unscale_and_clip_+update": _scaler_step,
    "ampclip: scale+unscale_and_clip_+step+update": _scaler_full_step,
    "torch: scale+unscale_+clip_grad_norm_+step+update": _torch_step,
}


@pytest.mark.parametrize("step", list(STEPS))
def test_step(benchmark, settings, step):
    params = _model(settings)
    call = STEPS[step](params)
    call()  # tables, caches and compiled kernels built once, as before every step after the first
    names = ops.dispatched(call)
    on_gpu = settings.device.type == "cuda"
    benchmark.extra_info.update({"step": step, "parameters": PARAMETERS, "elements": ELEMENTS,
                                 "device_ops": len(names), "ops": names,
                                 "timed": "host time until return" if on_gpu else "whole call"})
    if on_gpu:
        torch.cuda.synchronize()
    benchmark.pedantic(call, setup=torch.cuda.synchronize if on_gpu else None, rounds=max(settings.rounds, 50),
                       warmup_rounds=3, iterations=1)
