"""The op contract: the one place every backend plugs into.

Two ops cover every clip, scale and check ampclip does:

``ampclip::norm_pass(Tensor[] grads, Tensor? inv_scale, float norm_type, str backend)
    -> (Tensor per_tensor_norms, Tensor total_norm, Tensor found_inf)``
    One read of every gradient. Each element is unscaled on the fly (``g * inv_scale``, ``inv_scale`` a
    device tensor), checked for inf/NaN and accumulated in float32 (float64 for float64 gradients).
    ``per_tensor_norms`` has one entry per gradient; ``total_norm`` is 0-d; both are float32, or float64
    when any gradient is float64. ``found_inf`` is a 0-d float32, 1.0 exactly when some unscaled element
    is inf or NaN. norm_type is any p > 0 or inf.

``ampclip::scale_pass(Tensor(a!)[] grads, Tensor coef, Tensor? inv_scale, float? clip_value,
    Tensor? found_inf, bool zero_if_inf, str backend) -> ()``
    In place ``g <- clamp(g * inv_scale, -clip_value, clip_value) * coef``: the value clamp first, then the
    norm clip. ``coef`` is a device tensor, 0-d or one entry per gradient. When ``found_inf`` is non-zero
    the gradients are zeroed (``zero_if_inf``) or left untouched. Backends skip the write when the
    coefficient is 1 and there is neither unscale nor clamp.

A backend is a pair of functions with these signatures (minus ``backend``): ``reference`` (pure PyTorch,
any device), ``cpp`` (the compiled extension ``ampclip._C``: CPU, and CUDA when built with it) and
``triton`` (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``: see :func:`triton_runs_on`).

Both ops are ``torch.library`` custom ops with fake implementations, so they trace under
``torch.compile(fullgraph=True)``. In eager mode the Python wrappers below call the backend directly: the
custom-op boxing costs about 0.5 µs per tensor, which on 10,000 tiny gradients is more than the clip itself
(the ``cpp`` backend skips the dispatcher too, see csrc/python_entry.cpp).
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple, Optional

import torch

from . import _extension, reference

__all__ = [
    "BACKENDS",
    "EPS",
    "available_backends",
    "backend",
    "clip_coef",
    "clip_grad_norm",
    "norm_pass",
    "resolve_backend",
    "scale_pass",
    "triton_runs_on",
]

BACKENDS = ("reference", "cpp", "triton")
EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s eps, kept for identical coefficients


class _Backend(NamedTuple):
    norm_pass: Callable
    scale_pass: Callable
    clip_grad_norm: Optional[Callable] = None  # the whole clip in one call, where a backend has it


def _load_reference() -> _Backend:
    return _Backend(reference.norm_pass, reference.scale_pass)


def _load_cpp() -> Optional[_Backend]:
    if not _extension.AVAILABLE:
        return None
    return _Backend(_extension.norm_pass, _extension.scale_pass, _extension.clip_grad_norm)


def _load_triton() -> Optional[_Backend]:
    try:
        from . import triton_kernels

        return _Backend(triton_kernels.fused_norm_triton, triton_kernels.fused_scale_triton)
    except Exception:  # triton missing or too old: the other backends still work
        return None


_LOADERS = {"reference": _load_reference, "cpp": _load_cpp, "triton": _load_triton}


_loaded: dict[str, Optional[_Backend]] = {}


def _get(name: str) -> Optional[_Backend]:
    if name not in _loaded:
        _loaded[name] = _LOADERS[name]()
    return _loaded[name]


def available_backends() -> dict[str, bool]:
    """Which backends are installed here (the Triton one then runs on what :func:`triton_runs_on` says)."""
    return {name: _get(name) is not None for name in BACKENDS}


def triton_runs_on(device) -> bool:
    """Whether the triton backend can take tensors on ``device``: CUDA tensors, or CPU tensors under
    ``TRITON_INTERPRET=1`` with triton 3.7 or newer (3.6's interpreter passes scalars around as one-element
    arrays, which NumPy 2 refuses as loop bounds; compiled, the kernels need 3.6)."""
    if _get("triton") is None:
        return False
    if torch.device(device).type == "cuda":
        return True
    import triton

    major, minor = (int(part) for part in triton.__version__.split(".")[:2])
    return os.environ.get("TRITON_INTERPRET") == "1" and (major, minor) >= (3, 7)


@torch.compiler.assume_constant_result  # traced once as a constant: no guard on the backend tables
def resolve_backend(name: Optional[str], device: torch.device) -> str:
    """The backend that runs for ``name`` (None or "auto" picks the fastest) on ``device``.

    Raises ValueError for an unknown name and RuntimeError for a backend that cannot run here.
    """
    device = torch.device(device)
    if name in (None, "auto"):
        if device.type == "cuda" and _get("triton") is not None:
            return "triton"
        if _get("cpp") is not None and (device.type == "cpu" or _extension.HAS_CUDA):
            return "cpp"
        return "reference"
    if name not in BACKENDS:
        raise ValueError(f"unknown ampclip backend {name!r}; expected one of {BACKENDS} or 'auto'")
    if _get(name) is None:
        raise RuntimeError(f"ampclip backend {name!r} is not available here (see `python -m ampclip env`)")
    if name == "triton" and not triton_runs_on(device):
        raise RuntimeError("the triton backend needs CUDA tensors, or TRITON_INTERPRET=1 and triton >= 3.7 for "
                           "CPU tensors")
    if name == "cpp" and device.type == "cuda" and not _extension.HAS_CUDA:
        raise RuntimeError("ampclip._C was built without CUDA kernels; use backend='triton' or 'reference'")
    return name


# --------------------------------------------------------------------------------------------------------
# torch.library registration


@torch.library.custom_op("ampclip::norm_pass", mutates_args=())
def _norm_pass_op(
    grads: list[torch.Tensor], inv_scale: Optional[torch.Tensor], norm_type: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _get(backend).norm_pass(grads, inv_scale, norm_type)


def _norm_pass_fake(grads, inv_scale, norm_type, backend=None):
    acc = reference.accumulation_dtype(grads)
    device = grads[0].device if grads else torch.device("cpu")
    return (
        torch.empty(len(grads), dtype=acc, device=device),
        torch.empty((), dtype=acc, device=device),
        torch.empty((), dtype=torch.float32, device=device),
    )


_norm_pass_op.register_fake(_norm_pass_fake)


@torch.library.custom_op("ampclip::scale_pass", mutates_args=("grads",))
def _scale_pass_op(
    grads: list[torch.Tensor],
    coef: torch.Tensor,
    inv_scale: Optional[torch.Tensor],
    clip_value: Optional[float],
    found_inf: Optional[torch.Tensor],
    zero_if_inf: bool,
    backend: str,
) -> None:
    _get(backend).scale_pass(grads, coef, inv_scale, clip_value, found_inf, zero_if_inf)


@_scale_pass_op.register_fake
def _scale_pass_fake(grads, coef, inv_scale, clip_value, found_inf, zero_if_inf, backend):
    return None


if _extension.AVAILABLE:
    # The compiled kernels are real dispatcher ops too; their fakes make them traceable and opcheck-able.
    torch.library.register_fake("ampclip_C::norm_pass")(_norm_pass_fake)
    torch.library.register_fake("ampclip_C::scale_pass")(
        lambda grads, coef, inv_scale, clip_value, found_inf, zero_if_inf: None
    )
    torch.library.register_fake("ampclip_C::clip_grad_norm_")(
        lambda grads, max_norm, norm_type: _norm_pass_fake(grads, None, norm_type)[1]
    )


# --------------------------------------------------------------------------------------------------------
# Python entry points


def norm_pass(
    grads: list[torch.Tensor],
    inv_scale: Optional[torch.Tensor] = None,
    norm_type: float = 2.0,
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-tensor norms, total norm and ``found_inf`` of ``grads * inv_scale`` in one read.

    ``grads`` must share one device (dtypes may mix). See the module docstring for the contract.

    Example::

        per_tensor, total, found_inf = ampclip.ops.norm_pass([p.grad for p in model.parameters()])
    """
    if not grads:
        return reference.norm_pass(grads, inv_scale, norm_type)
    name = resolve_backend(backend, grads[0].device)
    if torch.compiler.is_compiling():
        return torch.ops.ampclip.norm_pass(grads, inv_scale, norm_type, name)
    return _get(name).norm_pass(grads, inv_scale, norm_type)


def scale_pass(
    grads: list[torch.Tensor],
    coef: torch.Tensor,
    inv_scale: Optional[torch.Tensor] = None,
    clip_value: Optional[float] = None,
    found_inf: Optional[torch.Tensor] = None,
    zero_if_inf: bool = False,
    backend: Optional[str] = None,
) -> None:
    """In place ``g <- clamp(g * inv_scale, ±clip_value) * coef``, skipped or zeroed when ``found_inf``.

    Example::

        ampclip.ops.scale_pass(grads, coef=torch.tensor(0.5))
    """
    if not grads:
        return
    name = resolve_backend(backend, grads[0].device)
    if torch.compiler.is_compiling():
        torch.ops.ampclip.scale_pass(grads, coef, inv_scale, clip_value, found_inf, zero_if_inf, name)
        return
    _get(name).scale_pass(grads, coef, inv_scale, clip_value, found_inf, zero_if_inf)


def clip_coef(max_norm: float, total_norm: torch.Tensor) -> torch.Tensor:
    """min(1, max_norm / (total_norm + eps)) on the device: no host sync."""
    return (max_norm / (total_norm + EPS)).clamp_(max=1.0)


def clip_grad_norm(
    grads: list[torch.Tensor], max_norm: float, norm_type: float = 2.0, backend: Optional[str] = None
) -> torch.Tensor:
    """Norm pass, :func:`clip_coef` and scale pass; returns the pre-clip total norm.

    A backend with a fused clip (the compiled CPU kernels) runs all three in one call: on 10,000 tiny
    gradients, crossing into the backend once instead of twice saves about 1.5 ms.

    Example::

        total = ampclip.ops.clip_grad_norm([p.grad for p in model.parameters()], max_norm=1.0)
    """
    name = resolve_backend(backend, grads[0].device)
    fused = _get(name).clip_grad_norm
    if fused is not None and not torch.compiler.is_compiling():
        return fused(grads, max_norm, norm_type)
    total = norm_pass(grads, None, norm_type, backend=name)[1]
    scale_pass(grads, clip_coef(max_norm, total), backend=name)
    return total


def backend() -> dict:
    """What is available and what runs: the backend per device type, versions and the GPU name.

    Example::

        >>> ampclip.backend()["in_use"]["cpu"]
        'cpp'
    """
    info = {
        "available": available_backends(),
        "in_use": {"cpu": resolve_backend(None, "cpu")},
        "torch": torch.__version__,
        "triton": None,
        "cuda": torch.version.cuda,
        "gpu": None,
        "extension": "loaded" if _extension.AVAILABLE else f"not loaded ({_extension.ERROR})",
        "extension_cuda": _extension.HAS_CUDA,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["in_use"]["cuda"] = resolve_backend(None, "cuda")
    return info
