"""Workloads of the benchmark harness: the gradient shapes of real models and of the cases that hurt torch,
and the rotated random gradient sets every timed call clips for real.

Every call clips, without re-randomising inside the timed region: the unscaling providers use
``inv_scale = 2`` and clip to the set's stored norm (coefficient 0.5), which leaves the gradients as they
were (``g * 2 * 0.5``); the others clip to 0.99 of the stored norm, and a set that has shrunk 16x is
multiplied back by an exact power of two outside the timed region. The value of a multiplier does not
change the work; a coefficient of exactly 1 would (ampclip skips the write then), and this scheme never
produces one by accident.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ampclip.reference import parameters_of  # zero-stride parameters: the drop-ins are called as users do
from ampclip.shapes import gpt2_shapes, scaled


def llama7b_shapes() -> list[tuple]:
    """LLaMA-7B-like decoder: 291 tensors, 6.74B elements (untied lm_head)."""
    d, ff, vocab = 4096, 11008, 32000
    layer = [(d, d)] * 4 + [(ff, d), (ff, d), (d, ff), (d,), (d,)]
    return [(vocab, d)] + layer * 32 + [(d,), (vocab, d)]


WORKLOADS: dict[str, Callable[[], list[tuple]]] = {
    "gpt2-124m": gpt2_shapes,  # 148 tensors, 124.4M elements
    "gpt2-355m": lambda: gpt2_shapes(d_model=1024, n_layer=24),
    "gpt2-1.5b": lambda: gpt2_shapes(d_model=1600, n_layer=48),
    "llama-7b": llama7b_shapes,
    "2000x512": lambda: [(512,)] * 2000,  # pytorch#133586
    "10000x4": lambda: [(4,)] * 10000,  # pytorch PR #91846: launch-bound
    "1.5e9": lambda: [(1_500_000_000,)],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_CPU = ["gpt2-124m", "2000x512", "10000x4"]
DEFAULT_CPU_DTYPES = ["fp32", "bf16"]

# Gradient values: N(0, 1/8). Small enough that torch's fp16 norm of the largest workload (6.7e9 elements:
# sqrt(6.7e9)/8 = 10,000) stays below 65504, so torch's fp16 clip clips rather than zeroing on inf.
SIGMA = 0.125
INV_SCALE = 2.0  # unscale x2 then clip x0.5 leaves the gradients unchanged
SHRINK = 0.99  # non-unscaling providers clip to 0.99 of the stored norm: a real write every call
RESTORE_BELOW = 1 / 16  # a set whose norm fell below this fraction is multiplied back (exact power of 2)


def numel(shapes) -> int:
    return sum(math.prod(s) for s in shapes)


def fitted(shapes: list[tuple], budget_elems: int) -> tuple[list[tuple], int]:
    """Divide every tensor's leading dimension by one divisor until the workload fits ``budget_elems``; the
    tensor count is kept. Returns (shapes, divisor)."""
    divisor = max(1, math.ceil(numel(shapes) / max(1, budget_elems)))
    return scaled(shapes, divisor), divisor


def norm64(grads: list[torch.Tensor]) -> float:
    """The 2-norm in float64 on the device, one tensor at a time (no host copy of the whole workload)."""
    per = torch._foreach_norm(grads, 2, dtype=torch.float64)
    return float(torch.linalg.vector_norm(torch.stack(per)))


class GradSets:
    """K independent random gradient sets, rotated call by call, with the stored norm of each tracked so
    that every call clips for real (see the module docstring).

    ``mode`` (set per provider) decides the bound :meth:`next` hands out: ``unscale_clip``: the stored norm
    (the unscaled norm is twice it: coefficient 0.5, values unchanged); ``clip``: 0.99 of it; ``noclip``:
    inf (nothing changes).
    """

    def __init__(self, shapes, dtype, device, sets: int, seed: int = 0):
        gen = torch.Generator(device=device).manual_seed(seed)
        self.sets = [[(torch.randn(s, generator=gen, device=device) * SIGMA).to(dtype) for s in shapes]
                     for _ in range(sets)]
        self.inv_scale = torch.full((), INV_SCALE, device=device)
        self.norm0 = [norm64(g) for g in self.sets]
        self.norms = list(self.norm0)
        self.params = [parameters_of(g) for g in self.sets]  # built once, outside timing
        self.mode = "unscale_clip"
        self.bound_factor = 1.0  # the check sets 0.5: a provider that skipped its write would then show
        self.calls = 0
        self.restores = 0

    def peek(self) -> int:
        return self.calls % len(self.sets)

    def resync(self) -> None:
        """Measure the stored norms again (between providers, never timed)."""
        self.norms = [norm64(g) for g in self.sets]

    def prepare(self) -> None:
        """Multiply the next set back up if this call would take it below RESTORE_BELOW of its start
        (called between timed calls)."""
        k = self.peek()
        if self.mode == "clip" and self.norms[k] * SHRINK < self.norm0[k] * RESTORE_BELOW:
            factor = 2.0 ** round(math.log2(self.norm0[k] / self.norms[k]))
            torch._foreach_mul_(self.sets[k], factor)  # a power of two: exact
            self.norms[k] *= factor
            self.restores += 1

    def next(self) -> tuple[int, list[torch.Tensor], float]:
        """(set index, gradients, bound) for the next call, advancing the rotation."""
        k = self.peek()
        self.calls += 1
        if self.mode == "noclip":
            return k, self.sets[k], math.inf
        bound = self.norms[k] * (SHRINK if self.mode == "clip" else 1.0) * self.bound_factor
        self.norms[k] = bound
        return k, self.sets[k], bound

    def nbytes(self) -> int:
        return sum(g.numel() * g.element_size() for g in self.sets[0])

    def numel(self) -> int:
        return sum(g.numel() for g in self.sets[0])
