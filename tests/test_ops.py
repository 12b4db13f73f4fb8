"""The op contract is registered with torch.library: opcheck on every op and every backend that runs here,
torch.compile(fullgraph=True), one dispatch story for the compiled entries, and the number of device ops a
training step dispatches (the benchmarks record the same counts beside torch's)."""

import math

import pytest
import torch

import ampclip
from ampclip import ops
from helpers import CPU_BACKENDS, params_with, random_grads, rel_close

# Every backend that takes CPU tensors here, the Triton one under its interpreter: opcheck's checks (schema,
# fake tensors, aliasing, autograd registration, AOT dispatch) are what keep torch.compile working on a GPU.
OPCHECK_BACKENDS = CPU_BACKENDS


def _inputs():
    grads = random_grads([(5,), (1025,), (3, 7)], (torch.float32, torch.bfloat16))
    return grads, torch.tensor(0.5)


@pytest.mark.parametrize("backend", OPCHECK_BACKENDS)
@pytest.mark.parametrize("inv_scale", [False, True], ids=["plain", "unscale"])
@pytest.mark.parametrize("clamp", [None, [-0.25, 0.5]], ids=["noclamp", "clamp"])
def test_opcheck_norm_pass(backend, inv_scale, clamp):
    grads, inv = _inputs()
    torch.library.opcheck(torch.ops.ampclip.norm_pass.default,
                          (grads, inv if inv_scale else None, 2.0, clamp, backend))


@pytest.mark.parametrize("backend", OPCHECK_BACKENDS)
@pytest.mark.parametrize("clamp", [None, [-0.25, 0.25]], ids=["noclamp", "clamp"])
def test_opcheck_scale_pass(backend, clamp):
    grads, inv = _inputs()
    args = (grads, torch.tensor(0.3), inv, clamp, torch.tensor(0.0), False, backend)
    torch.library.opcheck(torch.ops.ampclip.scale_pass.default, args)


@pytest.mark.parametrize("backend", OPCHECK_BACKENDS)
@pytest.mark.parametrize("mode", [0, 1, 2], ids=["global", "per_tensor", "per_group"])
@pytest.mark.parametrize("bound_tensor", [False, True], ids=["float_bound", "tensor_bound"])
def test_opcheck_clip_finalize(backend, mode, bound_tensor):
    per_tensor = torch.tensor([0.5, 3.0, 1.25, 0.0])
    total = torch.linalg.vector_norm(per_tensor)
    group_index = torch.tensor([0, 1, 0, 1]) if mode == 2 else None
    bound = torch.tensor(1.5) if bound_tensor else None
    args = (per_tensor, total, 1.5, bound, mode, group_index, 2 if mode == 2 else 0, 2.0, 1e-6, 0, backend)
    torch.library.opcheck(torch.ops.ampclip.clip_finalize.default, args)


@pytest.mark.parametrize("backend", OPCHECK_BACKENDS)
@pytest.mark.parametrize("found", [0.0, 1.0], ids=["clean", "overflow"])
def test_opcheck_scaler_update(backend, found):
    state = torch.tensor([1024.0, 1 / 1024, 3.0, 1.0])
    history = torch.full((3, 8), math.nan)
    args = (state, history, torch.tensor(found), torch.tensor(2.5), 3, 2.0, 0.5, 4, 1, 1.0, 65536.0, True, backend)
    torch.library.opcheck(torch.ops.ampclip.scaler_update.default, args)


@pytest.mark.parametrize("backend", OPCHECK_BACKENDS)
@pytest.mark.parametrize("layers", [False, True], ids=["counters", "layers"])
def test_opcheck_clip_stats_update(backend, layers):
    per_tensor = torch.tensor([0.5, 3.0, 1.25])
    args = (torch.zeros(2, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64) if layers else None,
            per_tensor, torch.tensor(0.5), torch.tensor(0.0), backend)
    torch.library.opcheck(torch.ops.ampclip.clip_stats_update.default, args)


def test_clip_compiles_with_fullgraph():
    def clip(grads, inv_scale):
        per_tensor, total, found_inf = ops.norm_pass(grads, inv_scale, 2.0)
        coef = ops.clip_finalize(per_tensor, total, 1.0)[0]
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


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_drop_in_clip_compiles_with_fullgraph(backend):
    grads = random_grads([(64,), (9, 3)])
    params = params_with(grads)
    compiled = torch.compile(lambda ps: ampclip.clip_grad_norm_(ps, 0.5, backend=backend), fullgraph=True,
                             backend="aot_eager")
    total = compiled(params)
    assert abs(total.item() - ampclip.reference.exact_norm(grads, 2.0)) <= 1e-5 * total.item()
    assert abs(ampclip.reference.exact_norm([p.grad for p in params], 2.0) - 0.5) <= 1e-5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", ["global", "per_tensor"])
def test_fused_clipper_step_compiles_with_fullgraph(backend, mode):
    grads = random_grads([(64,), (9, 3), (5,)], (torch.float32, torch.bfloat16))
    params, twins = params_with(grads), params_with(grads)
    clipper = ampclip.FusedClipper(params, max_norm=0.5, mode=mode, backend=backend)
    eager = ampclip.FusedClipper(twins, max_norm=0.5, mode=mode, backend=backend)
    inv = torch.tensor(0.5)
    compiled = torch.compile(lambda: clipper.clip_(inv).total_norm, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(), eager.clip_(inv).total_norm)
    for p, q in zip(params, twins):
        assert torch.equal(p.grad, q.grad)


class _MetaBackend(ampclip.backends.Backend):
    """A backend for one device that is not the CPU (meta tensors stand in for a GPU's): the reference's passes."""

    name = "triton"
    device_types = frozenset({"meta"})

    def norm_pass(self, grads, inv_scale, norm_type, clamp):
        return ampclip.reference.norm_pass(grads, inv_scale, norm_type, clamp)

    def scale_pass(self, grads, coef, inv_scale, clamp, found_inf, zero_if_inf):
        ampclip.reference.scale_pass(grads, coef, inv_scale, clamp, found_inf, zero_if_inf)


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_a_forced_backend_is_chosen_for_the_gradients_device(monkeypatch, how):
    # A backend that serves the gradients' device but not the CPU, forced by name: the drop-in must pick its
    # path from the gradients, not ask for a CPU backend first (it did: "does not take cpu tensors").
    from ampclip import backends

    monkeypatch.setitem(backends._loaded, "triton", _MetaBackend())
    monkeypatch.setattr(ops, "_default", {})
    params = [torch.nn.Parameter(torch.empty(4, device="meta")) for _ in range(3)]
    for p in params:
        p.grad = torch.empty(4, device="meta")
    if how == "environment":
        monkeypatch.setenv(ops.ENV_BACKEND, "triton")
        total = ampclip.clip_grad_norm_(params, 1.0)
    else:
        total = ampclip.clip_grad_norm_(params, 1.0, backend="triton")
    assert total.device.type == "meta"


# ------------------------------------------------------------------------------------------ dispatch


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="no _C")
def test_compiled_entries_under_a_dispatch_mode_go_through_the_registered_ops():
    grads = random_grads([(300,), (7, 3)])
    want = ampclip.reference.exact_norm(grads, 2.0)
    totals = []
    names = ops.dispatched(lambda: (totals.append(ops.norm_pass(grads, None, 2.0, backend="cpp")[1]),
                                    ops.scale_pass(grads, torch.tensor(0.5), backend="cpp")))
    assert names.count("ampclip.norm_pass.default") == 1 and names.count("ampclip.scale_pass.default") == 1
    assert rel_close(totals[0].item(), want, 1e-6)
    assert rel_close(ampclip.reference.exact_norm(grads, 2.0), want / 2, 1e-6)
    params = ampclip.reference.parameters_of(grads)
    names = ops.dispatched(ampclip.clip_grad_norm_, params, want / 4)  # the drop-in's fast path steps aside too
    assert names == ["ampclip.norm_pass.default", "ampclip.clip_finalize.default", "ampclip.scale_pass.default"]
    assert rel_close(ampclip.reference.exact_norm(grads, 2.0), want / 4, 1e-5)


def _model(n: int) -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(torch.randn(64)) for _ in range(n)]
    for p in params:
        p.grad = torch.randn(64) * 100
    return params


def _count(fn) -> list[str]:
    fn()  # warm: tables and caches built, as in every step after the first
    return ops.dispatched(fn)


@pytest.mark.parametrize("tensors", [20, 2000])
def test_a_step_dispatches_a_handful_of_device_ops_whatever_the_tensor_count(tensors):
    """unscale_and_clip_ + update() and GradientClipper.clip_() dispatch a fixed, small number of ops (each a
    kernel launch on a GPU), independent of the number of tensors: the bookkeeping is in the small ops."""
    params = _model(tensors)
    optimizer = torch.optim.SGD(params, lr=0.1)
    scaler = ampclip.DynamicLossScaler("cpu", init_scale=1024.0)
    loss = torch.ones(())

    def scaler_step():
        scaler.scale(loss)
        scaler.unscale_and_clip_(optimizer, max_norm=1.0)
        scaler.update()

    clipper = ampclip.GradientClipper(params, "norm", max_norm=1.0)
    scaler_ops = [op for op in _count(scaler_step) if op != "aten.mul.Tensor"]  # minus scale() itself
    clipper_ops = _count(clipper.clip_)
    print(f"\n{tensors} tensors: unscale_and_clip_ + update {len(scaler_ops)} ops {scaler_ops}; "
          f"GradientClipper.clip_ {len(clipper_ops)} ops {clipper_ops}")
    # The counts docs/architecture.md and the README quote for the CPU backend (whose norm pass does not compute
    # the coefficient; the Triton one's does: tests/test_launches.py): the norm pass, the coefficient and the scale
    # pass, then the statistics or the scale update: 4, and 5 with the CPU's free read of inv_scale.
    passes = ["ampclip.norm_pass.default", "ampclip.clip_finalize.default", "ampclip.scale_pass.default"]
    assert clipper_ops == [*passes, "ampclip.clip_stats_update.default"]
    assert scaler_ops == ["aten._local_scalar_dense.default", *passes, "ampclip.scaler_update.default"]


def test_torch_chain_op_count_for_comparison():
    """torch's own chain (GradScaler.unscale_ + clip_grad_norm_ + update), counted the same way: recorded in
    the benchmarks beside ampclip's. Here only that it runs and grows with the tensor count."""
    counts = [len(_count(torch_step(tensors))) for tensors in (20, 200)]
    assert counts[1] > counts[0] > 0


def torch_step(tensors: int):
    """torch's chain on ``tensors`` parameters: scale, GradScaler.unscale_, clip_grad_norm_, step, update."""
    params = _model(tensors)
    optimizer = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    loss = torch.ones(())

    def step():
        scaler.scale(loss)
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()

    return step
