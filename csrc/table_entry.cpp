// The entries of ampclip._C that gather gradients and keep the tensor tables (ampclip/ops.py's gathering and
// steady clip, ampclip/backends/tensor_table.py), added to the module by csrc/python_entry.cpp. Every step of a
// training loop runs them over every parameter, so each is one C++ loop over a list: reading each `.grad`, a
// table's rows, its signature and the comparison with it, and the version bumps of a pass that wrote through
// raw pointers.

#include <ATen/MemoryOverlap.h>
#include <torch/csrc/Device.h>
#include <torch/csrc/Exceptions.h>

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "python_args.h"

namespace ampclip {
namespace {

using namespace py;

// A tensor's dtype, device and dimension count in one word of its signature.
inline uint64_t kind_word(const at::Tensor& t) {
  return static_cast<uint64_t>(t.scalar_type()) | (static_cast<uint64_t>(t.device().index() + 1) << 16) |
         (static_cast<uint64_t>(t.device().type()) << 32) | (static_cast<uint64_t>(t.dim()) << 48);
}

// What a kernel table of these tensors depends on, per tensor: dtype, device, element count, data pointer,
// sizes and strides (all of them: equal signatures mean equal layouts, never a hash collision). Not the
// tensor's identity: the new gradients a backward allocates after zero_grad(set_to_none=True) can land at
// the old addresses, and then the old table fits them. Calls visit(word) for every word in order, up to the
// first for which it returns false (the kind word first: a comparison with a table's signature stops there for
// a tensor of another device, a meta one, before its data pointer is read); returns false when an item is not
// a plain dense tensor (no strides to read) or a visit returned false.
template <typename Visit>
bool tensor_words(const at::Tensor& t, Visit& visit) {
  if (t.is_nested() || t.layout() != at::kStrided || !t.has_storage()) return false;
  const auto ok = visit(kind_word(t)) && visit(static_cast<uint64_t>(t.numel())) &&
                  visit(reinterpret_cast<uintptr_t>(t.const_data_ptr()));
  if (!ok) return false;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (!visit(static_cast<uint64_t>(t.sizes()[d])) || !visit(static_cast<uint64_t>(t.strides()[d]))) return false;
  }
  return true;
}

template <typename Visit>
bool signature_words(PyObject* const* items, Py_ssize_t count, Visit visit) {
  for (Py_ssize_t i = 0; i < count; ++i) {
    if (!is_plain(items[i]) || !tensor_words(THPVariable_Unpack(items[i]), visit)) return false;
  }
  return true;
}

// Compares the words it is given with a signature (bytes), one after the other: the visit of signature_words
// that signature_matches, present_grads and claim_grads use. A miss stays a miss.
class SignatureCheck {
 public:
  explicit SignatureCheck(PyObject* signature)
      : data_(signature != nullptr && PyBytes_Check(signature)
                  ? reinterpret_cast<const unsigned char*>(PyBytes_AS_STRING(signature))
                  : nullptr),
        size_(data_ != nullptr ? static_cast<size_t>(PyBytes_GET_SIZE(signature)) / sizeof(uint64_t) : 0),
        same_(data_ != nullptr) {}

  bool operator()(uint64_t w) {
    if (!same_ || at_ >= size_) return same_ = false;
    uint64_t want;
    std::memcpy(&want, data_ + at_++ * sizeof(uint64_t), sizeof(want));
    return same_ = want == w;
  }

  // Every word so far compared equal.
  bool same() const { return same_; }
  void fail() { same_ = false; }
  // Every word compared equal, and the signature had no more.
  bool matched() const { return same_ && at_ == size_; }

 private:
  const unsigned char* data_;
  size_t size_;
  size_t at_ = 0;
  bool same_;
};

// present_grads(params: list | tuple, signature: bytes | None)
//   -> (grads, indices | None, device | None, ready, matched) | None
//
// The gradients that exist, in parameter order, and their parameters' indices (None when every parameter
// has one, the common case); the one device they share (None when they are on several, or there are none);
// whether every one is a gradient the kernels take as it is (plain, dense, float16/bfloat16/float32/float64);
// and whether the gradients' tensor_signature is `signature` (a table's: then that table fits them, with no
// second loop to check it). One loop over the parameters instead of four in Python: a step's host cost. None
// when a parameter is not a plain Tensor or Parameter.
PyObject* present_grads(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!check_nargs(nargs, 2, "present_grads(params, signature)")) return nullptr;
  PyObject* params = args[0];
  SignatureCheck check(args[1]);
  if (!PyList_Check(params) && !PyTuple_Check(params)) Py_RETURN_NONE;
  const Py_ssize_t count = PySequence_Fast_GET_SIZE(params);
  PyObject** items = PySequence_Fast_ITEMS(params);
  for (Py_ssize_t i = 0; i < count; ++i) {
    if (!THPVariable_CheckExact(items[i])) Py_RETURN_NONE;
  }
  // Plain C API lists, filled in place: this loop runs every step over every parameter.
  pybind11::object grads = pybind11::reinterpret_steal<pybind11::object>(PyList_New(count));
  if (!grads) return nullptr;
  std::vector<Py_ssize_t> missing;  // parameters without a gradient
  std::optional<c10::Device> device;
  bool one_device = true;
  bool ready = true;
  Py_ssize_t found = 0;
  for (Py_ssize_t i = 0; i < count; ++i) {
    const at::Tensor& grad = THPVariable_Unpack(items[i]).grad();
    if (!grad.defined()) {
      missing.push_back(i);
      continue;
    }
    PyObject* wrapped = THPVariable_Wrap(grad);
    if (wrapped == nullptr) return nullptr;
    PyList_SET_ITEM(grads.ptr(), found++, wrapped);  // steals the new reference
    if (!device.has_value()) device = grad.device();
    one_device = one_device && grad.device() == *device;
    ready = ready && !grad.is_nested() && grad.layout() == at::kStrided && is_float_dtype(grad.scalar_type()) &&
            !grad.key_set().has(c10::DispatchKey::Python);
    if (check.same() && !tensor_words(grad, check)) check.fail();  // stops comparing at the first miss
  }
  pybind11::object indices = pybind11::none();
  if (!missing.empty()) {
    // shrink the list to the gradients found (the unset tail is NULL, which PyList_SetSlice accepts), and
    // list the parameters that have one
    if (PyList_SetSlice(grads.ptr(), found, count, nullptr) < 0) return nullptr;
    pybind11::list present;
    size_t next_missing = 0;
    for (Py_ssize_t i = 0; i < count; ++i) {
      if (next_missing < missing.size() && missing[next_missing] == i) {
        ++next_missing;
      } else {
        present.append(i);
      }
    }
    indices = present;
  }
  pybind11::object where = pybind11::none();
  if (device.has_value() && one_device) where = pybind11::reinterpret_steal<pybind11::object>(THPDevice_New(*device));
  return pybind11::make_tuple(grads, indices, where, ready, ready && check.matched()).release().ptr();
  END_HANDLE_TH_ERRORS
}

// claim_grads(params: list | tuple, signature: bytes, bump: bool) -> bool
//
// Whether every parameter has a gradient and the gradients' tensor_signature is `signature`: then they are
// exactly the tensors of the table that signature belongs to, and a clip launches on that table as it is. The
// steady state of a training loop, which clips the same parameters every step: one loop over the parameters,
// that reads each .grad (zero_grad(set_to_none=True) makes new ones) and makes no Python object, where
// present_grads builds the list of gradients. With `bump`, the caller writes the gradients through the table
// next, so the loop bumps each one's version counter once its words matched, as torch's in-place ops do (an
// inference tensor has none); after a miss further on, the gradients before it stay bumped once more than they
// were written, which costs nothing: a version is only compared for equality with a saved one. False when a
// parameter is not a plain Tensor or Parameter, or a gradient is missing, a wrapper, not dense, or differs from
// the signature.
PyObject* claim_grads(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!check_nargs(nargs, 3, "claim_grads(params, signature, bump)")) return nullptr;
  PyObject* params = args[0];
  if (!PyList_Check(params) && !PyTuple_Check(params)) {
    return error(Bad::kType, "claim_grads: params must be a list or a tuple");
  }
  if (!PyBytes_Check(args[1])) return error(Bad::kType, "claim_grads: signature must be bytes");
  bool bump = false;
  if (!bool_arg(args[2], "claim_grads", "bump", bump)) return nullptr;
  SignatureCheck check(args[1]);
  const Py_ssize_t count = PySequence_Fast_GET_SIZE(params);
  PyObject** items = PySequence_Fast_ITEMS(params);
  for (Py_ssize_t i = 0; i < count; ++i) {
    if (!THPVariable_CheckExact(items[i])) Py_RETURN_FALSE;
    const at::Tensor& grad = THPVariable_Unpack(items[i]).grad();
    if (!grad.defined() || is_wrapper(grad) || !tensor_words(grad, check)) Py_RETURN_FALSE;
    if (bump) bump_version(grad.unsafeGetTensorImpl());
  }
  if (!check.matched()) Py_RETURN_FALSE;
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

// tensor_signature(tensors: list | tuple) -> (hash: int, signature: bytes) | None
//
// The signature_words packed into bytes, with a 64-bit hash as a dictionary key (comparing two signatures is
// a memcmp). None when an item is not a plain dense tensor.
PyObject* tensor_signature(PyObject* /*module*/, PyObject* tensors) {
  HANDLE_TH_ERRORS
  if (!PyList_Check(tensors) && !PyTuple_Check(tensors)) Py_RETURN_NONE;
  const Py_ssize_t count = PySequence_Fast_GET_SIZE(tensors);
  constexpr uint64_t kPrime = 0x100000001b3ULL;  // FNV-1a's multiplier, applied per 64-bit word
  std::vector<uint64_t> words;
  words.reserve(static_cast<size_t>(count) * 6);
  uint64_t hash = 0xcbf29ce484222325ULL;
  const bool plain = signature_words(PySequence_Fast_ITEMS(tensors), count, [&](uint64_t w) {
    words.push_back(w);
    hash = (hash ^ w) * kPrime;
    return true;
  });
  if (!plain) Py_RETURN_NONE;
  pybind11::bytes packed(reinterpret_cast<const char*>(words.data()), words.size() * sizeof(uint64_t));
  return pybind11::make_tuple(hash, packed).release().ptr();
  END_HANDLE_TH_ERRORS
}

// signature_matches(tensors: list | tuple, signature: bytes) -> bool
//
// Whether tensor_signature(tensors) would give `signature`, compared word by word as the tensors are read:
// no allocation, and a miss stops at the first word that differs. What a table cache checks its last table
// with before it computes a key (the same list is clipped every step: a few ns a tensor).
PyObject* signature_matches(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!check_nargs(nargs, 2, "signature_matches(tensors, signature)")) return nullptr;
  if (!PyList_Check(args[0]) && !PyTuple_Check(args[0])) Py_RETURN_FALSE;
  SignatureCheck check(args[1]);
  const bool plain = signature_words(PySequence_Fast_ITEMS(args[0]), PySequence_Fast_GET_SIZE(args[0]),
                                     [&](uint64_t w) { return check(w); });
  if (plain && check.matched()) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
  END_HANDLE_TH_ERRORS
}

// bump_versions(tensors: list | tuple) -> None
//
// Bumps the version counter of every tensor (an inference tensor has none), as torch's in-place ops do: for
// passes that wrote them through raw pointers (the Triton kernels). One loop, a few ns a tensor, where
// torch.autograd.graph.increment_version converts the list to a vector of tensors first.
PyObject* bump_versions(PyObject* /*module*/, PyObject* tensors) {
  HANDLE_TH_ERRORS
  if (!PyList_Check(tensors) && !PyTuple_Check(tensors)) {
    return error(Bad::kType, "bump_versions: tensors must be a list or a tuple");
  }
  const Py_ssize_t count = PySequence_Fast_GET_SIZE(tensors);
  PyObject** items = PySequence_Fast_ITEMS(tensors);
  for (Py_ssize_t i = 0; i < count; ++i) {
    if (!THPVariable_Check(items[i])) return error(Bad::kType, "bump_versions: an item is not a tensor");
  }
  py::bump_versions(items, count);
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}


// The table layout the kernels read (ampclip/backends/tensor_table.py, csrc/cuda/fused_clip_cuda.h): a dtype
// code per tensor, plus kAligned when the tensor's data address and every chunk's start are 16-byte aligned.
constexpr int64_t kAligned = 4;
constexpr int64_t kVectorBytes = 16;

int64_t dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return 0;
    case at::kBFloat16: return 1;
    case at::kFloat: return 2;
    default: return 3;  // kDouble: the callers take the four float dtypes only
  }
}

// table_rows(tensors: list | tuple, chunk: int)
//   -> (host, num_chunks, num_filled, has_fp64, expanded: int | None, aliased: bool, strided: list[int]) | None
//
// A tensor table's rows (ampclip/backends/tensor_table.py), read in one loop over the tensors: `host`, the int64
// buffer of the five sections (ptrs, numels, codes, chunk_begin, chunk_tensor, each padded to an even length)
// for one copy to the device; how many chunks there are and how many tensors own one; whether a tensor is
// float64; the first tensor whose elements share memory (expanded); whether the memory of two tensors overlaps;
// the non-contiguous tensors with elements, whose rows the caller points at staging buffers. None for anything
// but plain dense float16/bfloat16/float32/float64 tensors on one CPU or CUDA device: the Python build then
// raises its clear error. Tens of ns a tensor, where the same in Python costs about 2 us: a table is built on
// every step whose gradients moved.
PyObject* table_rows(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  constexpr const char* op = "table_rows";
  if (!check_nargs(nargs, 2, "table_rows(tensors, chunk)")) return nullptr;
  int64_t chunk = 0;
  if (!int_arg(args[1], op, "chunk", chunk)) return nullptr;
  if (chunk <= 0) return error(Bad::kValue, "table_rows: chunk must be > 0");
  if (!PyList_Check(args[0]) && !PyTuple_Check(args[0])) Py_RETURN_NONE;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(args[0]);
  PyObject** items = PySequence_Fast_ITEMS(args[0]);
  if (n == 0) Py_RETURN_NONE;
  int64_t num_chunks = 0;
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!is_plain(items[i])) Py_RETURN_NONE;
    const at::Tensor& t = THPVariable_Unpack(items[i]);
    const c10::Device device = t.device();
    if (t.is_nested() || t.layout() != at::kStrided || !is_float_dtype(t.scalar_type()) || !t.has_storage() ||
        !(device.is_cpu() || device.is_cuda()) || device != THPVariable_Unpack(items[0]).device()) {
      Py_RETURN_NONE;
    }
    num_chunks += (t.numel() + chunk - 1) / chunk;
  }
  const auto even = [](int64_t k) { return k + (k & 1); };
  const int64_t sizes[5] = {even(n), even(n), even(n), even(n + 1), even(num_chunks)};
  at::Tensor host = at::zeros({sizes[0] + sizes[1] + sizes[2] + sizes[3] + sizes[4]}, at::kLong);
  int64_t* ptrs = host.data_ptr<int64_t>();
  int64_t* numels = ptrs + sizes[0];
  int64_t* codes = numels + sizes[1];
  int64_t* chunk_begin = codes + sizes[2];
  int64_t* chunk_tensor = chunk_begin + sizes[3];
  std::vector<std::pair<uintptr_t, uintptr_t>> extents;  // [first byte, last byte + 1) of each tensor with elements
  extents.reserve(static_cast<size_t>(n));
  pybind11::list strided;
  int64_t chunks = 0, num_filled = 0;
  bool has_fp64 = false;
  pybind11::object expanded = pybind11::none();
  for (Py_ssize_t i = 0; i < n; ++i) {
    const at::Tensor& t = THPVariable_Unpack(items[i]);
    const int64_t numel = t.numel();
    const auto ptr = reinterpret_cast<uintptr_t>(t.const_data_ptr());
    const int64_t itemsize = static_cast<int64_t>(t.element_size());
    ptrs[i] = static_cast<int64_t>(ptr);
    numels[i] = numel;
    const bool aligned = ptr % kVectorBytes == 0 && chunk * itemsize % kVectorBytes == 0;
    codes[i] = dtype_code(t.scalar_type()) | (aligned ? kAligned : 0);
    chunk_begin[i] = chunks;
    const int64_t owned = (numel + chunk - 1) / chunk;
    for (int64_t k = 0; k < owned; ++k) chunk_tensor[chunks++] = i;
    num_filled += owned > 0;
    has_fp64 = has_fp64 || t.scalar_type() == at::kDouble;
    if (expanded.is_none() && at::has_internal_overlap(t) == at::MemOverlap::Yes) expanded = pybind11::int_(i);
    if (numel > 0) {
      int64_t last = 0;  // the offset of the last element, in elements
      for (int64_t d = 0; d < t.dim(); ++d) last += (t.sizes()[d] - 1) * t.strides()[d];
      extents.emplace_back(ptr, ptr + static_cast<uintptr_t>((last + 1) * itemsize));
      if (!t.is_contiguous()) strided.append(i);
    }
  }
  chunk_begin[n] = chunks;
  std::sort(extents.begin(), extents.end());
  bool aliased = false;
  for (size_t k = 1; k < extents.size() && !aliased; ++k) aliased = extents[k].first < extents[k - 1].second;
  return pybind11::make_tuple(host, num_chunks, num_filled, has_fp64, expanded, aliased, strided).release().ptr();
  END_HANDLE_TH_ERRORS
}

#define AMPCLIP_FASTCALL(fn) reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fn)), METH_FASTCALL

PyMethodDef table_methods[] = {
    {"present_grads", AMPCLIP_FASTCALL(present_grads),
     "(gradients that exist, their parameter indices or None when all exist, their one device or None, whether "
     "the kernels take every one, whether their signature is the one given); None for non-plain parameters."},
    {"claim_grads", AMPCLIP_FASTCALL(claim_grads),
     "Whether the parameters' gradients (all present) have the signature given; with bump, bumps each version as it "
     "matches."},
    {"tensor_signature", tensor_signature, METH_O,
     "(hash, bytes) of each tensor's data pointer, size, dtype, device, sizes and strides, for table caches."},
    {"bump_versions", bump_versions, METH_O, "Bumps the version counter of every tensor, as an in-place op does."},
    {"signature_matches", AMPCLIP_FASTCALL(signature_matches),
     "Whether tensor_signature(tensors) would give this signature, compared without building it."},
    {"table_rows", AMPCLIP_FASTCALL(table_rows),
     "A tensor table's int64 host rows and what the table must know of its tensors; None for what it cannot take."},
    {nullptr, nullptr, 0, nullptr},
};

#undef AMPCLIP_FASTCALL

}  // namespace

int add_table_methods(PyObject* module) { return PyModule_AddFunctions(module, table_methods); }

}  // namespace ampclip
