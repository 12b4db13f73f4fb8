"""Adaptive clipping against the implementations people know: AGC against timm's ``adaptive_clip_grad``, ZClip
against the ``zclip`` package, through the stand-alone calls, GradientClipper and AMPConfig; no host sync in
``clip_()``, exact resume, clear errors. Both packages are test dependencies (``pip install zclip`` and
``pip install timm --no-deps``: timm's torchvision dependency need not import; its agc.py is plain torch)."""

import io
import math

import pytest
import torch

import ampclip
from ampclip import ops, reference
from ampclip.models import TinyGPT, TinyGPTConfig, random_batches
from helpers import CPU_BACKENDS, bitwise_equal, rel_close

timm_agc = reference.timm_adaptive_clip_grad()
needs_timm = pytest.mark.skipif(timm_agc is None, reason="timm is not installed (pip install timm --no-deps)")
try:
    import zclip as zclip_package
except ImportError:  # pragma: no cover - a test dependency
    zclip_package = None
needs_zclip = pytest.mark.skipif(zclip_package is None, reason="the zclip package is not installed (pip install zclip)")

FAST = [b for b in CPU_BACKENDS if b != "triton"]
HAS_TRITON = "triton" in CPU_BACKENDS
# conv weights, a linear weight and its bias, a gain, a wide linear, a one-element parameter
AGC_SHAPES = [(16, 3, 3, 3), (8, 16, 1, 1), (32, 16), (32,), (7,), (10, 300), (1,)]
# What AGC in float32 arithmetic may be off by, relative, against float64: for float32 gradients a few units in
# the last place (the norms, bound and ratio are rounded before the product); for 16-bit ones the product's
# one rounding to the gradient's dtype. atol: float16's subnormal spacing (small gradients are subnormal).
RTOL = {torch.float32: 4 * 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
ATOL = {torch.float32: 0.0, torch.float16: 2.0**-24, torch.bfloat16: 0.0}


def _agc_case(dtype=torch.float32, seed=0, grad_scale=1.0):
    """Parameters and gradients where some units clip and some do not: rows of the parameters span four
    decades (some below eps), rows of the gradients are scaled by random factors."""
    gen = torch.Generator().manual_seed(seed)
    params, grads = [], []
    for shape in AGC_SHAPES:
        rows = shape[0] if len(shape) > 1 else 1
        row_scale = 10 ** (torch.rand(rows, generator=gen) * 4 - 4.5)  # 3e-5 .. 0.3
        view = (rows,) + (1,) * (len(shape) - 1) if len(shape) > 1 else (1,)
        p = torch.randn(shape, generator=gen, dtype=torch.float64) * row_scale.double().reshape(view)
        g = torch.randn(shape, generator=gen, dtype=torch.float64) * 10 ** (torch.rand(rows, generator=gen) * 3 - 4.0
                                                                          ).double().reshape(view)
        params.append(torch.nn.Parameter(p.to(dtype)))
        grads.append((g * grad_scale).to(dtype))
    return params, grads


def _with_grads(params, grads):
    out = []
    for p, g in zip(params, grads):
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = g.clone()
        out.append(q)
    return out


def _exact_agc(params, grads, clip_factor, eps, norm_type=2.0):
    """AGC in float64 on the host: the yardstick."""
    out = []
    for p, g in zip(params, grads):
        p64, g64 = p.detach().double(), g.double()
        rows = ops.unit_count(p)
        pr, gr = p64.reshape(rows, -1), g64.reshape(rows, -1)
        bound = torch.linalg.vector_norm(pr, norm_type, dim=1).clamp(min=eps) * clip_factor
        gn = torch.linalg.vector_norm(gr, norm_type, dim=1)
        coef = torch.where(gn < bound, torch.ones_like(gn), bound / gn.clamp(min=1e-6))
        out.append((gr * coef[:, None]).reshape(g.shape))
    return out


# ------------------------------------------------------------------------------------------------ AGC


@needs_timm
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm_type", [2.0, 1.0], ids=["p2", "p1"])
def test_agc_matches_timm(backend, dtype, norm_type):
    params, grads = _agc_case(dtype)
    ours = _with_grads(params, grads)
    ampclip.adaptive_clip_grad_(ours, clip_factor=0.01, eps=1e-3, norm_type=norm_type, backend=backend)
    exact = _exact_agc(params, grads, 0.01, 1e-3, norm_type)
    rtol, atol = RTOL[dtype], ATOL[dtype]
    clipped_somewhere = False
    for q, g, e in zip(ours, grads, exact):
        torch.testing.assert_close(q.grad.double(), e, rtol=rtol, atol=atol)
        clipped_somewhere |= not torch.equal(q.grad, g)
    assert clipped_somewhere
    # timm computed at float32 on the same values, rounded once to the gradient's dtype: the same within the
    # rounding of that dtype (float32: within timm's own error, its norms summed in float32)
    upcast = _with_grads([p.float() for p in params], [g.float() for g in grads])
    timm_agc(upcast, clip_factor=0.01, eps=1e-3, norm_type=norm_type)
    for q, t, g in zip(ours, upcast, grads):
        torch.testing.assert_close(q.grad.double(), t.grad.to(dtype).double(),
                                   rtol=2e-6 if dtype == torch.float32 else rtol, atol=atol)
        # the same units are clipped: a unit left alone keeps its bits in both
        rows = ops.unit_count(g)
        kept_ours = (q.grad == g).reshape(rows, -1).all(dim=1)
        kept_timm = (t.grad.to(dtype) == g).reshape(rows, -1).all(dim=1)
        assert torch.equal(kept_ours, kept_timm)
    # timm run in the gradient's own dtype rounds its norms and ratio to that dtype too: within a few of its ulps
    native = _with_grads(params, grads)
    timm_agc(native, clip_factor=0.01, eps=1e-3, norm_type=norm_type)
    for q, t in zip(ours, native):
        torch.testing.assert_close(q.grad.double(), t.grad.double(), rtol=2e-6 if dtype == torch.float32 else 4 * rtol,
                                   atol=4 * atol)


@needs_timm
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's NumPy, on inf * inf
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("on_nonfinite", ["leave", "zero"])
def test_agc_clipper_unscales_on_the_fly_and_skips_on_inf(backend, on_nonfinite):
    params, grads = _agc_case(seed=1)
    scaled = [g * 1024 for g in grads]
    clipper = ampclip.GradientClipper(_with_grads(params, scaled), "agc", clip_factor=0.02, eps=1e-3,
                                      backend=backend, on_nonfinite=on_nonfinite)
    stats = clipper.clip_(inv_scale=torch.tensor(1 / 1024))
    baseline = _with_grads(params, grads)
    total = reference.exact_norm(grads, 2.0)
    timm_agc(baseline, clip_factor=0.02, eps=1e-3)
    for q, t in zip(clipper.params, baseline):
        torch.testing.assert_close(q.grad, t.grad, rtol=4e-7, atol=0)
    assert stats.found_inf.item() == 0.0 and stats.clip_coef.shape == (sum(map(ops.unit_count, params)),)
    assert abs(stats.total_norm.item() - total) <= 2e-6 * total
    want_post = reference.exact_norm([t.grad for t in baseline], 2.0)
    assert abs(stats.post_clip_norm.item() - want_post) <= 2e-6 * want_post
    assert clipper.get_statistics()["clipped_steps"] == 1
    # an overflow: found_inf exact, the gradients left alone (or zeroed), the step counted as skipped
    for q, g in zip(clipper.params, scaled):
        q.grad = g.clone()
    clipper.params[3].grad[-1] = math.inf
    before = [q.grad.clone() for q in clipper.params]
    stats = clipper.clip_(inv_scale=torch.tensor(1 / 1024))
    assert stats.found_inf.item() == 1.0
    for q, b in zip(clipper.params, before):
        assert bitwise_equal(q.grad, torch.zeros_like(b) if on_nonfinite == "zero" else b)
    assert clipper.get_statistics()["skipped_steps"] == 1


@needs_timm
@pytest.mark.parametrize("exclude", ["names", "predicate"])
def test_agc_exclude_leaves_parameters_unclipped_but_unscaled(exclude):
    params, grads = _agc_case(seed=2)
    names = [f"layer{i}.{'bias' if p.dim() == 1 else 'weight'}" for i, p in enumerate(params)]
    left_out = {n for n, p in zip(names, params) if p.dim() <= 1} | {"layer5.weight"}
    rule = sorted(left_out) if exclude == "names" else (lambda name, p: name in left_out)
    ours = _with_grads(params, [g * 4 for g in grads])
    clipper = ampclip.GradientClipper(list(zip(names, ours)), "agc", clip_factor=0.01, exclude=rule)
    clipper.clip_(inv_scale=torch.tensor(0.25))
    kept = [t for n, t in zip(names, _with_grads(params, grads)) if n not in left_out]
    timm_agc(kept, clip_factor=0.01, eps=1e-3)
    kept = iter(kept)
    for n, q, g in zip(names, ours, grads):
        want = g if n in left_out else next(kept).grad
        torch.testing.assert_close(q.grad, want, rtol=4e-7, atol=0)
    ampclip.adaptive_clip_grad_(list(zip(names, _with_grads(params, grads))), exclude=rule)  # the same, functional


@needs_timm
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_agc_exclude_with_clip_factor_zero_leaves_the_excluded_alone(backend):
    # clip_factor 0 bounds every unit at 0; the excluded ones have an infinite bound, and inf * 0 must not turn
    # their gradients into NaN.
    params, grads = _agc_case(seed=3)
    left_out = {i for i, p in enumerate(params) if p.dim() <= 1}
    rule = lambda name, p: p.dim() <= 1  # noqa: E731
    kept = [t for i, t in enumerate(_with_grads(params, grads)) if i not in left_out]
    timm_agc(kept, clip_factor=0.0, eps=1e-3)
    kept = iter(kept)
    ours = _with_grads(params, grads)
    clipper = ampclip.GradientClipper(_with_grads(params, grads), "agc", clip_factor=0.0, exclude=rule,
                                      backend=backend)
    total = ampclip.adaptive_clip_grad_(ours, clip_factor=0.0, exclude=rule, backend=backend)
    stats = clipper.clip_()
    for i, (q, c, g) in enumerate(zip(ours, clipper.params, grads)):
        want = g if i in left_out else next(kept).grad
        assert bitwise_equal(q.grad, want) and bitwise_equal(c.grad, want), i
    want_post = reference.exact_norm([g for i, g in enumerate(grads) if i in left_out], 2.0)
    assert rel_close(stats.post_clip_norm.item(), want_post, 2e-6)
    assert rel_close(total.item(), reference.exact_norm(grads, 2.0), 2e-6)
    assert bool(stats.clip_coef.isfinite().all())


@needs_timm
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_agc_clips_a_gradient_held_by_two_entries_once(backend):
    params, grads = _agc_case(seed=4)
    # (a) a parameter listed twice (tied weights gathered from two modules), as timm is handed it
    ours, theirs = _with_grads(params, grads), _with_grads(params, grads)
    total = ampclip.adaptive_clip_grad_(ours + ours[:2], clip_factor=0.01, backend=backend)
    timm_agc(theirs + theirs[:2], clip_factor=0.01)  # clips them twice: the second time changes next to nothing
    for q, t, e in zip(ours, theirs, _exact_agc(params, grads, 0.01, 1e-3)):
        torch.testing.assert_close(q.grad, t.grad, rtol=4e-7, atol=0)
        torch.testing.assert_close(q.grad.double(), e, rtol=RTOL[torch.float32], atol=0)
    assert rel_close(total.item(), reference.exact_norm(grads + grads[:2], 2.0), 2e-6)
    # (b) two parameters of different weights sharing one .grad: timm clips by one, then by the other
    ours, theirs = _with_grads(params, grads), _with_grads(params, grads)
    for pair in (ours, theirs):
        twin = torch.nn.Parameter(pair[2].detach() * torch.linspace(0.1, 3.0, pair[2].shape[0])[:, None])
        twin.grad = pair[2].grad  # the same tensor
        pair.append(twin)
    timm_agc(theirs, clip_factor=0.01)
    named = [(f"p{i}", q) for i, q in enumerate(ours)]
    scaled = [g * 8 for g in grads]
    for q, g in zip(ours, scaled):
        q.grad.copy_(g)  # the shared one is written once, through either entry
    stats = ampclip.GradientClipper(named, "agc", clip_factor=0.01, backend=backend).clip_(torch.tensor(0.125))
    for q, t in zip(ours, theirs):
        torch.testing.assert_close(q.grad, t.grad, rtol=4e-7, atol=0)
    assert ours[-1].grad is ours[2].grad
    after = [q.grad for q in ours]  # the shared gradient counts twice, as it does in the pre-clip norm
    assert rel_close(stats.post_clip_norm.item(), reference.exact_norm(after, 2.0), 2e-6)
    assert rel_close(stats.total_norm.item(), reference.exact_norm(grads + grads[2:3], 2.0), 2e-6)


@needs_timm
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's NumPy, on inf * 0
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("value", [math.inf, math.nan], ids=["inf", "nan"])
def test_agc_with_a_nonfinite_gradient_clips_the_others_as_timm(backend, value):
    params, grads = _agc_case(seed=5)
    grads[2][5, 3] = value
    ours, theirs = _with_grads(params, grads), _with_grads(params, grads)
    total = ampclip.adaptive_clip_grad_(ours, clip_factor=0.01, backend=backend)
    timm_agc(theirs, clip_factor=0.01)
    assert not math.isfinite(total.item())  # what tells the caller to skip the step
    clipped = 0
    for q, t, g in zip(ours, theirs, grads):
        torch.testing.assert_close(q.grad, t.grad, rtol=4e-7, atol=0, equal_nan=True)
        clipped += not torch.equal(q.grad, g)
    assert clipped >= 4


@pytest.mark.parametrize("meta_first", [False, True], ids=["cpu_first", "meta_first"])
def test_agc_measures_every_device_before_it_writes_any(meta_first):
    params, grads = _agc_case(seed=6)
    ours = _with_grads(params, grads)
    meta = torch.nn.Parameter(torch.empty(4, 3, device="meta"))
    meta.grad = torch.empty(4, 3, device="meta")
    mixed = [meta, *ours] if meta_first else [*ours, meta]
    if not meta_first:  # the CPU norm first: the meta one cannot be copied to it, as in get_total_norm
        theirs = pytest.raises(NotImplementedError, lambda: torch.nn.utils.get_total_norm([p.grad for p in mixed]))
        with pytest.raises(type(theirs.value)):
            ampclip.adaptive_clip_grad_(mixed, clip_factor=0.01)
        assert all(bitwise_equal(q.grad, g) for q, g in zip(ours, grads))
        return
    total = ampclip.adaptive_clip_grad_(mixed, clip_factor=0.01)
    assert total.device.type == "meta"
    for q, e in zip(ours, _exact_agc(params, grads, 0.01, 1e-3)):
        torch.testing.assert_close(q.grad.double(), e, rtol=RTOL[torch.float32], atol=0)


def test_agc_without_parameters_or_gradients():
    p = torch.nn.Parameter(torch.randn(3, 4))
    assert ampclip.adaptive_clip_grad_([p]).item() == 0.0
    stats = ampclip.GradientClipper([p], "agc").clip_()
    assert stats.total_norm.item() == 0.0 and stats.found_inf.item() == 0.0
    q = torch.nn.Parameter(torch.randn(5))
    q.grad = torch.randn(5)
    stats = ampclip.GradientClipper([p, q], "agc").clip_()  # some parameters without a gradient
    assert stats.per_tensor_norms.shape == (1,) and stats.clip_coef.shape == (1,)


def test_agc_bad_input_is_a_clear_error_before_anything_is_written():
    params, grads = _agc_case()
    ours = _with_grads(params, grads)
    ours.append(torch.nn.Parameter(torch.zeros(5)))
    ours[-1].grad = torch.randn(1).expand(5)  # its elements share memory: cannot be written in place
    before = [q.grad.clone() for q in ours]
    with pytest.raises(ValueError, match="share memory"):
        ampclip.adaptive_clip_grad_(ours)
    assert all(bitwise_equal(q.grad, b) for q, b in zip(ours, before))
    with pytest.raises(ValueError, match="clip_factor"):
        ampclip.adaptive_clip_grad_(ours, clip_factor=-1.0)
    with pytest.raises(ValueError, match="eps"):
        ampclip.GradientClipper(ours, "agc", eps=math.nan)
    with pytest.raises(ValueError, match="max_norm"):
        ampclip.GradientClipper(ours, "agc", max_norm=1.0)
    with pytest.raises(ValueError, match="named parameters"):
        ampclip.GradientClipper(ours, "agc", exclude=["fc.weight"])
    with pytest.raises(ValueError, match="does not have"):
        ampclip.GradientClipper([("a", ours[0])], "agc", exclude=["fc.weight"])
    with pytest.raises(ValueError, match="passes of its own"):
        ampclip.GradientClipper(ours[:1], "agc").clip_(defer_to=torch.optim.AdamW(ours[:1], fused=True))
    with pytest.raises(ValueError, match="gradient_clip_strategy 'agc'"):
        ampclip.AMPConfig(gradient_clip_strategy="agc", gradient_clip_options={"clip_factor": -0.1})
    with pytest.raises(ValueError, match="passes of its own|no single bound"):
        ampclip.FusedClipper(ours[:1], strategy=ampclip.strategies.AGC()).clip_(max_norm=1.0)


def test_agc_state_round_trips():
    params, grads = _agc_case()
    a = ampclip.GradientClipper(_with_grads(params, grads), "agc", clip_factor=0.05, eps=1e-4)
    b = ampclip.GradientClipper(_with_grads(params, grads), "agc", clip_factor=0.05, eps=1e-4)
    a.clip_()
    b.load_state_dict(a.state_dict())
    assert b.get_statistics()["clipped_steps"] == 1
    with pytest.raises(ValueError, match="strategy"):
        ampclip.GradientClipper(_with_grads(params, grads), "norm").load_state_dict(a.state_dict())


def test_agc_through_amp_config_and_the_trainer():
    # No branch on the strategy in the config or the trainer: the name and its options are enough.
    config = ampclip.AMPConfig(precision="bf16", gradient_clip_strategy="agc",
                               gradient_clip_options={"clip_factor": 0.001, "exclude": ["head.weight"]})
    assert config.gradient_clip_max_norm is None  # AGC has no global bound
    model = TinyGPT(TinyGPTConfig(context=8, d_model=16, n_layer=1, n_head=2))
    trainer = ampclip.create_amp_trainer(model, amp_config=config)
    batches = random_batches(4, 8, seed=0)
    losses = [trainer.training_step(next(batches)) for _ in range(3)]
    assert all(math.isfinite(loss) for loss in losses)
    stats = trainer.last_clipping_stats
    assert stats["clipped"] and stats["post_clip_norm"] < stats["pre_clip_norm"]
    assert trainer.get_gradient_summary()["strategy"] == "agc"


# ------------------------------------------------------------------------------------------------ ZClip

ZCLIP_SETTINGS = [
    pytest.param({}, id="defaults"),
    pytest.param({"max_grad_norm": 10.0, "z_thresh": 2.0}, id="zscore-cap10"),
    pytest.param({"max_grad_norm": None, "mode": "percentile", "z_thresh": 1.5}, id="percentile"),
    pytest.param({"max_grad_norm": None, "clip_option": "mean", "skip_update_on_spike": True, "warmup_steps": 5},
                 id="mean-skip"),
    pytest.param({"max_grad_norm": 50.0, "alpha": 0.9, "clip_factor": 0.7, "warmup_steps": 0, "eps": 1e-3},
                 id="factor-nowarmup"),
]


def _spiky_run(steps, seed, shapes=((64, 32), (32,), (300,))):
    """Per step a list of gradients: norms around 1 with a slow drift, and random spikes of 5x to 60x."""
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        scale = (1.0 + 0.3 * torch.rand((), generator=gen).item()) * (1 + step / steps)
        if torch.rand((), generator=gen).item() < 0.06:
            scale *= 5 + 55 * torch.rand((), generator=gen).item()
        yield [torch.randn(s, generator=gen) * scale / 50 for s in shapes]


def _package_zclip(settings):
    module = torch.nn.Module()
    module.params = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(s)) for s in ((64, 32), (32,), (300,))])
    return zclip_package.ZClip(**settings), module


@needs_zclip
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("settings", ZCLIP_SETTINGS)
def test_zclip_matches_the_package_over_a_spiky_run(backend, settings):
    theirs, module = _package_zclip(settings)
    params = [torch.nn.Parameter(torch.zeros_like(p)) for p in module.params]
    ours = ampclip.ZClip(params, backend=backend, **settings)
    decisions = []
    for grads in _spiky_run(300, seed=3):
        for p, q, g in zip(module.params, params, grads):
            p.grad, q.grad = g.clone(), g.clone()
        before = reference.exact_norm(grads, 2.0)
        theirs.step(module)
        their_coef = reference.exact_norm([p.grad for p in module.params], 2.0) / before
        stats = ours.clip_()
        coef = stats.clip_coef.item()
        assert (coef < 1 - 1e-6) == (their_coef < 1 - 1e-6), len(decisions)  # the same decision, every step
        assert coef == pytest.approx(their_coef, rel=2e-6, abs=0)
        for p, q in zip(module.params, params):
            torch.testing.assert_close(q.grad, p.grad, rtol=2e-6, atol=1e-12)
        decisions.append(coef < 1 - 1e-6)
        if theirs.initialized:
            stats = ours.statistics()
            assert stats["zclip_ready"]
            assert stats["zclip_mean"] == pytest.approx(theirs.mean, rel=1e-5)
            assert stats["zclip_std"] == pytest.approx(theirs.var**0.5, rel=1e-4)
    assert 5 <= sum(decisions) < len(decisions)  # the run exercised both branches


@needs_zclip
@pytest.mark.skipif(not HAS_TRITON, reason="triton cannot run here")
def test_zclip_on_triton_matches_the_package():
    settings = {"max_grad_norm": 10.0, "warmup_steps": 5, "alpha": 0.8}
    theirs, module = _package_zclip(settings)
    params = [torch.nn.Parameter(torch.zeros_like(p)) for p in module.params]
    ours = ampclip.ZClip(params, backend="triton", **settings)
    for grads in _spiky_run(20, seed=4):
        for p, q, g in zip(module.params, params, grads):
            p.grad, q.grad = g.clone(), g.clone()
        theirs.step(module)
        ours.clip_()
        for p, q in zip(module.params, params):
            torch.testing.assert_close(q.grad, p.grad, rtol=2e-6, atol=1e-12)
    assert ours.statistics()["zclip_mean"] == pytest.approx(theirs.mean, rel=1e-5)


@pytest.mark.parametrize("backend", FAST)
def test_zclip_resumes_bit_for_bit(backend):
    def make():
        return ampclip.ZClip([torch.nn.Parameter(torch.zeros(s)) for s in ((64, 32), (32,), (300,))],
                             max_grad_norm=5.0, warmup_steps=8, backend=backend)

    runs = list(_spiky_run(40, seed=5))
    whole, first = make(), make()
    for grads in runs[:20]:
        for clipper in (whole, first):
            for p, g in zip(clipper.clipper.params, grads):
                p.grad = g.clone()
            clipper.clip_()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    resumed = make()
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    for grads in runs[20:]:
        coefs = []
        for clipper in (whole, resumed):
            for p, g in zip(clipper.clipper.params, grads):
                p.grad = g.clone()
            coefs.append(clipper.clip_().clip_coef)
        assert bitwise_equal(coefs[0], coefs[1])
        for p, q in zip(whole.clipper.params, resumed.clipper.params):
            assert bitwise_equal(p.grad, q.grad)
    assert whole.state_dict()["state"].equal(resumed.state_dict()["state"])
    with pytest.raises(ValueError, match="warmup_steps"):
        ampclip.ZClip([torch.nn.Parameter(torch.zeros(3))], warmup_steps=9).load_state_dict(whole.state_dict())


def test_zclip_skips_overflowing_steps_without_touching_its_state():
    p = torch.nn.Parameter(torch.zeros(4))
    zclip = ampclip.ZClip([p], warmup_steps=3, max_grad_norm=None)
    norms = [1.0, 1.2, 0.9, math.inf, 1.1, math.nan, 30.0]
    coefs = []
    for value in norms:
        p.grad = torch.tensor([value, 0.0, 0.0, 0.0])
        stats = zclip.clip_()
        coefs.append(stats.clip_coef.item())
        assert stats.found_inf.item() == float(not math.isfinite(value))
    state = zclip.statistics()
    assert state["zclip_warmup_seen"] == 3 and state["zclip_ready"]
    assert math.isfinite(state["zclip_mean"]) and coefs[-1] < 0.2  # the spike is clipped by a clean EMA


@needs_zclip
def test_zclip_step_without_gradients_changes_no_state_where_the_package_records_zero():
    # The documented difference (docs/strategies.md): an empty step carries no norm. The package measures it as
    # 0.0, so its warm-up holds one more entry.
    p = torch.nn.Parameter(torch.zeros(4))
    ours = ampclip.ZClip([p], warmup_steps=3, max_grad_norm=None)
    theirs, module = zclip_package.ZClip(warmup_steps=3, max_grad_norm=None), torch.nn.Linear(4, 1, bias=False)
    for value in (1.0, None, 1.2):
        p.grad = None if value is None else torch.tensor([value, 0.0, 0.0, 0.0])
        module.weight.grad = None if value is None else torch.tensor([[value, 0.0, 0.0, 0.0]])
        before = ours.state_dict()
        stats = ours.clip_()
        theirs.step(module)
        if value is None:
            assert repr(ours.state_dict()) == repr(before) and stats.total_norm.item() == 0.0
    assert ours.statistics()["zclip_warmup_seen"] == 2 and not ours.initialized
    assert theirs.initialized  # 1.0, 0.0 and 1.2 filled its warm-up of three


def test_zclip_through_gradient_clipper_and_amp_config():
    p = torch.nn.Parameter(torch.zeros(3))
    clipper = ampclip.GradientClipper([p], "zclip", max_norm=None, warmup_steps=2, zclip_mode="percentile",
                                      z_thresh=1.0)
    for value in (1.0, 1.5, 1.2, 9.0):
        p.grad = torch.tensor([value, 0.0, 0.0])
        stats = clipper.clip_()
    assert stats.clip_coef.item() < 1.0
    summary = clipper.get_statistics()
    assert summary["strategy"] == "zclip" and summary["zclip_ready"] and summary["clipped_steps"] == 1
    config = ampclip.AMPConfig(precision="fp32", gradient_clip_strategy="zclip", gradient_clip_max_norm=5.0,
                               gradient_clip_options={"z_thresh": 2.0, "warmup_steps": 2})
    model = TinyGPT(TinyGPTConfig(context=8, d_model=16, n_layer=1, n_head=2))
    trainer = ampclip.create_amp_trainer(model, amp_config=config)
    batches = random_batches(4, 8, seed=0)
    assert all(math.isfinite(trainer.training_step(next(batches))) for _ in range(4))
    assert trainer.get_gradient_summary()["zclip_ready"]


def test_zclip_bad_settings_are_clear_errors():
    params = [torch.nn.Parameter(torch.zeros(3))]
    for kwargs, match in [({"alpha": 1.5}, "alpha"), ({"z_thresh": 0.0}, "z_thresh"), ({"mode": "median"}, "mode"),
                          ({"clip_option": "max"}, "clip_option"), ({"warmup_steps": 2.5}, "warmup_steps"),
                          ({"max_grad_norm": -1.0}, "max_norm"), ({"clip_factor": 0.0}, "clip_factor"),
                          ({"eps": -1e-6}, "eps")]:
        with pytest.raises(ValueError, match=match):
            ampclip.ZClip(params, **kwargs)
    with pytest.raises(ValueError, match="global"):
        ampclip.GradientClipper(params, "zclip", mode="per_tensor")
    with pytest.raises(TypeError, match="percentile"):
        ampclip.GradientClipper(params, "zclip", percentile=5)


# ------------------------------------------------------------------------------------------------ no host sync


def _forbid_host_reads(monkeypatch, allowed=()):
    """item(), tolist(), bool() and float() of any tensor but those ``allowed`` raise."""
    for name in ("item", "tolist", "__bool__", "__float__"):
        original = getattr(torch.Tensor, name)

        def refuse(self, *args, _original=original, **kwargs):
            if any(self is a for a in allowed):
                return _original(self, *args, **kwargs)
            raise AssertionError("a host sync in clip_()")

        monkeypatch.setattr(torch.Tensor, name, refuse)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("strategy", ["agc", "agc-exclude", "zclip", "zclip-standalone"])
def test_clip_reads_nothing_back_from_the_device(backend, strategy, monkeypatch):
    params, grads = _agc_case(seed=6)
    named = [(f"p{i}", p) for i, p in enumerate(_with_grads(params, grads))]
    if strategy == "zclip-standalone":
        clipper = ampclip.ZClip(named, warmup_steps=2, backend=backend)
    elif strategy == "zclip":
        clipper = ampclip.GradientClipper(named, "zclip", warmup_steps=2, backend=backend)
    else:
        exclude = ["p3"] if strategy == "agc-exclude" else None
        clipper = ampclip.GradientClipper(named, "agc", exclude=exclude, backend=backend)
    inv = torch.tensor(0.5)
    clipper.clip_(inv)  # the first step builds the caches
    with monkeypatch.context() as patch:
        # FusedClipper checks that a CPU inv_scale is > 0 (free to read on the CPU, skipped for CUDA tensors)
        _forbid_host_reads(patch, allowed=(inv,))
        for step in range(4):  # warm-up and ready steps, a clean and an overflowing one
            if step == 2:
                named[0][1].grad[0, 0, 0, 0] = math.nan
            stats = clipper.clip_(inv)
    assert stats.found_inf.item() == 1.0  # the probe worked: outside it, item() is back


# ------------------------------------------------------------------------------------------------ device ops


def _count_ops(fn):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            returns = func._schema.returns
            if not (returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)):
                self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    fn()
    with Recorder() as recorder:
        fn()
    return recorder.ops


@pytest.mark.parametrize("tensors", [20, 2000])
def test_adaptive_steps_dispatch_a_handful_of_device_ops(tensors):
    params = [torch.nn.Parameter(torch.randn(4, 16)) for _ in range(tensors)]
    for p in params:
        p.grad = torch.randn(4, 16)
    named = [(f"p{i}", p) for i, p in enumerate(params)]
    agc = ampclip.GradientClipper(named, "agc", enable_monitoring=False)
    agc_exclude = ampclip.GradientClipper(named, "agc", exclude=["p0"], enable_monitoring=False)
    zclip = ampclip.GradientClipper(named, "zclip", enable_monitoring=False)
    # Without inv_scale: with it the ops are the same (it is an argument of each), plus, for a CPU tensor, the
    # read of FusedClipper's check that it is > 0.
    counts = {name: _count_ops(lambda c=c: c.clip_()) for name, c in
              (("agc", agc), ("agc-exclude", agc_exclude), ("zclip", zclip))}
    assert counts["agc"] == ["ampclip.unit_norm_pass.default", "ampclip.unit_norm_pass.default",
                             "ampclip.unit_clip_finalize.default", "ampclip.unit_scale_pass.default",
                             "ampclip.clip_stats_update.default"], counts["agc"]
    assert len(counts["agc-exclude"]) == 6 and "aten.index_copy.default" in counts["agc-exclude"]
    assert counts["zclip"] == ["ampclip.norm_pass.default", "ampclip.zclip_update.default",
                               "ampclip.clip_finalize.default", "ampclip.scale_pass.default",
                               "ampclip.clip_stats_update.default"], counts["zclip"]


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["agc", "zclip"])
def test_gpu_adaptive_clip_never_syncs(strategy):
    params, grads = _agc_case(seed=7)
    ours = [torch.nn.Parameter(p.detach().cuda()) for p in params]
    for q, g in zip(ours, grads):
        q.grad = g.cuda()
    options = {"warmup_steps": 2} if strategy == "zclip" else {}
    clipper = ampclip.GradientClipper(ours, strategy, backend="triton", **options)
    inv = torch.tensor(0.5, device="cuda")
    clipper.clip_(inv)  # tables and layouts are built on the first step (one host-to-device copy each)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            stats = clipper.clip_(inv)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert stats.found_inf.item() == 0.0


@pytest.mark.gpu
@needs_timm
def test_gpu_agc_matches_timm():
    params, grads = _agc_case(seed=8)
    ours = _with_grads([p.cuda() for p in params], [g.cuda() for g in grads])
    baseline = _with_grads(params, grads)
    ampclip.adaptive_clip_grad_(ours, backend="triton")
    timm_agc(baseline)
    for q, t in zip(ours, baseline):
        torch.testing.assert_close(q.grad.cpu(), t.grad, rtol=4e-7, atol=0)


@pytest.mark.gpu
def test_gpu_zclip_step_is_graph_capturable():
    params = [torch.nn.Parameter(torch.zeros(s, device="cuda")) for s in ((64, 32), (300,))]
    twin = [torch.nn.Parameter(torch.zeros_like(p)) for p in params]
    graphed, eager = (ampclip.ZClip(ps, warmup_steps=3, max_grad_norm=None, backend="triton") for ps in (params, twin))
    for ps in (params, twin):
        for p in ps:
            p.grad = torch.zeros_like(p)
    eager.clip_()
    graphed.clip_()  # warm: table, layout and kernels ready
    eager.load_state_dict(graphed.state_dict())
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        stats = graphed.clip_()
    torch.cuda.current_stream().wait_stream(stream)
    graphed.load_state_dict(eager.state_dict())  # the capture did not run the step
    for grads in _spiky_run(30, seed=9, shapes=((64, 32), (300,))):
        for p, q, g in zip(params, twin, grads):
            p.grad.copy_(g.cuda())
            q.grad.copy_(g.cuda())
        graph.replay()
        want = eager.clip_()
        assert torch.equal(stats.clip_coef, want.clip_coef)
        for p, q in zip(params, twin):
            assert torch.equal(p.grad, q.grad)
