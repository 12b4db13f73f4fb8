"""Device tables that let one launch cover any number of tensors (apex's multi_tensor_apply idea, with a
table in device memory instead of kernel arguments).

For a list of contiguous tensors of one dtype: each tensor's data pointer and element count, and one entry
per (tensor, chunk of CHUNK elements). A program handles one chunk. Tables are built on the host once and
cached while the tensors' storage and sizes stay the same.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

CHUNK = 32768  # elements per program: 128 KiB of fp32, enough work to hide a program's start-up
_CACHE_SIZE = 16


@dataclass
class TensorTable:
    ptrs: torch.Tensor  # int64 [T]: data pointers
    numels: torch.Tensor  # int64 [T]
    chunk_tensor: torch.Tensor  # int32 [C]: the tensor of each chunk
    chunk_start: torch.Tensor  # int64 [C]: the chunk's first element (64-bit: tensors may pass 2^31)
    chunk_begin: torch.Tensor  # int32 [T + 1]: the chunks of tensor t are chunk_begin[t] .. chunk_begin[t+1]
    num_chunks: int


_cache: "OrderedDict[tuple, TensorTable]" = OrderedDict()


def tensor_table(tensors: list[torch.Tensor], chunk: int = CHUNK) -> TensorTable:
    """The (cached) table of ``tensors``: contiguous, one dtype, one device."""
    key = (tensors[0].device, tensors[0].dtype, chunk, tuple((t.data_ptr(), t.numel()) for t in tensors))
    table = _cache.get(key)
    if table is not None:
        _cache.move_to_end(key)
        return table
    numels = [t.numel() for t in tensors]
    chunks_per = [(n + chunk - 1) // chunk for n in numels]
    chunk_tensor = torch.repeat_interleave(torch.arange(len(tensors), dtype=torch.int32),
                                           torch.tensor(chunks_per, dtype=torch.int64))
    chunk_begin = torch.zeros(len(tensors) + 1, dtype=torch.int64)
    chunk_begin[1:] = torch.tensor(chunks_per, dtype=torch.int64).cumsum(0)
    # position of each chunk inside its tensor, times the chunk size
    chunk_start = (torch.arange(int(chunk_begin[-1]), dtype=torch.int64)
                   - chunk_begin[:-1].repeat_interleave(torch.tensor(chunks_per, dtype=torch.int64))) * chunk
    device = tensors[0].device
    table = TensorTable(
        ptrs=torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64).to(device, non_blocking=True),
        numels=torch.tensor(numels, dtype=torch.int64).to(device, non_blocking=True),
        chunk_tensor=chunk_tensor.to(device, non_blocking=True),
        chunk_start=chunk_start.to(device, non_blocking=True),
        chunk_begin=chunk_begin.to(torch.int32).to(device, non_blocking=True),
        num_chunks=int(chunk_begin[-1]),
    )
    _cache[key] = table
    if len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return table
