"""Random gradient sets and comparisons shared by the test files."""

from __future__ import annotations

import contextlib
import math
import os
import traceback

import pytest
import torch

import ampclip

# Odd sizes on purpose: 1 element, 3, one past a power of two, zero-size, a tensor that spans two CPU work
# chunks (65,536 elements each) with a short tail, and 2-D/3-D shapes.
ODD_SHAPES = [(1,), (3,), (4097,), (0,), (65536 + 1000,), (33, 17), (2, 3, 5), (7, 0), (128,)]

NORMS = [pytest.param(p, id=f"p{p}") for p in (1.0, 2.0, 3.0, math.inf)]
# The backends that take CPU tensors here (Triton only under its interpreter, from triton 3.7 on).
CPU_BACKENDS = [name for name in ampclip.ops.BACKENDS if ampclip.ops.runs_on(name, "cpu")]
DTYPE_MIXES = [
    pytest.param((torch.float32,), id="fp32"),
    pytest.param((torch.float16,), id="fp16"),
    pytest.param((torch.bfloat16,), id="bf16"),
    pytest.param((torch.float64,), id="fp64"),
    pytest.param((torch.float32, torch.float16, torch.bfloat16), id="mixed"),
]


def random_grads(shapes, dtypes=(torch.float32,), scale=1.0, noncontiguous_every=0, seed=0):
    """Random gradients (never zeros) with dtypes cycling through ``dtypes``.

    Every ``noncontiguous_every``-th 2-D-able gradient is made a strided view (a transpose or a slice).
    """
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for i, shape in enumerate(shapes):
        dtype = dtypes[i % len(dtypes)]
        g = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
        if noncontiguous_every and i % noncontiguous_every == 0 and g.numel() > 1:
            if g.dim() >= 2:
                g = g.transpose(0, 1).contiguous().transpose(0, 1)  # same values, transposed strides
            else:
                g = torch.stack([g, g], dim=1)[:, 0]  # a stride-2 view with the same values
            assert not g.is_contiguous()
        grads.append(g)
    return grads


def params_with(grads):
    """Parameters whose ``.grad`` are clones of ``grads``."""
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    return params


def clone_all(tensors):
    return [t.clone() for t in tensors]


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bits, so that NaNs compare equal and -0.0 differs from 0.0."""
    view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(view)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def exact_per_tensor(grads, norm_type, inv_scale=None):
    from ampclip.reference import exact_norm

    return [exact_norm([g], norm_type, inv_scale) for g in grads]


def rel_close(actual: float, expected: float, rtol: float) -> bool:
    if math.isnan(expected):
        return math.isnan(actual)
    if math.isinf(expected):
        return actual == expected
    return abs(actual - expected) <= rtol * max(abs(expected), 1e-30)


def norm_rtol(norm_type: float) -> float:
    """fp32 accumulation error allowed against fp64 (p-norms go through pow(), which rounds more)."""
    return 2e-6 if norm_type in (1.0, 2.0, math.inf) else 5e-5


def put_nonfinite(grads, tensor_index, position, value):
    """Writes ``value`` (inf or NaN) at ``position`` ("first", "last", "tail" or an int) of one gradient."""
    flat = grads[tensor_index].view(-1)  # callers pass contiguous gradients
    index = {"first": 0, "last": flat.numel() - 1, "tail": flat.numel() - 3}.get(position, position)
    flat[index] = value
    return index


def run_two_processes(target, *args, timeout=300) -> dict:
    """Runs ``target(rank, 2, port, *args, results)`` in two spawned processes (gloo on 127.0.0.1) and
    returns ``results``, the dict the workers fill. A hung worker is killed, so the test fails instead of
    hanging the suite."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    results = manager.dict()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(rank, 2, port, *args, results)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
        if p.is_alive():
            p.kill()
    errors = {k: v for k, v in results.items() if isinstance(k, str)}
    assert not errors, "\n".join(errors.values())
    assert sorted(results.keys()) == [0, 1], f"a worker failed (exit codes {[p.exitcode for p in procs]})"
    return dict(results)


@contextlib.contextmanager
def gloo_worker(rank, world_size, port, results):
    """The life of a spawned worker: a gloo group on 127.0.0.1 for the body, its traceback (if any) handed
    to the parent in ``results``, and an exit that skips interpreter teardown (which aborts now and then)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        yield
    except BaseException:
        results[f"rank {rank}"] = traceback.format_exc()
    finally:
        dist.destroy_process_group()
        os._exit(0)


@contextlib.contextmanager
def counted_launches():
    """Counts what ``fn`` would launch on a GPU, as a list filled on exit: the names of the Triton kernels the
    interpreter runs, and the aten ops that launch a kernel (not an allocation, a view, or the read of a CPU
    scalar, which on a GPU would be a device tensor read on the device)."""
    import triton.runtime.interpreter as interpreter
    from torch.utils._python_dispatch import TorchDispatchMode

    launches: list[str] = []
    quiet = {"aten.empty.memory_format", "aten.empty_strided.default", "aten._local_scalar_dense.default",
             "aten.lift_fresh.default", "aten.detach.default"}
    inside_kernel = []  # the interpreter's own torch calls, while it runs a kernel, are not launches

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            returns = func._schema.returns
            view = returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)
            if not view and str(func) not in quiet and not inside_kernel:
                launches.append(str(func))
            return func(*args, **(kwargs or {}))

    run = interpreter.InterpretedFunction.run

    def counted(self, *args, grid, warmup, **kwargs):
        if not warmup:
            launches.append(f"triton.{self.__name__}")
        inside_kernel.append(True)
        try:
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            inside_kernel.pop()

    interpreter.InterpretedFunction.run = counted
    try:
        with Recorder():
            yield launches
    finally:
        interpreter.InterpretedFunction.run = run
