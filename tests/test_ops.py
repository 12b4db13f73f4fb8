"""The op contract is registered with torch.library: opcheck on every op and backend, and torch.compile."""

import pytest
import torch

import ampclip
from ampclip import ops
from helpers import random_grads

CPU_BACKENDS = [name for name in ("reference", "cpp") if ops.available_backends()[name]]


def _inputs():
    grads = random_grads([(5,), (4097,), (3, 7)], (torch.float32, torch.bfloat16))
    return grads, torch.tensor(0.5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("inv_scale", [False, True], ids=["plain", "unscale"])
def test_opcheck_norm_pass(backend, inv_scale):
    grads, inv = _inputs()
    torch.library.opcheck(torch.ops.ampclip.norm_pass.default, (grads, inv if inv_scale else None, 2.0, backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("with_clip", [False, True], ids=["noclamp", "clamp"])
def test_opcheck_scale_pass(backend, with_clip):
    grads, inv = _inputs()
    args = (grads, torch.tensor(0.3), inv, 0.25 if with_clip else None, torch.tensor(0.0), False, backend)
    torch.library.opcheck(torch.ops.ampclip.scale_pass.default, args)


@pytest.mark.skipif(not ops.available_backends()["cpp"], reason="no _C")
def test_opcheck_compiled_kernels():
    grads, inv = _inputs()
    torch.library.opcheck(torch.ops.ampclip_C.norm_pass.default, (grads, inv, 2.0))
    torch.library.opcheck(
        torch.ops.ampclip_C.scale_pass.default, (grads, torch.tensor(0.3), inv, 0.5, torch.tensor(0.0), True)
    )


def test_clip_compiles_with_fullgraph():
    def clip(grads, inv_scale):
        _, total, found_inf = ops.norm_pass(grads, inv_scale, 2.0)
        coef = (1.0 / (total + 1e-6)).clamp(max=1.0)
        ops.scale_pass(grads, coef, inv_scale, None, found_inf, False)
        return total, found_inf

    grads, inv = _inputs()
    twin = [g.clone() for g in grads]
    compiled = torch.compile(clip, fullgraph=True, backend="aot_eager")
    total, found = compiled(grads, inv)
    total_eager, found_eager = clip(twin, inv)
    assert torch.equal(total, total_eager) and torch.equal(found, found_eager)
    for a, b in zip(grads, twin):
        assert torch.equal(a, b)


def test_drop_in_clip_compiles_with_fullgraph():
    grads = random_grads([(64,), (9, 3)])
    params = [torch.nn.Parameter(torch.empty_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    compiled = torch.compile(lambda ps: ampclip.clip_grad_norm_(ps, 0.5), fullgraph=True, backend="aot_eager")
    total = compiled(params)
    assert abs(total.item() - ampclip.reference.exact_norm(grads, 2.0)) <= 1e-5 * total.item()
    assert abs(ampclip.reference.exact_norm([p.grad for p in params], 2.0) - 0.5) <= 1e-5
