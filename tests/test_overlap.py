"""Norms measured during backward (FusedClipper(..., overlap=...)) against torch on a twin model: one process
with tied, unused and frozen parameters, gradient accumulation, the loss scaler beside torch's GradScaler,
DDP and FSDP2 on two gloo processes; the clip after backward launches no norm pass; what overlap refuses."""

import contextlib
import copy
import gc
import math

import pytest
import torch
import torch.nn.functional as F

import ampclip
from ampclip import ops
from helpers import gloo_worker, run_two_processes

TINY_MB = 1e-6  # about a byte: every parameter in a bucket of its own
BUCKETS = [pytest.param(TINY_MB, id="tiny-buckets"), pytest.param(ampclip.overlap.DEFAULT_BUCKET_MB, id="one-bucket")]
VOCAB = 11


class Net(torch.nn.Module):
    """Tied weights (the head is the embedding), a frozen layer and a layer the forward never uses."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, 8)
        self.hidden = torch.nn.Linear(8, 8)
        self.frozen = torch.nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.unused = torch.nn.Linear(8, 3)
        self.head = torch.nn.Linear(8, VOCAB, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        x = self.emb(ids)
        return self.head(torch.tanh(self.hidden(x)) + self.frozen(x))


def batch(seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (4, 5), generator=gen), torch.randint(0, VOCAB, (4, 5), generator=gen), scale


def loss_of(model, data):
    ids, targets, scale = data
    return F.cross_entropy(model(ids).reshape(-1, VOCAB), targets.reshape(-1)) * scale


def twins(seed=0):
    torch.manual_seed(seed)
    model = Net()
    return model, copy.deepcopy(model)


def clip_recorded(clipper, **kwargs):
    """``clipper.clip_(**kwargs)`` and the names of the ops it dispatched."""
    out = {}
    names = ops.dispatched(lambda: out.setdefault("stats", clipper.clip_(**kwargs)))
    return out["stats"], names


def norm_passes(names):
    """The passes that read the gradients to measure them (clip_norm_pass measures and finds the coefficient)."""
    return sum(name.startswith(("ampclip.norm_pass", "ampclip.clip_norm_pass")) for name in names)


def assert_grads_equal(model, twin, rtol=1e-6):
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=1e-9, msg=name)


# ------------------------------------------------------------------------------------------------ one process
@pytest.mark.parametrize("bucket_cap_mb", BUCKETS)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_one_process_equals_torch_with_tied_unused_and_frozen_parameters(bucket_cap_mb, norm_type):
    model, twin = twins()
    clipper = ampclip.FusedClipper(model.parameters(), max_norm=0.3, norm_type=norm_type,
                                   overlap=ampclip.Overlap(bucket_cap_mb=bucket_cap_mb))
    data = batch(1)
    loss_of(model, data).backward()
    loss_of(twin, data).backward()
    stats, names = clip_recorded(clipper)
    want = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.3, norm_type)
    assert norm_passes(names) == 0, names  # measured during backward
    assert abs(stats.total_norm.item() - want.item()) <= 1e-6 * want.item()
    assert stats.clip_coef.item() < 1 and stats.found_inf.item() == 0
    assert model.unused.weight.grad is None and model.frozen.weight.grad is None
    assert_grads_equal(model, twin)


@pytest.mark.parametrize("bucket_cap_mb", BUCKETS + [pytest.param(0.0002, id="two-per-bucket")])
@pytest.mark.parametrize("norm_type", [2.0, 3.0, 6.0, math.inf])
def test_every_parameter_used_gives_the_norms_in_parameter_order(bucket_cap_mb, norm_type):
    torch.manual_seed(8)
    model = torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))
    twin = copy.deepcopy(model)
    clipper = ampclip.FusedClipper(model.named_parameters(), max_norm=0.1, norm_type=norm_type,
                                   overlap=ampclip.Overlap(bucket_cap_mb=bucket_cap_mb))
    x = torch.randn(9, 6)
    for m in (model, twin):
        m(x).square().mean().backward()
    stats, names = clip_recorded(clipper, inv_scale=torch.tensor(0.25))  # as if the loss had been scaled by 4
    assert norm_passes(names) == 0
    for q in twin.parameters():
        q.grad.mul_(0.25)
    want_norms = torch.stack([torch.linalg.vector_norm(q.grad, norm_type) for q in twin.parameters()])
    torch.testing.assert_close(stats.per_tensor_norms, want_norms, rtol=2e-6, atol=0)
    want = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.1, norm_type)
    assert abs(stats.total_norm.item() - want.item()) <= 2e-6 * want.item()
    assert_grads_equal(model, twin, rtol=2e-6)


@pytest.mark.parametrize("bucket_cap_mb", BUCKETS)
@pytest.mark.parametrize("mode", ["per_tensor", "per_group"])
def test_per_tensor_and_per_group_modes_equal_torch_per_tensor_and_per_group(bucket_cap_mb, mode):
    model, twin = twins()
    names = [n for n, _ in model.named_parameters()]
    groups = [["emb.weight", "hidden.bias"], [n for n in names if n not in ("emb.weight", "hidden.bias")]]
    clipper = ampclip.FusedClipper(model.named_parameters(), max_norm=0.05, mode=mode,
                                   groups=groups if mode == "per_group" else None,
                                   overlap=ampclip.Overlap(bucket_cap_mb=bucket_cap_mb))
    data = batch(2)
    loss_of(model, data).backward()
    loss_of(twin, data).backward()
    stats, dispatched = clip_recorded(clipper)
    assert norm_passes(dispatched) == 0
    by_name = dict(twin.named_parameters())
    present = [n for n in names if by_name[n].grad is not None]
    assert stats.names == present
    want_norms = [torch.linalg.vector_norm(by_name[n].grad).item() for n in present]
    torch.testing.assert_close(stats.per_tensor_norms, torch.tensor(want_norms), rtol=1e-6, atol=0)
    if mode == "per_tensor":
        for n in present:
            torch.nn.utils.clip_grad_norm_([by_name[n]], 0.05)
    else:
        for group in groups:
            torch.nn.utils.clip_grad_norm_([by_name[n] for n in group if by_name[n].grad is not None], 0.05)
    assert_grads_equal(model, twin)


def test_a_gradient_the_hooks_did_not_see_is_measured_and_one_replaced_after_backward_too():
    model, twin = twins()
    clipper = ampclip.FusedClipper(model.parameters(), max_norm=0.2, overlap=ampclip.Overlap(bucket_cap_mb=TINY_MB))
    hand = torch.randn(3, 8)
    for m in (model, twin):  # an unused parameter whose gradient is set by hand: its hook never fires
        m.unused.weight.grad = hand.clone()
    data = batch(3)
    loss_of(model, data).backward()
    loss_of(twin, data).backward()
    stats, names = clip_recorded(clipper)
    assert norm_passes(names) == 0  # measured at the end of backward
    want = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.2)
    assert abs(stats.total_norm.item() - want.item()) <= 1e-6 * want.item()
    assert_grads_equal(model, twin)

    for m in (model, twin):
        m.zero_grad(set_to_none=True)
        loss_of(m, data).backward()
        m.hidden.weight.grad = m.hidden.weight.grad * 3  # after backward: the partial of the old tensor is void
    stats, names = clip_recorded(clipper)
    assert norm_passes(names) == 1
    want = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.2)
    assert abs(stats.total_norm.item() - want.item()) <= 1e-6 * want.item()
    assert_grads_equal(model, twin)


@pytest.mark.parametrize("skip_measure", [False, True], ids=["every-backward-measured", "no_measure"])
def test_four_step_accumulation_equals_torch(skip_measure):
    model, twin = twins()
    clipper = ampclip.FusedClipper(model.parameters(), max_norm=0.4, mode="global",
                                   overlap=ampclip.Overlap(bucket_cap_mb=TINY_MB))
    for step in range(2):
        passes = []
        for micro in range(4):
            data = batch(10 * step + micro)
            quiet = clipper.no_measure() if skip_measure and micro < 3 else contextlib.nullcontext()
            with quiet:
                passes.append(norm_passes(ops.dispatched(lambda data=data: loss_of(model, data).backward())))
            loss_of(twin, data).backward()
        stats, names = clip_recorded(clipper)
        want = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.4)
        assert norm_passes(names) == 0
        assert abs(stats.total_norm.item() - want.item()) <= 1e-6 * want.item()
        assert_grads_equal(model, twin)
        measuring = len([p for p in model.parameters() if p.grad is not None])  # tiny buckets: a pass each
        assert passes == ([0, 0, 0] if skip_measure else [measuring] * 3) + [measuring]
        for m in (model, twin):
            m.zero_grad(set_to_none=True)


def test_a_backward_after_the_measured_one_voids_what_was_measured():
    model, twin = twins()
    clipper = ampclip.FusedClipper(model.parameters(), max_norm=0.4, overlap=True)
    for micro, quiet in enumerate([False, True]):  # measured, then accumulated into without measuring
        data = batch(20 + micro)
        with clipper.no_measure() if quiet else contextlib.nullcontext():
            loss_of(model, data).backward()
        loss_of(twin, data).backward()
    stats, names = clip_recorded(clipper)
    assert norm_passes(names) == 1  # the clip measures the accumulated gradients itself
    want = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.4)
    assert abs(stats.total_norm.item() - want.item()) <= 1e-6 * want.item()
    assert_grads_equal(model, twin)


def test_training_with_set_to_none_and_a_deferred_clip_equals_torch():
    model, twin = twins(4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2, fused=True)
    clipper = ampclip.FusedClipper(model.parameters(), max_norm=0.3, overlap=ampclip.Overlap(bucket_cap_mb=TINY_MB))
    for step in range(4):
        data = batch(30 + step)
        loss_of(model, data).backward()
        loss_of(twin, data).backward()
        stats, names = clip_recorded(clipper, defer_to=opt)
        assert names == ["ampclip.clip_finalize.default"] or norm_passes(names) == 0
        want = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.3)
        assert abs(stats.total_norm.item() - want.item()) <= 1e-6 * want.item()
        opt.step()
        twin_opt.step()
        opt.zero_grad(set_to_none=True)
        twin_opt.zero_grad(set_to_none=True)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", ["adaptive", "zclip"])
def test_adaptive_bounds_see_the_same_norms(strategy):
    model, twin = twins(5)
    options = {"warmup_steps": 2} if strategy == "zclip" else {}
    ours = ampclip.GradientClipper(model.parameters(), strategy, max_norm=10.0, overlap=True, **options)
    plain = ampclip.GradientClipper(twin.parameters(), strategy, max_norm=10.0, **options)
    for step in range(5):
        data = batch(40 + step, scale=1.0 + 3 * (step == 4))  # a spike at the end
        loss_of(model, data).backward()
        loss_of(twin, data).backward()
        a, b = ours.clip_(), plain.clip_()
        assert abs(a.total_norm.item() - b.total_norm.item()) <= 1e-6 * b.total_norm.item()
        assert abs(a.clip_coef.item() - b.clip_coef.item()) <= 1e-6
        assert_grads_equal(model, twin)
        model.zero_grad(set_to_none=True)
        twin.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------------ loss scaling
def _torch_step(model, opt, scaler, data, max_norm):
    scaler.scale(loss_of(model, data)).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("fused", [False, True], ids=["sgd", "fused-adamw"])
def test_scaler_skips_scales_and_weights_equal_torch_gradscaler(fused):
    model, twin = twins(6)

    def optimizer(m):
        return (torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True) if fused
                else torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9))

    opt, twin_opt = optimizer(model), optimizer(twin)
    settings = dict(init_scale=2.0**10, growth_interval=2)
    scaler = ampclip.DynamicLossScaler("cpu", **settings)
    torch_scaler = torch.amp.GradScaler("cpu", **settings)
    clipper = ampclip.FusedClipper(model.parameters(), max_norm=0.3, overlap=ampclip.Overlap(bucket_cap_mb=TINY_MB))
    found, scales = [], []
    for step in range(7):
        data = batch(50 + step, scale=math.inf if step in (2, 5) else 1.0)  # inf from the loss itself
        scaler.scale(loss_of(model, data)).backward()
        out = []
        names = ops.dispatched(lambda out=out: out.append(scaler.unscale_and_clip_(opt, clipper=clipper)))
        assert norm_passes(names) == 0
        stats = out[0]
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        _torch_step(twin, twin_opt, torch_scaler, data, 0.3)
        found.append(bool(stats.found_inf))
        scales.append((scaler.get_scale(), torch_scaler.get_scale()))
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert found == [False, False, True, False, False, True, False]
    assert all(a == b for a, b in scales), scales


class _Inject(torch.autograd.Function):
    """Identity forward; backward gives ``(grad_out * a) * b``: a gradient whose true value passes float32's range
    while the scaled one (grad_out = the loss scale below 1) does not."""

    @staticmethod
    def forward(ctx, w, a, b):
        ctx.a, ctx.b = a, b
        return w.sum() * 0

    @staticmethod
    def backward(ctx, grad_out):
        return (grad_out * ctx.a) * ctx.b, None, None


@pytest.mark.parametrize("big", [False, True], ids=["finite", "overflows-when-unscaled"])
def test_a_loss_scale_below_one_flags_what_overflows_when_unscaled_as_the_clip_after_backward_does(big):
    # The partials are of the scaled gradients; ampclip's found_inf is of the unscaled ones (g * inv_scale), which
    # can overflow only while inv_scale > 1. (torch's GradScaler checks the scaled values and steps on the inf.)
    a = torch.full((4,), 1e20)
    b = torch.full((4,), 1e19 if big else 1.0)
    found = []
    for overlap in (True, False):
        w = torch.nn.Parameter(torch.ones(4))
        opt = torch.optim.SGD([w], lr=0.1)
        scaler = ampclip.DynamicLossScaler("cpu", init_scale=1 / 16)
        clipper = ampclip.FusedClipper([w], max_norm=1.0, overlap=overlap)
        scaler.scale(_Inject.apply(w, a, b)).backward()
        assert torch.isfinite(w.grad).all()  # the scaled gradient is finite, the unscaled one not when big
        found.append(bool(scaler.unscale_and_clip_(opt, clipper=clipper).found_inf))
        scaler.step(opt)
        scaler.update()
        found.append(scaler.get_scale())
    assert found == [big, 1 / 32 if big else 1 / 16] * 2


@pytest.mark.gpu
def test_on_a_gpu_the_scaled_fp16_steps_equal_torch_and_the_clip_neither_measures_nor_syncs():
    model, twin = (m.cuda() for m in twins(9))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2, fused=True)
    scaler = ampclip.DynamicLossScaler("cuda", init_scale=2.0**10, growth_interval=2)
    torch_scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10, growth_interval=2)
    clipper = ampclip.FusedClipper(model.parameters(), max_norm=0.3, overlap=ampclip.Overlap(bucket_cap_mb=TINY_MB))
    for step in range(6):
        ids, targets, _ = batch(70 + step)
        data = (ids.cuda(), targets.cuda(), math.inf if step == 2 else 1.0)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = loss_of(model, data)
        scaler.scale(loss).backward()
        out = []
        if step > 0:  # after the first step every table and index is built: nothing left to copy or wait for
            torch.cuda.set_sync_debug_mode("error")
        try:
            names = ops.dispatched(lambda out=out: out.append(scaler.unscale_and_clip_(opt, clipper=clipper)))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert norm_passes(names) == 0
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            twin_loss = loss_of(twin, data)
        torch_scaler.scale(twin_loss).backward()
        torch_scaler.unscale_(twin_opt)
        torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.3)
        torch_scaler.step(twin_opt)
        torch_scaler.update()
        twin_opt.zero_grad(set_to_none=True)
        assert bool(out[0].found_inf) == (step == 2)
        assert scaler.get_scale() == torch_scaler.get_scale()
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ life cycle
def test_refusals_come_before_anything_is_modified():
    model = Net()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = [p.grad for p in model.parameters()]
    with pytest.raises(ValueError, match="value"):
        ampclip.FusedClipper(model.parameters(), value_clip=0.5, flatten=True, overlap=True)
    with pytest.raises(ValueError, match="value"):
        ampclip.GradientClipper(model.parameters(), "value", clip_value=0.5, overlap=True)
    with pytest.raises(ValueError, match="agc"):
        ampclip.GradientClipper(model.parameters(), "agc", overlap=True)
    with pytest.raises(ValueError, match="twice"):
        ampclip.FusedClipper([(n, p) for n, p in model.named_parameters()] * 2, overlap=True)
    with pytest.raises(TypeError, match="overlap"):
        ampclip.FusedClipper(model.parameters(), overlap="yes")
    with pytest.raises(ValueError, match="bucket_cap_mb"):
        ampclip.Overlap(bucket_cap_mb=0)
    with pytest.raises(ValueError, match="comm_hook"):
        ampclip.Overlap(comm_hook=lambda state, bucket: None)
    assert all(p.grad is g for p, g in zip(model.parameters(), before))


def test_the_hooks_go_with_the_clipper_and_a_copy_measures_at_clip_time():
    model, twin = twins(7)
    clipper = ampclip.FusedClipper(model.parameters(), max_norm=0.2, overlap=True)
    copied = copy.deepcopy(clipper)
    del clipper
    gc.collect()
    data = batch(60)
    assert norm_passes(ops.dispatched(lambda: loss_of(model, data).backward())) == 0
    # the copy holds its own copies of the parameters: give them the twin's gradients
    loss_of(twin, data).backward()
    for p, q in zip(copied.params, twin.parameters()):
        p.grad = None if q.grad is None else q.grad.clone()
    stats, names = clip_recorded(copied)
    assert norm_passes(names) == 1
    want = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.2)
    assert abs(stats.total_norm.item() - want.item()) <= 1e-6 * want.item()


# ------------------------------------------------------------------------------------------------ trainer
def test_the_trainer_measures_during_backward_by_default_and_can_be_told_not_to():
    from ampclip.train import build

    assert build("single", "fp32", overlap_clip=True).clipper.fused._meter is not None
    assert build("single", "fp32").clipper.fused._meter is None  # "auto": during backward on a GPU only
    assert build("single", "fp32", overlap_clip=False).clipper.fused._meter is None
    assert build("single", "fp32", gradient_clip_strategy="value").clipper.fused._meter is None  # auto: not here
    with pytest.raises(ValueError, match="value"):
        build("single", "fp32", gradient_clip_strategy="value", overlap_clip=True)
    with pytest.raises(ValueError, match="overlap_clip"):
        ampclip.AMPConfig(overlap_clip="always")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_the_trainer_gives_the_same_steps_with_and_without_overlap(precision):
    from ampclip.models import random_batches
    from ampclip.train import build

    runs = []
    for overlap in (True, False):
        trainer = build("single", precision, max_norm=0.5, lr=0.05, optimizer="sgd", overlap_clip=overlap,
                        grad_accumulation_steps=2, init_scale=2.0**8 if precision == "fp16" else None)
        batches = random_batches(8, 64, seed=3)
        stats = []
        for micro in range(8):
            trainer.training_step(next(batches))
            if micro % 2:  # an optimizer step
                s = trainer.last_clipping_stats
                stats.append((s["pre_clip_norm"], s["found_inf"], s["loss_scale"]))
        runs.append((stats, [p.detach().clone() for p in trainer.model.parameters()]))
    (a, params_a), (b, params_b) = runs
    for (norm, found, scale), (norm_b, found_b, scale_b) in zip(a, b):
        assert found == found_b and scale == scale_b and abs(norm - norm_b) <= 1e-5 * norm_b
    for p, q in zip(params_a, params_b):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ DDP
def _ddp_models(base, **kwargs):
    from torch.nn.parallel import DistributedDataParallel as DDP

    return [DDP(copy.deepcopy(base), bucket_cap_mb=TINY_MB, find_unused_parameters=True, **kwargs) for _ in range(2)]


def _ddp_worker(rank, world_size, port, results):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook

    with gloo_worker(rank, world_size, port, results):
        torch.manual_seed(0)
        base = Net()
        out = {}
        for case in ("allreduce", "user-hook"):
            ours, twin = _ddp_models(base)
            if case == "user-hook":
                spec = ampclip.Overlap(ours, comm_hook=fp16_compress_hook)
                twin.register_comm_hook(None, fp16_compress_hook)
            else:
                spec = ours
            clipper = ampclip.FusedClipper(ours.parameters(), max_norm=0.3, overlap=spec)
            rows = []
            for step in range(2):
                for micro in range(4):  # accumulation: no_sync on all but the last micro-batch
                    data = batch(100 * step + 10 * rank + micro)
                    for model in (ours, twin):
                        with model.no_sync() if micro < 3 else contextlib.nullcontext():
                            loss_of(model, data).backward()
                stats, names = clip_recorded(clipper)
                want = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.3)
                grads = [(p.grad is None, q.grad is None,
                          None if p.grad is None else (p.grad - q.grad).abs().max().item() / q.grad.abs().max().item())
                         for p, q in zip(ours.parameters(), twin.parameters())]
                rows.append((stats.total_norm.item(), want.item(), norm_passes(names), grads))
                for model in (ours, twin):
                    model.zero_grad(set_to_none=True)
            out[case] = rows
            if case == "user-hook":
                try:
                    ampclip.FusedClipper(twin.parameters(), overlap=twin)
                except RuntimeError as exc:
                    out["refused"] = str(exc)
        results[rank] = out


def test_ddp_on_two_processes_equals_torch_on_a_twin_model():
    results = run_two_processes(_ddp_worker)
    for rank in (0, 1):
        out = results[rank]
        for case in ("allreduce", "user-hook"):
            for total, want, passes, grads in out[case]:
                assert abs(total - want) <= 1e-6 * want, case
                assert passes == 0, case  # measured in the comm hook, on the reduced buckets
                for none, twin_none, err in grads:
                    assert none == twin_none and (err is None or err <= 1e-6), case
        assert "comm hook" in out["refused"] and "Overlap(ddp_model, comm_hook=" in out["refused"]
    assert results[0]["allreduce"][0][0] == results[1]["allreduce"][0][0]  # every rank: the same norm


# ------------------------------------------------------------------------------------------------ FSDP2
def _fsdp_models(base, count=2):
    """``count`` FSDP2 copies of ``base``: its hidden and unused layers sharded on their own, the rest (the tied
    embedding and head, the frozen layer) by the root."""
    from torch.distributed.fsdp import fully_shard

    models = []
    for _ in range(count):
        model = copy.deepcopy(base)
        fully_shard(model.hidden)
        fully_shard(model.unused)
        models.append(fully_shard(model))
    return models


def _local_errors(model, twin):
    """Per parameter: (no grad, twin has no grad, max |difference| / max |twin|) on this rank's shards."""
    rows = []
    for p, q in zip(model.parameters(), twin.parameters()):
        if p.grad is None or q.grad is None:
            rows.append((p.grad is None, q.grad is None, None))
            continue
        a, b = p.grad.to_local(), q.grad.to_local()
        scale = b.abs().max().item() or 1.0
        rows.append((False, False, (a - b).abs().max().item() / scale))
    return rows


def _fsdp_worker(rank, world_size, port, results):
    with gloo_worker(rank, world_size, port, results):
        torch.manual_seed(0)
        base = Net()
        out = {}
        sharded, = _fsdp_models(base, count=1)
        try:  # a list mixing sharded and plain parameters: refused before any hook is registered
            ampclip.FusedClipper([*sharded.parameters(), torch.nn.Parameter(torch.ones(2))], overlap=True)
        except ValueError as exc:
            out["mixed"] = str(exc)
        # "sync": the reduce-scatter runs every micro-batch and adds into the sharded gradients, the micro-batches
        # but the last under no_measure; "sync-measured": the same, every backward measured (the last stands);
        # "no-sync": FSDP2 keeps the unsharded sums and reduces at the last one
        cases = (("sync", TINY_MB, "global"), ("sync-measured", TINY_MB, "global"),
                 ("no-sync", ampclip.overlap.DEFAULT_BUCKET_MB, "global"), ("sync", TINY_MB, "per_tensor"))
        for case, bucket_cap_mb, mode in cases:
            ours, twin = _fsdp_models(base)
            clipper = ampclip.FusedClipper(ours.parameters(), max_norm=0.3, mode=mode,
                                           overlap=ampclip.Overlap(bucket_cap_mb=bucket_cap_mb))
            after = ampclip.FusedClipper(twin.parameters(), max_norm=0.3, mode=mode)  # the clip after backward
            rows = []
            for step in range(3):
                inf_step = step == 2
                for micro in range(4):
                    last = micro == 3
                    # ours: the loss scaled by 4, and on the last micro-batch of the last step inf on rank 1 only
                    poison = math.inf if inf_step and last and rank == 1 else 1.0
                    data = batch(100 * step + 10 * rank + micro)
                    for model, factor in ((ours, 4.0 * poison), (twin, 1.0)):
                        if case == "no-sync":
                            model.set_requires_gradient_sync(last)
                        skip = not last and model is ours and case != "sync-measured"
                        with clipper.no_measure() if skip else contextlib.nullcontext():
                            (loss_of(model, data) * factor).backward()
                stats, names = clip_recorded(clipper, inv_scale=torch.tensor(0.25))
                if inf_step:
                    rows.append(("inf", stats.found_inf.item(), norm_passes(names)))
                else:  # torch's norm of the twin's DTensor gradients, and the clip after backward on them
                    grads = [q.grad for q in twin.parameters() if q.grad is not None]
                    rows.append(("torch", torch.nn.utils.get_total_norm(grads).full_tensor().item(),
                                 stats.total_norm.item()))
                    want = after.clip_()
                    rows.append((stats.total_norm.item(), want.total_norm.item(), norm_passes(names),
                                 (stats.per_tensor_norms - want.per_tensor_norms).abs().max().item()
                                 / want.per_tensor_norms.abs().max().item(), _local_errors(ours, twin)))
                for model in (ours, twin):
                    model.zero_grad(set_to_none=True)
            out[(case, mode)] = rows
        results[rank] = out


def test_fsdp2_on_two_processes_measures_the_reduced_shards_and_equals_the_clip_after_backward():
    results = run_two_processes(_fsdp_worker)
    for rank in (0, 1):
        assert "all DTensors (FSDP2) or all plain" in results[rank].pop("mixed")
        for key, rows in results[rank].items():
            for row in rows:
                if row[0] == "inf":  # rank 1's inf reaches rank 0 through the clip's all-reduce
                    assert row[1] == 1.0 and row[2] == 0, (key, row)
                elif row[0] == "torch":
                    assert abs(row[1] - row[2]) <= 1e-6 * row[1], (key, row)
                else:
                    total, want, passes, norm_error, grads = row
                    assert passes == 0, key  # measured on the reduce-scatter's output, during backward
                    assert abs(total - want) <= 1e-6 * want and norm_error <= 1e-6, (key, row)
                    for none, twin_none, err in grads:
                        assert none == twin_none and (err is None or err <= 1e-6), (key, grads)
    assert results[0][("sync", "global")][0][0] == results[1][("sync", "global")][0][0]


@pytest.mark.gpu
def test_on_a_gpu_fsdp2_measures_on_its_reduce_scatter_stream_and_equals_the_clip_after_backward():
    # One rank (nccl): FSDP2 still reduces on its own stream and calls the hooks there, so this checks that the
    # partials written on that stream are what the clip reads on the current one.
    import torch.distributed as dist

    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(10)
        base = Net().cuda()
        ours, twin = _fsdp_models(base)
        clipper = ampclip.FusedClipper(ours.parameters(), max_norm=0.3, overlap=ampclip.Overlap(bucket_cap_mb=TINY_MB))
        after = ampclip.FusedClipper(twin.parameters(), max_norm=0.3)
        for step in range(3):
            for micro in range(2):
                ids, targets, _ = batch(80 + 2 * step + micro)
                data = (ids.cuda(), targets.cuda(), 1.0)
                with contextlib.nullcontext() if micro else clipper.no_measure():
                    loss_of(ours, data).backward()
                loss_of(twin, data).backward()
            stats, names = clip_recorded(clipper)
            want = after.clip_()
            assert norm_passes(names) == 0
            assert abs(stats.total_norm.item() - want.total_norm.item()) <= 1e-5 * want.total_norm.item()
            for (none, twin_none, err) in _local_errors(ours, twin):
                assert none == twin_none and (err is None or err <= 1e-5)
            for model in (ours, twin):
                model.zero_grad(set_to_none=True)
    finally:
        dist.destroy_process_group()
