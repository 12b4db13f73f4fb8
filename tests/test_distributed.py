"""DDP and FSDP2 on 2 gloo processes give the norms, clip coefficients and parameters of one process on the
full batch; a non-finite gradient on one rank skips the step on every rank."""

import math
import os

import pytest
import torch

from ampclip import AMPTrainer
from ampclip.models import random_batches
from ampclip.train import build
from helpers import run_two_processes

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
    trainer = build(mode, "fp32", max_norm=0.5, lr=0.05, trainer_cls=_PoisonableTrainer, optimizer="sgd")
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


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
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


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_inf_on_one_rank_skips_the_step_everywhere(mode):
    results = _run(mode, poison_step=1)
    for rank in (0, 1):
        stats, _ = results[rank]
        assert [found for _, _, found in stats] == [False, True, False, False]
    for name in results[0][1]:
        assert torch.equal(results[0][1][name], results[1][1][name])
