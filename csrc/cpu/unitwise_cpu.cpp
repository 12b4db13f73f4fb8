// The unit-wise passes of adaptive gradient clipping (AGC) on the CPU (see ampclip/ops.py): the norm of every
// unit (row along dim 0) of every tensor in one read, and every unit scaled by its own coefficient in one read
// and write.
//
// A unit of a dense tensor is a dense run of elements, so each pass hands the norm and scale passes of
// fused_clip_cpu.cpp a list of units instead of a list of tensors: the same kernels (float lanes flushed into
// double partials per block, F16C and AVX2 conversions, a fixed-order reduction whatever the thread count,
// units with a coefficient of exactly 1 and nothing to unscale left untouched), one work item per unit or per
// 65,536-element chunk of a longer one. GPT-2-124M has about 90,000 units: the walk over them costs a few
// hundred microseconds against tens of milliseconds of memory traffic.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "adaptive_cpu.h"

namespace ampclip {
namespace {

// The units of gathered tensors as spans of their own; strided tensors are read from their contiguous copies.
CpuGrads units_of(const CpuGrads& grads, const std::vector<int64_t>& counts) {
  CpuGrads units;
  units.any_double = grads.any_double;
  int64_t total = 0;
  for (const int64_t c : counts) total += c;
  units.spans.reserve(total);
  for (size_t t = 0; t < grads.spans.size(); ++t) {
    const GradSpan& span = grads.spans[t];
    const int64_t length = counts[t] > 0 ? span.numel / counts[t] : 0;
    for (int64_t r = 0; r < counts[t]; ++r) {
      units.spans.push_back({static_cast<char*>(span.data) + r * length * span.itemsize, length, span.dtype,
                             span.itemsize, span.impl});
    }
  }
  return units;
}

std::vector<int64_t> unit_counts(const std::vector<at::Tensor>& tensors) {
  std::vector<int64_t> counts;
  counts.reserve(tensors.size());
  for (const auto& t : tensors) counts.push_back(unit_count(t));
  return counts;
}

// Scales the units of gathered gradients, then writes strided gradients back from their copies.
void scale_units(CpuGrads& grads, const std::vector<int64_t>& counts, const at::Tensor& coef,
                 const std::optional<at::Tensor>& inv_scale, const std::optional<at::Tensor>& found_inf,
                 bool zero_if_inf) {
  CpuGrads units = units_of(grads, counts);
  scale_pass_cpu(units, coef, inv_scale, std::nullopt, found_inf, zero_if_inf);
  for (auto& [index, grad, copy] : grads.strided) grad.copy_(copy);
}

}  // namespace

int64_t unit_count(const at::Tensor& t) { return t.dim() > 1 ? t.size(0) : 1; }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> unit_norm_pass_cpu(
    const std::vector<at::Tensor>& tensors, const std::optional<at::Tensor>& inv_scale, double norm_type) {
  for (size_t i = 0; i < tensors.size(); ++i) check_kernel_grad(tensors[i], i, "ampclip unit_norm_pass", false);
  CpuGrads grads;
  grads.spans.reserve(tensors.size());
  for (const auto& t : tensors) grads.add(t, /*writable=*/false);
  const auto counts = unit_counts(tensors);
  auto [unit_norms, total, found_inf] = norm_pass_cpu(units_of(grads, counts), inv_scale, norm_type, std::nullopt);
  auto per_tensor = at::empty({static_cast<int64_t>(tensors.size())}, unit_norms.options());
  AT_DISPATCH_FLOATING_TYPES(unit_norms.scalar_type(), "ampclip_unit_norm_pass_cpu", [&] {
    const scalar_t* units = unit_norms.const_data_ptr<scalar_t>();
    scalar_t* out = per_tensor.mutable_data_ptr<scalar_t>();
    std::vector<double> values;
    int64_t begin = 0;
    for (size_t t = 0; t < counts.size(); ++t) {
      values.assign(units + begin, units + begin + counts[t]);
      out[t] = round_to<scalar_t>(combine_norms(values.data(), counts[t], norm_type));
      begin += counts[t];
    }
  });
  return {unit_norms, per_tensor, total, found_inf};
}

void unit_scale_pass_cpu(const std::vector<at::Tensor>& grads, const at::Tensor& coef,
                         const std::optional<at::Tensor>& inv_scale, const std::optional<at::Tensor>& found_inf,
                         bool zero_if_inf) {
  for (size_t i = 0; i < grads.size(); ++i) check_kernel_grad(grads[i], i, "ampclip unit_scale_pass", true);
  const auto counts = unit_counts(grads);
  int64_t units = 0;
  for (const int64_t c : counts) units += c;
  TORCH_CHECK_VALUE(coef.numel() == units, "ampclip unit_scale_pass: coef must hold one entry per unit (", units,
                    "), got ", coef.numel());
  TORCH_CHECK_VALUE(coef.device().is_cpu(), "ampclip unit_scale_pass: coef must be on the CPU, got ", coef.device());
  CpuGrads all;
  all.spans.reserve(grads.size());
  for (const auto& g : grads) all.add(g, /*writable=*/true);
  if (!all.overlapping()) return scale_units(all, counts, coef.reshape({-1}), inv_scale, found_inf, zero_if_inf);
  // Gradients that share memory: one after the other, each reading what the ones before it wrote, as
  // torch's per-tensor ops do (a strided one is copied again when its turn comes).
  const auto flat = coef.reshape({-1});
  int64_t begin = 0;
  for (size_t t = 0; t < grads.size(); ++t) {
    CpuGrads one;
    one.add(grads[t], /*writable=*/true);
    scale_units(one, {counts[t]}, flat.narrow(0, begin, counts[t]), inv_scale, found_inf, zero_if_inf);
    begin += counts[t];
  }
}

std::tuple<at::Tensor, at::Tensor> unit_clip_finalize_cpu(const at::Tensor& param_norms, const at::Tensor& grad_norms,
                                                          double clip_factor, double eps, double norm_type) {
  TORCH_CHECK_VALUE(param_norms.device().is_cpu() && grad_norms.device().is_cpu(),
                    "ampclip unit_clip_finalize: the norms must be CPU tensors");
  TORCH_CHECK_VALUE(param_norms.numel() == grad_norms.numel(),
                    "ampclip unit_clip_finalize: param_norms and grad_norms must have one entry per unit each, got ",
                    param_norms.numel(), " and ", grad_norms.numel());
  const auto gn = grad_norms.contiguous();
  const auto pn = param_norms.to(gn.scalar_type()).contiguous();
  auto coef = at::empty_like(gn);
  at::Tensor post;
  AT_DISPATCH_FLOATING_TYPES(gn.scalar_type(), "ampclip_unit_clip_finalize_cpu", [&] {
    using T = scalar_t;
    const T* g = gn.const_data_ptr<T>();
    const T* p = pn.const_data_ptr<T>();
    T* out = coef.mutable_data_ptr<T>();
    const T floor_eps = round_to<T>(eps), factor = round_to<T>(clip_factor), tiny = static_cast<T>(1e-6);
    const int64_t n = gn.numel();
    std::vector<double> clipped(n);
    for (int64_t i = 0; i < n; ++i) {
      // In T, as the reference's tensor ops round (clamp keeps NaN: the comparisons are written for that).
      const T bound = (p[i] < floor_eps ? floor_eps : p[i]) * factor;
      const T c = g[i] < bound ? T(1) : bound / (g[i] < tiny ? tiny : g[i]);
      out[i] = c;
      clipped[i] = static_cast<double>(g[i]) * static_cast<double>(c);
    }
    post = scalar_of(combine_norms(clipped.data(), n, norm_type), gn.options());
  });
  return {coef, post};
}

}  // namespace ampclip
