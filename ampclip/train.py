"""Train the bundled tiny GPT with AMPTrainer, on one process or distributed.

    python -m ampclip.train --steps 100
    torchrun --nproc-per-node 2 -m ampclip.train --steps 100            # DDP
    torchrun --nproc-per-node 2 -m ampclip.train --steps 100 --fsdp     # FSDP2 (fully_shard)

Every rank draws the same global batch and trains on its slice, so the run matches one process on the
full batch up to float rounding. NCCL on GPUs, gloo on the CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import torch

from .config import create_default_amp_config
from .models import TinyGPT, random_batches
from .trainer import AMPTrainer

__all__ = ["build", "main"]


def build(
    mode: str = "single",
    precision: str = "fp32",
    max_norm: Optional[float] = 1.0,
    lr: float = 3e-3,
    device: Optional[torch.device] = None,
    seed: int = 0,
    trainer_cls: type = AMPTrainer,
    optimizer: str = "adamw",
    **config,
) -> AMPTrainer:
    """A trainer for the tiny GPT: ``mode`` "single", "ddp" or "fsdp" (the process group must be up),
    ``optimizer`` "adamw" or "sgd" (momentum 0.9)."""
    device = device or torch.device("cpu")
    torch.manual_seed(seed)
    model = TinyGPT().to(device)
    if mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    elif mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    elif mode != "single":
        raise ValueError(f"mode must be 'single', 'ddp' or 'fsdp', got {mode!r}")
    amp_config = create_default_amp_config(precision=precision, gradient_clip_max_norm=max_norm, **config)
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, foreach=False)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, foreach=False)
    else:
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
    return trainer_cls(model, opt, amp_config=amp_config)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ampclip.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16, help="global batch size")
    parser.add_argument("--precision", choices=("fp16", "bf16", "fp32"), default=None,
                        help="default: fp16 on a GPU, bf16 on the CPU")
    parser.add_argument("--max-norm", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard) instead of DDP")
    parser.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args(argv)

    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    precision = args.precision or ("fp16" if device.type == "cuda" else "bf16")
    mode = "single" if world_size == 1 else "fsdp" if args.fsdp else "ddp"
    trainer = build(mode, precision, args.max_norm, args.lr, device)
    batches = random_batches(args.batch_size, trainer.model.module.cfg.context if mode == "ddp" else 64,
                             seed=1, device=device, rank=rank, world_size=world_size)
    for step in range(args.steps):
        loss = trainer.training_step_async(next(batches))
        if (step + 1) % args.log_every == 0:
            stats = trainer.last_clipping_stats
            if rank == 0:
                print(f"step {step + 1:5d}  loss {float(loss):.4f}  grad norm {stats['pre_clip_norm']:.4f}  "
                      f"coef {stats['clip_coef']:.3f}  scale {stats['loss_scale']:g}  "
                      f"skipped {stats['found_inf']}", flush=True)
    if world_size > 1:
        dist.destroy_process_group()
        # Leave at once: the gloo backend's teardown at interpreter exit occasionally aborts a worker.
        sys.stdout.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
