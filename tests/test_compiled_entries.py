"""Every entry of the compiled extension, called directly with every kind of bad argument.

The entries are ampclip's only C++ code reached from Python. Each must check every tensor it touches (kind,
layout, device, dtype, size) before it reads a pointer, and leave through one error path: a Python
``GradientTypeError`` or ``GradientValueError`` (both also ``RuntimeError``, as torch raises for these inputs),
with every tensor it was handed bit-identical, never a crash. A tensor that needs the dispatcher first (a
``__torch_dispatch__`` subclass, a fake tensor) is answered with None, having changed nothing. ``.ci/run`` runs
this file under Python 3.12 as well (``make test-py312``).
"""

import math
import warnings

import pytest
import torch

from ampclip.backends import cpp
from ampclip.errors import GradientTypeError, GradientValueError
from helpers import bitwise_equal

_C = cpp._C
pytestmark = pytest.mark.skipif(_C is None, reason="the compiled extension is not built")
AMPCLIP_ERRORS = (GradientTypeError, GradientValueError)


def nested():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the nested-tensor API warns that it is a prototype
        return torch.nested.nested_tensor([torch.randn(2), torch.randn(3)])


# Each bad kind builds a replacement for a good tensor argument.
BAD_KINDS = {
    "sparse": lambda good: good.to_sparse() if good.dim() else torch.randn(3).to_sparse(),
    "nested": lambda good: nested(),
    "meta": lambda good: torch.empty_like(good, device="meta"),  # a tensor on another device than the CPU
    "integer": lambda good: good.to(torch.int32),
    "bool": lambda good: good.to(torch.bool),
    "complex": lambda good: good.to(torch.complex64),
    "expanded": lambda good: torch.randn(1, dtype=good.dtype).expand(good.shape),  # (tensors of 2+ elements)
    "0-d": lambda good: torch.tensor(0.5, dtype=good.dtype),
    "wrong size": lambda good: torch.rand(good.numel() + 2, dtype=good.dtype),
    "non-tensor": lambda good: 3,
    "string": lambda good: "grads",
}
ALWAYS_BAD = {"sparse", "nested", "meta", "integer", "bool", "complex", "non-tensor", "string"}


# ------------------------------------------------------------------------------------------------ the entries
# For each entry: a builder of good arguments, and per tensor argument (by position) the kinds it takes besides
# good values. A list of gradients is a position too: its items are replaced one at a time.

def grads2():
    return [torch.randn(5, 4), torch.randn(7, dtype=torch.bfloat16)]


def scalar():
    return torch.tensor(0.5)


ENTRIES = {
    "norm_pass": (lambda: [grads2(), scalar(), 2.0, None], {0: {"expanded", "0-d", "wrong size"}, 1: {"0-d"}}),
    "scale_pass": (lambda: [grads2(), torch.tensor([0.5, 0.25]), scalar(), None, torch.tensor(0.0), False],
                   {0: {"0-d", "wrong size"}, 1: {"expanded", "0-d"}, 2: {"0-d"}, 4: {"0-d"}}),
    "clip_grad_norm": (lambda: [grads2(), 1.0, 2.0], {0: {"0-d", "wrong size"}}),
    "clip_finalize": (lambda: [torch.rand(3), torch.tensor(2.0), scalar(), 2, torch.tensor([0, 1, 1]), 2, 2.0, 1e-6,
                               0],
                      {0: {"expanded"}, 1: {"0-d"}, 2: {"0-d", "non-tensor"}}),  # a bound may be a number
    "scaler_update": (lambda: [torch.tensor([2.0**16, 2.0**-16, 0.0, 1.0]), torch.full((3, 8), math.nan),
                               torch.tensor(0.0), torch.tensor(3.0), 1, 2.0, 0.5, 2000, 1, 0.0, math.inf, True],
                      {2: {"0-d"}, 3: {"0-d"}}),
    "clip_stats_update": (lambda: [torch.zeros(2, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64),
                                   torch.rand(3), torch.tensor([0.5, 1.0, 1.0]), torch.tensor(0.0)],
                          {2: {"expanded"}, 3: {"expanded", "0-d", "wrong size"}, 4: {"0-d"}}),
    "unit_norm_pass": (lambda: [grads2(), scalar(), 2.0], {0: {"expanded", "0-d", "wrong size"}, 1: {"0-d"}}),
    "unit_scale_pass": (lambda: [grads2(), torch.rand(6), scalar(), torch.tensor(0.0), False],
                        {0: {"0-d", "wrong size"}, 1: {"expanded"}, 2: {"0-d"}, 3: {"0-d"}}),
    "unit_clip_finalize": (lambda: [torch.rand(6), torch.rand(6), 0.01, 1e-3, 2.0],
                           {0: {"expanded"}, 1: {"expanded"}}),
    "zclip_update": (lambda: [torch.zeros(4, dtype=torch.float64), torch.zeros(3, dtype=torch.float64),
                              torch.tensor(2.0), torch.tensor(0.0), 0.97, 2.5, 1.0, 1e-6, 0, 1.0, False],
                     {2: {"0-d"}, 3: {"0-d"}}),
}


def tensors_in(args):
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, list):
            out += [t for t in a if isinstance(t, torch.Tensor)]
    return out


def snapshot(args):
    return [(t, t.clone()) for t in tensors_in(args) if t.layout == torch.strided and not t.is_nested
            and t.device.type == "cpu"]


def cases():
    for entry, (build, takes) in ENTRIES.items():
        for position, accepted in takes.items():
            good = build()[position]
            one_element = isinstance(good, torch.Tensor) and good.numel() == 1
            for kind in BAD_KINDS:
                if kind == "expanded" and one_element:
                    continue  # one element cannot share memory with another
                yield pytest.param(entry, position, kind, kind in accepted, id=f"{entry}-arg{position}-{kind}")


@pytest.mark.parametrize("entry, position, kind, accepted", list(cases()))
def test_a_bad_argument_raises_before_anything_is_written(entry, position, kind, accepted):
    build, _ = ENTRIES[entry]
    args = build()
    good = args[position]
    if isinstance(good, list):  # a list of gradients: its last item goes bad
        bad = BAD_KINDS[kind](good[-1])
        args[position] = good[:-1] + [bad]
    else:
        bad = args[position] = BAD_KINDS[kind](good)
    untouched = [(t, before) for t, before in snapshot(args) if t is not bad]
    if accepted:
        getattr(_C, entry)(*args)
        return
    with pytest.raises(AMPCLIP_ERRORS) as raised:
        getattr(_C, entry)(*args)
    assert isinstance(raised.value, RuntimeError), "torch raises RuntimeError for these inputs: ours must be one too"
    for t, before in untouched:
        assert bitwise_equal(t, before), f"{entry} wrote a tensor before refusing {kind} argument {position}"


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_the_good_arguments_run(entry):
    # the control: with nothing bad the same calls succeed, so the refusals above are the bad argument's
    build, _ = ENTRIES[entry]
    assert getattr(_C, entry)(*build()) is not None


@pytest.mark.parametrize("entry", ["norm_pass", "scale_pass", "clip_grad_norm", "unit_norm_pass", "unit_scale_pass"])
def test_not_a_list_and_wrong_argument_counts_raise_type_errors(entry):
    build, _ = ENTRIES[entry]
    args = build()
    with pytest.raises(TypeError):
        getattr(_C, entry)(5, *args[1:])
    with pytest.raises(TypeError):
        getattr(_C, entry)(*args[:-1])


@pytest.mark.parametrize("entry", ["norm_pass", "unit_norm_pass"])
def test_an_empty_list_is_measured_as_nothing(entry):
    build, _ = ENTRIES[entry]
    args = build()
    args[0] = []
    out = getattr(_C, entry)(*args)
    assert all(t.numel() == 0 or float(t) == 0.0 for t in out)


def test_mismatched_lengths_raise():
    g = grads2()
    with pytest.raises(GradientValueError, match="coef"):
        _C.scale_pass(g, torch.rand(3), None, None, None, False)  # 3 coefficients for 2 gradients
    with pytest.raises(GradientValueError, match="unit"):
        _C.unit_scale_pass(g, torch.rand(5), None, None, False)  # 6 units
    with pytest.raises(GradientValueError, match="group"):
        _C.clip_finalize(torch.rand(3), torch.tensor(1.0), 1.0, 2, torch.tensor([0, 1]), 2, 2.0, 1e-6, 0)
    with pytest.raises(GradientValueError, match="outside"):
        _C.clip_finalize(torch.rand(3), torch.tensor(1.0), 1.0, 2, torch.tensor([0, 1, 2]), 2, 2.0, 1e-6, 0)
    with pytest.raises(GradientValueError, match="layer_stats"):
        _C.clip_stats_update(torch.zeros(2, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.float64),
                             torch.rand(3), torch.tensor(0.5), torch.tensor(0.0))
    with pytest.raises(GradientValueError, match="param_norms"):
        _C.unit_clip_finalize(torch.rand(5), torch.rand(6), 0.01, 1e-3, 2.0)
    with pytest.raises(GradientValueError, match="slot"):
        _C.scaler_update(torch.tensor([1.0, 1.0, 0.0, 1.0]), torch.zeros(3, 8), None, None, 8, 2.0, 0.5, 2000, 1,
                         0.0, math.inf, True)
    assert all(t.dtype in (torch.float32, torch.bfloat16) for t in g)


@pytest.mark.parametrize("numbers, match", [((2.0, -1.0), "max_norm"), ((2.0, math.nan), "max_norm"),
                                            ((0.0, 1.0), "norm_type"), ((math.nan, 1.0), "norm_type")])
def test_bad_numbers_raise_value_errors_before_anything_is_written(numbers, match):
    norm_type, max_norm = numbers
    g = grads2()
    before = [t.clone() for t in g]
    with pytest.raises(GradientValueError, match=match):
        _C.clip_grad_norm(g, max_norm, norm_type)
    params = [torch.nn.Parameter(torch.empty_like(t)) for t in g]
    for p, t in zip(params, g):
        p.grad = t
    with pytest.raises(GradientValueError, match=match):
        _C.clip_params(params, max_norm, norm_type)
    assert all(bitwise_equal(a, b) for a, b in zip(g, before))
    with pytest.raises(GradientValueError, match="clamp"):
        _C.norm_pass(g, None, 2.0, (1.0, math.nan))


@pytest.mark.parametrize("kind", sorted(ALWAYS_BAD - {"non-tensor", "string"}) + ["expanded"])
def test_clip_params_hands_a_gradient_it_cannot_write_to_the_general_path(kind):
    params = [torch.randn(4, requires_grad=True) for _ in range(3)]
    for p in params:
        p.grad = torch.randn(4)
    bad = BAD_KINDS[kind](torch.randn(4))
    try:
        params[1] = torch.zeros_like(bad)  # torch takes a gradient of its parameter's kind only
        params[1].grad = bad
    except RuntimeError as exc:
        pytest.skip(f"torch itself refuses a {kind} gradient: {exc}")
    before = [p.grad.clone() for p in (params[0], params[2])]
    assert _C.clip_params(params, 0.01, 2.0) is None
    assert bitwise_equal(params[0].grad, before[0]) and bitwise_equal(params[2].grad, before[1])


@pytest.mark.parametrize("kind", list(BAD_KINDS))
def test_the_helpers_answer_none_or_a_result_for_anything(kind):
    tensors = [torch.randn(3), BAD_KINDS[kind](torch.randn(3))]
    is_tensor = isinstance(tensors[1], torch.Tensor)
    dense = is_tensor and tensors[1].layout == torch.strided and not tensors[1].is_nested
    assert (_C.tensor_signature(tensors) is not None) == dense  # no strides to read otherwise
    assert (_C.present_grads(tensors, None) is not None) == is_tensor  # reads .grad of any tensor, of nothing else
    assert _C.claim_grads(tensors, _C.tensor_signature([torch.randn(3), torch.randn(3)])[1], True) is False  # no .grad


@pytest.mark.parametrize("kind", sorted(ALWAYS_BAD - {"non-tensor", "string"}) + ["expanded"])
def test_claim_grads_misses_a_gradient_of_any_kind_it_was_not_built_from(kind):
    params = [torch.randn(4, requires_grad=True) for _ in range(2)]
    for p in params:
        p.grad = torch.randn(4)
    signature = _C.tensor_signature([p.grad for p in params])[1]
    bad = BAD_KINDS[kind](torch.randn(4))
    try:
        params[0] = torch.zeros_like(bad)
        params[0].grad = bad
    except RuntimeError as exc:
        pytest.skip(f"torch itself refuses a {kind} gradient: {exc}")
    assert _C.claim_grads(params, signature, True) is False


def test_results_are_owned_once():
    # each returned tensor is referenced by the result alone: dropping the result frees it
    import gc
    import weakref

    out = _C.norm_pass(grads2(), None, 2.0, None)
    refs = [weakref.ref(t) for t in out]
    del out
    gc.collect()
    assert all(r() is None for r in refs)


# ------------------------------------------------------------------------------------------------ the CUDA entries

CUDA_ENTRIES = ["cuda_norm_pass", "cuda_clip_norm_pass", "cuda_scale_pass", "cuda_clip_finalize"]
needs_cuda_entries = pytest.mark.skipif(_C is None or not hasattr(_C, "cuda_norm_pass"),
                                        reason="built without the CUDA kernels")


@needs_cuda_entries
@pytest.mark.parametrize("kind", list(BAD_KINDS))
def test_the_cuda_entries_refuse_bad_input_without_a_crash(kind):
    # CPU tensors stand for the wrong device; every kind of bad section or scalar is a clear error, not a fault
    device = "cuda" if torch.cuda.is_available() else "cpu"
    good = [torch.zeros(n, dtype=torch.int64, device=device) for n in (2, 2, 2, 3, 1)]
    tickets = torch.zeros(3, dtype=torch.int32, device=device)
    sections = [good[0], BAD_KINDS[kind](good[1].cpu()), *good[2:]]
    with pytest.raises((TypeError, ValueError)):
        _C.cuda_norm_pass(*sections, 32768, False, tickets, 1, None, 2.0, None, None)
    with pytest.raises((TypeError, ValueError)):
        _C.cuda_clip_norm_pass(*sections, 32768, False, tickets, 1, None, 2.0, None, None, 1.0, 1e-6, 0)
    with pytest.raises((TypeError, ValueError)):  # the ticket counters are checked like every other tensor
        _C.cuda_norm_pass(*good, 32768, False, BAD_KINDS[kind](tickets.cpu().float()), 1, None, 2.0, None, None)
    with pytest.raises((TypeError, ValueError)):
        _C.cuda_scale_pass([], *sections, 32768, torch.ones((), device=device), None, None, None, None, False)
    with pytest.raises((TypeError, ValueError)):
        _C.cuda_clip_finalize(BAD_KINDS[kind](torch.rand(3)), torch.tensor(1.0), torch.tensor(1.0), 0, None, 0, 2.0,
                              1e-6, 0)


@needs_cuda_entries
@pytest.mark.parametrize("name", CUDA_ENTRIES)
def test_the_cuda_entries_refuse_a_wrong_number_of_arguments(name):
    with pytest.raises(TypeError, match=name):
        getattr(_C, name)(torch.zeros(1))
