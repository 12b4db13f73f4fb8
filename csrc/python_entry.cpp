// The Python module ampclip._C: the CPU kernels' entry points, called by the `cpp` backend adapter
// (ampclip/backends/cpp.py) and nothing else.
//
// A clip of 2000 small gradients spends more time getting to the kernel than in it: reading `p.grad` in
// Python costs about 0.1 us a parameter and a boxed Tensor[] conversion about 0.15 us a tensor. Here the
// lists are read in C++ and the kernels are called directly. The op registration lives once, in Python
// (ampclip/ops.py, torch.library): torch.compile, opcheck and dispatch modes see those ops, whose
// implementation calls back into these entries. So each entry returns None, having changed nothing, when
// its input needs the dispatcher first (tensor subclasses, tensors with a Python dispatch key, an active
// TorchDispatchMode): the adapter then calls the registered op, which unwraps the input and comes back here.

#include <ATen/MemoryOverlap.h>
#include <torch/csrc/Exceptions.h>

#include <vector>

#include "cpu/fused_clip_cpu.h"
#include "python_args.h"
#ifdef AMPCLIP_WITH_CUDA
#include "cuda/python_cuda.h"
#endif

namespace ampclip {
namespace {

using namespace py;

// Runs fn(), without the GIL when the gradients are large; hold() lists the tensors to keep alive meanwhile.
template <typename Hold, typename Fn>
auto run_releasing_gil_if_large(const CpuGrads& grads, Hold hold, Fn fn) {
  int64_t numel = 0;
  for (const auto& span : grads.spans) numel += span.numel;
  const std::vector<at::Tensor> held = numel >= kReleaseGilFrom ? hold() : std::vector<at::Tensor>{};
  return py::run_releasing_gil_if_large(numel, fn);
}

// The tensors of a list or tuple that gather() accepted, for run_releasing_gil_if_large.
std::vector<at::Tensor> tensors_of(PyObject* seq) {
  std::vector<at::Tensor> out;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); ++i) {
    out.push_back(THPVariable_Unpack(PySequence_Fast_GET_ITEM(seq, i)));
  }
  return out;
}

// None -> nullopt, a (lo, hi) pair of numbers with lo <= hi -> it; false with a Python error otherwise.
bool clamp_arg(PyObject* obj, const char* op, std::optional<Clamp>& out) {
  if (obj == Py_None) return true;
  if (!PyTuple_Check(obj) || PyTuple_GET_SIZE(obj) != 2) {
    return fail(Bad::kType, std::string(op) + ": clamp must be None or a (lo, hi) tuple");
  }
  double lo = 0.0, hi = 0.0;
  if (!double_arg(PyTuple_GET_ITEM(obj, 0), op, "clamp's lo", lo) ||
      !double_arg(PyTuple_GET_ITEM(obj, 1), op, "clamp's hi", hi)) {
    return false;
  }
  if (!(lo <= hi)) {  // NaN fails too
    return fail(Bad::kValue, std::string(op) + ": the clamp needs lo <= hi, got [" + std::to_string(lo) + ", " +
                                 std::to_string(hi) + "]");
  }
  out = Clamp{lo, hi};
  return true;
}

// The gradients of a list or tuple: each checked (check_grad) before any is gathered, so nothing is touched
// when one is bad. Call after tensor_items() read them as kOk.
bool gather(PyObject* const* items, Py_ssize_t count, bool writable, const char* op, CpuGrads& out) {
  for (Py_ssize_t i = 0; i < count; ++i) {
    if (!check_grad(THPVariable_Unpack(items[i]), i, op, writable)) return false;
  }
  out.spans.reserve(count);
  for (Py_ssize_t i = 0; i < count; ++i) out.add(THPVariable_Unpack(items[i]), writable);
  return true;
}

// norm_pass(grads, inv_scale, norm_type, clamp) -> (per_tensor_norms, total_norm, found_inf) | None
PyObject* norm_pass(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  constexpr const char* op = "ampclip norm_pass";
  if (!check_nargs(nargs, 4, "norm_pass(grads, inv_scale, norm_type, clamp)")) return nullptr;
  double norm_type = 0.0;
  std::optional<Clamp> clamp;
  if (!double_arg(args[2], op, "norm_type", norm_type) || !check_norm_type(norm_type, op) ||
      !clamp_arg(args[3], op, clamp)) {
    return nullptr;
  }
  if (modes_active()) Py_RETURN_NONE;
  std::optional<at::Tensor> inv_scale;
  PyObject** items = nullptr;
  Py_ssize_t count = 0;
  const Read read = read_in_order([&] { return optional_tensor(args[1], op, "inv_scale", inv_scale); },
                                  [&] { return tensor_items(args[0], op, "grads", items, count); });
  if (read != Read::kOk) return answer(read);
  CpuGrads grads;
  if (!check_optional_scalar(inv_scale, op, "inv_scale") || !gather(items, count, /*writable=*/false, op, grads)) {
    return nullptr;
  }
  auto [norms, total, found_inf] = run_releasing_gil_if_large(
      grads, [&] { return tensors_of(args[0]); }, [&] { return norm_pass_cpu(grads, inv_scale, norm_type, clamp); });
  return tuple_of(std::move(norms), std::move(total), std::move(found_inf));
  END_HANDLE_TH_ERRORS
}

// The coefficient of a scale pass over `count` gradients: one value for all, or one per gradient.
bool check_coef(const at::Tensor& coef, Py_ssize_t count, const char* op) {
  if (!check_floats(coef, op, "coef", -1, /*one_dim=*/false)) return false;
  if (coef.numel() != 1 && coef.numel() != count) {
    return fail(Bad::kValue, std::string(op) + ": coef must hold 1 or one per gradient (" + std::to_string(count) +
                                 ") elements, got " + std::to_string(coef.numel()));
  }
  return true;
}

// scale_pass(grads, coef, inv_scale, clamp, found_inf, zero_if_inf) -> True | None
PyObject* scale_pass(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  constexpr const char* op = "ampclip scale_pass";
  if (!check_nargs(nargs, 6, "scale_pass(grads, coef, inv_scale, clamp, found_inf, zero_if_inf)")) return nullptr;
  std::optional<Clamp> clamp;
  bool zero_if_inf = false;
  if (!clamp_arg(args[3], op, clamp) || !bool_arg(args[5], op, "zero_if_inf", zero_if_inf)) return nullptr;
  if (modes_active()) Py_RETURN_NONE;
  at::Tensor coef;
  std::optional<at::Tensor> inv_scale, found_inf;
  PyObject** items = nullptr;
  Py_ssize_t count = 0;
  const Read read = read_in_order([&] { return tensor_arg(args[1], op, "coef", coef); },
                                  [&] { return optional_tensor(args[2], op, "inv_scale", inv_scale); },
                                  [&] { return optional_tensor(args[4], op, "found_inf", found_inf); },
                                  [&] { return tensor_items(args[0], op, "grads", items, count); });
  if (read != Read::kOk) return answer(read);
  CpuGrads grads;
  if (!check_coef(coef, count, op) || !check_optional_scalar(inv_scale, op, "inv_scale") ||
      !check_optional_scalar(found_inf, op, "found_inf") || !gather(items, count, /*writable=*/true, op, grads)) {
    return nullptr;
  }
  run_releasing_gil_if_large(grads, [&] { return tensors_of(args[0]); }, [&] {
    scale_pass_cpu(grads, coef, inv_scale, clamp, found_inf, zero_if_inf);
  });
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

// max_norm and norm_type of the fused clips; false with a Python error for bad values.
bool clip_numbers(PyObject* const* args, const char* op, double& max_norm, double& norm_type) {
  return double_arg(args[1], op, "max_norm", max_norm) && check_bound(max_norm, op, "max_norm") &&
         double_arg(args[2], op, "norm_type", norm_type) && check_norm_type(norm_type, op);
}

// clip_grad_norm(grads, max_norm, norm_type) -> Tensor | None: norm pass, coefficient and scale pass in one
// call (on 10,000 tiny gradients, crossing into C++ once instead of three times saves about 1.5 ms).
PyObject* clip_grad_norm(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  constexpr const char* op = "ampclip clip_grad_norm_";
  if (!check_nargs(nargs, 3, "clip_grad_norm(grads, max_norm, norm_type)")) return nullptr;
  double max_norm = 0.0, norm_type = 0.0;
  if (!clip_numbers(args, op, max_norm, norm_type)) return nullptr;
  if (modes_active()) Py_RETURN_NONE;
  PyObject** items = nullptr;
  Py_ssize_t count = 0;
  const Read read = tensor_items(args[0], op, "grads", items, count);
  if (read != Read::kOk) return answer(read);
  CpuGrads grads;
  if (!gather(items, count, /*writable=*/true, op, grads)) return nullptr;
  at::Tensor total = run_releasing_gil_if_large(
      grads, [&] { return tensors_of(args[0]); }, [&] { return clip_grad_norm_cpu(grads, max_norm, norm_type); });
  return THPVariable_Wrap(std::move(total));
  END_HANDLE_TH_ERRORS
}

// clip_params(params: list | tuple, max_norm: float, norm_type: float) -> Tensor | None
//
// Clips the gradients of `params` in place like clip_grad_norm_ and returns the pre-clip total norm, or
// returns None, having changed nothing, when the input needs the general Python path: a parameter that is
// not a Tensor or Parameter (tensor subclasses such as DTensor), or a gradient that is not a dense CPU
// float tensor that can be written in place (other devices, sparse, nested, tensor subclasses, other dtypes,
// expanded tensors; the general path gives the errors). No gradient at all also returns None.
PyObject* clip_params(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  constexpr const char* op = "ampclip clip_grad_norm_";
  if (!check_nargs(nargs, 3, "clip_params(params, max_norm, norm_type)")) return nullptr;
  if (!PyList_Check(args[0]) && !PyTuple_Check(args[0])) {
    PyErr_SetString(PyExc_TypeError, "clip_params: params must be a list or a tuple");
    return nullptr;
  }
  double max_norm = 0.0, norm_type = 0.0;
  if (!clip_numbers(args, op, max_norm, norm_type)) return nullptr;
  if (modes_active()) Py_RETURN_NONE;

  const Py_ssize_t count = PySequence_Fast_GET_SIZE(args[0]);
  PyObject** items = PySequence_Fast_ITEMS(args[0]);
  CpuGrads grads;
  grads.spans.reserve(count);
  for (Py_ssize_t i = 0; i < count; ++i) {
    if (!THPVariable_CheckExact(items[i])) Py_RETURN_NONE;  // a subclass's .grad may mean something else
    const at::Tensor& grad = THPVariable_Unpack(items[i]).grad();
    if (!grad.defined()) continue;
    if (!is_kernel_grad(grad) || grad.key_set().has(c10::DispatchKey::Python) ||
        (!grad.is_contiguous() && at::has_internal_overlap(grad) == at::MemOverlap::Yes)) {
      Py_RETURN_NONE;
    }
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

// Per-group mode's group_index: one integer per norm, each in [0, num_groups) (read here: a CPU tensor).
bool check_group_index(const std::optional<at::Tensor>& group_index, int64_t count, int64_t num_groups,
                       const char* op) {
  if (!group_index.has_value()) return fail(Bad::kValue, std::string(op) + ": per-group mode needs group_index");
  const at::Tensor& gi = *group_index;
  const std::string name = where(op, "group_index");
  if (gi.is_nested() || gi.layout() != at::kStrided) return fail(Bad::kType, name + " is not dense");
  if (!gi.device().is_cpu()) return fail(Bad::kValue, name + " is on " + gi.device().str() + ", expected the CPU");
  if (!at::isIntegralType(gi.scalar_type(), /*includeBool=*/false)) {
    return fail(Bad::kType, name + " must hold integers, got " + dtype_name(gi));
  }
  if (gi.numel() != count) {
    return fail(Bad::kValue, name + " must hold one group per norm (" + std::to_string(count) + "), got " +
                                 std::to_string(gi.numel()));
  }
  const auto index = gi.to(at::kLong).contiguous();
  const int64_t* values = index.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < count; ++t) {
    if (values[t] < 0 || values[t] >= num_groups) {
      return fail(Bad::kValue, name + " holds " + std::to_string(values[t]) + ", outside [0, " +
                                   std::to_string(num_groups) + ")");
    }
  }
  return true;
}

// clip_finalize(per_tensor, total, max_norm, mode, group_index, num_groups, norm_type, eps, rule)
//   -> (coef, group_coef, group_norms, post_clip_norm) | None;  max_norm is a number or a 0-d tensor.
PyObject* clip_finalize(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  constexpr const char* op = "ampclip clip_finalize";
  if (!check_nargs(nargs, 9, "clip_finalize(per_tensor, total, max_norm, mode, group_index, num_groups, "
                             "norm_type, eps, rule)")) {
    return nullptr;
  }
  const bool bound_is_tensor = THPVariable_Check(args[2]);
  double max_norm = 0.0, norm_type = 0.0, eps = 0.0;
  int64_t mode = 0, num_groups = 0, rule = 0;
  if ((!bound_is_tensor && !(double_arg(args[2], op, "max_norm", max_norm) && check_bound(max_norm, op, "max_norm"))) ||
      !int_arg(args[3], op, "mode", mode) || !int_arg(args[5], op, "num_groups", num_groups) ||
      !double_arg(args[6], op, "norm_type", norm_type) || !check_norm_type(norm_type, op) ||
      !double_arg(args[7], op, "eps", eps) || !int_arg(args[8], op, "rule", rule)) {
    return nullptr;
  }
  if (mode < 0 || mode > 2) return error(Bad::kValue, "ampclip clip_finalize: mode must be 0, 1 or 2");
  if (rule != 0 && rule != 1) return error(Bad::kValue, "ampclip clip_finalize: rule must be 0 or 1");
  if (!(eps >= 0.0 && std::isfinite(eps))) {
    return error(Bad::kValue, "ampclip clip_finalize: eps must be finite and >= 0, got " + std::to_string(eps));
  }
  if (modes_active()) Py_RETURN_NONE;
  at::Tensor per_tensor, total;
  std::optional<at::Tensor> max_norm_tensor, group_index;
  const Read read = read_in_order([&] { return tensor_arg(args[0], op, "per_tensor", per_tensor); },
                                  [&] { return tensor_arg(args[1], op, "total", total); },
                                  [&] { return optional_tensor(bound_is_tensor ? args[2] : Py_None, op, "max_norm",
                                                               max_norm_tensor); },
                                  [&] { return optional_tensor(args[4], op, "group_index", group_index); });
  if (read != Read::kOk) return answer(read);
  if (!check_floats(per_tensor, op, "per_tensor", -1, /*one_dim=*/true) || !check_scalar(total, op, "total") ||
      !check_optional_scalar(max_norm_tensor, op, "max_norm")) {
    return nullptr;
  }
  if (per_tensor.scalar_type() != at::kFloat && per_tensor.scalar_type() != at::kDouble) {
    return error(Bad::kType, std::string(op) + ": per_tensor must be float32 or float64 (the norms' dtype), got " +
                                dtype_name(per_tensor));
  }
  if (mode == 2 && !check_group_index(group_index, per_tensor.numel(), num_groups, op)) return nullptr;
  auto [coef, group_coef, group_norms, post] = clip_finalize_cpu(per_tensor, total, max_norm_tensor, max_norm, mode,
                                                                 group_index, num_groups, norm_type, eps, rule);
  return tuple_of(std::move(coef), std::move(group_coef), std::move(group_norms), std::move(post));
  END_HANDLE_TH_ERRORS
}

// scaler_update(state, history, found_inf, grad_norm, slot, growth_factor, backoff_factor, growth_interval,
//               hysteresis, min_scale, max_scale, dynamic) -> True | None
PyObject* scaler_update(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  constexpr const char* op = "ampclip scaler_update";
  if (!check_nargs(nargs, 12, "scaler_update(state, history, found_inf, grad_norm, slot, growth_factor, "
                              "backoff_factor, growth_interval, hysteresis, min_scale, max_scale, dynamic)")) {
    return nullptr;
  }
  int64_t slot = 0, growth_interval = 0, hysteresis = 0;
  double growth_factor = 0.0, backoff_factor = 0.0, min_scale = 0.0, max_scale = 0.0;
  bool dynamic = false;
  if (!int_arg(args[4], op, "slot", slot) || !double_arg(args[5], op, "growth_factor", growth_factor) ||
      !double_arg(args[6], op, "backoff_factor", backoff_factor) ||
      !int_arg(args[7], op, "growth_interval", growth_interval) || !int_arg(args[8], op, "hysteresis", hysteresis) ||
      !double_arg(args[9], op, "min_scale", min_scale) || !double_arg(args[10], op, "max_scale", max_scale) ||
      !bool_arg(args[11], op, "dynamic", dynamic)) {
    return nullptr;
  }
  if (modes_active()) Py_RETURN_NONE;
  at::Tensor state, history;
  std::optional<at::Tensor> found_inf, grad_norm;
  const Read read = read_in_order([&] { return tensor_arg(args[0], op, "state", state); },
                                  [&] { return tensor_arg(args[1], op, "history", history); },
                                  [&] { return optional_tensor(args[2], op, "found_inf", found_inf); },
                                  [&] { return optional_tensor(args[3], op, "grad_norm", grad_norm); });
  if (read != Read::kOk) return answer(read);
  if (!check_state(state, op, "state", at::kFloat, {4}) || !check_state(history, op, "history", at::kFloat, {3, -1}) ||
      !check_optional_scalar(found_inf, op, "found_inf") || !check_optional_scalar(grad_norm, op, "grad_norm")) {
    return nullptr;
  }
  if (slot < 0 || slot >= history.size(1)) {
    return error(Bad::kValue, std::string(op) + ": slot " + std::to_string(slot) + " outside [0, " +
                                 std::to_string(history.size(1)) + ")");
  }
  scaler_update_cpu(state, history, found_inf, grad_norm, slot, growth_factor, backoff_factor, growth_interval,
                    hysteresis, min_scale, max_scale, dynamic);
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

// clip_stats_update(counters, layer_stats, per_tensor, coef, found_inf) -> True | None
PyObject* clip_stats_update(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  constexpr const char* op = "ampclip clip_stats_update";
  if (!check_nargs(nargs, 5, "clip_stats_update(counters, layer_stats, per_tensor, coef, found_inf)")) return nullptr;
  if (modes_active()) Py_RETURN_NONE;
  at::Tensor counters, per_tensor, coef, found_inf;
  std::optional<at::Tensor> layer_stats;
  const Read read = read_in_order([&] { return tensor_arg(args[0], op, "counters", counters); },
                                  [&] { return optional_tensor(args[1], op, "layer_stats", layer_stats); },
                                  [&] { return tensor_arg(args[2], op, "per_tensor", per_tensor); },
                                  [&] { return tensor_arg(args[3], op, "coef", coef); },
                                  [&] { return tensor_arg(args[4], op, "found_inf", found_inf); });
  if (read != Read::kOk) return answer(read);
  if (!check_state(counters, op, "counters", at::kDouble, {2}) ||
      !check_floats(per_tensor, op, "per_tensor", -1, /*one_dim=*/true) ||
      !check_floats(coef, op, "coef", -1, /*one_dim=*/false) || !check_scalar(found_inf, op, "found_inf") ||
      (layer_stats.has_value() &&
       !check_state(*layer_stats, op, "layer_stats", at::kDouble, {3, per_tensor.numel()}))) {
    return nullptr;
  }
  clip_stats_update_cpu(counters, layer_stats, per_tensor, coef, found_inf);
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

// cuda_archs() -> tuple of str: the GPU code the CUDA kernels hold, named as torch.cuda.get_arch_list() names
// it ('sm_90': machine code for sm_90; 'compute_90': PTX, compiled for newer GPUs when loaded). setup.py passes
// the list as AMPCLIP_CUDA_ARCHS ("sm_80,sm_90,compute_90"); empty in a build without the CUDA kernels.
PyObject* cuda_archs(PyObject* /*module*/, PyObject* /*unused*/) {
#ifdef AMPCLIP_CUDA_ARCHS
  PyObject* joined = PyUnicode_FromString(AMPCLIP_CUDA_ARCHS);
  if (joined == nullptr) return nullptr;
  PyObject* comma = PyUnicode_FromString(",");
  PyObject* parts = comma == nullptr ? nullptr : PyUnicode_Split(joined, comma, -1);
  Py_XDECREF(comma);
  Py_DECREF(joined);
  if (parts == nullptr) return nullptr;
  PyObject* out = PyList_AsTuple(parts);
  Py_DECREF(parts);
  return out;
#else
  return PyTuple_New(0);
#endif
}

#define AMPCLIP_FASTCALL(fn) reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fn)), METH_FASTCALL

PyMethodDef methods[] = {
    {"norm_pass", AMPCLIP_FASTCALL(norm_pass), "The norm pass on CPU gradients; None when the call needs the dispatcher."},
    {"scale_pass", AMPCLIP_FASTCALL(scale_pass), "The scale pass on CPU gradients; None when it needs the dispatcher."},
    {"clip_grad_norm", AMPCLIP_FASTCALL(clip_grad_norm), "Norm pass, coefficient and scale pass in one call."},
    {"clip_params", AMPCLIP_FASTCALL(clip_params),
     "clip_grad_norm_ straight from parameters; None when the input needs the general path."},
    {"clip_finalize", AMPCLIP_FASTCALL(clip_finalize), "The clip coefficient and post-clip norm from the norms."},
    {"scaler_update", AMPCLIP_FASTCALL(scaler_update), "One dynamic loss-scale update and its history entry."},
    {"clip_stats_update", AMPCLIP_FASTCALL(clip_stats_update), "Clipped/skipped counts and per-layer norms."},
    {"cuda_archs", cuda_archs, METH_NOARGS, "The GPU architectures the CUDA kernels were built for; () without them."},
    {nullptr, nullptr, 0, nullptr},
};

#undef AMPCLIP_FASTCALL

}  // namespace

int add_adaptive_methods(PyObject* module);  // csrc/adaptive_entry.cpp
int add_table_methods(PyObject* module);     // csrc/table_entry.cpp
}  // namespace ampclip

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, ampclip::methods};
  PyObject* m = PyModule_Create(&module);
  if (m != nullptr && ampclip::add_adaptive_methods(m) < 0) Py_CLEAR(m);
  if (m != nullptr && ampclip::add_table_methods(m) < 0) Py_CLEAR(m);
#ifdef AMPCLIP_WITH_CUDA
  if (m != nullptr && !ampclip::cuda::add_bindings(m)) Py_CLEAR(m);  // the CUDA kernels' entries
#endif
  return m;
}
