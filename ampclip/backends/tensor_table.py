"""Device tables that let one launch cover any list of gradients (apex's ``multi_tensor_apply`` idea, with
the table in device memory instead of kernel arguments, so there is no 4 KiB argument limit to split on).

Kernels of the ``triton`` backend (and of any multi-tensor backend) take a table built here by their adapter:
the kernels never import the Python package above them.

One table per gradient list, all dtypes together: a program handles one chunk of ``CHUNK`` elements of one
tensor and branches on that tensor's dtype code, so fp16, bf16, fp32 and fp64 gradients go through ONE launch
per kernel instead of one per dtype. Layout: a single int64 device buffer (one host-to-device copy), each
section padded to an even length so every section starts 16-byte aligned (Triton specialises pointer
arguments on 16-byte alignment; unaligned sections would compile extra variants)::

    ptrs[T]         data pointer of tensor t (or of its staging buffer when t is not contiguous)
    numels[T]       elements of tensor t (int64: a tensor may pass 2^31 elements)
    codes[T]        dtype code of tensor t (DTYPE_CODES), plus ALIGNED when its data address and every
                    chunk's start are 16-byte aligned (the Triton kernels then read whole blocks in 128-bit
                    loads, with no mask; the CUDA C++ kernels split each chunk at run time and ignore the bit)
    chunk_begin[T+1] first chunk of tensor t; the chunks of t are chunk_begin[t] .. chunk_begin[t+1]
    chunk_tensor[C] the tensor of chunk c; its first element is (c - chunk_begin[t]) * CHUNK

Zero-size tensors own no chunk but keep their row, so row t is always grads[t] (per-tensor coefficients and
norms index the table directly, no index map).

Building a table reads every tensor's pointer, size, dtype, layout and extent (in one C++ loop with the
compiled extension, ``ampclip._C.table_rows``: about 90 us for 2,000 tensors on a 2-core CPU; in Python without
it, ``_rows``: about 3.7 ms) and copies the rows to the device. A copy during CUDA-graph capture is not allowed
at all, so tables are cached, and found again by a signature of the gradient list:

* With the compiled extension, ``ampclip._C.tensor_signature``: per tensor its data pointer, element count,
  dtype, device, sizes and strides, packed into bytes in C++ with a 64-bit hash as the dictionary key, and
  compared in full with one memcmp (about 40 us for 2,000 tensors on the 2-core CI host), so two lists share
  a table only when every layout is equal, never on a hash collision. It
  leaves out the tensors' identity on purpose: after ``zero_grad(set_to_none=True)`` the next backward
  allocates new gradients, which the caching allocator can place at the old addresses (it hands freed
  blocks out again), and then the old table fits them. Nothing else is in a table, so a table whose
  tensors died is still right for any list with the same signature. A table with staging buffers (below)
  is dropped when one of its tensors dies, as the buffers are as large as their gradients.
* Without it, the tuple of the tensors' ``id()``s and the tuple of their data pointers (about 260 us for
  2,000 tensors on the same host). An ``id`` is only unique among live objects, so every cached tensor
  carries a weak reference whose callback drops the entry when that tensor dies; the cache never keeps a
  gradient alive. This signature does not see a live tensor whose size, dtype or strides change while its
  data pointer stays put (``resize_`` to a smaller size, ``t_()``): call :func:`clear_cache` after doing
  that to a gradient.

Either way the data pointer catches storage that moved under a live tensor (``.set_()``, ``.data =``, a
growing ``resize_``).

Non-contiguous gradients get a persistent contiguous staging buffer owned by the table: the norm pass copies
the gradient in, the scale pass copies in and back out. The table keeps pointing at the same buffer, so it
stays cached and CUDA-graph capturable; the cost is one extra copy of those (rare) gradients.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Optional

import torch

from ..contract import check_grads
from .cpp import signature_matches, table_rows, tensor_signature

CHUNK = 32768  # elements per program: 64 KiB of fp16, 32 iterations of a 1024-wide block, enough to hide
# a program's start-up; GPT-2 1.5B (1.56e9 elements) is ~48K programs, plenty for 132 SMs.
CACHE_SIZE = 64  # distinct gradient lists kept (tables used in a CUDA-graph capture are kept apart)
DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
# Set in codes[t] when tensor t's data address and chunk * itemsize are multiples of 16 bytes, so that every
# chunk, and every whole block in it, starts 16-byte aligned. Allocations are (the caching allocator aligns to
# 512 bytes); a view with an odd storage offset is not, and is read with masked loads.
ALIGNED = 4
VECTOR_BYTES = 16
_data_ptr = torch.Tensor.data_ptr


def _even(n: int) -> int:
    return n + (n & 1)


class TensorTable:
    """The device table of one gradient list (see the module docstring for the layout)."""

    __slots__ = ("key", "signature", "buffer", "dev_ptrs", "numels", "codes", "chunk_begin", "chunk_tensor",
                 "num_tensors", "num_filled", "num_chunks", "chunk", "has_fp64", "staging", "expanded", "aliased",
                 "_refs", "_exact", "_tickets", "__weakref__")

    def __init__(self, key, signature, grads: list[torch.Tensor], chunk: int, watch_lifetimes: bool):
        # bad input is an error before any kernel runs (the Python build's check_grads; the C++ one takes only
        # what passes it)
        rows = table_rows(grads, chunk)
        if rows is None:
            rows = _rows(grads, chunk)
        host, c, self.num_filled, self.has_fp64, self.expanded, self.aliased, strided = rows
        # What a write must know (a table serves reads and writes alike): `expanded`, the first gradient whose
        # elements share memory (stride 0: it cannot be written in place), and `aliased`, whether two gradients
        # share memory (then they are scaled one after the other, as torch does, never by racing programs).
        self.key = key
        self.signature = signature
        self.chunk = chunk
        self.num_tensors = n = len(grads)
        self.num_chunks = c
        device = grads[0].device
        # (index, staging buffer) of every non-contiguous gradient with elements: its row points at the buffer
        self.staging = [(i, torch.empty(grads[i].shape, dtype=grads[i].dtype, device=device)) for i in strided]
        sizes = _section_sizes(n, c)
        ptrs, _, codes, _, _ = host.split(sizes)
        for i, buf in self.staging:
            ptrs[i] = buf.data_ptr()
            codes[i] = _code(buf, buf.data_ptr(), chunk)
        self.buffer = to_device(host, device)  # one asynchronous copy, on a miss only
        self.dev_ptrs, self.numels, self.codes, self.chunk_begin, self.chunk_tensor = self.buffer.split(sizes)
        self._exact = None
        self._tickets = None
        # Dropped when a tensor dies: an identity-based signature is void then, and staging buffers are as
        # large as their gradients. Weak references only: the cache must never keep a gradient alive.
        self._refs = [weakref.ref(g, self._drop) for g in grads] if watch_lifetimes or self.staging else []

    def exact_sections(self) -> tuple[torch.Tensor, ...]:
        """``(ptrs[:T], numels[:T], codes[:T], chunk_begin[:T + 1], chunk_tensor[:C])``: the five sections at
        their exact lengths (views of the buffer, made once), as the CUDA C++ kernels take them."""
        if self._exact is None:
            n, c = self.num_tensors, self.num_chunks
            self._exact = (self.dev_ptrs[:n], self.numels[:n], self.codes[:n], self.chunk_begin[: n + 1],
                           self.chunk_tensor[:c])
        return self._exact

    @property
    def tickets(self) -> torch.Tensor:
        """int32 [num_tensors + 1] counters, zero between launches: the norm pass's programs draw from them to
        find the last one of each tensor and of the launch, which resets them (triton_kernels/fused_norm.py).
        One launch at a time uses a table's counters: the same gradient list is not clipped on two streams at
        once."""
        if self._tickets is None:
            self._tickets = torch.zeros(self.num_tensors + 1, dtype=torch.int32, device=self.buffer.device)
        return self._tickets

    def _drop(self, _ref) -> None:
        if _cache.get(self.key) is self:
            del _cache[self.key]
        _forget(self)

    def stage_in(self, grads: list[torch.Tensor]) -> None:
        """Copies every non-contiguous gradient into its staging buffer (a no-op in the common case)."""
        for i, buf in self.staging:
            buf.copy_(grads[i])

    def stage_out(self, grads: list[torch.Tensor]) -> None:
        """Copies the staging buffers back into their non-contiguous gradients."""
        for i, buf in self.staging:
            grads[i].copy_(buf)


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A table built on the host, on ``device``. A GPU gets it through pinned memory, asynchronously: from
    pageable memory the copy would wait for the device, a host sync on every table miss. (The caching host
    allocator keeps the pinned block until the copy has read it.)"""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _section_sizes(n: int, chunks: int) -> list[int]:
    """The lengths of the five sections of a table of ``n`` tensors and ``chunks`` chunks, each even."""
    return [_even(n), _even(n), _even(n), _even(n + 1), _even(chunks)]


def _code(t: torch.Tensor, ptr: int, chunk: int) -> int:
    """The codes section's entry of tensor ``t`` whose data the table reads at ``ptr``."""
    aligned = ptr % VECTOR_BYTES == 0 and chunk * t.element_size() % VECTOR_BYTES == 0
    return DTYPE_CODES[t.dtype] | (ALIGNED if aligned else 0)


def _rows(grads: list[torch.Tensor], chunk: int) -> tuple:
    """What ``_C.table_rows`` returns, in Python (without the extension, and for input it does not take, which
    ``check_grads`` refuses with a clear error)::

        (host, num_chunks, num_filled, has_fp64, expanded, aliased, strided)
    """
    check_grads(grads)
    n = len(grads)
    numels = [g.numel() for g in grads]
    ptrs = [g.data_ptr() for g in grads]
    counts = torch.tensor([(m + chunk - 1) // chunk for m in numels], dtype=torch.int64)
    begin = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=begin[1:])
    c = int(begin[-1])
    host = torch.zeros(sum(_section_sizes(n, c)), dtype=torch.int64)
    sections = host.split(_section_sizes(n, c))
    sections[0][:n] = torch.tensor(ptrs, dtype=torch.int64)
    sections[1][:n] = torch.tensor(numels, dtype=torch.int64)
    sections[2][:n] = torch.tensor([_code(g, ptr, chunk) for g, ptr in zip(grads, ptrs)], dtype=torch.int64)
    sections[3][: n + 1] = begin
    sections[4][:c] = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), counts)
    expanded = next((i for i, g in enumerate(grads) if torch._debug_has_internal_overlap(g) == 1), None)
    strided = [i for i, g in enumerate(grads) if g.numel() and not g.is_contiguous()]
    return (host, c, int((counts > 0).sum()), any(g.dtype == torch.float64 for g in grads), expanded,
            _share_memory(grads), strided)


def _share_memory(grads: list[torch.Tensor]) -> bool:
    """Whether the memory two gradients reach overlaps (a tensor that is the .grad of two parameters,
    overlapping views). Sorted extents, built once per table."""
    extents = []
    for g in grads:
        if g.numel():
            last = sum((size - 1) * stride for size, stride in zip(g.shape, g.stride()))
            extents.append((g.data_ptr(), g.data_ptr() + (last + 1) * g.element_size()))
    extents.sort()
    return any(b[0] < a[1] for a, b in zip(extents, extents[1:]))


_cache: "OrderedDict[tuple, TensorTable]" = OrderedDict()
# The few tables found last, newest first (with a compiled signature): a training loop clips the same list every
# step, and the norm and scale passes of one clip look the same list up twice. Each is checked in place
# (signature_matches: no allocation, a few ns a tensor) before the key of the dictionary is computed.
RECENT = 4
_recent: list[TensorTable] = []
# Tables looked up while a CUDA graph was being captured: the graph reads their device buffers at every
# replay, so neither the cache's eviction nor a tensor's death may free them.
_captured: dict[tuple, TensorTable] = {}
_builds = 0


def _capturing(grads: list[torch.Tensor]) -> bool:
    return grads[0].is_cuda and torch.cuda.is_current_stream_capturing()


def tensor_table(grads: list[torch.Tensor], chunk: int = CHUNK) -> TensorTable:
    """The table of ``grads`` (any dtypes of DTYPE_CODES, one device), built on the first call and cached.

    Example::

        table = tensor_table([p.grad for p in model.parameters()])
        table.num_chunks  # programs per launch
    """
    if type(grads) is Checked and grads.table is not None and grads.table.chunk == chunk:
        return _found(grads.table, grads)  # checked against this table as it was gathered
    for table in _recent:  # the list of the last clips: checked in place, before a key is computed
        if table.num_tensors == len(grads) and table.chunk == chunk and signature_matches(grads, table.signature):
            return _found(table, grads)
    compiled = tensor_signature(grads)
    if compiled is not None:
        digest, signature = compiled
        key = (chunk, len(grads), digest)
    else:
        check_grads(grads)  # what the compiled signature refuses may have no data pointer to read
        # The dict key is only (chunk, length, first and last id); the full tuples are compared (not hashed:
        # hashing costs as much as building them) against the entry's.
        key = (chunk, len(grads), id(grads[0]), id(grads[-1]))
        signature = (tuple(map(id, grads)), tuple(map(_data_ptr, grads)))
    table: Optional[TensorTable] = _cache.get(key)
    if table is not None and table.signature == signature:
        return _found(table, grads)
    table = TensorTable(key, signature, grads, chunk, watch_lifetimes=compiled is None)
    global _builds
    _builds += 1
    if key in _cache:
        _forget(_cache[key])
    _cache[key] = table
    while len(_cache) > CACHE_SIZE:
        _forget(_cache.popitem(last=False)[1])
    return _found(table, grads)


class Checked(list):
    """Gradients whose layout was compared with ``table``'s, in the loop that gathered them (``ops.gathered``), or
    by the lookup of their first pass (``table`` None until then): the other passes of one clip then find that
    table without a loop of their own. Made by ops for those passes and never handed back to the caller; a change
    to the list forgets the table (a change to a tensor's data pointer or shape between the gathering and the
    passes would not be seen: nothing between them makes one)."""

    __slots__ = ("table",)

    def __init__(self, grads, table: Optional[TensorTable]):
        super().__init__(grads)
        self.table = table

    def _forget(method):  # a decorator of the class body, deleted below
        def changed(self, *args, **kwargs):
            self.table = None
            return method(self, *args, **kwargs)

        return changed

    __setitem__ = _forget(list.__setitem__)
    __delitem__ = _forget(list.__delitem__)
    __iadd__ = _forget(list.__iadd__)
    __imul__ = _forget(list.__imul__)
    append = _forget(list.append)
    extend = _forget(list.extend)
    insert = _forget(list.insert)
    pop = _forget(list.pop)
    remove = _forget(list.remove)
    clear = _forget(list.clear)
    sort = _forget(list.sort)
    reverse = _forget(list.reverse)
    del _forget


def last_table() -> Optional[TensorTable]:
    """The table found last, whose layout a gathering of gradients may be compared with (``Checked``)."""
    return _recent[0] if _recent else None


def _found(table: TensorTable, grads: list[torch.Tensor]) -> TensorTable:
    """``table``, the one of ``grads``, marked most recently used (and kept with ``grads`` when they are a
    ``Checked`` list, for their next pass)."""
    if type(grads) is Checked:
        grads.table = table
    _cache.move_to_end(table.key)
    if isinstance(table.signature, bytes) and (not _recent or _recent[0] is not table):
        _forget(table)
        _recent.insert(0, table)
        del _recent[RECENT:]
    if _capturing(grads):
        _captured[table.key] = table  # every replay of the graph reads this table: never free it
    return table


def _forget(table: TensorTable) -> None:
    if table in _recent:
        _recent.remove(table)


def writable_table(grads: list[torch.Tensor]) -> TensorTable:
    """The table of gradients a pass is to write in place; an expanded gradient is an error before anything is
    written."""
    table = tensor_table(grads)
    if table.expanded is not None:
        raise ValueError(f"gradient {table.expanded} has elements that share memory (an expanded, stride-0 "
                         "tensor): it cannot be written in place; clone it first")
    return table


def table_to_write(grads: list[torch.Tensor], coef: torch.Tensor, one_at_a_time) -> Optional[TensorTable]:
    """The :func:`writable_table` of ``grads``, or None when they were handed to ``one_at_a_time(grads, coef)``
    one after the other instead, in list order, each reading what the ones before it wrote (gradients that
    share memory: as torch's per-tensor multiply, never racing programs)."""
    table = writable_table(grads)
    if not table.aliased:
        return table
    coefs = coef.reshape(-1).expand(len(grads)) if coef.numel() == 1 else coef.reshape(-1)
    for i, g in enumerate(grads):
        one_at_a_time([g], coefs[i])
    return None


def clear_cache() -> None:
    """Forgets every cached table (needed only after changing a live gradient's size, dtype or strides in
    place without moving its data). Tables that a captured CUDA graph reads stay alive."""
    _cache.clear()
    _recent.clear()


def cache_info() -> dict:
    """How many tables are cached and how many were built since import, for tests and debugging."""
    return {"tables": len(_cache), "max": CACHE_SIZE, "builds": _builds, "captured": len(_captured)}
