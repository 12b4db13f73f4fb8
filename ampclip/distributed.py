"""Sharded gradients (FSDP2's DTensor gradients, or any gradients split across ranks): the global norm,
per-tensor norms and found_inf from one all-reduce per step, not one per tensor.

Under DDP nothing is needed: DDP has already averaged the gradients, so every rank computes the same norm
and takes the same skip decision with no extra collective.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import ops


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor


def local_shards(grads: list[torch.Tensor]) -> tuple[list[torch.Tensor], Optional[object]]:
    """The local tensors of DTensor gradients and the process group they are sharded over.

    Plain tensors come back as they are, with no group. In-place writes to the local tensors update the
    DTensors (they share storage).
    """
    dtensor = _dtensor_type()
    if dtensor is None or not grads or not isinstance(grads[0], dtensor):
        return grads, None
    mesh = grads[0].device_mesh
    if mesh.ndim != 1:
        raise NotImplementedError("ampclip reduces DTensor gradients over 1-D device meshes (FSDP2 without HSDP)")
    for g in grads:
        if not all(p.is_shard() for p in g.placements):  # a replicated gradient would be counted per rank
            raise NotImplementedError(f"ampclip reduces sharded DTensor gradients; got placements {g.placements}")
    return [g.to_local() for g in grads], mesh.get_group()


def reduce_norms(per_tensor: torch.Tensor, found_inf: torch.Tensor, norm_type: float, group):
    """Global per-tensor norms, total norm and found_inf from the local ones: one all-reduce of
    ``len(per_tensor) + 1`` float64 values (SUM of |g|^p, MAX for the inf-norm; found_inf rides along).
    float64, because the p-th powers of float32 norms can overflow float32 (a norm of 1e20 squared)."""
    import torch.distributed as dist

    flag = found_inf.reshape(1).double()
    if math.isinf(norm_type):
        packed = torch.cat([per_tensor.double(), flag])
        dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
        norms = packed[:-1]
    else:
        packed = torch.cat([per_tensor.double().pow(norm_type), flag])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        norms = packed[:-1].pow(1.0 / norm_type)
    found = (packed[-1] != 0).to(torch.float32)
    norms = norms.to(per_tensor.dtype)
    return norms, ops.combine_norms(norms, norm_type), found
