"""DynamicLossScaler: torch GradScaler parity, hysteresis and bounds, bit-identical skipped steps, exact
inf/NaN detection, checkpoint round trips, the fused/deferred paths and bad input."""

import copy
import io
import math
import os
import pickle
import random
import warnings

import pytest
import torch

from ampclip import DynamicLossScaler
from helpers import bitwise_equal, rel_close, run_two_processes


def tiny_model(seed=0, fused=None, optim="sgd", device="cpu"):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(device)
    if optim == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)
    return model, opt


def backward(model, scaler, x, poison=None):
    scaler.scale(model(x).pow(2).mean()).backward()
    if poison is not None:
        model[0].weight.grad.view(-1)[poison] = math.inf


@pytest.mark.parametrize("growth_interval", [3, 2000])
def test_scale_sequence_and_parameters_match_torch(growth_interval):
    rng = random.Random(0)
    m1, o1 = tiny_model()
    m2, o2 = tiny_model()
    theirs = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=growth_interval)
    ours = DynamicLossScaler("cpu", init_scale=2.0**10, growth_interval=growth_interval)
    for step in range(300):
        x = torch.randn(4, 8)
        bad = rng.random() < 0.15
        for model, opt, scaler in ((m1, o1, theirs), (m2, o2, ours)):
            opt.zero_grad()
            backward(model, scaler, x, poison=3 if bad else None)
            scaler.step(opt)
            scaler.update()
        assert theirs.get_scale() == ours.get_scale(), step
    assert all(bitwise_equal(a.detach(), b.detach()) for a, b in zip(m1.parameters(), m2.parameters()))
    assert ours.history()["found_inf"].sum() > 0


def run_pattern(pattern, **kwargs):
    """Feed a pattern of overflow (1) / clean (0) steps; return the scale after each update."""
    model, opt = tiny_model()
    scaler = DynamicLossScaler("cpu", init_scale=1024.0, **kwargs)
    scales = []
    for bad in pattern:
        opt.zero_grad()
        backward(model, scaler, torch.randn(2, 8), poison=0 if bad else None)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return scales


def test_hysteresis_backs_off_after_consecutive_overflows():
    assert run_pattern([1, 0, 1, 0, 1], hysteresis=2) == [1024.0] * 5  # never two in a row
    assert run_pattern([1, 1, 1, 0, 1], hysteresis=2) == [1024.0, 512.0, 256.0, 256.0, 256.0]
    assert run_pattern([1, 1], hysteresis=1) == [512.0, 256.0]  # torch's behaviour


def test_min_and_max_scale_bound_the_scale():
    assert run_pattern([1, 1, 1, 1], min_scale=256.0) == [512.0, 256.0, 256.0, 256.0]
    assert run_pattern([0, 0, 0, 0], growth_interval=1, max_scale=4096.0) == [2048.0, 4096.0, 4096.0, 4096.0]


def test_scale_does_not_grow_past_float32():
    model, opt = tiny_model()
    scaler = DynamicLossScaler("cpu", init_scale=3e38, growth_interval=1)
    opt.zero_grad()
    scaler.scale(model(torch.randn(2, 8)).sum() * 0).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == pytest.approx(3e38, rel=1e-6)


# On the CPU as on CUDA: an inf gradient never reaches the weights, whichever way the step is taken (a fused
# optimizer skips on the device through found_inf, any other one is not called).
@pytest.mark.parametrize("optim", ["sgd", "sgd-unscale", "sgd-clip", "adamw", "adamw-fused", "adamw-fused-unscale",
                                   "adamw-fused-clip", "adamw-fused-clip-in-place"])
def test_skipped_step_leaves_parameters_and_optimizer_state_bit_identical(optim):
    fused = optim.startswith("adamw-fused")
    model, opt = tiny_model(optim="sgd" if optim.startswith("sgd") else "adamw", fused=fused or None)
    scaler = DynamicLossScaler("cpu")
    for _ in range(2):  # build optimizer state first
        opt.zero_grad()
        backward(model, scaler, torch.randn(4, 8))
        scaler.step(opt)
        scaler.update()
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    backward(model, scaler, torch.randn(4, 8), poison=5)
    if "-clip" in optim:
        stats = scaler.unscale_and_clip_(opt, max_norm=1.0, defer=False if optim.endswith("in-place") else "auto")
        assert stats.found_inf.item() == 1.0
    elif optim.endswith("unscale"):
        scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    assert all(bitwise_equal(p.detach(), q) for p, q in zip(model.parameters(), params))
    after = opt.state_dict()
    for key, values in state["state"].items():
        for name, value in values.items():
            assert bitwise_equal(after["state"][key][name], value), (key, name)


def test_thousands_of_injections_all_detected_and_no_false_alarm():
    rng = random.Random(1)
    model, opt = tiny_model()
    params = list(model.parameters())
    scaler = DynamicLossScaler("cpu", init_scale=1.0, growth_interval=10**9)
    for trial in range(2000):
        opt.zero_grad()
        for p in params:
            p.grad = torch.randn_like(p) * 10
        inject = trial % 2 == 0
        if inject:
            target = rng.choice(params).grad.view(-1)
            where = rng.choice(["first", "last", "tail", "random"])
            index = {"first": 0, "last": target.numel() - 1, "tail": target.numel() - 2}.get(
                where, rng.randrange(target.numel()))
            target[index] = rng.choice([math.inf, -math.inf, math.nan])
        stats = scaler.unscale_and_clip_(opt, max_norm=1.0, defer=False)
        assert stats.found_inf.item() == (1.0 if inject else 0.0), trial
        scaler._states.clear()  # only the detection is under test here


def test_state_dict_round_trip_continues_bit_for_bit():
    rng = random.Random(2)
    xs = [torch.randn(4, 8) for _ in range(30)]
    bad = [rng.random() < 0.3 for _ in xs]

    def train(model, opt, scaler, steps):
        for i in steps:
            opt.zero_grad()
            backward(model, scaler, xs[i], poison=1 if bad[i] else None)
            scaler.unscale_and_clip_(opt, max_norm=0.5)
            scaler.step(opt)
            scaler.update()

    model, opt = tiny_model(optim="adamw")
    scaler = DynamicLossScaler("cpu", init_scale=256.0, growth_interval=3, hysteresis=2)
    train(model, opt, scaler, range(15))
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), scaler.state_dict()))
    train(model, opt, scaler, range(15, 30))

    model2, opt2 = tiny_model(seed=123, optim="adamw")
    scaler2 = DynamicLossScaler("cpu", init_scale=1.0)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    scaler2.load_state_dict(saved[2])
    train(model2, opt2, scaler2, range(15, 30))
    assert scaler.get_scale() == scaler2.get_scale()
    assert scaler.state_dict()["_hysteresis_tracker"] == scaler2.state_dict()["_hysteresis_tracker"]
    assert all(bitwise_equal(a.detach(), b.detach()) for a, b in zip(model.parameters(), model2.parameters()))
    h1, h2 = scaler.history(), scaler2.history()
    assert all(torch.equal(h1[k].nan_to_num(-1), h2[k].nan_to_num(-1)) for k in h1)


def test_loads_a_torch_gradscaler_state_dict():
    theirs = torch.amp.GradScaler("cpu", init_scale=512.0, growth_interval=7)
    ours = DynamicLossScaler("cpu")
    ours.load_state_dict(theirs.state_dict())
    assert ours.get_scale() == 512.0 and ours.get_growth_interval() == 7


def test_fp16_overflow_storm_backs_off_and_training_resumes():
    # fp32 master weights, fp16 activations under autocast: the set-up GradScaler is for
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    scaler = DynamicLossScaler("cpu", init_scale=2.0**24, growth_interval=1000)
    skipped = []
    for step in range(40):
        opt.zero_grad()
        x = torch.randn(8, 16) * (100.0 if step < 5 else 1.0)  # a storm of huge activations
        before = model.weight.detach().clone()
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(x)
        scaler.scale(out.float().pow(2).mean()).backward()
        scaler.step(opt)
        scaler.update()
        skipped.append(torch.equal(before, model.weight.detach()))
    assert scaler.get_scale() < 2.0**24  # backed off
    assert any(skipped[:10]) and not any(skipped[-10:])  # skipped during the storm, stepping after it
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fused_step_is_sync_free(monkeypatch):
    model, opt = tiny_model(optim="adamw", fused=True)
    scaler = DynamicLossScaler("cpu")
    backward(model, scaler, torch.randn(4, 8))

    def no_sync(*args, **kwargs):
        raise AssertionError("host sync in the step")

    monkeypatch.setattr(torch.Tensor, "item", no_sync)
    monkeypatch.setattr(torch.Tensor, "tolist", no_sync)
    monkeypatch.setattr(torch.Tensor, "__bool__", no_sync)
    scaler.unscale_and_clip_(opt, max_norm=1.0)  # deferred into the fused optimizer
    scaler.step(opt)
    scaler.update()
    backward(model, scaler, torch.randn(4, 8))
    scaler.step(opt)  # no clip: found_inf from one read, grad_scale handed over
    scaler.update()


def test_unscale_divides_gradients_and_detects():
    model, opt = tiny_model()
    scaler = DynamicLossScaler("cpu", init_scale=64.0)
    scaler.scale(model(torch.randn(2, 8)).sum()).backward()
    scaled = [p.grad.clone() for p in model.parameters()]
    scaler.unscale_(opt)
    for p, g in zip(model.parameters(), scaled):
        assert torch.equal(p.grad, g / 64.0)


def test_bf16_precision_keeps_scale_one_but_still_skips():
    model, opt = tiny_model()
    scaler = DynamicLossScaler("cpu", precision="bf16")
    assert scaler.get_scale() == 1.0 and scaler.inv_scale is None
    before = [p.detach().clone() for p in model.parameters()]
    backward(model, scaler, torch.randn(2, 8), poison=0)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 1.0
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"init_scale": 0.0}, "init_scale"),
        ({"init_scale": -4.0}, "init_scale"),
        ({"growth_factor": 1.0}, "growth_factor"),
        ({"backoff_factor": 1.5}, "backoff_factor"),
        ({"growth_interval": 0}, "growth_interval"),
        ({"hysteresis": 0}, "hysteresis"),
        ({"min_scale": 8.0, "max_scale": 4.0}, "min_scale"),
        ({"precision": "fp8"}, "precision"),
    ],
)
def test_bad_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DynamicLossScaler("cpu", **kwargs)


def test_misuse_raises_clear_errors():
    model, opt = tiny_model()
    scaler = DynamicLossScaler("cpu")
    model(torch.randn(2, 8)).sum().backward()
    with pytest.raises(RuntimeError, match="before scale"):
        scaler.step(opt)
    opt.zero_grad()
    backward(model, scaler, torch.randn(2, 8))
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="already been called"):
        scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="already been called"):
        scaler.unscale_and_clip_(opt, 1.0)
    scaler.step(opt)
    with pytest.raises(RuntimeError, match="already been called"):
        scaler.step(opt)
    with pytest.raises(RuntimeError, match="after step"):
        scaler.unscale_(opt)
    scaler.update()
    with pytest.raises(RuntimeError, match="no inf/NaN checks"):
        scaler.update()
    with pytest.raises(ValueError, match="growth_factor"):
        scaler.set_growth_factor(0.5)


def _skip_worker(rank, world_size, port, results):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model, opt = tiny_model()
        # Gradients sharded by hand (not averaged by DDP): the scaler agrees over this group.
        scaler = DynamicLossScaler("cpu", init_scale=128.0, process_group=dist.group.WORLD)
        before = [p.detach().clone() for p in model.parameters()]
        # Sharded gradients: only rank 1 holds the inf.
        backward(model, scaler, torch.randn(2, 8) + rank, poison=0 if rank == 1 else None)
        stats = scaler.unscale_and_clip_(opt, max_norm=1.0)
        scaler.step(opt)
        scaler.update()
        unchanged = all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
        results[rank] = (stats.found_inf.item(), unchanged, scaler.get_scale())
    finally:
        dist.destroy_process_group()
        os._exit(0)


def test_one_rank_with_inf_skips_the_step_on_every_rank():
    results = run_two_processes(_skip_worker, timeout=120)
    assert results == {0: (1.0, True, 64.0), 1: (1.0, True, 64.0)}


# ------------------------------------------------------------------------------------------ disabled


def disabled_pair(how):
    """(ours, torch's), disabled the same way: enabled=False, or device "cuda" on a machine without CUDA."""
    if how == "enabled=False":
        return DynamicLossScaler("cpu", enabled=False), torch.amp.GradScaler("cpu", enabled=False)
    with pytest.warns(UserWarning, match="CUDA is not available"):
        ours = DynamicLossScaler()
    with pytest.warns(UserWarning, match="CUDA is not available"):
        theirs = torch.amp.GradScaler("cuda")
    return ours, theirs


@pytest.mark.parametrize("how", ["enabled=False", pytest.param("cuda", marks=pytest.mark.skipif(
    torch.cuda.is_available(), reason="disables itself only without CUDA"))])
@pytest.mark.parametrize("entry", ["unscale_and_clip_", "unscale_", "step"])
@pytest.mark.parametrize("optim", ["sgd", "adamw-fused"])
def test_a_disabled_scaler_runs_the_loop_as_torchs_disabled_one(how, entry, optim):
    # GradScaler(enabled=use_amp) is a common pattern: disabled, every call is a no-op but the clip and the step
    ours, theirs = disabled_pair(how)
    kind, fused = ("sgd", None) if optim == "sgd" else ("adamw", True)
    m1, o1 = tiny_model(optim=kind, fused=fused)
    m2, o2 = tiny_model(optim=kind, fused=fused)  # the same seed: identical weights
    for step in range(4):
        x = torch.randn(4, 8)
        for model, opt, scaler in ((m1, o1, ours), (m2, o2, theirs)):
            opt.zero_grad()
            backward(model, scaler, x)
            if entry == "unscale_and_clip_" and scaler is ours:
                stats = ours.unscale_and_clip_(opt, max_norm=0.05)
                assert stats.clip_coef.item() < 1  # the clip did run
            elif entry != "step":
                scaler.unscale_(opt)
                if entry == "unscale_and_clip_":
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
                    assert rel_close(stats.total_norm.item(), norm.item(), 1e-6), step
                else:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            assert not hasattr(opt, "grad_scale")  # nothing handed to the optimizer
            scaler.step(opt)
            scaler.update()
        if entry == "unscale_and_clip_":  # FusedClipper's norm vs torch's: the coefficient's last bit may differ
            for a, b in zip(m1.parameters(), m2.parameters()):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        else:
            assert all(bitwise_equal(a.detach(), b.detach()) for a, b in zip(m1.parameters(), m2.parameters()))
    assert not ours.is_enabled() and ours.get_scale() == theirs.get_scale() == 1.0
    assert ours.loss_scale.item() == 1.0 and ours.inv_scale is None
    assert ours.state_dict() == theirs.state_dict() == {}
    ours.load_state_dict({})  # a no-op when disabled, as torch's
    assert pickle.loads(pickle.dumps(ours)).get_scale() == 1.0


def test_a_disabled_scaler_does_not_unscale_fp16_or_check():
    # torch's disabled scaler never looks at the gradients: no fp16 refusal, no inf check, no skip
    model = torch.nn.Linear(4, 3).half()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = DynamicLossScaler("cpu", enabled=False)
    for _ in range(2):
        opt.zero_grad()
        scaler.scale(model(torch.randn(2, 4).half()).float().sum()).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        stats = scaler.unscale_and_clip_(opt, max_norm=1e9)
        assert all(bitwise_equal(p.grad, g) for p, g in zip(model.parameters(), grads))  # nothing unscaled
        scaler.step(opt)
        scaler.update()
    assert stats.found_inf.item() == 0.0


# ------------------------------------------------------------------------------------------ copies


def copied(how, obj):
    if how == "pickle":
        return pickle.loads(pickle.dumps(obj))
    if how == "deepcopy":
        return copy.deepcopy(obj)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = ["pickle", "deepcopy", "torch.save"]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("how", COPIES)
@pytest.mark.parametrize("when", ["fresh", "after_scale", "after_update"])
def test_a_copied_scaler_continues_bit_for_bit(how, when, device):
    rng = random.Random(3)
    xs = [torch.randn(4, 8, device=device) for _ in range(16)]
    bad = [rng.random() < 0.3 for _ in xs]
    start = 0 if when == "fresh" else 8
    # deferred clips into a fused optimizer: the scaler holds a clipper, which hooked the optimizer
    model, opt = tiny_model(optim="adamw", fused=True, device=device)
    scaler = DynamicLossScaler(device, init_scale=256.0, growth_interval=2, hysteresis=2, history_size=8)

    def losses(model, scaler, i):
        return scaler.scale(model(xs[i]).pow(2).mean())

    def train(model, opt, scaler, steps, backward_done=False):
        scales = []
        for i in steps:
            if not (backward_done and i == steps[0]):
                losses(model, scaler, i).backward()
            if bad[i]:
                model[0].weight.grad.view(-1)[1] = math.inf
            scaler.unscale_and_clip_(opt, max_norm=0.5)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            scales.append(scaler.get_scale())
        return scales

    train(model, opt, scaler, range(start))
    twin, twin_opt = tiny_model(seed=9, optim="adamw", fused=True, device=device)
    twin.load_state_dict(model.state_dict())
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # a state dict holds references
    if when == "after_scale":  # both losses scaled by the original, then copied; backward leaves it alone
        scaled = [losses(model, scaler, start), losses(twin, scaler, start)]
    copy_of = copied(how, scaler)
    if when == "after_scale":
        for loss in scaled:
            loss.backward()
    steps = range(start, len(xs))
    done = when == "after_scale"
    assert train(model, opt, scaler, steps, done) == train(twin, twin_opt, copy_of, steps, done)
    assert all(bitwise_equal(a.detach(), b.detach()) for a, b in zip(model.parameters(), twin.parameters()))
    h1, h2 = scaler.history(), copy_of.history()
    assert all(bitwise_equal(h1[k], h2[k]) for k in h1) and h1["found_inf"].sum() > 0
    assert scaler.state_dict()["_hysteresis_tracker"] == copy_of.state_dict()["_hysteresis_tracker"]


@pytest.mark.parametrize("how", COPIES)
def test_a_scaler_is_copied_between_iterations_only_as_torchs(how):
    # Between an iteration's first unscale_/step and its update() both refuse (AssertionError, torch's type);
    # disabled, both copy at any point.
    model, opt = tiny_model()
    ours, theirs = DynamicLossScaler("cpu"), torch.amp.GradScaler("cpu")
    for scaler in (ours, theirs):
        opt.zero_grad()
        backward(model, scaler, torch.randn(2, 8))
        copied(how, scaler)
        scaler.unscale_(opt)
        with pytest.raises(AssertionError, match="may only be pickled"):
            copied(how, scaler)
        scaler.step(opt)
        with pytest.raises(AssertionError, match="may only be pickled"):
            copied(how, scaler)
        scaler.update()
        copied(how, scaler)
    opt.zero_grad()
    backward(model, ours, torch.randn(2, 8))
    ours.unscale_and_clip_(opt, max_norm=1.0)
    with pytest.raises(AssertionError, match="may only be pickled"):
        copied(how, ours)
    for scaler in (DynamicLossScaler("cpu", enabled=False), torch.amp.GradScaler("cpu", enabled=False)):
        backward(model, scaler, torch.randn(2, 8))
        scaler.unscale_(opt)
        copied(how, scaler)


# ------------------------------------------------------------------------------------------ grad_scaler keyword


class ScalerAwareSGD(torch.optim.Optimizer):
    """An optimizer of torch's older contract: it takes the scaler as ``grad_scaler`` and unscales through it."""

    _step_supports_amp_scaling = True

    def __init__(self, params, lr):
        super().__init__(params, {"lr": lr})
        self.received = []

    @torch.no_grad()
    def step(self, closure=None, grad_scaler=None):
        self.received.append(grad_scaler)
        self.attributes = (hasattr(self, "grad_scale"), hasattr(self, "found_inf"))
        grad_scaler.unscale_(self)
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(p.grad, alpha=-group["lr"])


def test_step_hands_the_scaler_to_an_optimizer_that_takes_grad_scaler():
    models = [torch.nn.Linear(6, 3) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [ScalerAwareSGD(m.parameters(), lr=0.1) for m in models]
    ours = DynamicLossScaler("cpu", init_scale=512.0)
    theirs = torch.amp.GradScaler("cpu", init_scale=512.0)
    messages = {}
    for _ in range(3):
        x = torch.randn(4, 6)
        for model, opt, scaler in ((models[0], opts[0], ours), (models[1], opts[1], theirs)):
            opt.zero_grad()
            scaler.scale(model(x).pow(2).sum()).backward()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                scaler.step(opt)
            assert [w.category for w in caught] == [FutureWarning]
            assert caught[0].filename == __file__  # stacklevel: the caller's line, as torch's
            messages[scaler is ours] = str(caught[0].message)
            assert opt.received[-1] is scaler and opt.attributes == (False, False)
            scaler.update()
        assert messages[True] == messages[False]  # torch's words, so that the same filters apply
        assert ours.get_scale() == theirs.get_scale()
        assert all(bitwise_equal(a.detach(), b.detach()) for a, b in zip(*(m.parameters() for m in models)))
    # unscale_and_clip_ "auto" does not defer into it (it need not read grad_scale): it unscales in place
    opts[0].zero_grad()
    ours.scale(models[0](torch.randn(4, 6)).pow(2).sum()).backward()
    scaled = [p.grad.clone() for p in models[0].parameters()]
    ours.unscale_and_clip_(opts[0], max_norm=1e9)
    assert not hasattr(opts[0], "grad_scale")
    for p, g in zip(models[0].parameters(), scaled):
        torch.testing.assert_close(p.grad, g / 512.0, rtol=1e-6, atol=0)
