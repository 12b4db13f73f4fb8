"""The ``reference`` backend: :mod:`ampclip.reference`'s pure-PyTorch ops, on any device. The fallback
where no compiled backend runs, and the one to force while debugging (``backend="reference"``)."""

from __future__ import annotations

from .. import reference
from . import Backend


class ReferenceBackend(Backend):
    name = "reference"
    device_types = frozenset({"cpu", "cuda", "xpu", "mps", "meta", "hpu", "privateuseone"})
    priority = 0

    def runs_on(self, device) -> bool:
        return True  # plain torch ops run wherever torch does

    def norm_pass(self, grads, inv_scale, norm_type, clamp):
        return reference.norm_pass(grads, inv_scale, norm_type, clamp)

    def scale_pass(self, grads, coef, inv_scale, clamp, found_inf, zero_if_inf):
        reference.scale_pass(grads, coef, inv_scale, clamp, found_inf, zero_if_inf)


def load() -> Backend:
    return ReferenceBackend()
