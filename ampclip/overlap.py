"""Gradient norms measured while backward still runs: the measuring half of ``FusedClipper(..., overlap=...)``.

A gradient is final the moment autograd has accumulated it, while the rest of backward is still computing.
Its norm can be taken then, on the same stream, so that the norm pass (one read of every gradient, N bytes)
runs during backward and what is left after it is a small finalize and the scale (or nothing but the finalize
when the scale is deferred into a fused optimizer).

* One process (``overlap=True``): a post-accumulate-grad hook on every parameter that requires grad. The
  parameters are put in buckets of about ``bucket_cap_mb`` (25 MB, in reverse registration order, as DDP
  does); a hook only appends its parameter to its bucket, and the hook that completes a bucket launches one
  norm pass over it. At the end of backward (a final autograd callback) the buckets that did not complete
  (some member unused in this backward) are measured as they are.
* DDP (``overlap=ddp_model``): a comm hook that runs the all-reduce (or your own comm hook) and takes the norm
  pass of the *reduced* bucket in the future's callback; every rank gets the same norms.
* FSDP2 (``overlap=True`` on the sharded DTensor parameters): FSDP2 calls the sharded parameters'
  post-accumulate-grad hooks right after its reduce-scatter has written (or added to) their gradients, on the
  stream that wrote them, so the same hooks take the partials of the local shards of the *reduced* gradients.
  The clip reduces them over the mesh with one all-reduce, as it does for the shards it measures itself.
* Every backward starts a new round: what the last backward measured stands (gradient accumulation
  re-measures the accumulated gradients). A parameter that had a gradient but whose hook did not fire in the
  last backward (unused in it, or a gradient set by hand) is measured at the end of backward.
* At clip time the partials are used only if the gradients are the very tensors seen at the end of backward
  (the same set, the same objects); else the clip measures them itself. The partials are of the scaled
  gradients: the clip multiplies them by ``inv_scale`` (exact for the power-of-two scales of a dynamic loss
  scaler).

Only norms that do not depend on ``inv_scale`` other than through a factor can be taken early: a value clamp
(``value_clip``, the "value" strategy) and a strategy with passes of its own (AGC, whose bounds come from
the parameters) are refused.
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
import weakref
from typing import Callable, Optional

import torch

from . import distributed, ops

__all__ = ["DEFAULT_BUCKET_MB", "Overlap", "refusal"]

DEFAULT_BUCKET_MB = 25.0  # DDP's default bucket_cap_mb: a few launches per step, each large enough to stream


class Overlap:
    """How a :class:`ampclip.FusedClipper` measures gradients during backward. ``overlap=True`` is
    ``Overlap()``, ``overlap=ddp_model`` is ``Overlap(ddp_model)``.

    Args:
        ddp: a ``DistributedDataParallel`` model: the norms are taken of its reduced buckets, in a comm hook,
            instead of in post-accumulate-grad hooks on the parameters.
        bucket_cap_mb: the size of a bucket in one process (DDP's own buckets are used under DDP).
        comm_hook, comm_state: a DDP comm hook of yours, ``comm_hook(comm_state, bucket) -> Future``, to run
            inside the measuring one (DDP takes one comm hook: give it here instead of to
            ``ddp.register_comm_hook``). The norms are taken of what its future returns.

    Example::

        clipper = ampclip.FusedClipper(model.parameters(), max_norm=1.0,
                                       overlap=ampclip.Overlap(bucket_cap_mb=50))
    """

    def __init__(self, ddp=None, bucket_cap_mb: float = DEFAULT_BUCKET_MB, comm_hook: Optional[Callable] = None,
                 comm_state=None):
        if ddp is not None and not isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
            raise TypeError(f"overlap takes True, False, a DistributedDataParallel model or an Overlap, got "
                            f"{type(ddp).__name__}")
        if not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be > 0, got {bucket_cap_mb!r}")
        if comm_hook is not None and (ddp is None or not callable(comm_hook)):
            raise ValueError("comm_hook needs a DDP model (Overlap(ddp_model, comm_hook=hook)) and a callable hook")
        self.ddp = ddp
        self.bucket_cap_mb = float(bucket_cap_mb)
        self.comm_hook = comm_hook
        self.comm_state = comm_state

    @classmethod
    def of(cls, spec) -> Optional["Overlap"]:
        """``overlap=`` as given to the clipper: None for False/None, an :class:`Overlap` otherwise."""
        if spec is None or spec is False:
            return None
        if spec is True:
            return cls()
        if isinstance(spec, cls):
            return spec
        return cls(spec)  # a DDP model, or a TypeError


def refusal(params, strategy, spec: Overlap) -> Optional[Exception]:
    """Why ``spec`` cannot measure these parameters for this strategy (the exception to raise), or None."""
    if strategy.own_passes:
        return ValueError(f"overlap measures the gradient norms during backward; strategy {strategy.name!r} runs "
                          "passes of its own after backward (unit-wise norms of the parameters and gradients): use "
                          "overlap=False")
    if strategy.value_clip is not None:
        return ValueError("overlap cannot take a value clamp (value_clip, the 'value' strategy): the clamp applies "
                          "to the unscaled values, so the norm of the clamped gradients is not the scaled norm "
                          "times inv_scale; use overlap=False")
    if len({id(p) for p in params}) != len(params):
        return ValueError("overlap measures each parameter once: a parameter appears twice in the clipper's list")
    if len({distributed.is_dtensor(p) for p in params}) > 1:
        return ValueError("overlap needs the clipper's parameters to be all DTensors (FSDP2) or all plain tensors, "
                          "as the clip does")
    if spec.ddp is not None:
        hooks = getattr(spec.ddp, "_comm_hooks", [])
        if hooks:
            name = getattr(hooks[0][0], "__qualname__", "a comm hook")
            return RuntimeError(f"this DDP model already has a comm hook ({name}), and DDP takes one: pass yours to "
                                "ampclip.Overlap(ddp_model, comm_hook=hook, comm_state=state) instead of "
                                "ddp_model.register_comm_hook, and the norms are taken of what it returns")
        own = {id(p) for p in spec.ddp.parameters()}
        missing = [i for i, p in enumerate(params) if p.requires_grad and id(p) not in own]
        if missing:
            return ValueError(f"overlap=ddp_model measures the DDP model's buckets: parameters {missing[:5]} of the "
                              "clipper are not the model's")
    return None


class _Round:
    """What one backward measured. ``parts``: (bucket, index tensor, per-tensor norms, found_inf) per norm pass,
    the bucket -1 for a pass over another set (a bucket not complete, the gradients no hook saw, a DDP bucket);
    ``measured``: a flag per parameter; ``count``: the parameters measured; after the end of backward,
    ``result``: the present gradients, their norms, the total and found_inf, ready for the clip."""

    __slots__ = ("pending", "measured", "count", "parts", "buckets", "closed", "result")

    def __init__(self, buckets: int, params: int):
        self.pending = [[] for _ in range(buckets)]
        self.measured = bytearray(params)
        self.count = 0
        self.parts: list = []
        self.buckets: list = []
        self.closed = False
        self.result = None


class _Bucket:
    """A DDP bucket as the meter sees it: the clipper's index of each of its parameters that the clipper has
    (``index``, a device tensor), and where their gradients sit in the bucket's flat buffer."""

    __slots__ = ("indices", "index", "first", "sizes", "keep")

    def __init__(self, indices, index, sizes, keep):
        self.indices, self.index, self.first, self.sizes, self.keep = indices, index, indices[0], sizes, keep


class _CommState:
    """The state DDP hands the measuring comm hook: the meter (weakly) and the hook it wraps."""

    def __init__(self, meter, hook, state):
        self.meter, self.hook, self.state = weakref.ref(meter), hook, state


def _measuring_comm_hook(state: _CommState, bucket):
    fut = state.hook(state.state, bucket)
    meter = state.meter()
    return fut if meter is None else meter._on_bucket(bucket, fut)


def _param_hook(ref, index: int, bucket: int):
    def hook(param):  # the whole per-gradient cost: a call, a dereference, a few list operations
        meter = ref()
        if meter is not None:
            meter._ready(index, bucket)

    return hook


def _end_of_backward(ref, round_: _Round, hops: int) -> None:
    """A final autograd callback. It queues itself again ``hops`` times, so that it runs after every callback
    queued during backward (DDP's, which copies the reduced buckets into ``.grad``, among them)."""
    if hops > 0:
        torch.autograd.Variable._execution_engine.queue_callback(
            functools.partial(_end_of_backward, ref, round_, hops - 1))
        return
    meter = ref()
    if meter is not None:
        meter._close(round_)


class Meter:
    """Measures a clipper's gradients during backward (see the module docstring); :meth:`take` hands the clip
    what the last backward measured."""

    def __init__(self, params: list, norm_type: float, backend: str, spec: Overlap):
        self.params = params
        self.norm_type = norm_type
        self.backend = backend
        self.device = params[0].device
        self.ddp = spec.ddp is not None
        self._sharded = distributed.is_dtensor(params[0])  # FSDP2: the kernels read the local shards
        self._acc = ops.accumulation_dtype(params)
        self._paused = 0
        self._round: Optional[_Round] = None
        self._handles: list = []
        self._index_cache: dict[tuple, torch.Tensor] = {}
        self._members: list[list[int]] = []
        if self.ddp:
            self._hook_ddp(spec)
        else:
            self._hook_params(spec.bucket_cap_mb)

    # ---------------------------------------------------------------------------------------- set-up
    def _hook_params(self, bucket_cap_mb: float) -> None:
        cap = max(int(bucket_cap_mb * 2**20), 1)
        members, current, size = [], [], 0
        for i in reversed(range(len(self.params))):  # backward produces the last parameters' gradients first
            p = self.params[i]
            if not p.requires_grad:
                continue
            current.append(i)
            size += distributed.local(p.detach()).numel() * p.element_size()
            if size >= cap:
                members.append(current[::-1])  # ascending: the buckets, last first, list the parameters in order
                current, size = [], 0
        if current:
            members.append(current[::-1])
        self._members = members
        self._sizes = [len(m) for m in members]
        ref = weakref.ref(self)
        for b, bucket in enumerate(members):
            for i in bucket:
                self._handles.append(self.params[i].register_post_accumulate_grad_hook(_param_hook(ref, i, b)))

    def _hook_ddp(self, spec: Overlap) -> None:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        ddp = spec.ddp
        self._position = {id(p): i for i, p in enumerate(self.params)}
        self._buckets: dict[tuple, Optional[_Bucket]] = {}
        hook, state = (spec.comm_hook, spec.comm_state) if spec.comm_hook is not None else (allreduce_hook,
                                                                                             ddp.process_group)
        try:
            ddp.register_comm_hook(_CommState(self, hook, state), _measuring_comm_hook)
        except RuntimeError as exc:  # a built-in comm hook, or another clipper's
            raise RuntimeError(f"cannot measure in this DDP model's comm hook: {exc} (DDP takes one comm hook: pass "
                               "yours as ampclip.Overlap(ddp_model, comm_hook=hook, comm_state=state))") from exc
        ref = weakref.ref(self)
        # A forward under no_sync (gradient accumulation) makes what an earlier backward measured stale.
        self._handles.append(ddp.register_forward_pre_hook(lambda module, args: _forget_unless_synced(ref, module)))

    # The hooks go with the meter (a DDP comm hook stays: DDP cannot remove one; it then only runs the all-reduce).
    def __del__(self):
        for handle in getattr(self, "_handles", ()):
            handle.remove()

    # A copy of a clipper (pickle, deepcopy) measures nothing during backward: its hooks would be on the original
    # parameters. Its clips measure the gradients themselves.
    def __getstate__(self) -> dict:
        return {"params": self.params, "norm_type": self.norm_type, "backend": self.backend, "device": self.device,
                "ddp": self.ddp}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._sharded = distributed.is_dtensor(self.params[0])
        self._acc, self._paused, self._round, self._handles = ops.accumulation_dtype(self.params), 0, None, []
        self._index_cache, self._members = {}, []

    # ---------------------------------------------------------------------------------------- during backward
    @contextlib.contextmanager
    def paused(self):
        """No measuring in this block (gradient accumulation's micro-batches but the last): what was measured
        before is forgotten, since a backward in the block changes the gradients."""
        self._paused += 1
        self._round = None
        try:
            yield
        finally:
            self._paused -= 1

    def _start(self) -> _Round:
        r = _Round(len(self._members), len(self.params))
        self._round = r
        torch.autograd.Variable._execution_engine.queue_callback(
            functools.partial(_end_of_backward, weakref.ref(self), r, 1))
        return r

    def _ready(self, i: int, b: int) -> None:
        """Parameter ``i``'s gradient (in bucket ``b``) is final for this backward."""
        if self._paused:
            return
        r = self._round
        if r is None or r.closed or r.measured[i]:  # the first gradient of a new backward
            r = self._start()
        r.measured[i] = 1
        r.count += 1
        pending = r.pending[b]
        pending.append(i)
        if len(pending) == self._sizes[b]:
            self._flush(r, self._members[b], b)

    def _flush(self, r: _Round, members: list[int], bucket: int = -1) -> None:
        """One norm pass over the gradients of ``members`` (all of bucket ``bucket``, or -1 for another set)."""
        params = self.params
        grads = [params[i].grad for i in members]
        if self._sharded:
            grads = [g.to_local() for g in grads]
        per_tensor, _, found = ops.norm_pass(grads, None, self.norm_type, backend=self.backend)
        r.parts.append((bucket, self._index(members), per_tensor, found))

    def _on_bucket(self, bucket, fut):
        """DDP comm hook: measure the bucket once its future holds the reduced gradients."""
        if self._paused:
            return fut
        info = self._bucket(bucket)
        if info is None:  # none of the clipper's parameters
            return fut
        r = self._round
        if r is None or r.closed or r.measured[info.first]:
            r = self._start()
        r.measured[info.first] = 1
        r.count += len(info.indices)
        r.buckets.append(info)
        return fut.then(functools.partial(self._measure_reduced, r, info))

    def _measure_reduced(self, r: _Round, info: _Bucket, fut):
        value = fut.value()
        reduced = value[0] if isinstance(value, (list, tuple)) else value
        pieces = reduced.split(info.sizes)
        if info.keep is not None:
            pieces = [pieces[k] for k in info.keep]
        per_tensor, _, found = ops.norm_pass(list(pieces), None, self.norm_type, backend=self.backend)
        r.parts.append((-1, info.index, per_tensor, found))
        return reduced

    def _bucket(self, bucket) -> Optional[_Bucket]:
        buffer = bucket.buffer()
        key = (bucket.index(), buffer.data_ptr(), buffer.numel())
        if key in self._buckets:
            return self._buckets[key]
        if len(self._buckets) > 4096:  # DDP rebuilds its buckets once after the first step: old keys go stale
            self._buckets.clear()
        grads = bucket.gradients()
        base, elsize = buffer.data_ptr(), buffer.element_size()
        offsets = [(g.data_ptr() - base) // elsize for g in grads]
        sizes = [g.numel() for g in grads]
        if offsets != [sum(sizes[:k]) for k in range(len(sizes))] or sum(sizes) != buffer.numel():
            raise RuntimeError("ampclip overlap: a DDP bucket whose gradients are not laid out back to back")
        keep, indices = [], []
        for k, p in enumerate(bucket.parameters()):
            i = self._position.get(id(p))
            if i is not None:
                keep.append(k)
                indices.append(i)
        info = None
        if indices:
            info = _Bucket(indices, self._index(indices), sizes, None if len(keep) == len(sizes) else keep)
        self._buckets[key] = info
        return info

    def _index(self, indices: list[int]) -> torch.Tensor:
        """``indices`` as a device tensor, cached: the buckets are the same every step, and building one costs
        a copy to the device."""
        key = tuple(indices)
        cached = self._index_cache.get(key)
        if cached is None:
            if len(self._index_cache) > 4 * len(self._members) + 64:
                self._index_cache.clear()
            # without waiting (from pinned memory): a blocking copy would stall the host in the middle of backward
            cached = ops.to_device(torch.tensor(indices, dtype=torch.int64), self.device)
            self._index_cache[key] = cached
        return cached

    # ---------------------------------------------------------------------------------------- end of backward
    def _close(self, r: _Round) -> None:
        if self._round is not r:  # forgotten (no_measure, a forward under no_sync) or replaced
            return
        for b, pending in enumerate(r.pending):  # buckets with a member unused in this backward
            if 0 < len(pending) < self._sizes[b]:
                self._flush(r, pending)
        indices, grads = ops.present_grads(self.params)
        if not grads:
            r.closed = True
            return
        rest = self._unmeasured(r, indices, len(grads))
        if rest:
            self._flush(r, rest)
        if not r.parts:
            r.closed = True
            return
        parts = r.parts
        found = parts[0][3] if len(parts) == 1 else torch.stack([part[3] for part in parts]).amax()
        if indices is None and r.count == len(self.params) and all(part[0] >= 0 for part in parts):
            # every parameter measured in a full bucket, the usual step: the buckets, last first, list them in
            # order, and no scatter is needed
            parts = sorted(parts, key=lambda part: -part[0])
            per_tensor = (parts[0][2] if len(parts) == 1 else torch.cat([part[2] for part in parts])).to(self._acc)
        else:
            norms = torch.empty(len(self.params), dtype=self._acc, device=self.device)
            norms.index_copy_(0, torch.cat([part[1] for part in parts]),
                              torch.cat([part[2] for part in parts]).to(self._acc))
            per_tensor = norms if indices is None else norms.index_select(0, self._index(indices))
        r.result = (indices, grads, per_tensor, self._total(per_tensor), found)
        r.closed = True

    def _total(self, per_tensor: torch.Tensor) -> torch.Tensor:
        p = self.norm_type
        if per_tensor.dtype == torch.float32 and (p <= 4 or math.isinf(p)):
            # float64 holds the p-th powers of any float32 norm for p <= 4, overflow and underflow alike: one op
            # where ops.combine_norms rescales in a dozen
            return torch.linalg.vector_norm(per_tensor, p, dtype=torch.float64).to(torch.float32)
        return ops.combine_norms(per_tensor, p)

    def _unmeasured(self, r: _Round, indices: Optional[list[int]], present: int) -> list[int]:
        """The present gradients that were not measured in this backward."""
        if not self.ddp and r.count == present:  # a hook fired only for a gradient that is there: all measured
            return []
        if self.ddp:
            if r.count == len(self.params):
                return []
            for info in r.buckets:
                for i in info.indices:
                    r.measured[i] = 1
        measured = r.measured
        return [i for i in (range(len(self.params)) if indices is None else indices) if not measured[i]]

    # ---------------------------------------------------------------------------------------- at clip time
    def take(self, indices: Optional[list[int]], grads: list, inv_scale: Optional[torch.Tensor], norm_type: float):
        """``(per_tensor, total, found_inf)`` of the unscaled present gradients from what the last backward
        measured, or None when that does not describe ``grads`` (then the clip measures them). Either way the
        round is used up: the clip may rewrite the gradients."""
        r, self._round = self._round, None
        if r is None or r.result is None or norm_type != self.norm_type:
            return None
        seen_indices, seen, per_tensor, total, found = r.result
        if seen_indices != indices or len(seen) != len(grads) or not all(map(operator.is_, grads, seen)):
            return None
        if inv_scale is not None:
            # Norms scale with inv_scale, exactly for a power of two. found_inf is of the scaled gradients, and
            # g * inv_scale overflows for no finite g while inv_scale <= 1; above 1 (a loss scale below 1) an
            # element that overflows makes the unscaled norm overflow too, and that step is counted as inf.
            per_tensor = per_tensor * inv_scale
            total = total * inv_scale
            found = torch.where((inv_scale > 1) & ~torch.isfinite(total), torch.ones_like(found), found)
        return per_tensor, total, found


def _forget_unless_synced(ref, module) -> None:
    meter = ref()
    if meter is not None and not module.require_backward_grad_sync:
        meter._round = None
