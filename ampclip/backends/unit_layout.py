"""Unit layouts: where the units (rows along dim 0, or whole tensors of one dimension or none) of a tensor list
lie, for kernels that measure or scale every unit in one launch (the Triton unit-wise passes of AGC).

A launch has one program per *segment*: a run of at most ``SEGMENT`` elements of one tensor that covers whole
units (the rows of a weight, ``SEGMENT // row_length`` of them) or one piece of a unit longer than a segment (a
large bias, a long row). Each unit owns consecutive *slots*, one per segment piece (one in the common case), for
its partial norms; a finalize reduces them in order. Layout: one int64 device buffer, sections padded to even
lengths (16-byte aligned, as in ``tensor_table.py``)::

    seg_tensor[S]    the tensor of segment s          seg_start[S]  its first element in that tensor
    seg_len[S]       its elements                     seg_unit[S]   its first unit (global unit index)
    seg_slot[S]      its first slot                   row_len[T]    elements per unit of tensor t
    unit_slot_begin[U+1]  the slots of unit u are unit_slot_begin[u] .. unit_slot_begin[u+1]
    tensor_unit_begin[T+1]  the units of tensor t are tensor_unit_begin[t] .. tensor_unit_begin[t+1]

A layout depends on the tensors' shapes only. It is cached per tensor table (``tensor_table.py``), whose
signature covers the shapes, so a step finds both in one lookup, and a CUDA graph that captured a step keeps
reading the same buffers (a captured table is never freed, nor its layout).
"""

from __future__ import annotations

import weakref

import torch

from ..contract import unit_count
from .tensor_table import _even, to_device

SEGMENT = 32768  # elements per program, as the tensor table's CHUNK: enough work to hide a program's start-up

_layouts: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class UnitLayout:
    """The segments, slots and units of one tensor list (see the module docstring)."""

    __slots__ = ("buffer", "seg_tensor", "seg_start", "seg_len", "seg_unit", "seg_slot", "row_len",
                 "unit_slot_begin", "tensor_unit_begin", "counts", "segment", "num_tensors", "num_segments",
                 "num_units", "num_slots", "max_slots")

    def __init__(self, tensors: list[torch.Tensor], segment: int):
        self.segment = segment
        self.num_tensors = n = len(tensors)
        self.counts = counts = [unit_count(t) for t in tensors]
        lengths = [t.numel() // c if c else 0 for t, c in zip(tensors, counts)]
        self.num_units = u = sum(counts)
        parts = {name: [] for name in ("tensor", "start", "len", "unit", "slot")}
        unit_slots = torch.zeros(u, dtype=torch.int64)
        first_unit = first_slot = 0
        max_slots = 0
        for t, (rows, length) in enumerate(zip(counts, lengths)):
            if rows and length:
                if length <= segment:  # whole rows per segment, one slot per unit
                    per = segment // length
                    i = torch.arange((rows + per - 1) // per, dtype=torch.int64)
                    starts, lens = i * per * length, torch.clamp(rows - i * per, max=per) * length
                    units = slots = i * per
                    pieces = 1
                else:  # pieces of one row per segment, one slot per piece
                    pieces = (length + segment - 1) // segment
                    r = torch.arange(rows, dtype=torch.int64).repeat_interleave(pieces)
                    j = torch.arange(pieces, dtype=torch.int64).repeat(rows)
                    starts, lens = r * length + j * segment, torch.clamp(length - j * segment, max=segment)
                    units, slots = r, r * pieces + j
                parts["tensor"].append(torch.full_like(starts, t))
                parts["start"].append(starts)
                parts["len"].append(lens)
                parts["unit"].append(units + first_unit)
                parts["slot"].append(slots + first_slot)
                unit_slots[first_unit : first_unit + rows] = pieces
                first_slot += rows * pieces
                max_slots = max(max_slots, pieces)
            first_unit += rows
        cat = {k: torch.cat(v) if v else torch.zeros(0, dtype=torch.int64) for k, v in parts.items()}
        self.num_segments = s = cat["start"].numel()
        self.num_slots = first_slot
        self.max_slots = max_slots
        sizes = [_even(s)] * 5 + [_even(n), _even(u + 1), _even(n + 1)]
        host = torch.zeros(sum(sizes), dtype=torch.int64)
        sections = list(host.split(sizes))
        for section, key in zip(sections, ("tensor", "start", "len", "unit", "slot")):
            section[:s] = cat[key]
        sections[5][:n] = torch.tensor(lengths, dtype=torch.int64) if n else 0
        torch.cumsum(unit_slots, 0, out=sections[6][1 : u + 1])
        torch.cumsum(torch.tensor(counts, dtype=torch.int64), 0, out=sections[7][1 : n + 1])
        device = tensors[0].device
        self.buffer = to_device(host, device)  # one asynchronous copy, on a cache miss only
        (self.seg_tensor, self.seg_start, self.seg_len, self.seg_unit, self.seg_slot, self.row_len,
         self.unit_slot_begin, self.tensor_unit_begin) = self.buffer.split(sizes)


def unit_layout(table, tensors: list[torch.Tensor], segment: int = SEGMENT) -> UnitLayout:
    """The layout of ``tensors``, whose tensor table is ``table``; built once per table."""
    layout = _layouts.get(table)
    if layout is None or layout.segment != segment or layout.num_tensors != len(tensors):
        layout = _layouts[table] = UnitLayout(tensors, segment)
    return layout
