"""Recipe parity (seed 004): ampclip reproduces another system's clipping recipe, order and eps placement
included, against plain-torch implementations of the recipes, inside AdamW, over several steps."""

import math

import pytest
import torch

import ampclip
from ampclip import ops
from helpers import CPU_BACKENDS

FAST = [b for b in CPU_BACKENDS if b != "triton"]
CLAMP = (-0.02, 0.015)  # recipe B's [clip_min, clip_max]: asymmetric on purpose
MAX_NORM = 0.2
EPS = 1e-2  # large enough that where it goes shows: norms in (0.19, 0.2) are clipped too


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(24, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU(),
                               torch.nn.Linear(64, 5))


def _batches(steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 24, generator=gen)
        yield x, (x[:, :5] * 3 + torch.randn(32, 5, generator=gen)).sin()


def _train(clip, steps=6, lr=1e-2):
    """AdamW over ``steps`` batches with ``clip(model)`` between backward and step; returns the parameters."""
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    for x, y in _batches(steps):
        loss = torch.nn.functional.mse_loss(model(x), y) * 10
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip(model)
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def recipe_b_in_torch(model):
    """Seed 004's recipe B in plain torch: value clamp to [clip_min, clip_max], then each tensor's L2 norm
    clipped with the eps added to the norm: ``scale = max_norm / max(norm + eps, max_norm)``."""
    for p in model.parameters():
        g = p.grad
        g.clamp_(*CLAMP)
        norm = g.pow(2).sum().sqrt() + EPS
        g.mul_(MAX_NORM / torch.maximum(norm, torch.tensor(MAX_NORM)))


def torch_recipe(model):
    """torch's usual recipe: clip_grad_value_ then the global clip_grad_norm_."""
    torch.nn.utils.clip_grad_value_(model.parameters(), CLAMP[1])
    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)


def _close(a, b):
    return all(torch.allclose(x, y, rtol=1e-5, atol=1e-7) for x, y in zip(a, b))


@pytest.mark.parametrize("backend", FAST)
def test_recipe_b_value_clamp_then_per_tensor_clip_with_its_eps(backend):
    clippers, coefs = {}, []

    def fused(model):
        clipper = clippers.setdefault(id(model), ampclip.FusedClipper(
            model.parameters(), max_norm=MAX_NORM, mode="per_tensor", value_clip=CLAMP, coef_rule="max", eps=EPS,
            backend=backend))
        coefs.append(clipper.clip_().clip_coef)

    want = _train(recipe_b_in_torch)
    assert _close(_train(fused), want)
    coefs = torch.cat(coefs)
    assert (coefs < 1).any() and (coefs == 1).any()  # the run clips some tensors, not all
    # The same through GradientClipper's names (and so AMPConfig's: gradient_clip_coef_rule / _coef_eps).
    gradient_clippers = {}

    def by_strategy(model):
        gradient_clippers.setdefault(id(model), ampclip.GradientClipper(
            model.parameters(), "norm", max_norm=MAX_NORM, clip_value=CLAMP, mode="per_tensor", coef_rule="max",
            coef_eps=EPS, backend=backend)).clip_()

    assert _close(_train(by_strategy), want)
    # The test can fail: the usual global clip, or torch's eps (1e-6) in place of the recipe's, gives another run.
    assert not _close(_train(lambda m: ampclip.clip_grad_norm_(m.parameters(), MAX_NORM)), want)
    assert not _close(_train(lambda m: ampclip.FusedClipper(m.parameters(), MAX_NORM, mode="per_tensor",
                                                            value_clip=CLAMP, coef_rule="max",
                                                            backend=backend).clip_()), want)


@pytest.mark.parametrize("backend", FAST)
def test_torch_recipe_value_clamp_then_global_clip(backend):
    clippers = {}

    def fused(model):
        clippers.setdefault(id(model), ampclip.FusedClipper(model.parameters(), max_norm=MAX_NORM,
                                                            value_clip=CLAMP[1], backend=backend)).clip_()

    want = _train(torch_recipe)
    assert _close(_train(fused), want)
    assert not _close(_train(lambda m: ampclip.clip_grad_norm_(m.parameters(), MAX_NORM)), want)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_max_rule_with_an_infinite_bound_leaves_the_gradients_alone(backend):
    # max_norm / max(norm + eps, max_norm) with max_norm = inf is inf / inf: taken as 1, not NaN
    per_tensor = torch.tensor([0.5, 3.0, 0.0])
    for mode in ("global", "per_tensor"):
        coef, _, _, post = ops.clip_finalize(per_tensor, per_tensor.norm(), math.inf, mode, rule="max",
                                             backend=backend)
        assert torch.equal(coef, torch.ones_like(coef)) and post.item() == pytest.approx(3.0413812)
    coef = ops.clip_finalize(torch.tensor([math.nan]), torch.tensor(math.nan), math.inf, rule="max",
                             backend=backend)[0]
    assert math.isnan(coef.item())  # a NaN norm still gives NaN
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([1.0, -2.0, 3.0])
    ampclip.FusedClipper([p], max_norm=math.inf, coef_rule="max", backend=backend).clip_()
    assert torch.equal(p.grad, torch.tensor([1.0, -2.0, 3.0]))


def test_amp_config_carries_the_coefficient_rule_to_the_trainer():
    config = ampclip.AMPConfig(precision="fp32", gradient_clip_strategy="norm", gradient_clip_max_norm=MAX_NORM,
                               gradient_clip_mode="per_tensor", gradient_clip_value=CLAMP,
                               gradient_clip_coef_rule="max", gradient_clip_coef_eps=EPS)
    trainer = ampclip.create_amp_trainer(_model(), loss_fn=torch.nn.functional.mse_loss, amp_config=config)
    assert trainer.clipper.fused.coef_rule == "max" and trainer.clipper.fused.eps == EPS
    assert trainer.clipper.fused.value_clip == CLAMP and trainer.clipper.mode == "per_tensor"
    assert math.isfinite(trainer.training_step(next(_batches(1))))
    with pytest.raises(ValueError, match="gradient_clip_coef_rule"):
        ampclip.AMPConfig(gradient_clip_coef_rule="min")
    with pytest.raises(ValueError, match="gradient_clip_coef_eps"):
        ampclip.AMPConfig(gradient_clip_coef_eps=-1.0)
