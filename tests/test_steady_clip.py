"""The steady-state clip (``ops.steady_clip``): a clip of the same parameters as the last table's, found again in
one C++ loop over the parameters (``_C.claim_grads``) with no list of gradients made, then the two launches on
that table (one, deferred into a fused optimizer). On the Triton backend under its interpreter, against fp64,
against the general path, and with every change to the gradients that must send a clip back to the general
path."""

import math

import pytest
import torch

import ampclip
from ampclip import ops, reference
from ampclip.backends import cpp, tensor_table
from helpers import CPU_BACKENDS, bitwise_equal, clone_all, random_grads, rel_close

pytestmark = [
    pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="the Triton interpreter cannot run here"),
    pytest.mark.skipif(cpp._C is None, reason="needs the compiled extension"),
]

SHAPES = [(1,), (3,), (1500,), (0,), (33, 17), (2, 3, 5), (700,)]
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def params_of(grads):
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    return params


def signature(params) -> bytes:
    return cpp.tensor_signature([p.grad for p in params])[1]


def count_gatherings(monkeypatch) -> list:
    """A list that grows by one at every gathering of gradients (every clip on the general path)."""
    calls = []
    gathered = ops.gathered

    def counted(params):
        calls.append(1)
        return gathered(params)

    monkeypatch.setattr(ops, "gathered", counted)
    return calls


# ------------------------------------------------------------------------------------------ claim_grads


def test_claim_grads_matches_the_signature_and_bumps_each_version_once_when_asked():
    params = params_of(random_grads(SHAPES, DTYPES))
    versions = [p.grad._version for p in params]
    assert cpp._C.claim_grads(params, signature(params), True) is True
    assert [p.grad._version for p in params] == [v + 1 for v in versions]
    assert cpp._C.claim_grads(tuple(params), signature(params), True) is True
    assert cpp._C.claim_grads(params, signature(params), False) is True  # a clip that does not write
    assert [p.grad._version for p in params] == [v + 2 for v in versions]


def _moved(g):
    return g.clone()  # another address


def _other_dtype(g):
    return g.double() if g.dtype != torch.float64 else g.float()


def _other_shape(g):  # the same data pointer, another layout
    return g.view(-1) if g.dim() != 1 else g.view(1, -1)


def _other_strides(g):
    return g.as_strided(g.shape, (0,) * g.dim()) if g.dim() else g


def _offset(g):
    return g.view(-1)[1:].view(-1)


@pytest.mark.parametrize("change", [_moved, _other_dtype, _other_shape, _other_strides, _offset])
@pytest.mark.parametrize("where", [0, -1])
def test_claim_grads_misses_any_change_of_layout(change, where):
    params = params_of(random_grads([(6,), (2, 3), (5,), (4, 2)]))
    sig = signature(params)
    grad = change(params[where].grad)
    if grad.dtype != params[where].dtype or grad.shape != params[where].shape:  # torch refuses such a .grad
        params[where] = torch.nn.Parameter(torch.zeros_like(grad))
    params[where].grad = grad
    after = [p.grad._version for p in params]
    assert cpp._C.claim_grads(params, sig, True) is False
    if where == 0:  # nothing bumped before the miss
        assert [p.grad._version for p in params] == after


def test_claim_grads_misses_missing_gradients_wrappers_and_other_lists():
    from torch.testing._internal.two_tensor import TwoTensor

    params = params_of(random_grads([(6,), (3,), (5,)]))
    sig = signature(params)
    assert cpp._C.claim_grads(params[:2], sig, True) is False  # fewer tensors than the signature
    assert cpp._C.claim_grads(params + params_of([torch.randn(2)]), sig, True) is False  # more
    assert cpp._C.claim_grads(params, sig[:-8], True) is False and cpp._C.claim_grads(params, b"", True) is False
    assert cpp._C.claim_grads([], b"", True) is True  # an empty list has the empty signature
    saved = params[2].grad
    params[2].grad = None
    assert cpp._C.claim_grads(params, sig, True) is False
    params[2].grad = saved
    assert cpp._C.claim_grads(params + [torch.randn(2)], sig, True) is False  # a tensor without a gradient
    assert cpp._C.claim_grads([*params[:2], 3.0], sig, True) is False  # not a tensor
    wrapped = torch.nn.Parameter(TwoTensor(torch.randn(6), torch.randn(6)))
    wrapped.grad = TwoTensor(torch.randn(6), torch.randn(6))
    assert cpp._C.claim_grads([wrapped, *params[1:]], sig, True) is False
    meta = torch.nn.Parameter(torch.empty(6, device="meta"))
    meta.grad = torch.empty(6, device="meta")  # no data pointer to read: missed on its device first
    assert cpp._C.claim_grads([meta, *params[1:]], sig, True) is False


def test_claim_grads_takes_inference_gradients_without_a_version():
    with torch.inference_mode():
        grads = [torch.randn(5), torch.randn(2, 2)]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g
    assert cpp._C.claim_grads(params, signature(params), True) is True


def test_claim_grads_refuses_bad_arguments_with_a_clear_error():
    params = params_of([torch.randn(3)])
    with pytest.raises(TypeError, match="params must be a list or a tuple"):
        cpp._C.claim_grads(iter(params), signature(params), True)
    with pytest.raises(TypeError, match="signature must be bytes"):
        cpp._C.claim_grads(params, "abc", True)
    with pytest.raises(TypeError, match="takes 3 arguments"):
        cpp._C.claim_grads(params, signature(params))


# ------------------------------------------------------------------------------------------ the steady clip


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf], ids=["p2", "p1", "pinf"])
@pytest.mark.parametrize("mode", ["global", "per_tensor"])
@pytest.mark.parametrize("unscale", [None, 1 / 256], ids=["plain", "unscale"])
@pytest.mark.parametrize("value_clip", [None, 0.4], ids=["noclamp", "clamp"])
def test_a_steady_clip_matches_fp64(monkeypatch, norm_type, mode, unscale, value_clip):
    params = params_of(random_grads(SHAPES, DTYPES, seed=1))
    inv = None if unscale is None else torch.tensor(unscale)
    clipper = ampclip.FusedClipper(params, max_norm=0.5, norm_type=norm_type, mode=mode, value_clip=value_clip,
                                   backend="triton")
    clipper.clip_(inv)  # the first clip builds the table
    grads = random_grads(SHAPES, DTYPES, scale=256.0 if unscale else 1.0, seed=2)
    for p, g in zip(params, grads):  # the next step's gradients, in the same tensors
        p.grad.copy_(g)
    gatherings = count_gatherings(monkeypatch)
    stats = clipper.clip_(inv)
    assert gatherings == []
    u = [g.double() * (unscale or 1.0) for g in grads]
    if value_clip is not None:
        u = [t.clamp(-value_clip, value_clip) for t in u]
    norms = [reference.exact_norm([t], norm_type) for t in u]
    total = reference.exact_norm(u, norm_type)
    assert rel_close(stats.total_norm.item(), total, 5e-5) and stats.found_inf.item() == 0.0
    for i, (p, t) in enumerate(zip(params, u)):
        assert rel_close(stats.per_tensor_norms[i].item(), norms[i], 5e-5)
        coef = min(1.0, 0.5 / ((total if mode == "global" else norms[i]) + 1e-6))
        rtol = {torch.float32: 2e-6, torch.float64: 1e-12}.get(p.dtype, 1e-2) + 5e-5
        atol = 1e-7 if p.dtype == torch.float16 else 1e-12  # float16 rounds what it scales to subnormals
        torch.testing.assert_close(p.grad.double(), t * coef, rtol=rtol, atol=atol)
    assert stats.clip_coef.shape == (() if mode == "global" else (len(params),))


def first_clip(params, inv=None, **kwargs):
    """A Triton clipper on ``params`` after its first clip (the general path, which builds the table)."""
    clipper = ampclip.FusedClipper(params, max_norm=0.5, backend="triton", **kwargs)
    clipper.clip_(inv)
    return clipper


def renew(params, grads):
    """The next step's gradients, written into the same tensors."""
    for p, g in zip(params, grads):
        p.grad.copy_(g)


def test_a_steady_clip_is_bitwise_the_general_one_and_bumps_every_version(monkeypatch):
    first, second = random_grads(SHAPES, DTYPES, seed=3), random_grads(SHAPES, DTYPES, scale=4.0, seed=4)
    inv = torch.tensor(0.25)
    twin = params_of(first)
    with monkeypatch.context() as general_only:
        general_only.setattr(ops, "steady_clip", lambda *args, **kwargs: None)
        twin_clipper = first_clip(twin, inv)
        renew(twin, second)
        want = twin_clipper.clip_(inv)
    params = params_of(first)
    clipper = first_clip(params, inv)
    renew(params, second)
    versions = [p.grad._version for p in params]
    gatherings = count_gatherings(monkeypatch)
    got = clipper.clip_(inv)
    assert gatherings == []
    for field in ("total_norm", "clip_coef", "post_clip_norm", "found_inf", "per_tensor_norms"):
        assert bitwise_equal(getattr(got, field), getattr(want, field)), field
    for p, q, version in zip(params, twin, versions):
        assert bitwise_equal(p.grad, q.grad) and p.grad._version == version + 1


@pytest.mark.parametrize("on_nonfinite", ["leave", "zero"])
@pytest.mark.parametrize("position", [0, -1], ids=["first", "last"])
def test_a_steady_clip_finds_inf_and_nan_in_the_first_and_last_element(monkeypatch, on_nonfinite, position):
    params = params_of(random_grads(SHAPES, DTYPES, seed=5))
    inv = torch.tensor(0.5)
    clipper = first_clip(params, inv, on_nonfinite=on_nonfinite)
    grads = random_grads(SHAPES, DTYPES, seed=6)
    grads[position].view(-1)[position] = math.nan if position == 0 else math.inf
    renew(params, grads)
    gatherings = count_gatherings(monkeypatch)
    stats = clipper.clip_(inv)
    assert gatherings == [] and stats.found_inf.item() == 1.0
    for p, g in zip(params, grads):
        assert bitwise_equal(p.grad, torch.zeros_like(g) if on_nonfinite == "zero" else g)


def test_the_drop_in_clips_the_last_tables_gradients_without_gathering_them(monkeypatch):
    grads = random_grads(SHAPES, (torch.float32,), scale=3.0, seed=7)
    params, twin = params_of(grads), params_of(grads)
    ampclip.clip_grad_norm_(params, 1.0, backend="triton")
    torch.nn.utils.clip_grad_norm_(twin, 1.0)
    renew(params, grads)
    renew(twin, grads)
    gatherings = count_gatherings(monkeypatch)
    total = ampclip.clip_grad_norm_(params, 1.0, backend="triton")
    want = torch.nn.utils.clip_grad_norm_(twin, 1.0)
    assert gatherings == [] and rel_close(total.item(), want.item(), 1e-6)
    for p, q in zip(params, twin):
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-6, atol=1e-12)


def train(model, clipper, steps, defer: bool, gatherings=None):
    """``steps`` steps of fused AdamW on fixed inputs, the gradients kept (zero_grad(set_to_none=False): the
    same tensors every step, the steady clip's case), clipped in place or deferred into the optimizer."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    inv = torch.tensor(1 / 256)
    for step in range(steps):
        optimizer.zero_grad(set_to_none=False)
        (model(torch.randn(8, 16, generator=torch.Generator().manual_seed(step))).pow(2).mean() * 256).backward()
        before = clone_all([p.grad for p in model.parameters()])
        versions = [p.grad._version for p in model.parameters()]
        clipper.clip_(inv, defer_to=optimizer if defer else None)
        if defer:  # nothing written, nothing bumped: the optimizer scales the gradients as it reads them
            assert all(bitwise_equal(p.grad, b) for p, b in zip(model.parameters(), before))
            assert [p.grad._version for p in model.parameters()] == versions
            assert isinstance(optimizer.grad_scale, torch.Tensor)
        if gatherings is not None:
            assert len(gatherings) == 1  # the first step's clip gathered; the others took the steady clip
        optimizer.step()


def test_a_deferred_steady_clip_writes_nothing_and_gives_the_in_place_steps(monkeypatch):
    torch.manual_seed(2)
    models = [torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    gatherings = count_gatherings(monkeypatch)
    train(models[0], ampclip.FusedClipper(models[0].parameters(), max_norm=0.05, backend="triton"), 4, True,
          gatherings)
    train(models[1], ampclip.FusedClipper(models[1].parameters(), max_norm=0.05, backend="triton"), 4, False)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ back to the general path


def test_new_gradients_elsewhere_take_the_general_path_once_then_the_steady_one(monkeypatch):
    params = params_of(random_grads(SHAPES, (torch.float32,), seed=8))
    clipper = first_clip(params)
    gatherings = count_gatherings(monkeypatch)
    for step in range(3):
        grads = random_grads(SHAPES, (torch.float32,), scale=2.0, seed=9 + step)
        if step == 1:  # zero_grad(set_to_none=True) and a backward that allocated elsewhere
            for p, g in zip(params, grads):
                p.grad = g.clone()
        else:
            renew(params, grads)
        stats = clipper.clip_()
        exact = reference.exact_norm(grads, 2.0)
        assert rel_close(stats.total_norm.item(), exact, 5e-6)
        coef = min(1.0, 0.5 / (exact + 1e-6))
        for p, g in zip(params, grads):
            torch.testing.assert_close(p.grad.double(), g.double() * coef, rtol=5e-6, atol=1e-12)
        assert len(gatherings) == (0 if step == 0 else 1)


@pytest.mark.parametrize("change", ["transposed", "missing", "noncontiguous", "shared"])
def test_gradients_the_table_cannot_take_as_they_are_take_the_general_path(monkeypatch, change):
    grads = random_grads([(6, 4), (5,), (3, 3)], (torch.float32,), scale=2.0, seed=10)
    params = params_of(grads)
    if change == "noncontiguous":  # staged through a buffer of the table
        params[0].grad = torch.randn(4, 6).t()
    if change == "shared":  # one tensor the gradient of two parameters: scaled one after the other
        params.append(torch.nn.Parameter(torch.zeros(5)))
        params[3].grad = params[1].grad
    clipper = first_clip(params)
    if change == "transposed":  # the same data pointer, other strides
        params[2].grad = params[2].grad.t()
    elif change == "missing":
        params[1].grad = None
    grads = [p.grad for p in params if p.grad is not None]
    if change in ("noncontiguous", "shared"):  # their table the last one found (a clip's last is another)
        ops.norm_pass(grads, backend="triton")
        assert tensor_table.last_table().num_tensors == len(params)
    before = clone_all(grads)
    want = reference.exact_norm(before, 2.0)  # a shared gradient counts twice, as in torch's chain
    gatherings = count_gatherings(monkeypatch)
    stats = clipper.clip_()
    assert len(gatherings) == 1 and rel_close(stats.total_norm.item(), want, 5e-6)
    coef = min(1.0, 0.5 / (want + 1e-6))
    for i, (g, b) in enumerate(zip(grads, before)):
        times = 2 if change == "shared" and i in (1, 3) else 1  # and is scaled twice
        torch.testing.assert_close(g.double(), b.double() * coef ** times, rtol=5e-6, atol=1e-12)


def test_clips_that_need_more_than_two_passes_never_claim(monkeypatch):
    params = params_of(random_grads(SHAPES, (torch.float32,), seed=11))
    claims = []
    monkeypatch.setattr(cpp, "claim_grads", lambda *args: claims.append(1) or False)
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
    for kwargs, call in [({"mode": "per_group", "groups": [params[:3], params[3:]]}, {}),
                         ({"on_nonfinite": "zero"}, {"defer_to": optimizer}),
                         ({}, {"max_norm": lambda total: total * 0.5}),
                         ({"strategy": ampclip.strategies.AGC()}, {}), ({"backend": "cpp"}, {})]:
        clipper = ampclip.FusedClipper(params, max_norm=0.5, **{"backend": "triton", **kwargs})
        clipper.clip_(**call)
        clipper.clip_(**call)
    assert claims == []


def test_two_clippers_in_turn_each_clip_their_own_gradients():
    a, b = params_of(random_grads(SHAPES, seed=12)), params_of(random_grads(SHAPES[:4], seed=13))
    clippers = [first_clip(a), first_clip(b)]
    for step in range(4):
        params = (a, b)[step % 2]
        grads = random_grads(SHAPES if params is a else SHAPES[:4], scale=3.0, seed=14 + step)
        renew(params, grads)
        exact = reference.exact_norm(grads, 2.0)
        assert rel_close(clippers[step % 2].clip_().total_norm.item(), exact, 5e-6)
        for p, g in zip(params, grads):
            torch.testing.assert_close(p.grad.double(), g.double() * min(1.0, 0.5 / (exact + 1e-6)), rtol=5e-6,
                                       atol=1e-12)


def test_a_cleared_table_cache_sends_the_next_clip_to_the_general_path(monkeypatch):
    params = params_of(random_grads(SHAPES, seed=15))
    clipper = first_clip(params)
    tensor_table.clear_cache()
    gatherings = count_gatherings(monkeypatch)
    clipper.clip_()
    assert len(gatherings) == 1


def test_an_expanded_gradient_is_a_clear_error_with_nothing_bumped():
    params = params_of(random_grads([(5,), (3,)], seed=16))
    params[0].grad = torch.randn(1).expand(5)  # stride 0: cannot be written in place
    ops.norm_pass([p.grad for p in params], backend="triton")  # its table the last one found
    versions = [p.grad._version for p in params]
    with pytest.raises(ValueError, match="cannot be written in place"):
        ampclip.FusedClipper(params, max_norm=0.5, backend="triton").clip_()
    assert [p.grad._version for p in params] == versions
