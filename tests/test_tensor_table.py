"""The multi-tensor table (ampclip/backends/tensor_table.py): built once per gradient list, found again by an
exact signature of pointers, sizes, strides and dtypes, never keeping a gradient alive, kept for the replays
of a CUDA graph that read it."""

import gc

import pytest
import torch

from ampclip import ops
from ampclip.backends import cpp, tensor_table
from ampclip.backends.tensor_table import cache_info, clear_cache

table_of = tensor_table.tensor_table
needs_extension = pytest.mark.skipif(not ops.available_backends()["cpp"], reason="needs the compiled extension")


def test_table_is_cached_and_invalidated():
    grads = [torch.randn(100), torch.randn(3000).half()]
    table = table_of(grads)
    assert table_of(grads) is table  # same tensors: a hit
    assert table_of(list(grads)) is table  # a new list of the same tensors: a hit
    grads[0].set_(torch.randn(100))  # storage moved under the same tensor object: rebuilt
    assert table_of(grads) is not table


@needs_extension
def test_new_gradients_at_the_old_addresses_reuse_the_table():
    # zero_grad(set_to_none=True) and a backward: new tensor objects, usually at the same addresses
    storage = [torch.randn(4097), torch.randn(3, 5).half()]
    table = table_of([s.view_as(s) for s in storage])
    gc.collect()
    assert table_of([s.view_as(s) for s in storage]) is table
    assert table_of([storage[0].view_as(storage[0]), storage[1].view(5, 3)]) is not table  # other shape
    assert table_of([storage[0][1:], storage[1]]) is not table  # other address
    strided = [torch.randn(40, 30)[:, :20]]  # its table owns a staging buffer as large as the gradient
    table_of(strided)
    before = cache_info()["tables"]
    del strided
    gc.collect()
    assert cache_info()["tables"] == before - 1


@needs_extension
def test_any_change_of_sizes_or_strides_is_seen_exactly():
    base = torch.randn(40, 30)
    grads = [base[:, :20], torch.randn(50)]
    table = table_of(grads)
    grads[0].t_()  # same data pointer and element count, other sizes and strides
    assert table_of(grads) is not table
    # strides that differ in a way a hash of them might not: compared in full, never by hash alone
    a = torch.randn(64).as_strided((4, 4), (4, 1))
    b = a.as_strided((4, 4), (1, 4))
    assert cpp.tensor_signature([a])[1] != cpp.tensor_signature([b])[1]
    assert table_of([a]) is not table_of([b])


def test_a_table_used_in_a_cuda_graph_capture_outlives_the_cache(monkeypatch):
    grads = [torch.randn(300), torch.randn(70)]
    table = table_of(grads)  # built before capture, as a capture cannot copy host to device
    monkeypatch.setattr(tensor_table, "_capturing", lambda grads: True)
    assert table_of(grads) is table  # the lookup inside the capture
    monkeypatch.undo()
    for i in range(cache_info()["max"] + 1):  # evicts it from the lookup cache
        table_of([torch.randn(i + 1)])
    clear_cache()
    assert any(t is table for t in tensor_table._captured.values())


def test_table_cache_without_the_extension(monkeypatch):
    monkeypatch.setattr(tensor_table, "tensor_signature", lambda tensors: None)
    grads = [torch.randn(100), torch.randn(3000).half()]
    table = table_of(grads)
    assert table_of(list(grads)) is table
    grads[0].set_(torch.randn(100))
    assert table_of(grads) is not table
    # a table keyed on identities goes when its tensors die: the cache holds no gradient alive
    before = cache_info()["tables"]
    del grads, table
    gc.collect()
    assert cache_info()["tables"] < before


@pytest.fixture(params=["compiled", "python"])
def builder(request, monkeypatch):
    """Tables built by the extension's table_rows, or by the Python build that stands in without it."""
    if request.param == "compiled" and not ops.available_backends()["cpp"]:
        pytest.skip("needs the compiled extension")
    if request.param == "python":
        monkeypatch.setattr(tensor_table, "table_rows", lambda tensors, chunk: None)
    return request.param


def _mixed_gradients():
    """Odd sizes, every dtype, zero-size, non-contiguous (transposed, sliced, stride 2), misaligned views,
    overlapping views, an expanded one."""
    base = torch.randn(9000)
    return [torch.randn(1), torch.randn(3).half(), torch.randn(4097).bfloat16(), torch.empty(0),
            torch.randn(33, 17, dtype=torch.float64), torch.randn(7, 0), torch.randn(40, 30).t(), base[1:2500],
            base[::2], base[2000:2100], torch.randn(1).expand(5), torch.randn(2, 3, 5)[:, 1:], torch.randn(70000)]


@needs_extension
@pytest.mark.parametrize("chunk", [1, 1000, 1024, tensor_table.CHUNK])
@pytest.mark.parametrize("count", [1, 2, 13, 300])
def test_the_compiled_rows_are_the_python_ones(chunk, count):
    grads = (_mixed_gradients() * 25)[:count]
    compiled, python = cpp.table_rows(grads, chunk), tensor_table._rows(grads, chunk)
    assert torch.equal(compiled[0], python[0])  # every section, padding included
    assert compiled[1:] == python[1:]


@needs_extension
def test_the_compiled_rows_leave_what_they_cannot_take_to_the_python_build():
    from torch.testing._internal.two_tensor import TwoTensor

    for grads in ([], [torch.ones(3, dtype=torch.int64)], [torch.randn(3), torch.randn(3, dtype=torch.complex64)],
                  [torch.randn(3).to_sparse()], [torch.randn(3), torch.empty(3, device="meta")],
                  [TwoTensor(torch.randn(3), torch.randn(3))], [torch.randn(3), "not a tensor"],
                  (g for g in [torch.randn(3)])):
        assert cpp.table_rows(grads, 1024) is None
    with pytest.raises(ValueError, match="chunk must be > 0"):
        cpp.table_rows([torch.randn(3)], 0)
    with pytest.raises(TypeError, match="takes 2 arguments"):
        cpp._C.table_rows([torch.randn(3)])


def test_the_table_knows_what_a_write_must_know(builder):
    base = torch.randn(100)
    assert table_of([base[:60], base[40:]]).aliased  # overlapping views
    assert table_of([base, torch.randn(3), base]).aliased  # one tensor twice
    assert not table_of([base[:50], base[50:]]).aliased  # neighbours, not overlapping
    assert table_of([torch.randn(3), torch.randn(1).expand(4)]).expanded == 1
    with pytest.raises(TypeError, match="dtype|float16"):
        table_of([torch.ones(3, dtype=torch.int64)])


def test_codes_mark_tensors_whose_chunks_start_16_byte_aligned(builder):
    buf = torch.randn(5000)
    grads = [buf, buf[1:], buf[4:].half(), torch.randn(7, dtype=torch.float64), torch.empty(0)]
    codes = table_of(grads).codes[: len(grads)].tolist()
    dtypes = [tensor_table.DTYPE_CODES[g.dtype] for g in grads]
    assert [c & ~tensor_table.ALIGNED for c in codes] == dtypes
    aligned = [bool(c & tensor_table.ALIGNED) for c in codes]
    assert aligned == [g.data_ptr() % 16 == 0 for g in grads] == [True, False, True, True, True]
    # a chunk of 1001 float32 is 4004 bytes: the second chunk would start misaligned
    assert not table_of([buf], chunk=1001).codes[0].item() & tensor_table.ALIGNED
    assert table_of([buf.half()], chunk=1000).codes[0].item() & tensor_table.ALIGNED


def test_exact_sections_are_views_at_their_lengths(builder):
    grads = [torch.randn(5000), torch.randn(3), torch.empty(0)]
    table = table_of(grads, chunk=1024)
    sections = table.exact_sections()
    assert [s.numel() for s in sections] == [3, 3, 3, 4, 6]
    assert all(s.untyped_storage().data_ptr() == table.buffer.untyped_storage().data_ptr() for s in sections)
    assert table.exact_sections() is sections  # made once per table
