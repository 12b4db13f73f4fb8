"""NaNDetector, SpikeDetector and NaNRecoveryManager."""

import math

import pytest
import torch

import ampclip
from ampclip import DynamicLossScaler, NaNDetector, NaNRecoveryManager, SpikeDetector
from helpers import bitwise_equal


def model_and_opt(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def test_detector_is_silent_on_clean_steps_and_names_bad_parameters():
    model, _ = model_and_opt()
    model(torch.randn(4, 6)).sum().backward()
    detector = NaNDetector(model)
    assert detector.check(torch.tensor(0.0), loss=torch.tensor(1.5)) is None
    model[0].weight.grad[0, 0] = math.inf
    model[2].bias.grad[-1] = math.nan
    model[2].bias.grad[0] = -math.inf
    report = detector.check(torch.tensor(1.0))
    assert report.params == {"0.weight": {"inf": 1, "nan": 0}, "2.bias": {"inf": 1, "nan": 1}}
    assert not report.loss_nonfinite and "0.weight" in report.summary()


def test_detector_flags_nonfinite_loss():
    model, _ = model_and_opt()
    model(torch.randn(4, 6)).sum().backward()
    report = NaNDetector(model.named_parameters()).check(torch.tensor(0.0), loss=torch.tensor(float("nan")))
    assert report.loss_nonfinite and report.params == {}


def test_spike_detector():
    spikes = SpikeDetector(window=20, z_threshold=4.0, warmup=5)
    torch.manual_seed(0)
    values = (1.0 + 0.01 * torch.randn(30)).tolist()
    assert not any(spikes.observe(v) for v in values)
    assert spikes.observe(5.0) and spikes.observe(float("inf"))
    assert not spikes.observe(1.0) and spikes.spikes == 2


def train_steps(model, opt, scaler, recovery, bad_steps, steps, base_max_norm=1.0, seen=None):
    for step in range(steps):
        opt.zero_grad()
        x = torch.randn(4, 6)
        scaler.scale(model(x).pow(2).mean()).backward()
        if step in bad_steps:
            model[0].weight.grad[0, 0] = math.nan
        stats = scaler.unscale_and_clip_(opt, max_norm=recovery.max_norm(base_max_norm))
        if seen is not None:
            seen.append(stats.clip_coef.item())
        scaler.step(opt)
        scaler.update()
        recovery.after_step(stats.found_inf)


def test_skip_strategy_counts_and_keeps_training():
    model, opt = model_and_opt()
    scaler = DynamicLossScaler("cpu", init_scale=256.0)
    recovery = NaNRecoveryManager(model, opt, scaler, detector=NaNDetector(model))
    train_steps(model, opt, scaler, recovery, {2, 5}, 8)
    assert recovery.counts["nonfinite"] == 2
    assert [e.step for e in recovery.events if e.kind == "nonfinite"] == [2, 5]
    assert "0.weight" in recovery.events[0].detail
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_reduce_scale_strategy_backs_off_further():
    model, opt = model_and_opt()
    scaler = DynamicLossScaler("cpu", init_scale=256.0)
    recovery = NaNRecoveryManager(model, opt, scaler, strategy="reduce_scale", scale_factor=0.25)
    train_steps(model, opt, scaler, recovery, {1}, 3)
    assert scaler.get_scale() == 256.0 * 0.5 * 0.25 and recovery.counts["scale_reductions"] == 1


def test_clip_strategy_tightens_for_k_steps():
    model, opt = model_and_opt()
    scaler = DynamicLossScaler("cpu", precision="fp32")
    recovery = NaNRecoveryManager(model, opt, scaler, strategy="clip", clip_factor=0.1, clip_steps=2)
    assert recovery.max_norm(1.0) == 1.0
    train_steps(model, opt, scaler, recovery, {0}, 1)
    assert recovery.max_norm(1.0) == 0.1
    train_steps(model, opt, scaler, recovery, set(), 3)
    assert recovery.max_norm(1.0) == 1.0


def test_rollback_restores_the_last_good_snapshot_exactly():
    model, opt = model_and_opt()
    scaler = DynamicLossScaler("cpu", init_scale=128.0)
    recovery = NaNRecoveryManager(model, opt, scaler, strategy="rollback", rollback_after=2, snapshot_every=3)
    train_steps(model, opt, scaler, recovery, set(), 3)  # the snapshot is taken after step 3
    good_model = {k: v.clone() for k, v in model.state_dict().items()}
    good_opt = opt.state_dict()
    good_steps = [s["step"].clone() for s in good_opt["state"].values()]
    # A clean step that changes the weights, then two non-finite ones: roll back to the snapshot.
    train_steps(model, opt, scaler, recovery, {1, 2}, 3)
    assert recovery.counts["rollbacks"] == 1
    for k, v in model.state_dict().items():
        assert bitwise_equal(v, good_model[k])
    assert [s["step"] for s in opt.state_dict()["state"].values()] == good_steps
    assert scaler.get_scale() < 128.0


def test_bad_configuration():
    model, opt = model_and_opt()
    with pytest.raises(ValueError, match="strategy"):
        NaNRecoveryManager(model, opt, strategy="pray")
    with pytest.raises(ValueError, match="scaler"):
        NaNRecoveryManager(model, opt, strategy="reduce_scale")
    with pytest.raises(ValueError, match="optimizer"):
        NaNRecoveryManager(model, strategy="rollback")
    with pytest.raises(ValueError):
        SpikeDetector(window=1)


def test_state_dict_round_trip():
    model, opt = model_and_opt()
    scaler = DynamicLossScaler("cpu")
    recovery = NaNRecoveryManager(model, opt, scaler, strategy="clip", spike_detector=SpikeDetector(warmup=2))
    train_steps(model, opt, scaler, recovery, {1}, 4)
    clone = NaNRecoveryManager(model, opt, scaler, strategy="clip", spike_detector=SpikeDetector(warmup=2))
    clone.load_state_dict(recovery.state_dict())
    assert clone.state_dict() == recovery.state_dict()
    assert ampclip.NaNReport(0, False).summary().startswith("step 0")


@pytest.mark.parametrize("action", ["log", "skip"])
def test_gradient_norm_spike_is_logged_or_skipped(action):
    model, opt = model_and_opt()
    scaler = DynamicLossScaler("cpu", precision="fp32")
    recovery = NaNRecoveryManager(model, opt, scaler, spike_action=action,
                                  grad_norm_spike_detector=SpikeDetector(window=50, z_threshold=5.0, warmup=5))
    for step in range(12):
        opt.zero_grad()
        scaler.scale(model(torch.randn(4, 6)).pow(2).mean()).backward()
        if step == 10:
            for p in model.parameters():
                p.grad.mul_(1000.0)  # a spike, finite
        stats = scaler.unscale_and_clip_(opt, max_norm=1e6)
        before = [p.detach().clone() for p in model.parameters()]
        spiked = recovery.check_spikes(stats.found_inf, grad_norm=stats.total_norm)
        scaler.step(opt)
        scaler.update()
        recovery.after_step(stats.found_inf)
        assert spiked == (step == 10)
        stepped = not all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
        assert stepped == (step != 10 or action == "log")
    assert recovery.counts["grad_norm_spikes"] == 1 and recovery.counts["nonfinite"] == 0
