"""FusedClipper on every CPU backend (Triton under the interpreter) against fp64 and torch."""

import copy
import math
import pickle

import pytest
import torch

import ampclip
from ampclip import reference
from helpers import CPU_BACKENDS, bitwise_equal, clone_all, random_grads, rel_close

# Small sizes: the Triton interpreter costs about 0.7 ms per program.
SHAPES = [(1,), (3,), (1500,), (0,), (33, 17), (2, 3, 5), (700,)]
BACKENDS = CPU_BACKENDS
NORMS = [pytest.param(p, id=f"p{p}") for p in (2.0, 1.0, 3.0, math.inf)]


def params_with(grads, names=True):
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.randn(g.shape, dtype=g.dtype))
        p.grad = g.clone()
        params.append(p)
    if names:
        return params, [(f"layer{i}.weight", p) for i, p in enumerate(params)]
    return params, params


def exact_clip(grads, max_norm, norm_type, inv=1.0, value_clip=None):
    """fp64 recipe: unscale, value clamp, then the global norm clip. Returns (norm, clipped grads)."""
    u = [g.double() * inv for g in grads]
    if value_clip is not None:
        u = [t.clamp(-value_clip, value_clip) for t in u]
    norm = reference.exact_norm(u, norm_type)
    coef = min(1.0, max_norm / (norm + 1e-6))
    return norm, [t * coef for t in u]


def tol(dtype):
    return {torch.float32: 2e-6, torch.float64: 1e-12}.get(dtype, 1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_type", NORMS)
@pytest.mark.parametrize("unscale", [None, 1 / 512], ids=["plain", "unscale"])
@pytest.mark.parametrize("value_clip", [None, 0.4], ids=["noclamp", "clamp"])
def test_global_clip_matches_fp64(backend, norm_type, unscale, value_clip):
    grads = random_grads(SHAPES, (torch.float32, torch.bfloat16), scale=512.0 if unscale else 1.0)
    params, named = params_with(grads)
    exact, want = exact_clip(grads, 0.5, norm_type, unscale or 1.0, value_clip)
    clipper = ampclip.FusedClipper(named, max_norm=0.5, norm_type=norm_type, value_clip=value_clip, backend=backend)
    stats = clipper.clip_(None if unscale is None else torch.tensor(unscale))
    # The reference backend sums with torch's own fp32 kernels, which round more than fp32 lanes + fp64.
    rtol = 1e-4 if backend == "reference" else 5e-5 if norm_type == 3.0 else 5e-6
    assert rel_close(stats.total_norm.item(), exact, rtol)
    assert stats.found_inf.item() == 0.0 and stats.clip_coef.dim() == 0
    assert rel_close(stats.post_clip_norm.item(), min(exact, 0.5), 1e-4)
    for p, w in zip(params, want):  # the coefficient carries the norm's error
        torch.testing.assert_close(p.grad.double(), w, rtol=tol(p.dtype) + rtol, atol=1e-12)
    assert stats.names == [f"layer{i}.weight" for i in range(len(params))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_global_clip_equals_the_torch_chain(backend):
    grads = random_grads(SHAPES, (torch.float32,), scale=1024.0)
    params, _ = params_with(grads, names=False)
    twin = clone_all(grads)
    inv = torch.tensor(1 / 1024)
    stats = ampclip.FusedClipper(params, max_norm=1.0, backend=backend).clip_(inv)
    total, found = reference.torch_unscale_and_clip(twin, inv, 1.0)
    assert rel_close(stats.total_norm.item(), total.item(), 1e-5) and found.item() == stats.found_inf.item()
    for p, t in zip(params, twin):
        torch.testing.assert_close(p.grad, t, rtol=2e-6, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_type", NORMS)
def test_per_tensor_mode(backend, norm_type):
    grads = random_grads(SHAPES, (torch.float32, torch.float16))
    params, named = params_with(grads)
    stats = ampclip.FusedClipper(named, max_norm=2.0, norm_type=norm_type, mode="per_tensor", backend=backend).clip_()
    assert stats.clip_coef.shape == (len(grads),)
    for i, (p, g) in enumerate(zip(params, grads)):
        norm = reference.exact_norm([g], norm_type)
        assert rel_close(stats.per_tensor_norms[i].item(), norm, 5e-5)
        coef = min(1.0, 2.0 / (norm + 1e-6))
        torch.testing.assert_close(p.grad.double(), g.double() * coef, rtol=tol(g.dtype), atol=1e-7)
    post = reference.exact_norm([p.grad for p in params], norm_type)
    assert rel_close(stats.post_clip_norm.item(), post, 2e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_type", NORMS)
def test_per_group_mode_with_names_and_param_groups(backend, norm_type):
    grads = random_grads(SHAPES, (torch.float32,))
    params, named = params_with(grads)
    groups = [["layer0.weight", "layer2.weight", "layer5.weight"], ["layer1.weight", "layer3.weight"],
              ["layer4.weight", "layer6.weight"]]
    twin_params, _ = params_with(grads, names=False)
    stats = ampclip.FusedClipper(named, 1.5, norm_type, mode="per_group", groups=groups, backend=backend).clip_()
    assert stats.clip_coef.shape == (3,) and stats.group_norms.shape == (3,)
    for g_index, members in enumerate(groups):
        idx = [int(name[5]) for name in members]
        norm = reference.exact_norm([grads[i] for i in idx], norm_type)
        assert rel_close(stats.group_norms[g_index].item(), norm, 5e-5)
        for i in idx:
            want = grads[i].double() * min(1.0, 1.5 / (norm + 1e-6))
            torch.testing.assert_close(params[i].grad.double(), want, rtol=2e-6, atol=1e-12)
    # The same groups as optimizer param groups.
    param_groups = [{"params": [twin_params[int(n[5])] for n in members]} for members in groups]
    ampclip.FusedClipper(param_groups, 1.5, norm_type, mode="per_group", backend=backend).clip_()
    for a, b in zip(params, twin_params):
        assert bitwise_equal(a.grad, b.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("on_nonfinite", ["leave", "zero"])
@pytest.mark.parametrize("position", ["first", "last"])
def test_nonfinite_gradients(backend, on_nonfinite, position):
    grads = random_grads(SHAPES, (torch.float32, torch.float16))
    grads[2].view(-1)[0 if position == "first" else -1] = math.nan
    params, _ = params_with(grads, names=False)
    before = clone_all([p.grad for p in params])
    stats = ampclip.FusedClipper(params, 1.0, on_nonfinite=on_nonfinite, backend=backend).clip_(torch.tensor(0.5))
    assert stats.found_inf.item() == 1.0
    for p, b in zip(params, before):
        assert bitwise_equal(p.grad, torch.zeros_like(b) if on_nonfinite == "zero" else b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_clip_needed_leaves_bits_alone(backend):
    grads = random_grads(SHAPES, (torch.float32, torch.bfloat16))
    params, _ = params_with(grads, names=False)
    stats = ampclip.FusedClipper(params, max_norm=1e6, backend=backend).clip_()
    assert stats.clip_coef.item() == 1.0
    assert all(bitwise_equal(p.grad, g) for p, g in zip(params, grads))


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_to_dict_and_named_norms(backend):
    grads = random_grads(SHAPES, (torch.float32,))
    _, named = params_with(grads)
    stats = ampclip.FusedClipper(named, 0.1, backend=backend).clip_()
    d = stats.to_dict()
    assert set(d) >= {"total_norm", "post_clip_norm", "found_inf", "clip_coef", "per_tensor_norms"}
    assert d["found_inf"] is False and isinstance(d["total_norm"], float)
    assert list(d["per_tensor_norms"]) == [n for n, _ in named]
    assert rel_close(d["post_clip_norm"], 0.1, 1e-4)
    assert set(stats.named_norms()) == {n for n, _ in named}


@pytest.mark.parametrize("mode", ["global", "per_group"])
def test_stats_to_dict_without_names_keeps_every_per_tensor_norm(mode):
    # The coefficient has one element in global mode and one per group in per-group mode: neither may bound
    # how many per-tensor norms the dict keeps.
    grads = random_grads(SHAPES, (torch.float32,))
    params, _ = params_with(grads, names=False)
    groups = [params[:2], params[2:]] if mode == "per_group" else None
    stats = ampclip.FusedClipper(params, 0.1, mode=mode, groups=groups).clip_()
    norms = stats.to_dict()["per_tensor_norms"]
    assert list(norms) == list(range(len(params)))
    want = [float(v) for v in stats.named_norms().values()]
    assert list(norms.values()) == want
    assert all(rel_close(got, reference.exact_norm([g], 2.0), 1e-5) for got, g in zip(want, grads))


def test_bitwise_deterministic_across_runs():
    for backend in BACKENDS:
        results = []
        for _ in range(2):
            params, _ = params_with(random_grads(SHAPES, (torch.float32, torch.bfloat16), seed=3), names=False)
            stats = ampclip.FusedClipper(params, 0.3, backend=backend).clip_(torch.tensor(0.25))
            results.append((stats.total_norm, stats.per_tensor_norms, [p.grad for p in params]))
        assert bitwise_equal(results[0][0], results[1][0]) and bitwise_equal(results[0][1], results[1][1])
        assert all(bitwise_equal(a, b) for a, b in zip(results[0][2], results[1][2]))


def test_missing_gradients_are_skipped_and_reported(monkeypatch):
    grads = random_grads(SHAPES, (torch.float32,))
    params, named = params_with(grads)
    clipper = ampclip.FusedClipper(named, 1e9)
    assert clipper.clip_().names == [name for name, _ in named]  # all present
    params[1].grad = None
    stats = clipper.clip_()
    assert "layer1.weight" not in stats.names and len(stats.per_tensor_norms) == len(grads) - 1
    assert rel_close(stats.total_norm.item(), reference.exact_norm(grads[:1] + grads[2:], 2.0), 2e-6)
    # the compiled gathering and the Python one see the same gradients in the same order
    params[-1].grad = None
    indices, present = ampclip.ops.present_grads(params)
    assert indices == [i for i, p in enumerate(params) if p.grad is not None]
    assert all(a is p.grad for a, p in zip(present, (params[i] for i in indices)))
    monkeypatch.setattr(ampclip.backends.cpp, "present_grads", lambda params, signature=None: None)
    assert ampclip.ops.present_grads(params)[0] == indices


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fused_unscale", [None, 1 / 256], ids=["plain", "unscale"])
def test_deferred_into_fused_adamw_equals_in_place(backend, fused_unscale):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    twin = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    twin.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    opt_twin = torch.optim.AdamW(twin.parameters(), lr=1e-2, fused=True)
    deferred = ampclip.FusedClipper(model.parameters(), max_norm=0.05, backend=backend)
    in_place = ampclip.FusedClipper(twin.parameters(), max_norm=0.05, backend=backend)
    loss_scale = 1.0 if fused_unscale is None else 1 / fused_unscale
    inv = None if fused_unscale is None else torch.tensor(fused_unscale)
    for _ in range(3):
        x = torch.randn(8, 16)
        for m, o in ((model, opt), (twin, opt_twin)):
            o.zero_grad()
            (m(x).pow(2).mean() * loss_scale).backward()
        grads_before = [p.grad.clone() for p in model.parameters()]
        s1 = deferred.clip_(inv, defer_to=opt)
        assert all(bitwise_equal(p.grad, g) for p, g in zip(model.parameters(), grads_before))  # not rewritten
        s2 = in_place.clip_(inv)
        opt.step()
        opt_twin.step()
        assert not hasattr(opt, "grad_scale")  # dropped after its step
        assert rel_close(s1.total_norm.item(), s2.total_norm.item(), 1e-6) and s1.clip_coef.item() < 1
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_deferred_skips_the_step_on_inf():
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    model(torch.randn(2, 4)).sum().backward()
    model.weight.grad[0, 0] = math.inf
    before = [p.detach().clone() for p in model.parameters()]
    stats = ampclip.FusedClipper(model.parameters(), 1.0).clip_(defer_to=opt)
    opt.step()
    assert stats.found_inf.item() == 1.0
    assert all(bitwise_equal(p.detach(), b) for p, b in zip(model.parameters(), before))


def _model_and_twin(seed=3):
    """Two identical models with fused SGD (a lost or a stale scale moves SGD's weights by its factor)."""
    torch.manual_seed(seed)
    models = [torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    return [(m, torch.optim.SGD(m.parameters(), lr=0.1, fused=True)) for m in models]


def _defer(by, model, opt, max_norm=1e-3):
    if by == "clipper":
        return None, ampclip.FusedClipper(model.parameters(), max_norm).clip_(torch.tensor(1 / 1024), defer_to=opt)
    scaler = ampclip.DynamicLossScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.ones(()))
    return scaler, scaler.unscale_and_clip_(opt, max_norm=max_norm)


@pytest.mark.parametrize("by", ["clipper", "scaler"])
@pytest.mark.parametrize("renew", ["zero_grad", "zero_grad-keep", "accumulate"])
def test_a_deferred_scale_whose_step_never_came_does_not_scale_a_step_on_new_gradients(by, renew):
    # No clip_ and no update() in between: only the step itself can tell that the gradients are new.
    (model, opt), (twin, opt_twin) = _model_and_twin()
    x1, x2 = torch.randn(4, 6), torch.randn(4, 6)
    for m in (model, twin):
        (m(x1).pow(2).sum() * 1024).backward()
    _defer(by, model, opt)
    assert hasattr(opt, "grad_scale")  # deferred, and then its step never comes
    for m, o in ((model, opt), (twin, opt_twin)):
        if renew != "accumulate":
            o.zero_grad(set_to_none=renew == "zero_grad")
        m(x2).pow(2).sum().backward()
    opt.step()
    opt_twin.step()  # a plain step on the same gradients
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    assert all(bitwise_equal(a.detach(), b.detach()) for a, b in zip(model.parameters(), twin.parameters()))


@pytest.mark.parametrize("by", ["clipper", "scaler"])
def test_a_deferred_scale_is_applied_by_its_own_step(by):
    (model, opt), (twin, opt_twin) = _model_and_twin()
    x = torch.randn(4, 6)
    for m in (model, twin):
        (m(x).pow(2).sum() * 1024).backward()
    scaler, stats = _defer(by, model, opt)
    assert stats.clip_coef.item() < 1e-2  # so that a lost clip or unscale would show
    ampclip.FusedClipper(twin.parameters(), 1e-3).clip_(torch.tensor(1 / 1024))
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()
    opt_twin.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
@pytest.mark.parametrize("name", sorted(ampclip.strategies.STRATEGIES))
def test_a_copied_clipper_continues_as_the_original(how, name):
    # A FusedClipper holds parameters and strategy state, as an optimizer does: it copies as one does, also
    # after it deferred to an optimizer (which a copy has not).
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    clipper = ampclip.FusedClipper(model.named_parameters(), strategy=ampclip.strategies.create(name))
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    for step in range(3):
        model(torch.randn(4, 6)).pow(2).sum().backward()
        clipper.clip_(defer_to=opt if clipper.can_defer_to(opt) and step == 0 else None)
    copy_of = pickle.loads(pickle.dumps(clipper)) if how == "pickle" else copy.deepcopy(clipper)
    assert not any(a is b for a, b in zip(clipper.params, copy_of.params))
    for i in range(2):
        grads = random_grads([tuple(p.shape) for p in clipper.params], scale=3.0, seed=i)
        for c in (clipper, copy_of):
            for p, g in zip(c.params, grads):
                p.grad = g.clone()
        s1, s2 = clipper.clip_(), copy_of.clip_()
        assert bitwise_equal(s1.total_norm, s2.total_norm) and bitwise_equal(s1.clip_coef, s2.clip_coef)
        assert all(bitwise_equal(a.grad, b.grad) for a, b in zip(clipper.params, copy_of.params))
    assert copy_of.names == clipper.names


def test_flatten_rehomes_grads_into_one_buffer():
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    twin = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    twin.load_state_dict(model.state_dict())
    flat = ampclip.FusedClipper(model.parameters(), max_norm=0.1, flatten=True)
    plain = ampclip.FusedClipper(twin.parameters(), max_norm=0.1)
    buffer = flat._flat.buffers[0]
    for _ in range(2):
        x = torch.randn(4, 8)
        flat.zero_grad()
        plain.zero_grad()
        model(x).sum().backward()
        twin(x).sum().backward()
        assert all(p.grad.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
                   for p in model.parameters())  # backward accumulated into the buffer
        s1, s2 = flat.clip_(), plain.clip_()
        assert bitwise_equal(s1.total_norm, s2.total_norm)
        for a, b in zip(model.parameters(), twin.parameters()):
            assert bitwise_equal(a.grad, b.grad)
    flat.zero_grad()
    assert buffer.abs().sum().item() == 0.0


def test_bad_configuration_raises_clear_errors():
    params, named = params_with(random_grads([(4,), (5,)]))
    with pytest.raises(ValueError, match="mode"):
        ampclip.FusedClipper(params, mode="layerwise")
    with pytest.raises(ValueError, match="groups"):
        ampclip.FusedClipper(params, mode="per_group")
    with pytest.raises(ValueError, match="two groups"):
        ampclip.FusedClipper(named, mode="per_group", groups=[["layer0.weight"], ["layer0.weight", "layer1.weight"]])
    with pytest.raises(ValueError, match="no group"):
        ampclip.FusedClipper(named, mode="per_group", groups=[["layer0.weight"]])
    with pytest.raises(ValueError, match="not one of"):
        ampclip.FusedClipper(named, mode="per_group", groups=[["layer0.weight", "nope"]])
    with pytest.raises(ValueError, match="max_norm"):
        ampclip.FusedClipper(params, max_norm=-1)
    with pytest.raises(ValueError, match="no parameters"):
        ampclip.FusedClipper([])
    with pytest.raises(ValueError, match="on_nonfinite"):
        ampclip.FusedClipper(params, on_nonfinite="explode")
    with pytest.raises(TypeError, match="fused"):
        ampclip.FusedClipper(params).clip_(defer_to=torch.optim.SGD(params, lr=0.1))
    with pytest.raises(ValueError, match="global"):
        ampclip.FusedClipper(params, mode="per_tensor").clip_(defer_to=torch.optim.AdamW(params, fused=True))
    with pytest.raises(TypeError, match="inv_scale"):
        ampclip.FusedClipper(params).clip_(inv_scale="1/1024")
