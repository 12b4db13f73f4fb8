// The CPU kernels' view of a list of gradients, and the entries that csrc/python_entry.cpp calls.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace ampclip {

// torch.nn.utils.clip_grad_norm_'s eps, for the drop-in's fused clip.
constexpr double kTorchEps = 1e-6;

// v in T, rounded as IEEE rounds it: a double past T's range becomes inf, as torch's own casts give it (a plain
// static_cast of an out-of-range double is undefined behaviour, and at::scalar_tensor throws for it). A norm
// of finite float32 gradients can pass float32's range: torch returns inf there, and so do the kernels.
template <typename T>
T round_to(double v) {
  if constexpr (std::is_same_v<T, double>) {
    return v;
  } else {
    constexpr double kFirstInf = 3.4028235677973366e38;  // float's largest value plus half its last step
    constexpr float kInf = std::numeric_limits<float>::infinity();
    const float f = std::abs(v) >= kFirstInf ? (v > 0 ? kInf : -kInf) : static_cast<float>(v);
    return static_cast<T>(f);  // float16 and bfloat16 round from float, overflowing to inf
  }
}

// A 0-d tensor of `value` in the dtype of `options`, rounded by round_to.
at::Tensor scalar_of(double value, const at::TensorOptions& options);

// The value clamp [lo, hi] of the op contract.
using Clamp = std::pair<double, double>;

// One gradient as the kernels see it: a dense run of elements. Gathered once per call, so that each pass
// walks a flat array instead of the tensors' metadata (on thousands of small gradients that walk, not the
// arithmetic, is the cost).
struct GradSpan {
  void* data;
  int64_t numel;
  at::ScalarType dtype;
  int32_t itemsize;
  c10::TensorImpl* impl;  // the gradient's own, for its version counter
};

// Dense CPU float16/bfloat16/float32/float64 gradients (the caller checks) that outlive this object.
struct CpuGrads {
  std::vector<GradSpan> spans;
  // (index, gradient, contiguous copy) of non-contiguous gradients: read from the copy, written back.
  std::vector<std::tuple<int64_t, at::Tensor, at::Tensor>> strided;
  bool any_double = false;

  // writable: the data pointer is taken for writing (a copy-on-write storage is materialised).
  void add(const at::Tensor& grad, bool writable);
  // Whether two written gradients share memory: then they are scaled one after the other, in list order,
  // as torch's per-tensor mul_ does, instead of in parallel chunks that would race.
  bool overlapping() const;
};

// Whether the kernels take g: a dense (strided, not nested) CPU float16/bfloat16/float32/float64 tensor.
bool is_kernel_grad(const at::Tensor& g);
// The kernels' own check of a gradient (the entries check every input first, without throwing; this is the
// second line): throws naming what is wrong unless is_kernel_grad(g) and, for a gradient to be written
// (`writable`), no two of its elements share memory.
void check_kernel_grad(const at::Tensor& g, size_t index, const char* op, bool writable);
// The p-norm of values[0:n] in double, scaled by the largest |value| so that norms whose p-th powers would
// overflow still combine (ops.combine_norms); NaN propagates, inf gives inf, no value gives 0.
double combine_norms(const double* values, int64_t n, double p);
// The value of a one-element CPU tensor; throws a ValueError naming `what` otherwise.
double read_scalar(const at::Tensor& t, const char* what);

// The gradient passes of ampclip/ops.py on gathered gradients (see there for the contract).
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_pass_cpu(const CpuGrads& grads,
                                                             const std::optional<at::Tensor>& inv_scale,
                                                             double norm_type, const std::optional<Clamp>& clamp);
void scale_pass_cpu(CpuGrads& grads, const at::Tensor& coef, const std::optional<at::Tensor>& inv_scale,
                    const std::optional<Clamp>& clamp, const std::optional<at::Tensor>& found_inf, bool zero_if_inf);

// Clips the gradients in place to a total norm of max_norm (coefficient min(1, max_norm / (norm + 1e-6)))
// and returns the pre-clip norm: 0-d, float32, or float64 when a gradient is float64.
at::Tensor clip_grad_norm_cpu(CpuGrads& grads, double max_norm, double norm_type);

// The clip coefficient of a norm in the norm's dtype T. rule 0, torch's: min(1, max_norm / (norm + eps)),
// rounded as the tensor ops of torch's clip_grad_norm_ round it (`max_norm / t` is `t.reciprocal() *
// max_norm`, the scalars cast to T), so that the fused clip, the small op and torch agree bit for bit.
// rule 1: max_norm / max(norm + eps, max_norm), taken as 1 unless norm + eps > max_norm (so that an infinite
// max_norm gives 1, not inf / inf). A NaN norm gives a NaN coefficient, as in torch.
template <typename T>
T clip_coefficient(T norm, double max_norm, double eps, int64_t rule) {
  const T shifted = norm + round_to<T>(eps);
  const T bound = round_to<T>(max_norm);
  if (rule == 0) {
    const T coef = (T(1) / shifted) * bound;
    return std::isnan(coef) ? coef : std::min(coef, T(1));
  }
  return (shifted > bound || std::isnan(shifted) || std::isnan(bound)) ? bound / shifted : T(1);
}

// The small ops of ampclip/ops.py (csrc/cpu/small_ops_cpu.cpp): a few numbers per tensor, in one call each.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> clip_finalize_cpu(
    const at::Tensor& per_tensor, const at::Tensor& total, const std::optional<at::Tensor>& max_norm_tensor,
    double max_norm, int64_t mode, const std::optional<at::Tensor>& group_index, int64_t num_groups,
    double norm_type, double eps, int64_t rule);
void scaler_update_cpu(const at::Tensor& state, const at::Tensor& history, const std::optional<at::Tensor>& found_inf,
                       const std::optional<at::Tensor>& grad_norm, int64_t slot, double growth_factor,
                       double backoff_factor, int64_t growth_interval, int64_t hysteresis, double min_scale,
                       double max_scale, bool dynamic);
void clip_stats_update_cpu(const at::Tensor& counters, const std::optional<at::Tensor>& layer_stats,
                           const at::Tensor& per_tensor, const at::Tensor& coef, const at::Tensor& found_inf);

}  // namespace ampclip
