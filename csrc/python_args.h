// What the entries of ampclip._C (csrc/python_entry.cpp, csrc/adaptive_entry.cpp) share: reading their
// arguments, deciding when an input needs the dispatcher first, and releasing the GIL over large passes.
#pragma once

#include <Python.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <utility>

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

// A plain tensor: Tensor or Parameter, with no Python dispatch key (a tensor subclass or a fake tensor).
inline bool is_plain(PyObject* obj) {
  return THPVariable_CheckExact(obj) && !THPVariable_Unpack(obj).key_set().has(c10::DispatchKey::Python);
}

// A plain tensor -> it; false for anything else (the dispatcher handles it, or gives the error).
inline bool tensor_arg(PyObject* obj, at::Tensor& out) {
  if (!is_plain(obj)) return false;
  out = THPVariable_Unpack(obj);
  return true;
}

// None -> nullopt, a plain tensor -> it; false for anything else.
inline bool optional_tensor(PyObject* obj, std::optional<at::Tensor>& out) {
  if (obj == Py_None) return true;
  at::Tensor t;
  if (!tensor_arg(obj, t)) return false;
  out = std::move(t);
  return true;
}

inline bool check_nargs(Py_ssize_t nargs, Py_ssize_t expected, const char* signature) {
  if (nargs == expected) return true;
  PyErr_Format(PyExc_TypeError, "%s takes %zd arguments, got %zd", signature, expected, nargs);
  return false;
}

}  // namespace ampclip::py
