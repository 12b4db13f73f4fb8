// The Python module ampclip._C: importing it runs the op registrations of the other files, and it has one
// function of its own, the drop-in clip_grad_norm_'s fast path.
//
// A clip of 2000 small gradients spends more time getting to the kernel than in it: reading `p.grad` in
// Python costs about 0.1 us a parameter and the dispatcher's boxed Tensor[] conversion about 0.15 us a
// tensor. Here the parameters are read in C++ and the kernel is called directly.

#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <vector>

#include "cpu/fused_clip_cpu.h"

namespace ampclip {
namespace {

// Clips of at least this many elements (about 1 ms on one core) let other Python threads, a data loader's
// for one, run meanwhile. Below it, taking a reference to every gradient would cost more than it frees.
constexpr int64_t kReleaseGilFrom = 1 << 20;

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

  const Py_ssize_t count = PySequence_Fast_GET_SIZE(args[0]);
  PyObject** items = PySequence_Fast_ITEMS(args[0]);
  CpuGrads grads;
  grads.spans.reserve(count);
  for (Py_ssize_t i = 0; i < count; ++i) {
    if (!THPVariable_CheckExact(items[i])) Py_RETURN_NONE;
    const at::Tensor& grad = THPVariable_Unpack(items[i]).grad();
    if (!grad.defined()) continue;
    const auto dtype = grad.scalar_type();
    const bool plain = grad.layout() == at::kStrided && grad.device().is_cpu() &&
                       !grad.key_set().has(c10::DispatchKey::Python) &&
                       (dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kDouble);
    if (!plain) Py_RETURN_NONE;
    grads.add(grad, /*writable=*/true);
  }
  if (grads.spans.empty()) Py_RETURN_NONE;

  int64_t numel = 0;
  for (const auto& span : grads.spans) numel += span.numel;
  if (numel < kReleaseGilFrom) return THPVariable_Wrap(clip_grad_norm_cpu(grads, max_norm, norm_type));

  // Without the GIL another thread could replace a `.grad` and free it mid-clip: hold every gradient.
  std::vector<at::Tensor> held;
  held.reserve(grads.spans.size());
  for (Py_ssize_t i = 0; i < count; ++i) {
    const at::Tensor& grad = THPVariable_Unpack(items[i]).grad();
    if (grad.defined()) held.push_back(grad);
  }
  at::Tensor total;
  {
    pybind11::gil_scoped_release no_gil;
    total = clip_grad_norm_cpu(grads, max_norm, norm_type);
  }
  return THPVariable_Wrap(std::move(total));
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"clip_params", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(clip_params)), METH_FASTCALL,
     "Fast path of ampclip.clip_grad_norm_ for CPU gradients; None when the input needs the general path."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace
}  // namespace ampclip

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, ampclip::methods};
  return PyModule_Create(&module);
}
