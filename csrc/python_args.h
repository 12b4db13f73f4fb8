// What the entries of ampclip._C (csrc/python_entry.cpp, csrc/adaptive_entry.cpp) share: reading their
// arguments, checking every tensor they touch, deciding when an input needs the dispatcher first, and
// releasing the GIL over large passes.
//
// Bad input leaves an entry through one path: fail() sets a Python exception and the entry returns nullptr.
// No C++ exception is thrown for bad input, and every tensor is checked (kind, layout, device, dtype, size)
// before any pointer is read, so no input reaches a kernel that could fault on it. The kernels' own checks
// (TORCH_CHECK) stay as a second line, and each entry's HANDLE_TH_ERRORS as the last one, for what no input
// check can foresee (an allocation that fails).
#pragma once

#include <Python.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace ampclip::py {

// Passes over at least this many elements (about 1 ms on one core) let other Python threads, a data
// loader's for one, run meanwhile. Below it, taking a reference to every tensor would cost more than it frees.
constexpr int64_t kReleaseGilFrom = 1 << 20;

// Runs fn() without the GIL when the pass covers at least kReleaseGilFrom elements. The caller keeps every
// tensor the pass touches alive meanwhile: without the GIL another thread could drop the last reference.
template <typename Fn>
auto run_releasing_gil_if_large(int64_t numel, Fn fn) {
  if (numel < kReleaseGilFrom) return fn();
  pybind11::gil_scoped_release no_gil;
  return fn();
}

// An active TorchDispatchMode must see the registered op: the entries answer None then.
inline bool modes_active() { return c10::impl::TorchDispatchModeTLS::any_modes_set(); }

// ------------------------------------------------------------------------------------------------ errors

// The two kinds of bad input, raised as ampclip.errors.GradientTypeError and GradientValueError: TypeError and
// ValueError that are also RuntimeError, the type torch raises for the same inputs.
enum class Bad { kType, kValue };

inline PyObject* error_class(Bad kind) {
  static PyObject* classes[2] = {nullptr, nullptr};  // looked up once, under the GIL, then kept
  const int i = kind == Bad::kType ? 0 : 1;
  if (classes[i] == nullptr) {
    PyObject* module = PyImport_ImportModule("ampclip.errors");
    if (module != nullptr) {
      classes[i] = PyObject_GetAttrString(module, kind == Bad::kType ? "GradientTypeError" : "GradientValueError");
      Py_DECREF(module);
    }
    if (classes[i] == nullptr) {  // the package is not importable (a bare build): the built-in types
      PyErr_Clear();
      return kind == Bad::kType ? PyExc_TypeError : PyExc_ValueError;
    }
  }
  return classes[i];
}

// Sets the Python exception for bad input and returns false: `return fail(...)` in a check, then the entry
// returns nullptr.
inline bool fail(Bad kind, const std::string& message) {
  PyErr_SetString(error_class(kind), message.c_str());
  return false;
}

// fail() for an entry: the nullptr it returns.
inline PyObject* error(Bad kind, const std::string& message) {
  fail(kind, message);
  return nullptr;
}

inline std::string dtype_name(const at::Tensor& t) { return c10::toString(t.scalar_type()); }

inline std::string layout_name(const at::Tensor& t) {
  if (t.is_nested()) return "nested";
  switch (t.layout()) {
    case at::kStrided: return "strided";
    case at::kSparse: return "sparse_coo";
    case at::kSparseCsr: return "sparse_csr";
    case at::kSparseCsc: return "sparse_csc";
    case at::kSparseBsr: return "sparse_bsr";
    case at::kSparseBsc: return "sparse_bsc";
    case at::kMkldnn: return "mkldnn";
    default: return "non-strided";
  }
}

// ------------------------------------------------------------------------------------------------ reading

// What an argument turned out to be.
enum class Read { kOk, kDispatcher, kError };

// A tensor whose data the kernels must not read directly: one with a Python dispatch key (a __torch_dispatch__
// subclass, a fake tensor) or a functorch or functionalization wrapper; those need the dispatcher first.
inline bool is_wrapper(const at::Tensor& t) {
  constexpr c10::DispatchKeySet kWrappers({c10::DispatchKey::Python, c10::DispatchKey::Functionalize,
                                           c10::DispatchKey::FuncTorchBatched,
                                           c10::DispatchKey::FuncTorchGradWrapper});
  return t.key_set().has_any(kWrappers);
}

// A tensor object whose data the kernels may read directly: no wrapper (above). A Python subclass that overrides
// neither __torch_dispatch__ nor __torch_function__ (an nn.Parameter subclass, a bare `class T(torch.Tensor):
// pass`) is read like a Tensor: it is one, with a Python type of its own.
inline bool is_plain(PyObject* obj) {
  if (!THPVariable_Check(obj) || is_wrapper(THPVariable_Unpack(obj))) return false;
  if (THPVariable_CheckExact(obj)) return true;
  // A subclass: plain when its __torch_function__ is the one Tensor or Parameter has (the last type seen is
  // remembered: a list holds one type).
  static PyTypeObject* last_plain = nullptr;
  PyTypeObject* type = Py_TYPE(obj);
  if (type == last_plain) return true;
  static PyObject* name = PyUnicode_InternFromString("__torch_function__");
  PyObject* fn = PyObject_GetAttr(reinterpret_cast<PyObject*>(type), name);
  if (fn == nullptr) {
    PyErr_Clear();
    return false;
  }
  // Tensor's own (a classmethod: compared by its function) and Parameter's (torch._C's "disabled" one)
  static PyObject* tensor_fn = PyObject_GetAttr(THPVariableClass, name);
  static PyObject* disabled = [] {
    PyObject* torch_c = PyImport_ImportModule("torch._C");
    PyObject* impl = torch_c != nullptr ? PyObject_GetAttrString(torch_c, "_disabled_torch_function_impl") : nullptr;
    Py_XDECREF(torch_c);
    return impl;
  }();
  if (tensor_fn == nullptr || disabled == nullptr) PyErr_Clear();
  const auto function_of = [](PyObject* f) { return f != nullptr && PyMethod_Check(f) ? PyMethod_GET_FUNCTION(f) : f; };
  PyObject* own = function_of(fn);
  const bool plain = own != nullptr && (own == disabled || own == function_of(tensor_fn));
  Py_DECREF(fn);
  if (plain) last_plain = type;
  return plain;
}

// A tensor argument: kOk with `out` set, kDispatcher for a tensor the dispatcher must unwrap, kError (a Python
// TypeError set) for anything that is not a tensor.
inline Read tensor_arg(PyObject* obj, const char* op, const char* what, at::Tensor& out) {
  if (!THPVariable_Check(obj)) {
    fail(Bad::kType, std::string(op) + ": " + what + " must be a Tensor, got " + Py_TYPE(obj)->tp_name);
    return Read::kError;
  }
  if (!is_plain(obj)) return Read::kDispatcher;
  out = THPVariable_Unpack(obj);
  return Read::kOk;
}

// Reads arguments in order, each a callable returning Read, up to the first that is not kOk.
template <typename... Reads>
Read read_in_order(Reads&&... reads) {
  Read out = Read::kOk;
  ((out = out == Read::kOk ? reads() : out), ...);
  return out;
}

// What an entry returns for a read that is not kOk: None (the caller goes through the dispatcher) or nullptr
// (the Python error is set).
inline PyObject* answer(Read read) {
  if (read == Read::kError) return nullptr;
  Py_RETURN_NONE;
}

// None -> nullopt; else as tensor_arg.
inline Read optional_tensor(PyObject* obj, const char* op, const char* what, std::optional<at::Tensor>& out) {
  if (obj == Py_None) return Read::kOk;
  at::Tensor t;
  const Read read = tensor_arg(obj, op, what, t);
  if (read == Read::kOk) out = std::move(t);
  return read;
}

// The items of a list or tuple of tensors (borrowed), kDispatcher when one needs the dispatcher, kError for
// anything else.
inline Read tensor_items(PyObject* seq, const char* op, const char* what, PyObject**& items, Py_ssize_t& count) {
  if (!PyList_Check(seq) && !PyTuple_Check(seq)) {
    fail(Bad::kType, std::string(op) + ": " + what + " must be a list or tuple of Tensors, got " +
                         Py_TYPE(seq)->tp_name);
    return Read::kError;
  }
  count = PySequence_Fast_GET_SIZE(seq);
  items = PySequence_Fast_ITEMS(seq);
  bool dispatcher = false;
  for (Py_ssize_t i = 0; i < count; ++i) {
    if (!THPVariable_Check(items[i])) {
      fail(Bad::kType, std::string(op) + ": " + what + "[" + std::to_string(i) + "] must be a Tensor, got " +
                           Py_TYPE(items[i])->tp_name);
      return Read::kError;
    }
    dispatcher |= !is_plain(items[i]);
  }
  return dispatcher ? Read::kDispatcher : Read::kOk;
}

// Python numbers. Each returns false with a Python error set when the object is not one.
inline bool double_arg(PyObject* obj, const char* op, const char* what, double& out) {
  out = PyFloat_AsDouble(obj);
  if (out == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    return fail(Bad::kType, std::string(op) + ": " + what + " must be a number, got " + Py_TYPE(obj)->tp_name);
  }
  return true;
}

inline bool int_arg(PyObject* obj, const char* op, const char* what, int64_t& out) {
  out = PyLong_AsLongLong(obj);
  if (out == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    return fail(Bad::kType, std::string(op) + ": " + what + " must be an int, got " + Py_TYPE(obj)->tp_name);
  }
  return true;
}

inline bool bool_arg(PyObject* obj, const char* op, const char* what, bool& out) {
  const int truth = PyObject_IsTrue(obj);
  if (truth < 0) {
    PyErr_Clear();
    return fail(Bad::kType, std::string(op) + ": " + what + " must be a bool");
  }
  out = truth != 0;
  return true;
}

// A tuple of the tensors, each wrapped once and owned by the tuple alone (PyTuple_Pack would take a second
// reference to each new wrapper and leak it).
template <typename... Tensors>
PyObject* tuple_of(Tensors&&... tensors) {
  PyObject* items[] = {THPVariable_Wrap(std::forward<Tensors>(tensors))...};
  PyObject* out = PyTuple_New(sizeof...(Tensors));
  for (size_t i = 0; i < sizeof...(Tensors); ++i) {
    if (out == nullptr || items[i] == nullptr) {
      for (PyObject* item : items) Py_XDECREF(item);
      Py_XDECREF(out);
      return nullptr;
    }
  }
  for (size_t i = 0; i < sizeof...(Tensors); ++i) PyTuple_SET_ITEM(out, i, items[i]);  // steals the reference
  return out;
}

// Bumps a tensor's version counter (an inference tensor has none), as torch's in-place ops do: for passes that
// wrote it through a raw pointer.
inline void bump_version(c10::TensorImpl* impl) {
  if (!impl->is_inference()) impl->bump_version();
}

// bump_version of every tensor in items (each a THPVariable).
inline void bump_versions(PyObject* const* items, Py_ssize_t count) {
  for (Py_ssize_t i = 0; i < count; ++i) bump_version(THPVariable_Unpack(items[i]).unsafeGetTensorImpl());
}

inline bool check_nargs(Py_ssize_t nargs, Py_ssize_t expected, const char* signature) {
  if (nargs == expected) return true;
  PyErr_Format(PyExc_TypeError, "%s takes %zd arguments, got %zd", signature, expected, nargs);
  return false;
}

// ------------------------------------------------------------------------------------------------ checks
// Each returns true, or false with the Python error set. They read a tensor's metadata only, in an order that
// is safe for every kind of tensor (a nested or sparse tensor has no strides to ask for).

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

inline std::string where(const char* op, const char* what) { return std::string(op) + ": " + what; }

// Dense (strided, not nested), on the CPU, float16/bfloat16/float32/float64. `name()` gives the message's
// subject; it is called on failure only, so a good tensor costs no string (a gradient list may hold 10^4).
template <typename Name>
inline bool check_cpu_floats(const at::Tensor& t, const Name& name) {
  if (t.is_nested() || t.layout() != at::kStrided) {
    return fail(Bad::kType, name() + " is not dense (layout " + layout_name(t) + ")");
  }
  if (!t.device().is_cpu()) return fail(Bad::kValue, name() + " is on " + t.device().str() + ", expected the CPU");
  if (!is_float_dtype(t.scalar_type())) {
    return fail(Bad::kType,
                name() + " has dtype " + dtype_name(t) + "; expected float16, bfloat16, float32 or float64");
  }
  if (!t.has_storage()) return fail(Bad::kValue, name() + " has no storage");
  return true;
}

// A gradient the kernels take (check_cpu_floats); for a write (`writable`), also no two elements sharing memory.
inline bool check_grad(const at::Tensor& g, Py_ssize_t index, const char* op, bool writable) {
  const auto name = [&] { return std::string(op) + ": gradient " + std::to_string(index); };
  if (!check_cpu_floats(g, name)) return false;
  if (writable && at::has_internal_overlap(g) == at::MemOverlap::Yes) {
    return fail(Bad::kValue, name() + " has elements that share memory (an expanded tensor, stride 0): it cannot be "
                                    "written in place; clone it first");
  }
  return true;
}

// A one-element CPU float tensor (inv_scale, found_inf, a norm, a bound).
inline bool check_scalar(const at::Tensor& t, const char* op, const char* what) {
  if (!check_cpu_floats(t, [&] { return where(op, what); })) return false;
  if (t.numel() != 1) {
    return fail(Bad::kValue, where(op, what) + " must hold exactly one element, got " + std::to_string(t.numel()));
  }
  return true;
}

inline bool check_optional_scalar(const std::optional<at::Tensor>& t, const char* op, const char* what) {
  return !t.has_value() || check_scalar(*t, op, what);
}

// A CPU float tensor of `numel` elements (any count when negative), 1-D when `one_dim`.
inline bool check_floats(const at::Tensor& t, const char* op, const char* what, int64_t numel, bool one_dim) {
  if (!check_cpu_floats(t, [&] { return where(op, what); })) return false;
  if (one_dim && t.dim() != 1) {
    return fail(Bad::kValue, where(op, what) + " must be 1-D, got " + std::to_string(t.dim()) + " dimensions");
  }
  if (numel >= 0 && t.numel() != numel) {
    return fail(Bad::kValue, where(op, what) + " must hold " + std::to_string(numel) + " elements, got " +
                                 std::to_string(t.numel()));
  }
  return true;
}

// A state tensor an op writes in place: contiguous, on the CPU, of `dtype`, of exactly `sizes`.
inline bool check_state(const at::Tensor& t, const char* op, const char* what, at::ScalarType dtype,
                        std::vector<int64_t> sizes) {
  if (!check_cpu_floats(t, [&] { return where(op, what); })) return false;
  bool shape_ok = t.dim() == static_cast<int64_t>(sizes.size());
  for (size_t d = 0; shape_ok && d < sizes.size(); ++d) shape_ok = sizes[d] < 0 || t.size(d) == sizes[d];
  if (t.scalar_type() != dtype || !shape_ok || !t.is_contiguous()) {
    std::string shape;
    for (size_t d = 0; d < sizes.size(); ++d) {
      shape += (d ? ", " : "") + (sizes[d] < 0 ? std::string("n") : std::to_string(sizes[d]));
    }
    return fail(Bad::kValue, where(op, what) + " must be a contiguous " + c10::toString(dtype) + " tensor of shape [" +
                                 shape + "], got " + dtype_name(t) + " of " + std::to_string(t.dim()) + " dimensions");
  }
  return true;
}

// A norm_type the kernels compute: p > 0 or inf (NaN fails).
inline bool check_norm_type(double norm_type, const char* op) {
  if (norm_type > 0.0) return true;
  return fail(Bad::kValue, std::string(op) + ": norm_type must be > 0 or inf, got " + std::to_string(norm_type));
}

// A bound that scales gradients: >= 0 (inf allowed); a negative one would reverse them.
inline bool check_bound(double value, const char* op, const char* what) {
  if (value >= 0.0) return true;
  return fail(Bad::kValue, where(op, what) + " must be >= 0, got " + std::to_string(value));
}

}  // namespace ampclip::py
