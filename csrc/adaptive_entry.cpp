// The entries of ampclip._C for adaptive clipping (the unit-wise passes of AGC and ZClip's step), added to the
// module by csrc/python_entry.cpp. Same rules as its entries: called by the `cpp` backend adapter only, the
// lists read in C++, and None returned, having changed nothing, when the input needs the dispatcher first
// (tensor subclasses, tensors with a Python dispatch key, an active TorchDispatchMode): the adapter then calls
// the registered op (ampclip/ops.py), which unwraps the input and comes back here.

#include <torch/csrc/Exceptions.h>

#include <optional>
#include <vector>

#include "cpu/adaptive_cpu.h"
#include "python_args.h"

namespace ampclip {
namespace {

using namespace py;

// The tensors of a list or tuple of plain tensors; false when one needs the dispatcher.
bool tensor_list(PyObject* seq, std::vector<at::Tensor>& out, int64_t& numel) {
  if (!PyList_Check(seq) && !PyTuple_Check(seq)) return false;
  const Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  out.reserve(count);
  numel = 0;
  for (Py_ssize_t i = 0; i < count; ++i) {
    if (!is_plain(items[i])) return false;
    out.push_back(THPVariable_Unpack(items[i]));
    numel += out.back().numel();
  }
  return true;
}

// unit_norm_pass(tensors, inv_scale, norm_type) -> (unit_norms, per_tensor, total, found_inf) | None
PyObject* unit_norm_pass(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!check_nargs(nargs, 3, "unit_norm_pass(tensors, inv_scale, norm_type)")) return nullptr;
  const double norm_type = PyFloat_AsDouble(args[2]);
  if (PyErr_Occurred()) return nullptr;
  std::vector<at::Tensor> tensors;
  std::optional<at::Tensor> inv_scale;
  int64_t numel = 0;
  if (modes_active() || !optional_tensor(args[1], inv_scale) || !tensor_list(args[0], tensors, numel)) {
    Py_RETURN_NONE;
  }
  auto [units, per_tensor, total, found_inf] =
      run_releasing_gil_if_large(numel, [&] { return unit_norm_pass_cpu(tensors, inv_scale, norm_type); });
  return PyTuple_Pack(4, THPVariable_Wrap(std::move(units)), THPVariable_Wrap(std::move(per_tensor)),
                      THPVariable_Wrap(std::move(total)), THPVariable_Wrap(std::move(found_inf)));
  END_HANDLE_TH_ERRORS
}

// unit_scale_pass(grads, coef, inv_scale, found_inf, zero_if_inf) -> True | None
PyObject* unit_scale_pass(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!check_nargs(nargs, 5, "unit_scale_pass(grads, coef, inv_scale, found_inf, zero_if_inf)")) return nullptr;
  const int zero_if_inf = PyObject_IsTrue(args[4]);
  if (zero_if_inf < 0) return nullptr;
  std::vector<at::Tensor> grads;
  at::Tensor coef;
  std::optional<at::Tensor> inv_scale, found_inf;
  int64_t numel = 0;
  if (modes_active() || !tensor_arg(args[1], coef) || !optional_tensor(args[2], inv_scale) ||
      !optional_tensor(args[3], found_inf) || !tensor_list(args[0], grads, numel)) {
    Py_RETURN_NONE;
  }
  run_releasing_gil_if_large(numel, [&] {
    unit_scale_pass_cpu(grads, coef, inv_scale, found_inf, zero_if_inf != 0);
  });
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

// unit_clip_finalize(param_norms, grad_norms, clip_factor, eps, norm_type) -> (coef, post_clip_norm) | None
PyObject* unit_clip_finalize(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!check_nargs(nargs, 5, "unit_clip_finalize(param_norms, grad_norms, clip_factor, eps, norm_type)")) {
    return nullptr;
  }
  const double clip_factor = PyFloat_AsDouble(args[2]);
  const double eps = PyFloat_AsDouble(args[3]);
  const double norm_type = PyFloat_AsDouble(args[4]);
  if (PyErr_Occurred()) return nullptr;
  at::Tensor param_norms, grad_norms;
  if (modes_active() || !tensor_arg(args[0], param_norms) || !tensor_arg(args[1], grad_norms)) Py_RETURN_NONE;
  auto [coef, post] = unit_clip_finalize_cpu(param_norms, grad_norms, clip_factor, eps, norm_type);
  return PyTuple_Pack(2, THPVariable_Wrap(std::move(coef)), THPVariable_Wrap(std::move(post)));
  END_HANDLE_TH_ERRORS
}

// zclip_update(state, warmup, total, found_inf, alpha, z_thresh, max_grad_norm, eps, rule, clip_factor,
//              skip_update_on_spike) -> bound | None
PyObject* zclip_update(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!check_nargs(nargs, 11, "zclip_update(state, warmup, total, found_inf, alpha, z_thresh, max_grad_norm, eps, "
                              "rule, clip_factor, skip_update_on_spike)")) {
    return nullptr;
  }
  const double alpha = PyFloat_AsDouble(args[4]);
  const double z_thresh = PyFloat_AsDouble(args[5]);
  const double max_grad_norm = PyFloat_AsDouble(args[6]);
  const double eps = PyFloat_AsDouble(args[7]);
  const int64_t rule = PyLong_AsLongLong(args[8]);
  const double clip_factor = PyFloat_AsDouble(args[9]);
  const int skip = PyObject_IsTrue(args[10]);
  if (PyErr_Occurred() || skip < 0) return nullptr;
  at::Tensor state, warmup, total, found_inf;
  if (modes_active() || !tensor_arg(args[0], state) || !tensor_arg(args[1], warmup) || !tensor_arg(args[2], total) ||
      !tensor_arg(args[3], found_inf)) {
    Py_RETURN_NONE;
  }
  return THPVariable_Wrap(zclip_update_cpu(state, warmup, total, found_inf, alpha, z_thresh, max_grad_norm, eps,
                                           rule, clip_factor, skip != 0));
  END_HANDLE_TH_ERRORS
}

#define AMPCLIP_FASTCALL(fn) reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fn)), METH_FASTCALL

PyMethodDef adaptive_methods[] = {
    {"unit_norm_pass", AMPCLIP_FASTCALL(unit_norm_pass),
     "Unit-wise (per-row) norms, per-tensor norms, total norm and found_inf; None when it needs the dispatcher."},
    {"unit_scale_pass", AMPCLIP_FASTCALL(unit_scale_pass),
     "Every unit of every gradient times its own coefficient; None when it needs the dispatcher."},
    {"unit_clip_finalize", AMPCLIP_FASTCALL(unit_clip_finalize), "AGC's coefficient of every unit."},
    {"zclip_update", AMPCLIP_FASTCALL(zclip_update), "One ZClip step on its state; returns the step's bound."},
    {nullptr, nullptr, 0, nullptr},
};

#undef AMPCLIP_FASTCALL

}  // namespace

int add_adaptive_methods(PyObject* module) { return PyModule_AddFunctions(module, adaptive_methods); }

}  // namespace ampclip
