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
#include <torch/csrc/Device.h>
#include <torch/csrc/Exceptions.h>

#include <cstring>
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

// A tensor's dtype, device and dimension count in one word of its signature.
inline uint64_t kind_word(const at::Tensor& t) {
  return static_cast<uint64_t>(t.scalar_type()) | (static_cast<uint64_t>(t.device().index() + 1) << 16) |
         (static_cast<uint64_t>(t.device().type()) << 32) | (static_cast<uint64_t>(t.dim()) << 48);
}

// What a kernel table of these tensors depends on, per tensor: data pointer, element count, dtype, device,
// sizes and strides (all of them: equal signatures mean equal layouts, never a hash collision). Not the
// tensor's identity: the new gradients a backward allocates after zero_grad(set_to_none=True) can land at
// the old addresses, and then the old table fits them. Calls visit(word) for every word in order, up to the
// first for which it returns false; returns false when an item is not a plain dense tensor (no strides to read)
// or a visit returned false.
template <typename Visit>
bool tensor_words(const at::Tensor& t, Visit& visit) {
  if (t.is_nested() || t.layout() != at::kStrided || !t.has_storage()) return false;
  const auto ok = visit(reinterpret_cast<uintptr_t>(t.const_data_ptr())) &&
                  visit(static_cast<uint64_t>(t.numel())) && visit(kind_word(t));
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
// that signature_matches and present_grads use. A miss stays a miss.
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

// claim_grads(params: list | tuple, signature: bytes) -> bool
//
// Whether every parameter has a gradient and the gradients' tensor_signature is `signature`: then they are
// exactly the tensors of the table that signature belongs to, and a clip launches on that table as it is. The
// steady state of a training loop, which clips the same parameters every step: one loop over the parameters,
// that reads each .grad (zero_grad(set_to_none=True) makes new ones) and makes no Python object, where
// present_grads builds the list of gradients. The caller writes the gradients through the table next, so the
// loop bumps each one's version counter once its words matched, as torch's in-place ops do (an inference
// tensor has none); after a miss further on, the gradients before it stay bumped once more than they were
// written, which costs nothing: a version is only compared for equality with a saved one. False when a
// parameter is not a plain Tensor or Parameter, or a gradient is missing, a wrapper, not dense, or differs from
// the signature.
PyObject* claim_grads(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!check_nargs(nargs, 2, "claim_grads(params, signature)")) return nullptr;
  PyObject* params = args[0];
  if (!PyList_Check(params) && !PyTuple_Check(params)) {
    return error(Bad::kType, "claim_grads: params must be a list or a tuple");
  }
  if (!PyBytes_Check(args[1])) return error(Bad::kType, "claim_grads: signature must be bytes");
  const char* signature = PyBytes_AS_STRING(args[1]);
  const size_t size = static_cast<size_t>(PyBytes_GET_SIZE(args[1])) / sizeof(uint64_t);
  const auto word = [signature](size_t k) {
    uint64_t w;
    std::memcpy(&w, signature + k * sizeof(uint64_t), sizeof(w));
    return w;
  };
  const Py_ssize_t count = PySequence_Fast_GET_SIZE(params);
  PyObject** items = PySequence_Fast_ITEMS(params);
  size_t at = 0;
  for (Py_ssize_t i = 0; i < count; ++i) {
    if (!THPVariable_CheckExact(items[i])) Py_RETURN_FALSE;
    const at::Tensor& grad = THPVariable_Unpack(items[i]).grad();
    if (!grad.defined() || is_wrapper(grad) || grad.is_nested() || grad.layout() != at::kStrided) Py_RETURN_FALSE;
    const int64_t dim = grad.dim();
    // the kind word first: a tensor of another device (a meta one) has no data pointer to compare
    if (at + 3 + 2 * static_cast<size_t>(dim) > size || word(at + 2) != kind_word(grad) || !grad.has_storage()) {
      Py_RETURN_FALSE;
    }
    // no branch a word: the loop is bound by reading the tensors' metadata, not by comparing words
    bool same = (word(at) == reinterpret_cast<uintptr_t>(grad.const_data_ptr())) &
                (word(at + 1) == static_cast<uint64_t>(grad.numel()));
    at += 3;
    const c10::IntArrayRef sizes = grad.sizes(), strides = grad.strides();
    for (int64_t d = 0; d < dim; ++d, at += 2) {
      same &= (word(at) == static_cast<uint64_t>(sizes[d])) & (word(at + 1) == static_cast<uint64_t>(strides[d]));
    }
    if (!same) Py_RETURN_FALSE;
    bump_version(grad.unsafeGetTensorImpl());
  }
  if (at != size) Py_RETURN_FALSE;
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
    {"present_grads", AMPCLIP_FASTCALL(present_grads),
     "(gradients that exist, their parameter indices or None when all exist, their one device or None, whether "
     "the kernels take every one, whether their signature is the one given); None for non-plain parameters."},
    {"claim_grads", AMPCLIP_FASTCALL(claim_grads),
     "Whether the parameters' gradients (all present) have the signature given; bumps each version as it matches."},
    {"tensor_signature", tensor_signature, METH_O,
     "(hash, bytes) of each tensor's data pointer, size, dtype, device, sizes and strides, for table caches."},
    {"bump_versions", bump_versions, METH_O, "Bumps the version counter of every tensor, as an in-place op does."},
    {"signature_matches", AMPCLIP_FASTCALL(signature_matches),
     "Whether tensor_signature(tensors) would give this signature, compared without building it."},
    {"cuda_archs", cuda_archs, METH_NOARGS, "The GPU architectures the CUDA kernels were built for; () without them."},
    {nullptr, nullptr, 0, nullptr},
};

#undef AMPCLIP_FASTCALL

}  // namespace

int add_adaptive_methods(PyObject* module);  // csrc/adaptive_entry.cpp
}  // namespace ampclip

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, ampclip::methods};
  PyObject* m = PyModule_Create(&module);
  if (m != nullptr && ampclip::add_adaptive_methods(m) < 0) Py_CLEAR(m);
#ifdef AMPCLIP_WITH_CUDA
  if (m != nullptr && !ampclip::cuda::add_bindings(m)) Py_CLEAR(m);  // the CUDA kernels' entries
#endif
  return m;
}
