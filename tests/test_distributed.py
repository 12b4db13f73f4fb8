"""DDP and FSDP2 on 2 gloo processes give the norms, clip coefficients and parameters of one process on the
full batch; a non-finite gradient on one rank skips the step on every rank."""

import math
import os

import pytest
import torch

from ampclip import AMPTrainer
from ampclip.models import random_batches
from ampclip.train import build
from helpers import gloo_worker, run_two_processes

STEPS = 4
BATCH = 8


class _PoisonableTrainer(AMPTrainer):
    """Turns a batch marked ``poison`` into an infinite loss, so this rank's gradients are not finite."""

    def compute_loss(self, batch):
        poison = batch.pop("poison", False)
        loss = super().compute_loss(batch)
        return loss * math.inf if poison else loss


def _train(mode, rank=0, world_size=1, poison_step=None):
    # SGD: parameter differences stay proportional to gradient differences (Adam would turn the
    # rounding noise of gradients that are zero in exact arithmetic into full-size steps).
    # "-overlap": the norms measured during backward (overlap_clip=True raises where that does not apply).
    mode, _, overlap = mode.partition("-")
    trainer = build(mode, "fp32", max_norm=0.5, lr=0.05, trainer_cls=_PoisonableTrainer, optimizer="sgd",
                    overlap_clip=bool(overlap))
    meter = trainer.clipper.fused._meter
    if overlap:  # every clip must take what backward measured
        take = meter.take
        meter.take = lambda *args: _taken(take(*args))
    batches = random_batches(BATCH, 64, seed=3, rank=rank, world_size=world_size)
    stats = []
    for step in range(STEPS):
        batch = next(batches)
        if step == poison_step and rank == world_size - 1:
            batch["poison"] = True
        trainer.training_step(batch)
        s = trainer.last_clipping_stats
        stats.append((s["pre_clip_norm"], s["clip_coef"], s["found_inf"]))
    model = trainer.model.module if mode == "ddp" else trainer.model
    params = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        params[name] = full.detach().clone()
    return stats, params


def _taken(measured):
    assert measured is not None, "the clip measured the gradients itself"
    return measured


def _worker(rank, world_size, port, mode, poison_step, results):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results[rank] = _train(mode, rank, world_size, poison_step)
    finally:
        dist.destroy_process_group()
        os._exit(0)


def _run(mode, poison_step=None):
    return run_two_processes(_worker, mode, poison_step)


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "ddp-overlap", "fsdp-overlap"])
def test_matches_one_process_on_the_full_batch(mode):
    single_stats, single_params = _train("single")
    results = _run(mode)
    for rank in (0, 1):
        stats, params = results[rank]
        for (norm, coef, found), (norm1, coef1, found1) in zip(stats, single_stats):
            assert found == found1 is False
            assert abs(norm - norm1) <= 1e-5 * norm1 and abs(coef - coef1) <= 1e-5
        assert any(coef < 1 for _, coef, _ in stats)  # the clip was active
        for name, value in params.items():
            torch.testing.assert_close(value, single_params[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "fsdp-overlap"])
def test_inf_on_one_rank_skips_the_step_everywhere(mode):
    results = _run(mode, poison_step=1)
    for rank in (0, 1):
        stats, _ = results[rank]
        assert [found for _, _, found in stats] == [False, True, False, False]
    for name in results[0][1]:
        assert torch.equal(results[0][1][name], results[1][1][name])


def _unwrapped_worker(rank, world_size, port, results):
    # Each rank trains its own copy of a plain model (no DDP, no FSDP): the ranks' gradients differ, and an
    # inf on rank 0 alone must still skip the step on rank 1, with one all-reduce of found_inf.
    from ampclip import AMPConfig

    with gloo_worker(rank, world_size, port, results):
        torch.manual_seed(rank)
        model = torch.nn.Linear(8, 4)
        trainer = AMPTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                             loss_fn=lambda out, y: (out - y).pow(2).mean(), amp_config=AMPConfig(precision="fp32"))
        found, scales = [], []
        for step in range(3):
            x, y = torch.randn(4, 8), torch.randn(4, 4)
            before = model.weight.detach().clone()
            if step == 1 and rank == 0:
                y = y * math.inf
            trainer.training_step((x, y))
            found.append(trainer.last_clipping_stats["found_inf"])
            scales.append(torch.equal(before, model.weight.detach()))
        results[rank] = (found, scales)


def test_ranks_of_an_unwrapped_model_agree_on_every_skip():
    results = run_two_processes(_unwrapped_worker)
    for rank in (0, 1):
        found, unchanged = results[rank]
        assert found == [False, True, False]
        assert unchanged == [False, True, False]  # rank 1 skipped too, though its gradients were finite


def _dtensor_worker(rank, world_size, port, results):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import ampclip

    with gloo_worker(rank, world_size, port, results):
        mesh = init_device_mesh("cpu", (world_size,))
        gen = torch.Generator().manual_seed(0)  # the same full values on every rank
        full = [torch.randn(6, 5, generator=gen), torch.randn(7, generator=gen), torch.randn(3, generator=gen),
                torch.full((5,), 1e20)]  # squares past float32's range, sharded
        placements = [Shard(0), Replicate(), Shard(0), Shard(0)]
        out = {}
        calls = {"all_reduce": 0}
        real_all_reduce = dist.all_reduce

        def counting(*args, **kwargs):
            calls["all_reduce"] += 1
            return real_all_reduce(*args, **kwargs)

        def params_with(values):
            params = []
            for v, placement in zip(values, placements):
                p = torch.nn.Parameter(distribute_tensor(torch.zeros_like(v), mesh, [placement]))
                p.grad = distribute_tensor(v.clone(), mesh, [placement])
                params.append(p)
            return params

        for norm_type in (2.0, 1.0, math.inf):
            params = params_with(full)
            dist.all_reduce = counting
            calls["all_reduce"] = 0
            total = ampclip.clip_grad_norm_(params, 1e21, norm_type)
            dist.all_reduce = real_all_reduce
            out[f"calls-{norm_type}"] = calls["all_reduce"]
            out[f"total-{norm_type}"] = float(total.full_tensor())
            out[f"grads-{norm_type}"] = [p.grad.full_tensor() for p in params]
        params = params_with(full[:3])
        out["value"] = (ampclip.clip_grad_value_(params, 0.5), [p.grad.full_tensor() for p in params])[1]
        params = params_with(full[:3])
        total = ampclip.get_total_norm([p.grad for p in params])
        ampclip.clip_grads_with_norm_(params, 1.0, total)
        out["with_norm"] = [p.grad.full_tensor() for p in params]
        # the loss scaler takes replicated and sharded DTensor gradients, and all ranks skip together
        params = params_with(full[:3])
        if rank == 0:
            params[0].grad.to_local()[0, 0] = math.inf
        scaler = ampclip.DynamicLossScaler("cpu", init_scale=4.0)
        optimizer = torch.optim.SGD(params, lr=0.1)
        scaler.scale(torch.ones(()))
        scaler.unscale_(optimizer)
        out["scaler_found"] = scaler._states[id(optimizer)].found_inf.item()
        results[rank] = out


def test_drop_ins_on_dtensor_gradients_equal_torch_on_the_full_tensors():
    import ampclip

    results = run_two_processes(_dtensor_worker)
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(6, 5, generator=gen), torch.randn(7, generator=gen), torch.randn(3, generator=gen),
            torch.full((5,), 1e20)]
    for rank in (0, 1):
        out = results[rank]
        for norm_type in (2.0, 1.0, math.inf):
            want = [g.clone() for g in full]
            total = ampclip.clip_grad_norm_(ampclip.reference.parameters_of(want), 1e21, norm_type)
            assert abs(out[f"total-{norm_type}"] - total.item()) <= 1e-6 * total.item(), norm_type
            for got, w in zip(out[f"grads-{norm_type}"], want):
                torch.testing.assert_close(got, w, rtol=2e-6, atol=0)
            # one all-reduce for the whole list on a one-dimensional mesh, not one per tensor
            assert out[f"calls-{norm_type}"] == 1
        want = [g.clone() for g in full[:3]]
        torch.nn.utils.clip_grad_value_(ampclip.reference.parameters_of(want), 0.5)
        assert all(torch.equal(a, b) for a, b in zip(out["value"], want))
        want = [g.clone() for g in full[:3]]
        torch.nn.utils.clip_grad_norm_(ampclip.reference.parameters_of(want), 1.0)
        for got, w in zip(out["with_norm"], want):
            torch.testing.assert_close(got, w, rtol=2e-6, atol=0)
        assert out["scaler_found"] == 1.0  # rank 1's shard was finite: it skips all the same


def _rare_norms_worker(rank, world_size, port, results):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import ampclip

    with gloo_worker(rank, world_size, port, results):
        mesh = init_device_mesh("cpu", (world_size,))
        gen = torch.Generator().manual_seed(1)
        full = [torch.randn(6, 5, generator=gen), torch.randn(7, generator=gen)]
        full[0][2, 1] = 0.0  # norm 0 counts non-zeros

        def params_with(values):
            params = []
            for v, placement in zip(values, [Shard(0), Replicate()]):
                p = torch.nn.Parameter(distribute_tensor(torch.ones_like(v), mesh, [placement]))
                p.grad = distribute_tensor(v.clone(), mesh, [placement])
                params.append(p)
            return params

        out = {}
        for norm_type in (0.0, -math.inf, -1.0, -2.0):
            ours, theirs = params_with(full), params_with(full)
            totals = [ampclip.get_total_norm([p.grad for p in ours], norm_type),
                      torch.nn.utils.get_total_norm([p.grad for p in theirs], norm_type),
                      ampclip.clip_grad_norm_(ours, 0.01, norm_type),
                      torch.nn.utils.clip_grad_norm_(theirs, 0.01, norm_type)]
            out[norm_type] = ([type(t).__name__ for t in totals], [float(t.full_tensor()) for t in totals],
                              [p.grad.full_tensor() for p in ours], [p.grad.full_tensor() for p in theirs])
        # AGC's units are rows of each parameter, which a shard splits: a clear error, nothing written
        params = params_with(full)
        errors = []
        for clip in (lambda: ampclip.adaptive_clip_grad_(params),
                     lambda: ampclip.GradientClipper(params, "agc").clip_()):
            try:
                clip()
                errors.append(None)
            except NotImplementedError as exc:
                errors.append(str(exc))
        out["agc"] = (errors, [p.grad.full_tensor() for p in params])
        results[rank] = out


def test_rare_norm_types_on_dtensor_gradients_equal_torch_and_agc_refuses_them_clearly():
    results = run_two_processes(_rare_norms_worker)
    gen = torch.Generator().manual_seed(1)
    full = [torch.randn(6, 5, generator=gen), torch.randn(7, generator=gen)]
    full[0][2, 1] = 0.0
    for rank in (0, 1):
        out = results[rank]
        for norm_type in (0.0, -math.inf, -1.0, -2.0):
            kinds, totals, ours, theirs = out[norm_type]
            assert kinds == ["DTensor"] * 4, (norm_type, kinds)
            assert totals[0] == totals[1] and totals[2] == totals[3], (norm_type, totals)
            assert totals[0] == totals[2]
            for a, b in zip(ours, theirs):
                assert torch.equal(a, b), norm_type
        errors, grads = out["agc"]
        assert all(e is not None and "DTensor" in e for e in errors), errors
        assert all(torch.equal(g, f) for g, f in zip(grads, full))
