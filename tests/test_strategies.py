"""Strategies as bounds: a class per strategy, found by name by GradientClipper, AMPConfig and AMPTrainer, with
no branch on the strategy anywhere else."""

import math

import numpy as np
import pytest
import torch

import ampclip
from ampclip import strategies
from ampclip.models import TinyGPT, TinyGPTConfig, random_batches


def _params(values):
    params = []
    for v in values:
        p = torch.nn.Parameter(torch.zeros(len(v)))
        p.grad = torch.tensor(v, dtype=torch.float32)
        params.append(p)
    return params


def test_autoclip_leaves_skipped_steps_out_of_its_history():
    # AutoClip's bound is a percentile of the norms of clean steps; an overflowing step says nothing about
    # the run and must not pull the bound down (it used to enter as 0.0 and clip the next ten clean steps).
    clipper = ampclip.GradientClipper(_params([[3.0, 4.0]]), "adaptive", percentile=50.0, history_size=8)
    seen = []
    for step, value in enumerate([5.0, 7.0, math.inf, 6.0, 6.0]):
        p = clipper.params[0]
        p.grad = torch.tensor([value, 0.0])
        stats = clipper.clip_()
        if math.isfinite(value):
            seen.append(value)
            want = float(np.percentile(seen, 50.0))
            assert stats.clip_coef.item() == pytest.approx(min(1.0, want / (value + 1e-6)), rel=1e-6), step
        else:
            assert stats.found_inf.item() == 1.0
    assert clipper.get_statistics()["skipped_steps"] == 1
    assert clipper.get_statistics()["adaptive_bound"] == pytest.approx(float(np.percentile(seen, 50.0)))


def test_autoclip_state_round_trips_exactly():
    a = ampclip.GradientClipper(_params([[1.0, 2.0]]), "adaptive", history_size=4)
    for value in (1.0, 3.0, 2.0):
        a.params[0].grad = torch.tensor([value, 0.0])
        a.clip_()
    b = ampclip.GradientClipper(_params([[1.0, 2.0]]), "adaptive", history_size=4)
    b.load_state_dict(a.state_dict())
    for clipper in (a, b):
        clipper.params[0].grad = torch.tensor([2.5, 0.0])
    assert torch.equal(a.clip_().clip_coef, b.clip_().clip_coef)
    with pytest.raises(ValueError, match="history_size"):
        ampclip.GradientClipper(_params([[1.0]]), "adaptive", history_size=5).load_state_dict(a.state_dict())


def _snapshot(clipper):
    state = clipper.state_dict()
    return state, repr(state)  # the repr holds every tensor's values


_CLIPPER_ENTRIES = [("counters", [1.0, 2.0, 3.0]), ("counters", "many"), ("counters", [-1.0, 0.0]),
                    ("counters", [math.nan, 0.0]), ("layers", torch.zeros(2, 1, dtype=torch.float64)),
                    ("steps", -3), ("steps", 2.5), ("max_norm", -1.0)]
_STRATEGY_ENTRIES = {"adaptive": [("history", torch.zeros(3)), ("history", ["a"] * 4), ("count", "x"),
                                  ("count", -1), ("percentile", 0.0)],
                     "zclip": [("zclip state", torch.zeros(5)), ("warmup", "x")]}


@pytest.mark.parametrize("strategy, where, change", [
    pytest.param(strategy, where, change, id=f"{strategy}-{where}-{change!r}"[:60])
    for strategy in ("adaptive", "zclip", "norm")
    for where, change in _CLIPPER_ENTRIES + _STRATEGY_ENTRIES.get(strategy, [])])
def test_load_state_dict_checks_everything_before_it_replaces_anything(strategy, where, change):
    # The strategy's part (history, count, ...) is checked before the clipper's counters are replaced, and the
    # clipper's before the strategy's state: a bad entry anywhere leaves both as they were.
    options = {"history_size": 4} if strategy == "adaptive" else {"warmup_steps": 2} if strategy == "zclip" else {}
    a = ampclip.GradientClipper(_params([[1.0, 2.0], [3.0]]), strategy, max_norm=2.0, **options)
    for value in (1.0, 3.0, 2.0):
        a.params[0].grad = torch.tensor([value, 0.5])
        a.params[1].grad = torch.tensor([value * 2])
        a.clip_()
    good = a.state_dict()
    inner = {"history": "history", "count": "count", "percentile": "percentile", "zclip state": "state",
             "warmup": "warmup", "max_norm": "max_norm"}
    bad = {**good, "clipper": dict(good["clipper"])}
    if where in inner:
        bad["clipper"][inner[where]] = change
    else:
        bad[where] = change
    b = ampclip.GradientClipper(_params([[1.0, 2.0], [3.0]]), strategy, max_norm=2.0, **options)
    b.params[0].grad = torch.tensor([5.0, 1.0])
    b.params[1].grad = torch.tensor([0.25])
    b.clip_()
    before, text = _snapshot(b)
    with pytest.raises(ValueError):
        b.load_state_dict(bad)
    after, text_after = _snapshot(b)
    assert text_after == text and b.steps == before["steps"] and b.max_norm == 2.0
    b.load_state_dict(good)  # the good one still loads
    assert repr(b.state_dict()) == repr(good)


class HalfTheNorm(strategies.ClipStrategy):
    """A strategy of one's own: keep half of every step's global norm (a device tensor, no sync)."""

    name = "half"
    options = ("fraction",)

    def __init__(self, max_norm=math.inf, mode="global", value_clip=None, fraction=0.5):
        super().__init__(max_norm, mode, value_clip)
        self.fraction = fraction

    def bound(self, norms):
        return norms.total * self.fraction


@pytest.fixture
def half_strategy():
    strategies.register(HalfTheNorm)
    yield
    del strategies.STRATEGIES["half"]


def test_a_new_strategy_is_one_class_and_one_register_line(half_strategy):
    params = _params([[3.0, 4.0], [0.0, 12.0]])  # norm 13
    stats = ampclip.GradientClipper(params, "half", fraction=0.25).clip_()
    assert stats.total_norm.item() == pytest.approx(13.0) and stats.post_clip_norm.item() == pytest.approx(3.25)
    config = ampclip.AMPConfig(precision="fp32", gradient_clip_strategy="half",
                               gradient_clip_options={"fraction": 0.5})
    model = TinyGPT(TinyGPTConfig(context=8, d_model=16, n_layer=1, n_head=2))
    trainer = ampclip.create_amp_trainer(model, amp_config=config)
    loss = trainer.training_step(next(random_batches(4, 8, seed=0)))
    assert math.isfinite(loss)
    stats = trainer.last_clipping_stats
    assert stats["post_clip_norm"] == pytest.approx(stats["pre_clip_norm"] / 2, rel=1e-5)


def test_unknown_strategies_and_options_are_clear_errors():
    with pytest.raises(ValueError, match="strategy must be one of"):
        ampclip.GradientClipper(_params([[1.0]]), "magic")
    with pytest.raises(TypeError, match="percentile"):
        ampclip.GradientClipper(_params([[1.0]]), "norm", percentile=3)
    with pytest.raises(ValueError, match="gradient_clip_strategy 'adaptive'"):
        ampclip.AMPConfig(gradient_clip_strategy="adaptive", gradient_clip_options={"percentile": 0})
    with pytest.raises(ValueError, match="gradient_clip_options"):
        ampclip.AMPConfig(gradient_clip_strategy=None, gradient_clip_options={"percentile": 5})
