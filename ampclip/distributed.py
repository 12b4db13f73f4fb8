"""Sharded gradients (FSDP2's DTensor gradients): the global per-tensor norms, total norm and found_inf from
the local shards, with one all-reduce per mesh dimension for the whole list, never one per tensor, and
never a gathered copy of a gradient (transformers#46113 measured a 60 GB transient peak per rank from that).

Each gradient's p-th power of its local norm is summed over the mesh dimensions it is sharded on; over a
dimension it is replicated on, only the rank of local index 0 contributes, so the sum counts it once.
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


def is_dtensor(tensor) -> bool:
    """Whether ``tensor`` is a DTensor (False for anything else, and without torch.distributed)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def local(tensor):
    """The local tensor of a DTensor (for a replicated result, the whole value); a plain tensor as it is."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


class Shards:
    """DTensor gradients as the kernels see them: ``locals`` (their local tensors, which share storage with
    the DTensors, so in-place writes update them) and how to combine norms of locals over the mesh."""

    def __init__(self, grads: list):
        from torch.distributed.tensor import Replicate, Shard

        self.mesh = grads[0].device_mesh
        self.locals = []
        sharded = []  # per tensor, per mesh dimension: sharded (True) or replicated (False)
        for i, g in enumerate(grads):
            if g.device_mesh != self.mesh:
                raise ValueError(f"ampclip needs the DTensor gradients of one call on one device mesh; gradient {i} "
                                 "is on another")
            flags = []
            for placement in g.placements:
                if not isinstance(placement, (Shard, Replicate)):
                    raise NotImplementedError(f"gradient {i} has placement {placement}: reduce partial gradients "
                                              "(full_tensor() or redistribute) before clipping")
                flags.append(isinstance(placement, Shard))
            sharded.append(flags)
            self.locals.append(g.to_local())
        device = self.locals[0].device if self.locals else torch.device("cpu")
        flags = torch.tensor(sharded, dtype=torch.bool).reshape(len(grads), self.mesh.ndim)
        # per mesh dimension, which slots of the packed vector (one per tensor, then found_inf) this rank adds
        self._keep = []
        for d in range(self.mesh.ndim):
            first = self.mesh.get_local_rank(d) == 0
            keep = torch.cat([flags[:, d] | first, torch.ones(1, dtype=torch.bool)])
            self._keep.append(keep.to(device))

    def reduce(self, per_tensor: torch.Tensor, found_inf: torch.Tensor, norm_type: float):
        """Global ``(per_tensor_norms, total_norm, found_inf)`` from the local ones. One all-reduce of
        ``len(per_tensor) + 1`` float64 values per mesh dimension (SUM of |g|^p, MAX for the inf-norm;
        found_inf rides along). float64, because the p-th powers of float32 norms can overflow float32."""
        import torch.distributed as dist

        inf = math.isinf(norm_type)
        values = per_tensor.double() if inf else per_tensor.double().pow(norm_type)
        packed = torch.cat([values, found_inf.reshape(1).double()])
        for d, keep in enumerate(self._keep):
            if inf:  # the max of equal replicas is the replica: everyone contributes
                dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=self.mesh.get_group(d))
            else:
                packed = torch.where(keep, packed, torch.zeros_like(packed))
                dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=self.mesh.get_group(d))
        norms = (packed[:-1] if inf else packed[:-1].pow(1.0 / norm_type)).to(per_tensor.dtype)
        found = (packed[-1] != 0).to(torch.float32)
        return norms, ops.combine_norms(norms, norm_type), found

    def total_norm(self, norm_type: float, backend: Optional[str] = None):
        """The global norm of all gradients, as a DTensor replicated over the mesh (torch returns a DTensor
        too; ``.full_tensor()`` and ``.item()`` work on it without communication)."""
        from torch.distributed.tensor import DTensor, Replicate

        per_tensor, _, found_inf = ops.norm_pass(self.locals, None, norm_type, backend=backend)
        _, total, _ = self.reduce(per_tensor, found_inf, norm_type)
        return DTensor.from_local(total, self.mesh, [Replicate()] * self.mesh.ndim, run_check=False)

    def scale_by(self, coef: torch.Tensor, clip_value=None, backend: Optional[str] = None) -> None:
        """Every local shard times ``coef`` (clamped first to ``clip_value``): no communication."""
        ops.scale_by(self.locals, coef, clip_value=clip_value, backend=backend)


def sharded(tensors: list, of_grads: bool = False) -> Optional[Shards]:
    """:class:`Shards` of DTensor ``tensors`` (or of the gradients of DTensor parameters, ``of_grads``), None
    for plain tensors. A list mixing DTensors and plain tensors is a clear error."""
    dtensor = _dtensor_type()
    # FSDP2 shards every parameter it manages: the first one tells (O(1) on the plain path, which is hot)
    if dtensor is None or not tensors or not isinstance(tensors[0], dtensor):
        return None
    items = [t.grad for t in tensors if t.grad is not None] if of_grads else list(tensors)
    if not all(isinstance(t, dtensor) for t in items):
        raise ValueError("ampclip needs all gradients of one call to be DTensors or all plain tensors")
    return Shards(items) if items else None
