"""Kinds of tensors besides a plain Tensor, on every backend and through the public entry points.

* A plain Python subclass (``class SharedParam(nn.Parameter): pass``, ``class T(torch.Tensor): pass``) is a
  tensor with a Python type of its own: torch clips it as any other, and so must ampclip, with the same result
  as for its plain twin.
* A nested tensor has no single run of elements: refused with a clear error before anything is written, as
  torch refuses it.
"""

import warnings

import pytest
import torch

import ampclip
from ampclip import ops
from ampclip.errors import GradientTypeError
from helpers import CPU_BACKENDS, bitwise_equal, random_grads


class SharedParam(torch.nn.Parameter):
    pass


class TaggedTensor(torch.Tensor):
    pass


def twins(kind):
    """(subclassed parameters, plain parameters) with equal random gradients."""
    grads = random_grads([(6, 5), (17,), (3, 4)], seed=1)
    plain = [torch.nn.Parameter(torch.randn_like(g)) for g in grads]
    for p, g in zip(plain, grads):
        p.grad = g.clone()
    if kind == "parameter":
        mine = [SharedParam(p.detach().clone()) for p in plain]
        for p, g in zip(mine, grads):
            p.grad = g.clone()
    else:  # the gradients are the subclass
        mine = [torch.nn.Parameter(p.detach().clone()) for p in plain]
        for p, g in zip(mine, grads):
            p.grad = g.clone().as_subclass(TaggedTensor)
    return mine, plain


def same_grads(a, b):
    return all(bitwise_equal(p.grad.as_subclass(torch.Tensor), q.grad) for p, q in zip(a, b))


KINDS = ["parameter", "gradient"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_subclasses_are_clipped_as_their_plain_twins(backend, kind):
    mine, plain = twins(kind)
    total = ampclip.clip_grad_norm_(mine, 0.5, backend=backend)
    assert torch.equal(total, ampclip.clip_grad_norm_(plain, 0.5, backend=backend)) and same_grads(mine, plain)
    ampclip.clip_grad_value_(mine, 0.01, backend=backend)
    ampclip.clip_grad_value_(plain, 0.01, backend=backend)
    assert same_grads(mine, plain)
    assert torch.equal(ampclip.get_total_norm([p.grad for p in mine], backend=backend),
                       ampclip.get_total_norm([p.grad for p in plain], backend=backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("strategy", ["norm", "agc", "zclip"])
def test_subclasses_go_through_the_clippers_and_strategies(backend, kind, strategy):
    mine, plain = twins(kind)
    options = {"norm": {"max_norm": 0.5}, "agc": {"clip_factor": 0.01}, "zclip": {"warmup_steps": 1}}[strategy]
    a = ampclip.GradientClipper(mine, strategy, backend=backend, **options).clip_()
    b = ampclip.GradientClipper(plain, strategy, backend=backend, **options).clip_()
    assert torch.equal(a.total_norm, b.total_norm) and same_grads(mine, plain)
    stats = ampclip.FusedClipper(mine, max_norm=0.1, mode="per_tensor", backend=backend).clip_()
    assert torch.equal(stats.total_norm, ampclip.FusedClipper(plain, max_norm=0.1, mode="per_tensor",
                                                              backend=backend).clip_().total_norm)
    assert same_grads(mine, plain)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_adaptive_clipping_takes_subclassed_parameters(backend):
    mine, plain = twins("parameter")
    ampclip.adaptive_clip_grad_(mine, clip_factor=0.01, backend=backend)
    ampclip.adaptive_clip_grad_(plain, clip_factor=0.01, backend=backend)
    assert same_grads(mine, plain)
    ampclip.ZClip(mine, warmup_steps=1, backend=backend).clip_()
    ampclip.ZClip(plain, warmup_steps=1, backend=backend).clip_()
    assert same_grads(mine, plain)


def nested():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the nested-tensor API warns that it is a prototype
        return torch.nested.nested_tensor([torch.randn(2), torch.randn(3)])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_nested_tensor_is_refused_before_anything_is_written(backend):
    good = torch.randn(10)
    before = good.clone()
    calls = [lambda: ops.norm_pass([good, nested()], backend=backend),
             lambda: ops.scale_pass([good, nested()], torch.tensor(0.5), backend=backend),
             lambda: ops.unit_norm_pass([good, nested()], backend=backend),
             lambda: ops.unit_scale_pass([good, nested()], torch.rand(2), backend=backend),
             lambda: ampclip.get_total_norm([good, nested()], backend=backend)]
    for call in calls:
        with pytest.raises(GradientTypeError, match="nested"):
            call()
    assert bitwise_equal(good, before)
