"""AMPConfig, GradientClipper strategies, AMPTrainer (one process), metrics sinks."""

import copy
import math

import numpy as np
import pytest
import torch

import ampclip
from ampclip import (
    RECOMMENDED_CLIPPING_THRESHOLDS,
    AMPConfig,
    ClippingStrategy,
    create_amp_trainer,
    create_default_amp_config,
    create_gradient_clipper,
    get_recommended_threshold,
)
from ampclip.models import TinyGPT, random_batches
from ampclip.reference import exact_norm
from helpers import bitwise_equal


def test_recommended_thresholds():
    assert RECOMMENDED_CLIPPING_THRESHOLDS == {"fp16": 1.0, "bf16": 5.0, "fp32": 10.0}
    assert get_recommended_threshold("bf16") == 5.0
    with pytest.raises(ValueError, match="precision"):
        get_recommended_threshold("int8")


def test_config_defaults_and_validation():
    assert create_default_amp_config(precision="fp16").gradient_clip_max_norm == 1.0
    assert create_default_amp_config(precision="bf16", gradient_clip_max_norm=None).gradient_clip_max_norm == 5.0
    assert create_default_amp_config(precision="fp32").gradient_clip_max_norm == 10.0
    assert create_default_amp_config(gradient_clip_max_norm=2.5).gradient_clip_max_norm == 2.5
    assert AMPConfig(gradient_clip_strategy=ClippingStrategy.ADAPTIVE).gradient_clip_strategy == "adaptive"
    for bad, match in [
        ({"precision": "fp8"}, "precision"),
        ({"gradient_clip_strategy": "magic"}, "gradient_clip_strategy"),
        ({"gradient_clip_mode": "layer"}, "gradient_clip_mode"),
        ({"gradient_clip_strategy": "value", "gradient_clip_mode": "per_tensor"}, "norm"),
        ({"gradient_clip_max_norm": -1.0}, "gradient_clip_max_norm"),
        ({"grad_accumulation_steps": 0}, "grad_accumulation_steps"),
        ({"nan_recovery_strategy": "pray"}, "nan_recovery_strategy"),
        ({"precision": "bf16", "init_scale": 1024.0}, "fp16"),
    ]:
        with pytest.raises(ValueError, match=match):
            create_default_amp_config(**bad)


def named_grads(seed=0, scale=1.0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.Linear(20, 3))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * scale
    return model


@pytest.mark.parametrize("strategy", ["norm", "value"])
def test_norm_and_value_strategies(strategy):
    model = named_grads(scale=3.0)
    grads = [p.grad.clone() for p in model.parameters()]
    clipper = create_gradient_clipper(model.named_parameters(), strategy, max_norm=0.5)
    stats = clipper.clip_()
    if strategy == "norm":
        assert abs(exact_norm([p.grad for p in model.parameters()], 2.0) - 0.5) < 1e-5
    else:
        for p, g in zip(model.parameters(), grads):
            assert torch.equal(p.grad, g.clamp(-0.5, 0.5))
    assert stats.names == [n for n, _ in model.named_parameters()]
    summary = clipper.get_statistics()
    assert summary["steps"] == 1 and summary["clipped_steps"] == 1  # the clamp moved elements: a clipped step
    assert set(summary["per_layer"]) == {n for n, _ in model.named_parameters()}
    clipper.reset()
    assert clipper.get_statistics()["steps"] == 0


def test_precision_picks_the_default_bound():
    model = named_grads()
    assert create_gradient_clipper(model.parameters(), precision="fp16").max_norm == 1.0
    assert create_gradient_clipper(model.parameters(), "value", precision="bf16").clip_value == 5.0


def test_adaptive_strategy_is_autoclip():
    model = named_grads()
    clipper = create_gradient_clipper(model.named_parameters(), "adaptive", percentile=25.0, history_size=8)
    seen = []
    for step in range(12):
        for p in model.parameters():
            p.grad = torch.randn_like(p) * (1 + step % 5)
        norm = exact_norm([p.grad for p in model.parameters()], 2.0)
        seen.append(norm)
        bound = float(np.percentile(seen[-8:], 25.0))  # the window holds the current norm
        stats = clipper.clip_()
        assert abs(stats.total_norm.item() - norm) <= 1e-5 * norm
        after = exact_norm([p.grad for p in model.parameters()], 2.0)
        assert abs(after - min(norm, bound)) <= 1e-4 * norm, step
    state = clipper.state_dict()
    twin = create_gradient_clipper(named_grads().named_parameters(), "adaptive", percentile=25.0, history_size=8)
    twin.load_state_dict(state)
    assert twin.get_statistics()["adaptive_bound"] == clipper.get_statistics()["adaptive_bound"]


def test_bad_strategy_settings():
    model = named_grads()
    with pytest.raises(ValueError, match="strategy"):
        create_gradient_clipper(model.parameters(), "layerwise")
    with pytest.raises(ValueError, match="global"):
        create_gradient_clipper(model.parameters(), "adaptive", mode="per_tensor")
    with pytest.raises(ValueError, match="percentile"):
        create_gradient_clipper(model.parameters(), "adaptive", percentile=0)


def lm_trainer(precision="bf16", sgd=False, **config):
    torch.manual_seed(0)
    model = TinyGPT()
    cfg = create_default_amp_config(precision=precision, **config)
    opt = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if sgd
           else torch.optim.AdamW(model.parameters(), lr=3e-3))
    return create_amp_trainer(model, opt, amp_config=cfg)


def test_dict_batches_train_and_report_stats():
    trainer = lm_trainer(gradient_clip_max_norm=0.5)
    batches = random_batches(8, 64, seed=1)
    losses = [trainer.training_step(next(batches)) for _ in range(15)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    stats = trainer.last_clipping_stats
    assert set(stats) >= {"pre_clip_norm", "post_clip_norm", "clip_coef", "found_inf", "loss_scale"}
    assert stats["post_clip_norm"] <= 0.5 * (1 + 1e-4) and stats["loss_scale"] == 1.0
    summary = trainer.get_gradient_summary()
    assert summary["optimizer_steps"] == 15 and len(summary["loss_scale_history"]) == 15
    assert "wte.weight" in summary["per_layer"] and summary["clipped_steps"] > 0


def test_tuple_batches_with_loss_fn_and_fp16_scaler():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    cfg = create_default_amp_config(precision="fp16", init_scale=256.0)
    trainer = create_amp_trainer(model, loss_fn=torch.nn.functional.mse_loss, amp_config=cfg)
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    for _ in range(5):
        loss = trainer.training_step((x, y))
    assert math.isfinite(loss) and trainer.last_clipping_stats["loss_scale"] == 256.0
    with pytest.raises(ValueError, match="loss_fn"):
        create_amp_trainer(model, amp_config=cfg).training_step((x, y))


def test_clipping_off_measures_but_never_clips():
    trainer = lm_trainer(gradient_clip_strategy=None, gradient_clip_max_norm=1e-3)
    trainer.training_step(next(random_batches(8, 64)))
    stats = trainer.last_clipping_stats
    assert stats["clip_coef"] == 1.0 and stats["pre_clip_norm"] > 1e-3 and not stats["clipped"]


def test_gradient_accumulation_matches_the_full_batch():
    # SGD: Adam would turn rounding noise in gradients that are zero in exact arithmetic into full steps.
    full = lm_trainer(precision="fp32", sgd=True, gradient_clip_max_norm=0.5)
    accum = lm_trainer(precision="fp32", sgd=True, gradient_clip_max_norm=0.5, grad_accumulation_steps=2)
    batches = random_batches(8, 64, seed=2)
    for _ in range(3):
        batch = next(batches)
        full.training_step(batch)
        for half in (slice(0, 4), slice(4, 8)):
            accum.training_step({k: v[half] for k, v in batch.items()})
    assert full.global_step == accum.global_step == 3
    a, b = full.last_clipping_stats, accum.last_clipping_stats
    assert abs(a["pre_clip_norm"] - b["pre_clip_norm"]) <= 1e-5 * a["pre_clip_norm"]
    for p, q in zip(full.model.parameters(), accum.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy", ["norm", "adaptive"])
def test_resume_continues_exactly(strategy):
    batches = list(_take(random_batches(8, 64, seed=4), 10))
    one = lm_trainer(gradient_clip_strategy=strategy)
    for b in batches[:5]:
        one.training_step(b)
    state = copy.deepcopy(one.state_dict())  # like torch's, the state dict holds references
    for b in batches[5:]:
        one.training_step(b)
    two = lm_trainer(gradient_clip_strategy=strategy)
    two.load_state_dict(state)
    for b in batches[5:]:
        two.training_step(b)
    for p, q in zip(one.model.parameters(), two.model.parameters()):
        assert bitwise_equal(p.detach(), q.detach())
    assert one.last_clipping_stats == two.last_clipping_stats


def _take(it, n):
    return [next(it) for _ in range(n)]


def _leave_out_vectors(name, param):  # a module-level predicate: picklable, but a function all the same
    return param.ndim <= 1


@pytest.mark.parametrize("exclude", [lambda name, p: p.ndim <= 1, _leave_out_vectors, ["head.weight"]],
                         ids=["lambda", "function", "names"])
def test_a_checkpoint_of_agc_with_exclude_saves_and_loads_weights_only(exclude):
    import io

    batches = list(_take(random_batches(8, 64, seed=5), 6))
    options = {"clip_factor": 0.01, "exclude": exclude}
    one = lm_trainer(precision="fp32", gradient_clip_strategy="agc", gradient_clip_options=options)
    for b in batches[:3]:
        one.training_step(b)
    buffer = io.BytesIO()
    torch.save(one.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    saved = state["config"]["gradient_clip_options"]["exclude"]
    assert saved == (["head.weight"] if isinstance(exclude, list) else
                     f"{exclude.__module__}.{exclude.__qualname__}")
    two = lm_trainer(precision="fp32", gradient_clip_strategy="agc", gradient_clip_options=options)
    two.load_state_dict(state)
    for b in batches[3:]:
        one.training_step(b)
        two.training_step(b)
    for p, q in zip(one.model.parameters(), two.model.parameters()):
        assert bitwise_equal(p.detach(), q.detach())


def test_log_scalar_callback_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    logged = []
    board = ampclip.TensorBoardSink(str(tmp_path))
    torch.manual_seed(0)
    model = TinyGPT()
    cfg = create_default_amp_config(precision="bf16", monitoring_interval=2)
    trainer = create_amp_trainer(model, amp_config=cfg, log_scalar=[lambda *a: logged.append(a), board], log_every=2)
    batches = random_batches(4, 64)
    for _ in range(5):
        trainer.training_step_async(next(batches))
    board.close()
    names = {name for name, _, _ in logged}
    assert {"gradients/pre_clip_norm", "gradients/post_clip_norm", "gradients/clip_coef", "amp/loss_scale",
            "amp/found_inf"} <= names
    assert "gradients/layer/wte.weight" in names
    assert sorted({step for _, _, step in logged}) == [0, 2, 4]
    assert trainer.metrics.syncs == 3  # one sync per logged step
    assert any(f.name.startswith("events.out.tfevents") for f in tmp_path.iterdir())


def test_train_loop_with_progress_bar():
    trainer = lm_trainer()
    losses = trainer.train(random_batches(4, 64), max_steps=3, progress=False)
    assert len(losses) == 3 and trainer.global_step == 3


class _Tracker:
    def __init__(self):
        self.logged = {}

    def log_scalar(self, name, value, step):
        self.logged[name] = value


@pytest.mark.parametrize("max_grad_norm", [0.05, None])
def test_run_training_epoch_clips_logs_or_leaves_alone(max_grad_norm):
    torch.manual_seed(0)
    model = TinyGPT()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = _take(random_batches(4, 64, seed=5), 3)
    tracker = _Tracker()
    loss = ampclip.run_training_epoch(model, batches, opt, max_grad_norm=max_grad_norm, tracker=tracker)
    assert math.isfinite(loss)
    if max_grad_norm is None:
        assert tracker.logged == {}
    else:
        assert tracker.logged["gradients/pre_clip_norm"] > max_grad_norm
        assert abs(tracker.logged["gradients/post_clip_norm"] - max_grad_norm) < 1e-5


@pytest.mark.parametrize("clamp, moved", [(0.5, True), (100.0, False), ((-0.5, 100.0), True), ((-100.0, 0.5), True),
                                          ((-100.0, 100.0), False)])
def test_a_value_clamp_that_moves_an_element_counts_as_a_clipped_step(clamp, moved):
    model = named_grads(scale=3.0)
    clipper = ampclip.GradientClipper(model.named_parameters(), "value", clip_value=clamp)
    stats = clipper.clip_()
    assert stats.clamped.item() == float(moved) and stats.clip_coef.item() == 1.0  # the coefficient stays true
    assert clipper.get_statistics()["clipped_steps"] == int(moved)
    for p in model.parameters():  # nothing clamped when nothing is reported clamped, and the other way round
        lo, hi = (-clamp, clamp) if isinstance(clamp, float) else clamp
        assert p.grad.min() >= lo and p.grad.max() <= hi


def test_the_trainer_reports_a_clamped_step_as_clipped():
    from ampclip.models import random_batches
    from ampclip.train import build

    trainer = build("single", "fp32", gradient_clip_strategy="value", gradient_clip_value=1e-4, lr=0.01,
                    optimizer="sgd")
    trainer.training_step(next(random_batches(4, 32, seed=0)))
    stats = trainer.last_clipping_stats
    assert stats["clipped"] and stats["clip_coef"] == 1.0
    assert trainer.get_gradient_summary()["clipped_steps"] == 1
