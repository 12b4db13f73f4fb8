"""The ``cpp`` backend: the compiled CPU kernels of ``csrc/`` (the extension ``ampclip._C``).

Eager calls go straight into the kernels (csrc/python_entry.cpp reads the tensor lists in C++); an entry
answers None when its input needs the dispatcher first (tensor subclasses, dispatch modes), and the adapter
hands ``NotImplemented`` back to ``ops``, which calls the registered op. Besides the op contract this module
offers two helpers that ``ops`` and the Triton adapter use when the extension is there: reading the
present gradients of a parameter list, and the signature of a tensor list that table caches key on.

``import ampclip`` works without the extension: it warns once and the other backends run.
"""

from __future__ import annotations

import warnings

from .. import _extension_loader
from . import Backend, Unavailable

# The compiled kernels, checked against the running torch (and rebuilt against it when they were compiled
# for another one); never imported directly, which would load a mismatched binary before the check.
_C, ERROR = _extension_loader.load("ampclip._C")
if _C is None:
    warnings.warn(f"ampclip: {ERROR}. CPU gradients use the pure-PyTorch reference backend.", RuntimeWarning,
                  stacklevel=2)


def _or_dispatcher(result):
    return NotImplemented if result is None else result


class CppBackend(Backend):
    name = "cpp"
    device_types = frozenset({"cpu"})
    priority = 10
    validates_inputs = True  # dtype, layout, device and memory overlap, in C++ before any write

    def norm_pass(self, grads, inv_scale, norm_type, clamp):
        return _or_dispatcher(_C.norm_pass(grads, inv_scale, norm_type, clamp))

    def scale_pass(self, grads, coef, inv_scale, clamp, found_inf, zero_if_inf):
        return _or_dispatcher(_C.scale_pass(grads, coef, inv_scale, clamp, found_inf, zero_if_inf))

    def clip_finalize(self, per_tensor, total, max_norm, mode, group_index, num_groups, norm_type, eps, rule):
        return _or_dispatcher(_C.clip_finalize(per_tensor, total, max_norm, mode, group_index, num_groups,
                                               norm_type, eps, rule))

    def scaler_update(self, state, history, found_inf, grad_norm, slot, growth_factor, backoff_factor,
                      growth_interval, hysteresis, min_scale, max_scale, dynamic):
        return _or_dispatcher(_C.scaler_update(state, history, found_inf, grad_norm, slot, growth_factor,
                                               backoff_factor, growth_interval, hysteresis, min_scale, max_scale,
                                               dynamic))

    def clip_stats_update(self, counters, layer_stats, per_tensor, coef, found_inf):
        return _or_dispatcher(_C.clip_stats_update(counters, layer_stats, per_tensor, coef, found_inf))

    # the unit-wise passes and ZClip's step (csrc/cpu/unitwise_cpu.cpp, zclip_cpu.cpp)
    def unit_norm_pass(self, tensors, inv_scale, norm_type):
        return _or_dispatcher(_C.unit_norm_pass(tensors, inv_scale, norm_type))

    def unit_scale_pass(self, grads, coef, inv_scale, found_inf, zero_if_inf):
        return _or_dispatcher(_C.unit_scale_pass(grads, coef, inv_scale, found_inf, zero_if_inf))

    def unit_clip_finalize(self, param_norms, grad_norms, clip_factor, eps, norm_type):
        return _or_dispatcher(_C.unit_clip_finalize(param_norms, grad_norms, clip_factor, eps, norm_type))

    def zclip_update(self, state, warmup, total, found_inf, alpha, z_thresh, max_grad_norm, eps, rule, clip_factor,
                     skip_update_on_spike):
        return _or_dispatcher(_C.zclip_update(state, warmup, total, found_inf, alpha, z_thresh, max_grad_norm, eps,
                                              rule, clip_factor, skip_update_on_spike))

    def clip_grad_norm(self, grads, max_norm, norm_type):
        return _C.clip_grad_norm(grads, max_norm, norm_type)

    def clip_params(self, params, max_norm, norm_type):
        return _C.clip_params(params, max_norm, norm_type)


def load() -> Backend:
    if _C is None:
        raise Unavailable(f"the compiled extension ampclip._C is not loaded ({ERROR})")
    return CppBackend()


def describe() -> str:
    """Where the compiled extension came from, or why it is not loaded (for ``python -m ampclip env``)."""
    return f"loaded from {_extension_loader.loaded_from('ampclip._C')}" if _C is not None else f"not loaded: {ERROR}"


def present_grads(params, signature=None):
    """``(gradients that exist, their parameter indices or None when all exist, their one device or None, whether
    the kernels take every one, whether their tensor_signature is ``signature``)``, read in one C++ loop; None
    without the extension or when a parameter is not a plain Tensor or Parameter."""
    return None if _C is None else _C.present_grads(params, signature)


def tensor_signature(tensors):
    """``(hash, bytes)`` that change when any tensor's data pointer, size, dtype, device, sizes or strides do
    (not its identity); None without the extension or for tensor subclasses."""
    return None if _C is None else _C.tensor_signature(tensors)


def bump_versions(tensors) -> None:
    """Bumps the version counter of every tensor, as torch's in-place ops do (for a pass that wrote them through
    raw pointers): in one C++ loop, or torch's ``increment_version`` without the extension."""
    if _C is None:
        from torch.autograd.graph import increment_version

        increment_version(tensors)
    else:
        _C.bump_versions(tensors)


def claim_grads(params, signature, bump: bool) -> bool:
    """Whether every parameter has a gradient and their :func:`tensor_signature` is ``signature`` (bytes), in one
    C++ loop that makes no list of them and, with ``bump``, bumps each gradient's version as it matches (the
    caller writes them next); False without the extension."""
    return _C is not None and _C.claim_grads(params, signature, bump)


def table_rows(tensors, chunk: int):
    """A tensor table's host rows and what it must know of its tensors, read in one C++ loop (see
    ``tensor_table._rows``, the same in Python); None without the extension or for input it does not take."""
    return None if _C is None else _C.table_rows(tensors, chunk)


def signature_matches(tensors, signature) -> bool:
    """Whether :func:`tensor_signature` of ``tensors`` would give ``signature`` (bytes), compared in place; False
    without the extension."""
    return _C is not None and _C.signature_matches(tensors, signature)


def cuda_archs() -> tuple:
    """The GPU code the extension's CUDA kernels hold, named as ``torch.cuda.get_arch_list()`` names it
    (``'sm_90'`` machine code, ``'compute_90'`` PTX); () without the extension or without its CUDA kernels."""
    return tuple(_C.cuda_archs()) if _C is not None and hasattr(_C, "cuda_archs") else ()
