"""Adaptive clipping as stand-alone calls, with the arguments of the implementations people know:

* :func:`adaptive_clip_grad_`: adaptive gradient clipping (AGC, NFNets) with ``timm.utils.adaptive_clip_grad``'s
  arguments and results, in four device ops whatever the number of parameters.
* :class:`ZClip`: z-score adaptive clipping with the ``zclip`` package's arguments and decisions, its state on
  the device, no host sync per step.

Both are the strategies of :mod:`ampclip.strategies` ("agc", "zclip") run by a :class:`ampclip.FusedClipper`;
``GradientClipper(params, strategy="agc" | "zclip", ...)`` and ``AMPConfig(gradient_clip_strategy=...)`` give
the same with statistics, loss scaling and the trainer.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import distributed, ops
from .clipper import ClipStats, FusedClipper
from .strategies import AGC, ClipStep, Exclude, ZClipStrategy

__all__ = ["ZClip", "adaptive_clip_grad_"]


def adaptive_clip_grad_(parameters, clip_factor: float = 0.01, eps: float = 1e-3, norm_type: float = 2.0,
                        exclude: Exclude = None, backend: Optional[str] = None) -> torch.Tensor:
    """Adaptive gradient clipping in place, unit-wise, as ``timm.utils.adaptive_clip_grad``: for each parameter
    with a gradient, each unit (a row along dim 0 when it has more than one dimension, else the whole tensor)
    may keep ``max_norm = max(|unit of p|, eps) * clip_factor``; a unit's gradient whose norm is not below it
    is scaled by ``max_norm / max(|unit of g|, 1e-6)``.

    ``parameters``: a Tensor, an iterable of them, or ``named_parameters()`` pairs. ``exclude``: names (with
    named parameters) or a predicate ``(name, param) -> bool`` of parameters left alone (NFNets leave out the
    final classifier). One read of the parameters, one of the gradients, one read and write of the units
    clipped; no host sync. Returns the pre-clip total norm of the gradients (0-d, float32; timm returns None).

    As timm: a gradient holding inf or NaN does not stop the others from being clipped (its own units come out
    NaN or 0, as in timm); the returned norm is then not finite, which tells the caller to skip the step. A
    gradient held by several entries (a parameter listed twice, tied weights) is clipped once. Parameters on
    several devices are measured on each, and every device is measured before any gradient is written (a meta
    parameter beside CPU ones fails as ``get_total_norm`` does, with nothing written). DTensor (sharded)
    parameters raise NotImplementedError.

    Example::

        loss.backward()
        ampclip.adaptive_clip_grad_(model.parameters(), clip_factor=0.01)
        optimizer.step()
    """
    items = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    names = None
    if items and isinstance(items[0], tuple):
        names = [name for name, _ in items]
        items = [p for _, p in items]
    norm_type = ops.check_norm_type(norm_type)
    strategy = AGC(clip_factor, eps, exclude)
    strategy.attach(items, names)
    present = [(i, p) for i, p in enumerate(items) if p.grad is not None]
    if not present:
        return torch.tensor(0.0)
    if any(distributed.is_dtensor(p) or distributed.is_dtensor(p.grad) for _, p in present):
        raise NotImplementedError("adaptive_clip_grad_ does not take sharded (DTensor) parameters or gradients: a "
                                  "shard holds part of a unit (a row of a parameter, or a whole vector); clip the "
                                  "full tensors")
    by_device: dict[torch.device, list] = {}
    for i, p in present:
        by_device.setdefault(p.grad.device, []).append((i, p))
    steps = []
    for device, members in by_device.items():  # every device's checks before anything is written
        grads = [p.grad for _, p in members]
        name = ops.resolve_backend(backend, device)
        ops.check_grads(grads, writable=True)
        steps.append(ClipStep([p for _, p in members], grads, [i for i, _ in members], None, norm_type, False, name,
                              clip_nonfinite=True))
    measured = [strategy.measure(step) for step in steps]
    totals = [m.result.total for m in measured]
    if len(totals) == 1:
        total = totals[0]
    else:  # combined before any write: a norm that cannot reach the first device fails with nothing written
        first = present[0][1].grad.device
        total = ops.combine_norms(torch.stack([t.to(first) for t in totals]), norm_type)
    for step, m in zip(steps, measured):
        strategy.apply(step, m)
    return total


class ZClip:
    """ZClip (Kumar et al. 2025): adaptive clipping of the global norm by its z-score against an EMA of the
    norms, with the ``zclip`` package's arguments, meanings and arithmetic (its ``step(model)`` is
    :meth:`clip_` here), but fused and sync-free: the norm comes from one read of the gradients, the EMA, the
    warm-up buffer and the decision stay on the device in one small op, and the clip is one scale pass.
    CUDA-graph capturable after the first step.

    Args:
        parameters: the parameters (or ``named_parameters()`` pairs) whose gradients are clipped.
        alpha: EMA smoothing factor of the mean and variance.
        z_thresh: in "zscore" mode, the z-score above which a norm is a spike; in "percentile" mode the bound
            is ``mean + z_thresh * std``.
        max_grad_norm: a fixed cap on the bound, during the warm-up too; None for none.
        eps: added to the standard deviation in the z-score.
        warmup_steps: clean steps whose norms initialise the EMA (clipped to ``max_grad_norm`` meanwhile).
        mode: "zscore" or "percentile".
        clip_option: in "zscore" mode, "adaptive_scaling" (clip a spike to
            ``(mean + z_thresh * std / (z / z_thresh)) * clip_factor``) or "mean" (clip it to the mean).
        clip_factor: the multiplier of the adaptive-scaling bound.
        skip_update_on_spike: leave the EMA alone on a spike (else it moves towards the bound).
        norm_type, backend, on_nonfinite: as :class:`ampclip.FusedClipper`.

    A step with inf/NaN is reported in ``found_inf``, not clipped, and leaves the EMA alone (the package would
    take the NaN into its mean for good).

    Example::

        zclip = ampclip.ZClip(model.parameters(), alpha=0.97, z_thresh=2.5, max_grad_norm=1.0)
        loss.backward()
        stats = zclip.clip_()          # stats.total_norm: the pre-clip norm, a device tensor
        optimizer.step()
    """

    def __init__(self, parameters, alpha: float = 0.97, z_thresh: float = 2.5, max_grad_norm: Optional[float] = 1.0,
                 eps: float = 1e-6, warmup_steps: int = 25, mode: str = "zscore",
                 clip_option: str = "adaptive_scaling", clip_factor: float = 1.0, skip_update_on_spike: bool = False,
                 *, norm_type: float = 2.0, backend: Optional[str] = None, on_nonfinite: str = "leave"):
        self.strategy = ZClipStrategy(alpha, z_thresh, max_grad_norm, eps, warmup_steps, mode, clip_option,
                                      clip_factor, skip_update_on_spike)
        self.clipper = FusedClipper(parameters, norm_type=norm_type, backend=backend, on_nonfinite=on_nonfinite,
                                    strategy=self.strategy)

    def clip_(self, inv_scale=None, defer_to: Optional[torch.optim.Optimizer] = None) -> ClipStats:
        """Unscale (``inv_scale``: a device tensor or an ampclip DynamicLossScaler), measure, decide and clip.
        Returns :class:`ampclip.ClipStats`; no host sync. ``defer_to`` a fused optimizer as in
        :meth:`ampclip.FusedClipper.clip_`."""
        return self.clipper.clip_(inv_scale, defer_to=defer_to)

    def can_defer_to(self, optimizer) -> bool:
        return self.clipper.can_defer_to(optimizer)

    @property
    def initialized(self) -> bool:
        """Whether the warm-up is over (one host sync)."""
        return self.strategy.statistics()["zclip_ready"]

    def statistics(self) -> dict:
        """EMA mean and standard deviation of the norm, warm-up state (one host sync)."""
        return self.strategy.statistics()

    def state_dict(self) -> dict:
        """Settings, EMA state and warm-up buffer (CPU tensors): a resumed run continues bit for bit."""
        return self.clipper.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.clipper.load_state_dict(state)
