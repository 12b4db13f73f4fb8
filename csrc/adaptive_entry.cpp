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

// The tensors of a list or tuple read as kOk by tensor_items(), each checked (check_grad) before any is used.
bool checked_tensors(PyObject* const* items, Py_ssize_t count, bool writable, const char* op,
                     std::vector<at::Tensor>& out, int64_t& numel) {
  out.reserve(count);
  numel = 0;
  for (Py_ssize_t i = 0; i < count; ++i) {
    const at::Tensor& t = THPVariable_Unpack(items[i]);
    if (!check_grad(t, i, op, writable)) return false;
    out.push_back(t);
    numel += t.numel();
  }
  return true;
}

// unit_norm_pass(tensors, inv_scale, norm_type) -> (unit_norms, per_tensor, total, found_inf) | None
PyObject* unit_norm_pass(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  constexpr const char* op = "ampclip unit_norm_pass";
  if (!check_nargs(nargs, 3, "unit_norm_pass(tensors, inv_scale, norm_type)")) return nullptr;
  double norm_type = 0.0;
  if (!double_arg(args[2], op, "norm_type", norm_type) || !check_norm_type(norm_type, op)) return nullptr;
  if (modes_active()) Py_RETURN_NONE;
  std::optional<at::Tensor> inv_scale;
  PyObject** items = nullptr;
  Py_ssize_t count = 0;
  const Read read = read_in_order([&] { return optional_tensor(args[1], op, "inv_scale", inv_scale); },
                                  [&] { return tensor_items(args[0], op, "tensors", items, count); });
  if (read != Read::kOk) return answer(read);
  std::vector<at::Tensor> tensors;
  int64_t numel = 0;
  if (!check_optional_scalar(inv_scale, op, "inv_scale") ||
      !checked_tensors(items, count, /*writable=*/false, op, tensors, numel)) {
    return nullptr;
  }
  auto [units, per_tensor, total, found_inf] =
      run_releasing_gil_if_large(numel, [&] { return unit_norm_pass_cpu(tensors, inv_scale, norm_type); });
  return tuple_of(std::move(units), std::move(per_tensor), std::move(total), std::move(found_inf));
  END_HANDLE_TH_ERRORS
}

// unit_scale_pass(grads, coef, inv_scale, found_inf, zero_if_inf) -> True | None
PyObject* unit_scale_pass(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  constexpr const char* op = "ampclip unit_scale_pass";
  if (!check_nargs(nargs, 5, "unit_scale_pass(grads, coef, inv_scale, found_inf, zero_if_inf)")) return nullptr;
  bool zero_if_inf = false;
  if (!bool_arg(args[4], op, "zero_if_inf", zero_if_inf)) return nullptr;
  if (modes_active()) Py_RETURN_NONE;
  at::Tensor coef;
  std::optional<at::Tensor> inv_scale, found_inf;
  PyObject** items = nullptr;
  Py_ssize_t count = 0;
  const Read read = read_in_order([&] { return tensor_arg(args[1], op, "coef", coef); },
                                  [&] { return optional_tensor(args[2], op, "inv_scale", inv_scale); },
                                  [&] { return optional_tensor(args[3], op, "found_inf", found_inf); },
                                  [&] { return tensor_items(args[0], op, "grads", items, count); });
  if (read != Read::kOk) return answer(read);
  std::vector<at::Tensor> grads;
  int64_t numel = 0;
  if (!check_optional_scalar(inv_scale, op, "inv_scale") || !check_optional_scalar(found_inf, op, "found_inf") ||
      !checked_tensors(items, count, /*writable=*/true, op, grads, numel)) {
    return nullptr;
  }
  int64_t units = 0;
  for (const auto& g : grads) units += unit_count(g);
  if (!check_floats(coef, op, "coef (one entry per unit)", units, /*one_dim=*/false)) return nullptr;
  run_releasing_gil_if_large(numel, [&] { unit_scale_pass_cpu(grads, coef, inv_scale, found_inf, zero_if_inf); });
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

// unit_clip_finalize(param_norms, grad_norms, clip_factor, eps, norm_type) -> (coef, post_clip_norm) | None
PyObject* unit_clip_finalize(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  constexpr const char* op = "ampclip unit_clip_finalize";
  if (!check_nargs(nargs, 5, "unit_clip_finalize(param_norms, grad_norms, clip_factor, eps, norm_type)")) {
    return nullptr;
  }
  double clip_factor = 0.0, eps = 0.0, norm_type = 0.0;
  if (!double_arg(args[2], op, "clip_factor", clip_factor) || !double_arg(args[3], op, "eps", eps) ||
      !double_arg(args[4], op, "norm_type", norm_type) || !check_norm_type(norm_type, op)) {
    return nullptr;
  }
  if (modes_active()) Py_RETURN_NONE;
  at::Tensor param_norms, grad_norms;
  const Read read = read_in_order([&] { return tensor_arg(args[0], op, "param_norms", param_norms); },
                                  [&] { return tensor_arg(args[1], op, "grad_norms", grad_norms); });
  if (read != Read::kOk) return answer(read);
  if (!check_floats(grad_norms, op, "grad_norms", -1, /*one_dim=*/false) ||
      !check_floats(param_norms, op, "param_norms (one per unit, as grad_norms)", grad_norms.numel(),
                    /*one_dim=*/false)) {
    return nullptr;
  }
  if (grad_norms.scalar_type() != at::kFloat && grad_norms.scalar_type() != at::kDouble) {
    return error(Bad::kType, std::string(op) + ": grad_norms must be float32 or float64 (the norms' dtype), got " +
                                 dtype_name(grad_norms));
  }
  auto [coef, post] = unit_clip_finalize_cpu(param_norms, grad_norms, clip_factor, eps, norm_type);
  return tuple_of(std::move(coef), std::move(post));
  END_HANDLE_TH_ERRORS
}

// zclip_update(state, warmup, total, found_inf, alpha, z_thresh, max_grad_norm, eps, rule, clip_factor,
//              skip_update_on_spike) -> bound | None
PyObject* zclip_update(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  constexpr const char* op = "ampclip zclip_update";
  if (!check_nargs(nargs, 11, "zclip_update(state, warmup, total, found_inf, alpha, z_thresh, max_grad_norm, eps, "
                              "rule, clip_factor, skip_update_on_spike)")) {
    return nullptr;
  }
  double alpha = 0.0, z_thresh = 0.0, max_grad_norm = 0.0, eps = 0.0, clip_factor = 0.0;
  int64_t rule = 0;
  bool skip = false;
  if (!double_arg(args[4], op, "alpha", alpha) || !double_arg(args[5], op, "z_thresh", z_thresh) ||
      !double_arg(args[6], op, "max_grad_norm", max_grad_norm) || !double_arg(args[7], op, "eps", eps) ||
      !int_arg(args[8], op, "rule", rule) || !double_arg(args[9], op, "clip_factor", clip_factor) ||
      !bool_arg(args[10], op, "skip_update_on_spike", skip)) {
    return nullptr;
  }
  if (rule < 0 || rule > 2) return error(Bad::kValue, std::string(op) + ": rule must be 0, 1 or 2");
  if (modes_active()) Py_RETURN_NONE;
  at::Tensor state, warmup, total, found_inf;
  const Read read = read_in_order([&] { return tensor_arg(args[0], op, "state", state); },
                                  [&] { return tensor_arg(args[1], op, "warmup", warmup); },
                                  [&] { return tensor_arg(args[2], op, "total", total); },
                                  [&] { return tensor_arg(args[3], op, "found_inf", found_inf); });
  if (read != Read::kOk) return answer(read);
  if (!check_state(state, op, "state", at::kDouble, {4}) || !check_state(warmup, op, "warmup", at::kDouble, {-1}) ||
      !check_scalar(total, op, "total") || !check_scalar(found_inf, op, "found_inf")) {
    return nullptr;
  }
  if (warmup.numel() < 1) return error(Bad::kValue, std::string(op) + ": warmup must hold at least one element");
  if (total.scalar_type() != at::kFloat && total.scalar_type() != at::kDouble) {
    return error(Bad::kType, std::string(op) + ": total must be float32 or float64, got " + dtype_name(total));
  }
  return THPVariable_Wrap(zclip_update_cpu(state, warmup, total, found_inf, alpha, z_thresh, max_grad_norm, eps,
                                           rule, clip_factor, skip));
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
