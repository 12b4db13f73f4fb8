"""Providers of the benchmark harness: what is timed, each with the bytes it must move and the torch baseline
of its scenario, and the correctness check every provider passes before it is timed.

Scenarios (N = the gradient bytes):

* ``unscale_clip``: GradScaler's unscale then clip_grad_norm_ (``torch_chain``, 5N bytes) against ampclip's
  fused in-place path (3N).
* ``clip``: clip_grad_norm_ alone (``torch_clip``) against the drop-in (``ampclip_dropin``), 3N each.
* ``noclip``: a bound above the norm: torch still multiplies every gradient by 1 (3N); ampclip only reads (N).
* ``floor``: the fastest passes over the same bytes, on one flat float32 buffer: a read (``sum``) plus an
  in-place multiply (``mul_``) for a clip (3N, ``floor_clip``), a read alone when nothing is clipped (N,
  ``floor_read``): what torch's fastest primitives take over those bytes. The fraction reported is that time
  over the provider's: a fused kernel that reads and writes at the memory's rate can pass 1.
* ``copy``: a device copy of the same bytes (2N), for GB/s against the machine's bandwidth.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ampclip import FusedClipper, clip_grad_norm_, ops, reference

from .workloads import INV_SCALE, SHRINK, GradSets, norm64

# Bytes the task of each scenario must move, in units of N, and the torch baseline it is compared with.
SCENARIO_FLOOR_N = {"copy": 2, "unscale_clip": 3, "clip": 3, "noclip": 1, "floor": None}
SCENARIO_BASELINE = {"unscale_clip": "torch_chain", "clip": "torch_clip", "noclip": "torch_clip_noclip"}
SCENARIO_FLOOR = {"unscale_clip": "floor_clip", "clip": "floor_clip", "noclip": "floor_read"}


@dataclass
class Provider:
    """``setup(gradsets)`` returns a zero-argument call doing one full clip of the next set and returning
    the pre-clip total norm (a tensor). ``moved_n``: the bytes it moves, in units of N."""

    setup: Callable[[GradSets], Callable[[], Any]]
    scenario: str
    moved_n: int
    description: str
    reference: Optional[Callable] = None  # the ampclip.reference baseline a torch provider must equal
    needs_cuda: bool = False
    needs_compile: bool = False
    # why this provider cannot run on gradients of a dtype on a device (None: it can); asked before setup
    unsupported: Optional[Callable[[torch.dtype, torch.device], Optional[str]]] = None

    @property
    def flat(self) -> bool:
        """Timed on flat buffers of the same bytes, not on the gradient sets (no clip, no check)."""
        return self.scenario in ("copy", "floor")


# ------------------------------------------------------------------------------------------------ torch
@functools.lru_cache(maxsize=None)
def torch_unscale_missing(dtype: torch.dtype, device: torch.device) -> Optional[str]:
    """Why torch's GradScaler cannot unscale ``dtype`` gradients on ``device``, or None when it can. torch is
    asked itself, with one call on a one-element tensor: its CUDA kernel has no bfloat16 (torch 2.11) while
    its CPU kernel has, and a later torch may add it."""
    grad = torch.ones(1, device=device).to(dtype)
    try:
        torch._amp_foreach_non_finite_check_and_unscale_(
            [grad], torch.zeros((), device=device), torch.ones((), device=device))
    except NotImplementedError as e:
        return f"torch's GradScaler cannot unscale {dtype} gradients on {device.type}: {str(e).splitlines()[0]}"
    return None


def _torch_clip(gs: GradSets):
    # reference.torch_clip_grad_norm minus its per-call wrapping of every gradient (not torch's cost): the
    # parameters are built once. The check proves the two are bitwise equal.
    def call():
        k, _, bound = gs.next()
        return torch.nn.utils.clip_grad_norm_(gs.params[k], bound, 2.0, foreach=True)

    return call


def _torch_chain(gs: GradSets):
    # reference.torch_unscale_and_clip (one dtype) with the parameters built once; bitwise equal (checked).
    def call():
        k, grads, bound = gs.next()
        found_inf = torch.zeros((), dtype=torch.float32, device=gs.inv_scale.device)  # as GradScaler does
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, gs.inv_scale)
        return torch.nn.utils.clip_grad_norm_(gs.params[k], bound, 2.0, foreach=True)

    return call


def _torch_compile_chain(gs: GradSets):
    compiled = torch.compile(reference.torch_unscale_and_clip)
    bounds: dict[int, tuple[float, torch.Tensor]] = {}  # the bound as a device tensor: no recompile per value

    def call():
        k, grads, bound = gs.next()
        cached = bounds.get(k)
        if cached is None or cached[0] != bound:
            cached = bounds[k] = (bound, torch.tensor(bound, device=gs.inv_scale.device))
        return compiled(grads, gs.inv_scale, cached[1])[0]

    return call


# ------------------------------------------------------------------------------------------------ ampclip
def _ampclip_dropin(gs: GradSets):
    def call():
        k, _, bound = gs.next()
        return clip_grad_norm_(gs.params[k], bound)  # no unscale: the drop-in takes what torch's takes

    return call


def _ampclip_ops(backend: str):
    """The fused in-place path through the op layer: norm pass (unscale on the fly, check, norm), the
    coefficient on the device, scale pass (unscale and clip in one read and write): 3N."""

    def setup(gs: GradSets):
        def call():
            _, grads, bound = gs.next()
            per_tensor, total, found_inf = ops.norm_pass(grads, gs.inv_scale, 2.0, backend=backend)
            coef = ops.clip_finalize(per_tensor, total, bound, backend=backend)[0]
            ops.scale_pass(grads, coef, inv_scale=gs.inv_scale, found_inf=found_inf, backend=backend)
            return total

        return call

    return setup


def _fused_clipper(backend: str):
    """``FusedClipper(...).clip_(inv_scale)``: the per-step API (the op path plus its statistics)."""

    def setup(gs: GradSets):
        clippers = [FusedClipper(params, max_norm=1.0, backend=backend) for params in gs.params]

        def call():
            k, _, bound = gs.next()
            return clippers[k].clip_(gs.inv_scale, max_norm=bound).total_norm

        return call

    return setup


# ------------------------------------------------------------------------------------------------ floors
def flat_buffers(gs: GradSets, count: int, dtype: Optional[torch.dtype] = None) -> list[torch.Tensor]:
    """``count`` flat buffers holding as many bytes as a gradient set, in its dtype or in ``dtype``."""
    first = gs.sets[0][0]
    dtype = dtype or first.dtype
    elements = -(-gs.nbytes() // dtype.itemsize)
    return [torch.full((elements,), 0.125, dtype=dtype, device=first.device) for _ in range(count)]


def _copy(gs: GradSets):
    bufs = flat_buffers(gs, max(2, len(gs.sets)))
    state = {"i": 0}

    def call():
        i = state["i"] = (state["i"] + 1) % len(bufs)
        return bufs[(i + 1) % len(bufs)].copy_(bufs[i])

    return call


def _floor(write: bool):
    def setup(gs: GradSets):
        # The same bytes seen as float32, whatever the gradients' dtype: the floor is the bytes' traffic, and
        # torch's CPU sum and mul_ of bfloat16 are far slower than the memory.
        bufs = flat_buffers(gs, len(gs.sets), torch.float32)
        state = {"i": 0, "factor": 0.5}

        def call():
            i = state["i"] = (state["i"] + 1) % len(bufs)
            total = bufs[i].sum(dtype=torch.float32)
            if write:
                bufs[i].mul_(state["factor"])  # 0.5 and 2 by turns: exact, the values stay put
                state["factor"] = 1 / state["factor"]
            return total

        return call

    return setup


def _providers() -> dict[str, Provider]:
    """Every provider the harness knows. Adding one is one entry here."""
    out = {
        "copy": Provider(_copy, "copy", 2, "dst.copy_(src) of the same bytes: the bandwidth ceiling"),
        "floor_clip": Provider(_floor(True), "floor", 3, "sum() + mul_() of one flat buffer: a clip's floor"),
        "floor_read": Provider(_floor(False), "floor", 1, "sum() of one flat buffer: the floor of any norm"),
        "torch_chain": Provider(_torch_chain, "unscale_clip", 5,
                                "GradScaler.unscale_ + clip_grad_norm_(foreach=True)",
                                reference=reference.torch_unscale_and_clip, unsupported=torch_unscale_missing),
        "torch_compile_chain": Provider(_torch_compile_chain, "unscale_clip", 5,
                                        "torch.compile of the torch chain", needs_compile=True,
                                        unsupported=torch_unscale_missing),
        "torch_clip": Provider(_torch_clip, "clip", 3, "torch.nn.utils.clip_grad_norm_(foreach=True)",
                               reference=reference.torch_clip_grad_norm),
        "ampclip_dropin": Provider(_ampclip_dropin, "clip", 3, "ampclip.clip_grad_norm_"),
        "torch_clip_noclip": Provider(_torch_clip, "noclip", 3, "torch clip_grad_norm_, bound above the norm",
                                      reference=reference.torch_clip_grad_norm),
        "ampclip_dropin_noclip": Provider(_ampclip_dropin, "noclip", 1,
                                          "ampclip.clip_grad_norm_, bound above the norm"),
    }
    for name in ops.BACKENDS:
        gpu_only = name in ("triton", "cuda")
        out[f"ampclip_{name}"] = Provider(_ampclip_ops(name), "unscale_clip", 3,
                                          f"ops.norm_pass + clip_finalize + scale_pass, backend={name}",
                                          needs_cuda=gpu_only)
        out[f"clipper_{name}"] = Provider(_fused_clipper(name), "unscale_clip", 3,
                                          f"FusedClipper(backend={name!r}).clip_(inv_scale)", needs_cuda=gpu_only)
    return out


PROVIDERS = _providers()


def available(device: torch.device, with_compile: bool) -> dict[str, Provider]:
    """The providers that run here: backends that are built, Triton and CUDA C++ only on CUDA, torch.compile
    on CUDA or when asked for."""
    built = ops.available_backends()
    out = {}
    for name, prov in PROVIDERS.items():
        backend = name.split("_", 1)[1] if name.startswith(("ampclip_", "clipper_")) else None
        if backend in built and not built[backend]:
            continue
        if (prov.needs_cuda and device.type != "cuda") or (prov.needs_compile and not with_compile):
            continue
        out[name] = prov
    return out


# ------------------------------------------------------------------------------------------------ checks
class CheckError(AssertionError):
    """A provider returned a wrong norm or left wrong gradients: nothing of it is timed."""


def check(name: str, prov: Provider, call, gs: GradSets, dtype: torch.dtype) -> dict:
    """One call of ``name`` on the next set, checked: the returned norm against an fp64 norm, the post-clip
    norm against the bound, ``noclip`` gradients bitwise unchanged, the torch baselines bitwise equal to
    ``ampclip.reference``'s. Returns what was compared (kept in the results)."""
    k = gs.peek()
    gs.prepare()
    stored = norm64(gs.sets[k])
    unscaled = prov.scenario == "unscale_clip"
    expected = stored * (INV_SCALE if unscaled else 1.0)  # the norm the call must return
    # Half the timed bound: in the timed scheme an unscale-and-clip leaves the stored norm where it was,
    # exactly as a call that wrote nothing would; here the correct result is half of it.
    factor = 1.0 if prov.scenario == "noclip" else 0.5
    bound = {"unscale_clip": gs.norms[k], "clip": gs.norms[k] * SHRINK, "noclip": math.inf}[prov.scenario] * factor
    problems = []
    ref_norm = ref_grads = None
    if prov.reference is not None:  # the timed torch call must equal ampclip.reference's, bitwise
        ref_grads = [g.clone() for g in gs.sets[k]]
        ref_out = prov.reference(ref_grads, gs.inv_scale, bound) if unscaled else prov.reference(ref_grads, bound)
        ref_norm = ref_out[0] if unscaled else ref_out
    before = None
    if prov.scenario == "noclip":
        before = ref_grads if ref_grads is not None else [g.clone() for g in gs.sets[k]]
    gs.bound_factor = factor
    try:
        returned = call()
    finally:
        gs.bound_factor = 1.0
    got = float(returned)
    # torch's fp16/bf16 norms are rounded to the dtype, and its fp32 CPU norm of GPT-2-124M-sized tensors
    # was 8.5e-4 off the fp64 value: the torch baselines and the reference backend (which sums with torch's
    # kernels) get the tolerance torch needs; the compiled backends the tight one.
    torch_like = prov.reference is not None or name.endswith("_reference")
    rtol = (3e-3 if torch_like else 1e-4) if dtype == torch.float32 else 1e-2
    if not math.isfinite(got) or abs(got - expected) > rtol * expected:
        problems.append(f"returned norm {got:.7g}, fp64 norm {expected:.7g}")
    post = norm64(gs.sets[k])
    if prov.scenario == "noclip":
        if not all(torch.equal(a, b) for a, b in zip(before, gs.sets[k])):
            problems.append("the gradients changed although no clipping was needed")
    elif abs(post - bound) > ((3e-3 if torch_like else 1e-3) if dtype == torch.float32 else 2e-2) * bound:
        problems.append(f"post-clip norm {post:.7g}, bound {bound:.7g}")
    if ref_norm is not None:
        if not torch.equal(returned, ref_norm):
            problems.append(f"norm {got!r} differs from ampclip.reference's {float(ref_norm)!r}")
        if not all(torch.equal(a, b) for a, b in zip(ref_grads, gs.sets[k])):
            problems.append("gradients differ from those ampclip.reference's baseline leaves")
    if factor != 1.0:  # back to the timed scale (a power of two: exact)
        torch._foreach_mul_(gs.sets[k], 1 / factor)
        gs.norms[k] = norm64(gs.sets[k])
    if problems:
        raise CheckError(f"{name} ({dtype}): " + "; ".join(problems))
    return {"returned_norm": got, "fp64_norm": expected, "rel_err": abs(got - expected) / expected,
            "post_clip_norm": post, "bound": bound}
