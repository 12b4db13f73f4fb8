// The Python module ampclip._C: importing it runs the op registrations of the other files, and it has the
// eager entry points of the CPU kernels.
//
// A clip of 2000 small gradients spends more time getting to the kernel than in it: reading `p.grad` in
// Python costs about 0.1 us a parameter and the dispatcher's boxed Tensor[] conversion about 0.15 us a
// tensor. Here the lists are read in C++ and the kernels are called directly. Each entry returns None,
// having changed nothing, when the call needs the dispatcher after all (tensor subclasses, tensors with a
// Python dispatch key, an active TorchDispatchMode): the caller then calls the registered op.

#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include <vector>

#include "cpu/fused_clip_cpu.h"

namespace ampclip {
namespace {

// Passes over at least this many elements (about 1 ms on one core) let other Python threads, a data
// loader's for one, run meanwhile. Below it, taking a reference to every tensor would cost more than it frees.
constexpr int64_t kReleaseGilFrom = 1 << 20;

// Runs fn(), without the GIL when the gradients are large. hold() lists the tensors to keep alive for the
// time: without the GIL another thread could drop the last reference to one mid-pass.
template <typename Hold, typename Fn>
auto run_releasing_gil_if_large(const CpuGrads& grads, Hold hold, Fn fn) {
  int64_t numel = 0;
  for (const auto& span : grads.spans) numel += span.numel;
  if (numel < kReleaseGilFrom) return fn();
  const std::vector<at::Tensor> held = hold();
  pybind11::gil_scoped_release no_gil;
  return fn();
}

// The tensors of a list or tuple that gather_list accepted, for run_releasing_gil_if_large.
std::vector<at::Tensor> tensors_of(PyObject* seq) {
  std::vector<at::Tensor> out;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); ++i) {
    out.push_back(THPVariable_Unpack(PySequence_Fast_GET_ITEM(seq, i)));
  }
  return out;
}

// A plain tensor: Tensor or Parameter, with no Python dispatch key (a tensor subclass or a fake tensor).
bool is_plain(PyObject* obj) {
  return THPVariable_CheckExact(obj) && !THPVariable_Unpack(obj).key_set().has(c10::DispatchKey::Python);
}

// None -> nullopt, a plain tensor -> it; false for anything else (the dispatcher gives the error).
bool optional_tensor(PyObject* obj, std::optional<at::Tensor>& out) {
  if (obj == Py_None) return true;
  if (!is_plain(obj)) return false;
  out = THPVariable_Unpack(obj);
  return true;
}

// The tensors of a list or tuple, checked and gathered; false when one needs the dispatcher.
bool gather_list(PyObject* seq, bool writable, const char* op, CpuGrads& out) {
  if (!PyList_Check(seq) && !PyTuple_Check(seq)) return false;
  const Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  out.spans.reserve(count);
  for (Py_ssize_t i = 0; i < count; ++i) {
    if (!is_plain(items[i])) return false;
  }
  for (Py_ssize_t i = 0; i < count; ++i) {
    const at::Tensor& grad = THPVariable_Unpack(items[i]);
    check_grad(grad, static_cast<size_t>(i), op);
    out.add(grad, writable);
  }
  return true;
}

// norm_pass(grads, inv_scale, norm_type) -> (per_tensor_norms, total_norm, found_inf) | None
PyObject* norm_pass(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 3) {
    PyErr_SetString(PyExc_TypeError, "norm_pass(grads, inv_scale, norm_type) takes 3 arguments");
    return nullptr;
  }
  const double norm_type = PyFloat_AsDouble(args[2]);
  if (PyErr_Occurred()) return nullptr;
  std::optional<at::Tensor> inv_scale;
  CpuGrads grads;
  if (c10::impl::TorchDispatchModeTLS::any_modes_set() || !optional_tensor(args[1], inv_scale) ||
      !gather_list(args[0], /*writable=*/false, "ampclip norm_pass", grads)) {
    Py_RETURN_NONE;
  }
  auto [norms, total, found_inf] = run_releasing_gil_if_large(
      grads, [&] { return tensors_of(args[0]); }, [&] { return norm_pass_cpu(grads, inv_scale, norm_type); });
  return PyTuple_Pack(3, THPVariable_Wrap(std::move(norms)), THPVariable_Wrap(std::move(total)),
                      THPVariable_Wrap(std::move(found_inf)));
  END_HANDLE_TH_ERRORS
}

// scale_pass(grads, coef, inv_scale, clip_value, found_inf, zero_if_inf) -> True | None
PyObject* scale_pass(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 6) {
    PyErr_SetString(PyExc_TypeError,
                    "scale_pass(grads, coef, inv_scale, clip_value, found_inf, zero_if_inf) takes 6 arguments");
    return nullptr;
  }
  std::optional<double> clip_value;
  if (args[3] != Py_None) {
    clip_value = PyFloat_AsDouble(args[3]);
    if (PyErr_Occurred()) return nullptr;
  }
  const int zero_if_inf = PyObject_IsTrue(args[5]);
  if (zero_if_inf < 0) return nullptr;
  std::optional<at::Tensor> coef, inv_scale, found_inf;
  CpuGrads grads;
  if (c10::impl::TorchDispatchModeTLS::any_modes_set() || args[1] == Py_None || !optional_tensor(args[1], coef) ||
      !optional_tensor(args[2], inv_scale) || !optional_tensor(args[4], found_inf) ||
      !gather_list(args[0], /*writable=*/true, "ampclip scale_pass", grads)) {
    Py_RETURN_NONE;
  }
  run_releasing_gil_if_large(grads, [&] { return tensors_of(args[0]); }, [&] {
    scale_pass_cpu(grads, *coef, inv_scale, clip_value, found_inf, zero_if_inf != 0);
  });
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

// clip_params(params: list | tuple, max_norm: float, norm_type: float) -> Tensor | None
//
// Clips the gradients of `params` in place like clip_grad_norm_ and returns the pre-clip total norm, or
// returns None, having changed nothing, when the input needs the general Python path: a parameter that is
// not a Tensor or Parameter (tensor subclasses such as DTensor), or a gradient that is not a dense CPU
// float tensor (other devices, sparse, tensor subclasses, other dtypes; the Python path gives the errors).
// No gradient at all also returns None.
PyObject* clip_params(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 3) {
    PyErr_SetString(PyExc_TypeError, "clip_params(params, max_norm, norm_type) takes 3 arguments");
    return nullptr;
  }
  if (!PyList_Check(args[0]) && !PyTuple_Check(args[0])) {
    PyErr_SetString(PyExc_TypeError, "clip_params: params must be a list or a tuple");
    return nullptr;
  }
  const double max_norm = PyFloat_AsDouble(args[1]);
  const double norm_type = PyFloat_AsDouble(args[2]);
  if (PyErr_Occurred()) return nullptr;
  if (c10::impl::TorchDispatchModeTLS::any_modes_set()) Py_RETURN_NONE;

  const Py_ssize_t count = PySequence_Fast_GET_SIZE(args[0]);
  PyObject** items = PySequence_Fast_ITEMS(args[0]);
  CpuGrads grads;
  grads.spans.reserve(count);
  for (Py_ssize_t i = 0; i < count; ++i) {
    if (!THPVariable_CheckExact(items[i])) Py_RETURN_NONE;  // a subclass's .grad may mean something else
    const at::Tensor& grad = THPVariable_Unpack(items[i]).grad();
    if (!grad.defined()) continue;
    if (!is_kernel_grad(grad) || grad.key_set().has(c10::DispatchKey::Python)) Py_RETURN_NONE;
    grads.add(grad, /*writable=*/true);
  }
  if (grads.spans.empty()) Py_RETURN_NONE;

  const auto gradients = [&] {
    std::vector<at::Tensor> out;
    for (Py_ssize_t i = 0; i < count; ++i) {
      const at::Tensor& grad = THPVariable_Unpack(items[i]).grad();
      if (grad.defined()) out.push_back(grad);
    }
    return out;
  };
  at::Tensor total = run_releasing_gil_if_large(
      grads, gradients, [&] { return clip_grad_norm_cpu(grads, max_norm, norm_type); });
  return THPVariable_Wrap(std::move(total));
  END_HANDLE_TH_ERRORS
}

// present_grads(params: list | tuple) -> (grads, indices | None) | None
//
// The gradients that exist, in parameter order, and their parameters' indices (None when every parameter
// has one, the common case). None when a parameter is not a plain Tensor or Parameter.
PyObject* present_grads(PyObject* /*module*/, PyObject* params) {
  HANDLE_TH_ERRORS
  if (!PyList_Check(params) && !PyTuple_Check(params)) Py_RETURN_NONE;
  const Py_ssize_t count = PySequence_Fast_GET_SIZE(params);
  PyObject** items = PySequence_Fast_ITEMS(params);
  for (Py_ssize_t i = 0; i < count; ++i) {
    if (!THPVariable_CheckExact(items[i])) Py_RETURN_NONE;
  }
  pybind11::list grads;
  pybind11::object indices = pybind11::none();  // a list from the first parameter without a gradient
  for (Py_ssize_t i = 0; i < count; ++i) {
    const at::Tensor& grad = THPVariable_Unpack(items[i]).grad();
    if (!grad.defined()) {
      if (indices.is_none()) {
        pybind11::list before;
        for (Py_ssize_t j = 0; j < i; ++j) before.append(j);
        indices = before;
      }
      continue;
    }
    grads.append(pybind11::reinterpret_steal<pybind11::object>(THPVariable_Wrap(grad)));
    if (!indices.is_none()) indices.cast<pybind11::list>().append(i);
  }
  return pybind11::make_tuple(grads, indices).release().ptr();
  END_HANDLE_TH_ERRORS
}

// tensor_signature(tensors: list | tuple) -> (hash: int, signature: bytes) | None
//
// What a kernel table of these tensors depends on, per tensor: data pointer, element count, dtype and
// device, and a hash of its sizes and strides. Not the tensor's identity: the new gradients a backward
// allocates after zero_grad(set_to_none=True) can land at the old addresses, and then the old table fits
// them. Equal signatures mean the table still fits; comparing them is a memcmp, and the 64-bit hash
// is the dictionary key. None when an item is not a plain tensor.
PyObject* tensor_signature(PyObject* /*module*/, PyObject* tensors) {
  HANDLE_TH_ERRORS
  if (!PyList_Check(tensors) && !PyTuple_Check(tensors)) Py_RETURN_NONE;
  const Py_ssize_t count = PySequence_Fast_GET_SIZE(tensors);
  PyObject** items = PySequence_Fast_ITEMS(tensors);
  constexpr uint64_t kPrime = 0x100000001b3ULL;  // FNV-1a's multiplier, applied per 64-bit word
  constexpr int kWords = 4;
  std::vector<uint64_t> words(static_cast<size_t>(count) * kWords);
  uint64_t hash = 0xcbf29ce484222325ULL;
  for (Py_ssize_t i = 0; i < count; ++i) {
    if (!is_plain(items[i])) Py_RETURN_NONE;
    const at::Tensor& t = THPVariable_Unpack(items[i]);
    uint64_t shape = static_cast<uint64_t>(t.dim());
    for (int64_t d = 0; d < t.dim(); ++d) {  // a changed view must not look the same
      shape = (shape ^ static_cast<uint64_t>(t.sizes()[d])) * kPrime;
      shape = (shape ^ static_cast<uint64_t>(t.strides()[d])) * kPrime;
    }
    uint64_t* w = words.data() + i * kWords;
    w[0] = t.has_storage() ? reinterpret_cast<uintptr_t>(t.const_data_ptr()) : 0;
    w[1] = static_cast<uint64_t>(t.numel());
    w[2] = static_cast<uint64_t>(t.scalar_type()) | (static_cast<uint64_t>(t.device().index() + 1) << 16) |
           (static_cast<uint64_t>(t.device().type()) << 32);
    w[3] = shape;
    for (int k = 0; k < kWords; ++k) hash = (hash ^ w[k]) * kPrime;
  }
  pybind11::bytes packed(reinterpret_cast<const char*>(words.data()), words.size() * sizeof(uint64_t));
  return pybind11::make_tuple(hash, packed).release().ptr();
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"norm_pass", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(norm_pass)), METH_FASTCALL,
     "ampclip_C::norm_pass without the dispatcher; None when the call needs it."},
    {"scale_pass", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(scale_pass)), METH_FASTCALL,
     "ampclip_C::scale_pass without the dispatcher; None when the call needs it."},
    {"clip_params", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(clip_params)), METH_FASTCALL,
     "Fast path of ampclip.clip_grad_norm_ for CPU gradients; None when the input needs the general path."},
    {"present_grads", present_grads, METH_O,
     "(gradients that exist, their parameter indices or None when all exist); None for non-plain parameters."},
    {"tensor_signature", tensor_signature, METH_O,
     "(hash, bytes) of each tensor's data pointer, size, dtype, device and layout, for table caches."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace
}  // namespace ampclip

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, ampclip::methods};
  return PyModule_Create(&module);
}
