"""Regressions for the defects outside testing found (each failed before its fix), and the points where the
drop-ins must behave as torch does."""

import copy
import math
import types
import warnings

import pytest
import torch

import ampclip
from ampclip import DynamicLossScaler, FusedClipper, NaNRecoveryManager
from helpers import CPU_BACKENDS, bitwise_equal, clone_all, random_grads, rel_close


def params_of(values):
    return ampclip.reference.parameters_of([v.clone() for v in values])


def model_and_optimizer(optimizer=torch.optim.SGD, **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    return model, optimizer(model.parameters(), lr=0.1, **kwargs)


def set_grads(model, value=1.0):
    for p in model.parameters():
        p.grad = torch.full_like(p, value)


# -------------------------------------------------------------------------------------- 1. the value clamp


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_value_clip_does_not_hide_an_overflow_from_the_scaler(backend):
    model, optimizer = model_and_optimizer()
    scaler = DynamicLossScaler("cpu", init_scale=1024.0, backend=backend)
    before = copy.deepcopy(model.state_dict())
    set_grads(model)
    model.weight.grad[0, 0] = math.inf
    scaler.scale(torch.ones(()))
    stats = scaler.unscale_and_clip_(optimizer, max_norm=1.0, value_clip=0.1)
    assert stats.found_inf.item() == 1.0
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # skipped
    assert scaler.get_scale() == 512.0  # and backed off
    clipper = FusedClipper(model.parameters(), max_norm=1.0, value_clip=0.1, backend=backend)
    assert clipper.clip_().found_inf.item() == 1.0


# -------------------------------------------------------------------------------------- 2. shared memory


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_gradient_shared_by_two_parameters_is_clipped_as_torch_clips_it(backend):
    for _ in range(3):  # the same result every run
        shared = torch.randn(70001)
        mine = [torch.nn.Parameter(torch.zeros(70001)) for _ in range(2)]
        theirs = [torch.nn.Parameter(torch.zeros(70001)) for _ in range(2)]
        for p in mine:
            p.grad = shared
        twin = shared.clone()
        for p in theirs:
            p.grad = twin
        got = ampclip.clip_grad_norm_(mine, 1.0, backend=backend)
        want = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        assert rel_close(got.item(), want.item(), 1e-5)
        torch.testing.assert_close(shared, twin, rtol=1e-5, atol=0)


# -------------------------------------------------------------------------------------- 3. mixed devices


def test_mixed_devices_are_an_error_before_anything_runs():
    params = params_of([torch.randn(10)])
    params.append(torch.nn.Parameter(torch.randn(3, device="meta")))
    params[1].grad = torch.randn(3, device="meta")
    before = params[0].grad.clone()
    with pytest.raises((ValueError, RuntimeError), match="device|meta"):
        ampclip.clip_grad_norm_(params, 1e-3)
    assert bitwise_equal(params[0].grad, before)


# -------------------------------------------------------------------------------------- 4. overflowing squares


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradients_whose_squares_overflow_are_clipped_not_zeroed(backend, dtype):
    grads = [torch.full((1000,), 1e20, dtype=dtype), torch.full((10,), -1e19, dtype=dtype)]
    exact = ampclip.reference.exact_norm(grads, 2.0)  # 3.16e21: finite
    params = params_of(grads)
    total = ampclip.clip_grad_norm_(params, 1.0, backend=backend)
    assert rel_close(total.item(), exact, 1e-5)
    assert rel_close(ampclip.reference.exact_norm([p.grad for p in params], 2.0), 1.0, 1e-2)
    for mode in ("per_group", "per_tensor"):
        params = params_of(grads)
        groups = [[params[0]], [params[1]]] if mode == "per_group" else None
        stats = FusedClipper(params, 1.0, mode=mode, groups=groups, backend=backend).clip_()
        assert stats.found_inf.item() == 0.0 and rel_close(stats.total_norm.item(), exact, 1e-5)
        assert torch.isfinite(stats.clip_coef).all() and (stats.clip_coef > 0).all()


# -------------------------------------------------------------------------------------- 5. deferred scales


def test_a_deferred_clip_without_its_step_leaves_no_stale_scale():
    model, optimizer = model_and_optimizer(fused=True)
    clipper = FusedClipper(model.parameters(), max_norm=1e9)
    set_grads(model)
    clipper.clip_(torch.tensor(1 / 65536), defer_to=optimizer)  # and then no step
    set_grads(model)
    clipper.clip_()  # a plain clip: the deferred scale of the step that never came must be gone
    before = model.weight.detach().clone()
    optimizer.step()
    torch.testing.assert_close(model.weight.detach(), before - 0.1, rtol=0, atol=1e-7)
    # the scaler's own deferral is dropped at update() when its step never came
    scaler = DynamicLossScaler("cpu", init_scale=65536.0)
    set_grads(model)
    scaler.scale(torch.ones(()))
    scaler.unscale_and_clip_(optimizer, max_norm=1e9)
    assert hasattr(optimizer, "grad_scale")
    scaler.update()
    assert not hasattr(optimizer, "grad_scale") and not hasattr(optimizer, "found_inf")


# -------------------------------------------------------------------------------------- 6. rollback twice


def test_rolling_back_twice_restores_the_same_snapshot():
    model, optimizer = model_and_optimizer(torch.optim.AdamW)
    scaler = DynamicLossScaler("cpu", init_scale=256.0)
    recovery = NaNRecoveryManager(model, optimizer, scaler, strategy="rollback", rollback_after=1)
    snapshot = copy.deepcopy((model.state_dict(), optimizer.state_dict()))

    def bad_step():
        set_grads(model, 0.5)
        optimizer.step()  # changes the optimizer's state in place
        recovery.after_step(torch.tensor(1.0))

    for _ in range(2):
        bad_step()
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in snapshot[0].items())
        state = optimizer.state_dict()["state"]
        assert state == {} or all(torch.equal(state[i][n], snapshot[1]["state"][i][n]) for i in state for n in state[i])


# -------------------------------------------------------------------------------------- 7. scaler state


@pytest.mark.parametrize("change, match", [
    ({"scale": -4.0}, "scale"), ({"scale": math.nan}, "scale"), ({"growth_factor": 1.0}, "growth_factor"),
    ({"backoff_factor": 1.0}, "backoff_factor"), ({"growth_interval": 0}, "growth_interval"),
    ({"_growth_tracker": -1}, "_growth_tracker"), ({"hysteresis": 0}, "hysteresis"),
])
def test_load_state_dict_checks_everything_before_it_assigns(change, match):
    scaler = DynamicLossScaler("cpu", init_scale=1024.0, history_size=8)
    good = scaler.state_dict()
    other = DynamicLossScaler("cpu", init_scale=8.0, history_size=8)
    with pytest.raises(ValueError, match=match):
        other.load_state_dict({**good, **change})
    assert other.state_dict()["scale"] == 8.0 and other.get_growth_factor() == 2.0
    with pytest.raises(ValueError, match="history_size"):
        DynamicLossScaler("cpu", history_size=4).load_state_dict(good)


# -------------------------------------------------------------------------------------- 8. per-call overrides


def test_per_call_overrides_are_checked():
    params = params_of(random_grads([(10,)]))
    before = clone_all([p.grad for p in params])
    clipper = FusedClipper(params, 1.0)
    for bad in (-1.0, math.nan, torch.tensor(-1.0)):
        with pytest.raises(ValueError, match="max_norm"):
            clipper.clip_(max_norm=bad)
    with pytest.raises(ValueError, match="inv_scale"):
        clipper.clip_(inv_scale=torch.tensor(-0.5))
    with pytest.raises(ValueError, match="total_norm"):
        ampclip.clip_grads_with_norm_(params, 1.0, torch.tensor([1.0, 2.0]))
    assert all(bitwise_equal(p.grad, b) for p, b in zip(params, before))


# -------------------------------------------------------------------------------------- 9. errors before writes


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_an_expanded_gradient_is_refused_before_any_other_is_written(backend):
    grads = random_grads([(50,), (30,)])
    params = params_of(grads)
    params[1].grad = torch.randn(1).expand(30)
    before = params[0].grad.clone()
    calls = [lambda: ampclip.clip_grad_value_(params, 1e-3, backend=backend),
             lambda: ampclip.clip_grad_norm_(params, 1e-3, backend=backend),
             lambda: ampclip.clip_grads_with_norm_(params, 1e-3, torch.tensor(10.0), backend=backend),
             lambda: FusedClipper(params, 1e-3, backend=backend).clip_()]
    for call in calls:
        with pytest.raises(ValueError, match="share memory"):
            call()
        assert bitwise_equal(params[0].grad, before)


# -------------------------------------------------------------------------------------- torch's contract


def test_an_empty_generator_warns_as_torch_does():
    with pytest.warns(UserWarning, match="empty generator"):
        assert ampclip.clip_grad_norm_((p for p in []), 1.0).item() == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ampclip.clip_grad_norm_([], 1.0)  # a list is not a consumed generator


@pytest.mark.parametrize("norm_type", [0.0, -1.0, -2.5, -math.inf], ids=str)
def test_the_norms_torch_computes_beyond_p_above_zero(norm_type):
    grads = random_grads([(100,), (7, 3), (1,)])
    grads[0][3] = 0.0
    mine, theirs = params_of(grads), params_of(grads)
    got = ampclip.clip_grad_norm_(mine, 0.5, norm_type)
    want = torch.nn.utils.clip_grad_norm_(theirs, 0.5, norm_type)
    assert bitwise_equal(got, want)
    assert all(bitwise_equal(a.grad, b.grad) for a, b in zip(mine, theirs))
    assert bitwise_equal(ampclip.get_total_norm(grads, norm_type),
                         torch.nn.utils.get_total_norm(grads, norm_type))


def test_complex_gradients_are_clipped_as_torch_clips_them():
    grads = [torch.randn(50, dtype=torch.complex64), torch.randn(9, 2)]
    mine, theirs = params_of(grads), params_of(grads)
    got = ampclip.clip_grad_norm_(mine, 0.5)
    want = torch.nn.utils.clip_grad_norm_(theirs, 0.5)
    assert rel_close(got.item(), want.item(), 1e-6)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
    with pytest.raises(NotImplementedError, match="complex"):  # torch refuses to clamp complex values too
        torch.nn.utils.clip_grad_value_(params_of(grads), 0.3)
    with pytest.raises(NotImplementedError, match="complex"):
        ampclip.clip_grad_value_(params_of(grads), 0.3)


def test_the_scaler_behaves_as_torchs_gradscaler_where_torch_refuses():
    if not torch.cuda.is_available():
        with pytest.warns(UserWarning, match="CUDA is not available"):
            assert not DynamicLossScaler("cuda").is_enabled()
    model, optimizer = model_and_optimizer()
    scaler = DynamicLossScaler("cpu")
    scaler.scale(torch.ones(()))
    with pytest.raises(AssertionError, match="No inf checks were recorded"):
        scaler.step(optimizer)  # no gradient at all
    half = torch.nn.Linear(4, 2).half()
    opt16 = torch.optim.SGD(half.parameters(), lr=0.1)
    for p in half.parameters():
        p.grad = torch.ones_like(p)
    scaler = DynamicLossScaler("cpu")
    with pytest.raises(ValueError, match="FP16 gradients"):
        scaler.unscale_(opt16)
    with pytest.raises(ValueError, match="FP16 gradients"):
        scaler.unscale_and_clip_(opt16, max_norm=1.0)


def test_a_generator_of_parameters_is_consumed_once():
    params = params_of(random_grads([(10,), (3,)]))
    gen = (p for p in params)
    assert isinstance(gen, types.GeneratorType)
    total = ampclip.clip_grad_norm_(gen, 1e9)
    assert rel_close(total.item(), ampclip.reference.exact_norm([p.grad for p in params], 2.0), 1e-6)
