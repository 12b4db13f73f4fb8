"""Pure-PyTorch reference of every ampclip op: the source of truth for tests, the baseline for benchmarks
and the fallback backend on any device.

It follows the op contract of :mod:`ampclip.ops` exactly, favouring clarity over speed:

* ``norm_pass`` reads each gradient once in its accumulation dtype (float32, or float64 for float64
  gradients), multiplies by ``inv_scale`` when given, and returns per-tensor norms, the total norm and an
  exact ``found_inf`` flag (1.0 when any unscaled element is inf or NaN).
* ``scale_pass`` rewrites ``g <- clamp(g * inv_scale, -clip_value, clip_value) * coef`` (value clamp first,
  then the norm clip), and when ``found_inf`` is set leaves the gradients alone or zeroes them.

Nothing here synchronises with the host, so the fallback keeps the sync-free contract on a GPU.

The torch baselines that benchmarks and parity tests compare against live here too, so that the two
cannot drift apart.
"""

from __future__ import annotations

import torch

__all__ = [
    "accumulation_dtype",
    "combine_norms",
    "norm_pass",
    "scale_pass",
    "exact_norm",
    "torch_clip_grad_norm",
    "torch_unscale_and_clip",
]


def accumulation_dtype(tensors) -> torch.dtype:
    """float64 when any tensor is float64, else float32: the dtype of every norm ampclip returns."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def combine_norms(norms: torch.Tensor, norm_type: float) -> torch.Tensor:
    """Total norm from a 1-D tensor of partial norms (per tensor, per device or per rank).

    The p-norm of p-norms equals the p-norm of all elements; for the inf-norm it is the max. An empty input
    gives 0. NaN propagates, as in ``torch.linalg.vector_norm``.
    """
    if norms.numel() == 0:
        return norms.new_zeros(())
    return torch.linalg.vector_norm(norms, norm_type)


def norm_pass(grads: list[torch.Tensor], inv_scale: torch.Tensor | None, norm_type: float):
    """Returns ``(per_tensor_norms, total_norm, found_inf)`` of the unscaled gradients.

    ``per_tensor_norms`` has one entry per gradient (0 for a zero-size one); all outputs are in
    :func:`accumulation_dtype`; ``found_inf`` is 0-d, 1.0 exactly when an unscaled element is not finite.
    """
    acc = accumulation_dtype(grads)
    device = grads[0].device if grads else torch.device("cpu")
    found_inf = torch.zeros((), dtype=torch.float32, device=device)
    if not grads:
        empty = torch.zeros(0, dtype=acc, device=device)
        return empty, torch.zeros((), dtype=acc, device=device), found_inf
    norms = []
    for g in grads:
        u = g.to(acc)
        if inv_scale is not None:
            u = u * inv_scale.to(acc)
        norms.append(torch.linalg.vector_norm(u, norm_type) if u.numel() else u.new_zeros(()))
        found_inf = torch.maximum(found_inf, (~torch.isfinite(u)).any().to(torch.float32))
    per_tensor = torch.stack(norms)
    return per_tensor, combine_norms(per_tensor, norm_type), found_inf


def scale_pass(
    grads: list[torch.Tensor],
    coef: torch.Tensor,
    inv_scale: torch.Tensor | None,
    clip_value: float | None,
    found_inf: torch.Tensor | None,
    zero_if_inf: bool,
) -> None:
    """In place: ``g <- clamp(g * inv_scale, -clip_value, clip_value) * coef``.

    ``coef`` is 0-d (one coefficient for all) or has one entry per gradient. When ``found_inf`` is given and
    non-zero the gradients are zeroed (``zero_if_inf``) or left untouched.
    """
    if not grads:
        return
    coefs = coef.reshape(-1).expand(len(grads)) if coef.numel() == 1 else coef
    for i, g in enumerate(grads):
        if g.numel() == 0:
            continue
        acc = torch.float64 if g.dtype == torch.float64 else torch.float32
        u = g.to(acc)
        if inv_scale is not None:
            u = u * inv_scale.to(acc)
        if clip_value is not None:
            u = u.clamp(-clip_value, clip_value)
        u = u * coefs[i].to(acc)
        if found_inf is not None:
            skipped = torch.zeros_like(u) if zero_if_inf else g.to(acc)
            u = torch.where(found_inf.to(g.device) != 0, skipped, u)
        g.copy_(u)


def exact_norm(grads: list[torch.Tensor], norm_type: float, inv_scale: float | None = None) -> float:
    """The total norm in float64 on the host: the yardstick tests compare every backend with."""
    if not grads:
        return 0.0
    flat = torch.cat([g.detach().double().reshape(-1).cpu() for g in grads])
    if inv_scale is not None:
        flat = flat * inv_scale
    if flat.numel() == 0:
        return 0.0
    return float(torch.linalg.vector_norm(flat, norm_type))


def torch_clip_grad_norm(grads: list[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """torch's own ``clip_grad_norm_(foreach=True)`` on a list of gradients (the drop-in baseline)."""
    return torch.nn.utils.clip_grad_norm_(parameters_of(grads), max_norm, norm_type, foreach=True)


def parameters_of(grads: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    """Parameters whose ``.grad`` are ``grads``, so the parameter-based clip functions (torch's and
    ampclip's) act on bare gradient tensors as they would on a model's. A parameter's data is a zero-stride
    view of one element: it costs no memory."""
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros((), dtype=g.dtype, device=g.device).expand(g.shape))
        p.grad = g
        params.append(p)
    return params


def torch_unscale_and_clip(
    grads: list[torch.Tensor], inv_scale: torch.Tensor, max_norm: float, norm_type: float = 2.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch chain that ampclip replaces: ``GradScaler.unscale_`` then ``clip_grad_norm_(foreach=True)``.

    5N bytes: the unscale reads and writes, the norm reads, the clip reads and writes. Returns
    ``(total_norm, found_inf)``.
    """
    found_inf = torch.zeros((), dtype=torch.float32, device=inv_scale.device)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for group in by_dtype.values():
        torch._amp_foreach_non_finite_check_and_unscale_(group, found_inf, inv_scale)
    return torch_clip_grad_norm(grads, max_norm, norm_type), found_inf
