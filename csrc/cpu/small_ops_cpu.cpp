// The small ops of the op contract on the CPU (see ampclip/ops.py): the clip coefficient from the norms,
// one loss-scale update, and the clip statistics. Each reads and writes a few numbers per tensor; as torch
// ops each would be four to twenty dispatched calls, here it is one plain loop.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cmath>
#include <limits>
#include <vector>

#include "fused_clip_cpu.h"

namespace ampclip {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

double nan_max(double a, double b) { return (b > a || b != b) ? b : a; }

std::vector<double> as_doubles(const at::Tensor& t) {
  const auto dense = t.contiguous();
  std::vector<double> out(dense.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dense.scalar_type(), "ampclip_as_doubles", [&] {
    const scalar_t* data = dense.const_data_ptr<scalar_t>();
    for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<double>(data[i]);
  });
  return out;
}

at::Tensor filled(const std::vector<double>& values, at::IntArrayRef shape, const at::TensorOptions& options) {
  auto out = at::empty(shape, options);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "ampclip_filled", [&] {
    scalar_t* data = out.mutable_data_ptr<scalar_t>();
    for (size_t i = 0; i < values.size(); ++i) data[i] = round_to<scalar_t>(values[i]);
  });
  return out;
}

void check_cpu(const at::Tensor& t, const char* what) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "ampclip cpp: ", what, " must be a CPU tensor, got ", t.device());
}

}  // namespace

double combine_norms(const double* values, int64_t n, double p) {
  double peak = 0.0;
  for (int64_t i = 0; i < n; ++i) peak = nan_max(peak, std::abs(values[i]));
  if (std::isinf(p) || !(peak > 0.0) || std::isinf(peak)) return peak;  // NaN, 0 or inf, or the inf-norm
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double x = std::abs(values[i]) / peak;
    sum += p == 2.0 ? x * x : std::pow(x, p);
  }
  return (p == 2.0 ? std::sqrt(sum) : std::pow(sum, 1.0 / p)) * peak;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> clip_finalize_cpu(
    const at::Tensor& per_tensor, const at::Tensor& total, const std::optional<at::Tensor>& max_norm_tensor,
    double max_norm, int64_t mode, const std::optional<at::Tensor>& group_index, int64_t num_groups,
    double norm_type, double eps, int64_t rule) {
  check_cpu(per_tensor, "per_tensor");
  check_cpu(total, "total");
  TORCH_CHECK_VALUE(mode >= 0 && mode <= 2, "ampclip clip_finalize: mode must be 0, 1 or 2, got ", mode);
  TORCH_CHECK_VALUE(rule == 0 || rule == 1, "ampclip clip_finalize: rule must be 0 or 1, got ", rule);
  const double bound = max_norm_tensor.has_value() ? read_scalar(*max_norm_tensor, "max_norm") : max_norm;
  const auto options = at::TensorOptions().dtype(per_tensor.scalar_type());
  const int64_t count = per_tensor.numel();
  const auto norms = as_doubles(per_tensor);
  std::vector<double> units;                 // the norms the bound applies to
  std::vector<int64_t> unit_of(count, 0);    // the unit of each tensor
  if (mode == 0) {
    units = {read_scalar(total, "total")};
  } else if (mode == 1) {
    units = norms;
    for (int64_t t = 0; t < count; ++t) unit_of[t] = t;
  } else {
    TORCH_CHECK_VALUE(group_index.has_value() && group_index->numel() == count,
                      "ampclip clip_finalize: per-group mode needs one group index per tensor");
    const auto index = group_index->to(at::kLong).contiguous();
    const int64_t* gi = index.const_data_ptr<int64_t>();
    std::vector<std::vector<double>> members(num_groups);  // the norms of each group's tensors, in order
    for (int64_t t = 0; t < count; ++t) {
      TORCH_CHECK_VALUE(gi[t] >= 0 && gi[t] < num_groups, "ampclip clip_finalize: group index ", gi[t],
                        " outside [0, ", num_groups, ")");
      members[gi[t]].push_back(norms[t]);
      unit_of[t] = gi[t];
    }
    for (const auto& m : members) units.push_back(combine_norms(m.data(), static_cast<int64_t>(m.size()), norm_type));
  }
  // Coefficients and the post-clip norm in the norms' dtype, rounded as the tensor ops would round them.
  std::vector<double> coefs(units.size()), clipped(units.size());
  AT_DISPATCH_FLOATING_TYPES(per_tensor.scalar_type(), "ampclip_clip_finalize", [&] {
    for (size_t u = 0; u < units.size(); ++u) {
      const auto norm = round_to<scalar_t>(units[u]);
      coefs[u] = clip_coefficient<scalar_t>(norm, bound, eps, rule);
      clipped[u] = static_cast<double>(norm) * coefs[u];
    }
  });
  const double post =
      mode == 0 ? clipped[0] : combine_norms(clipped.data(), static_cast<int64_t>(clipped.size()), norm_type);

  at::Tensor coef, group_coef, group_norms;
  if (mode == 2) {
    std::vector<double> per(count);
    for (int64_t t = 0; t < count; ++t) per[t] = coefs[unit_of[t]];
    coef = filled(per, {count}, options);
    group_coef = filled(coefs, {num_groups}, options);
    group_norms = filled(units, {num_groups}, options);
  } else {
    coef = mode == 0 ? filled(coefs, {}, options) : filled(coefs, {count}, options);
    group_coef = at::empty({0}, options);
    group_norms = at::empty({0}, options);
  }
  return {coef, group_coef, group_norms, scalar_of(post, options)};
}

void scaler_update_cpu(const at::Tensor& state, const at::Tensor& history, const std::optional<at::Tensor>& found_inf,
                       const std::optional<at::Tensor>& grad_norm, int64_t slot, double growth_factor,
                       double backoff_factor, int64_t growth_interval, int64_t hysteresis, double min_scale,
                       double max_scale, bool dynamic) {
  TORCH_CHECK_VALUE(state.scalar_type() == at::kFloat && state.numel() == 4 && state.is_contiguous() &&
                        state.device().is_cpu(),
                    "ampclip scaler_update: state must be a contiguous float32 CPU tensor of 4 elements");
  TORCH_CHECK_VALUE(history.scalar_type() == at::kFloat && history.dim() == 2 && history.size(0) == 3 &&
                        history.is_contiguous() && history.device().is_cpu(),
                    "ampclip scaler_update: history must be a contiguous float32 CPU tensor of shape [3, H]");
  const int64_t size = history.size(1);
  TORCH_CHECK_VALUE(slot >= 0 && slot < size, "ampclip scaler_update: slot ", slot, " outside [0, ", size, ")");
  const double found = found_inf.has_value() ? read_scalar(*found_inf, "found_inf") : kNaN;
  const double norm = grad_norm.has_value() ? read_scalar(*grad_norm, "grad_norm") : kNaN;
  float* st = state.mutable_data_ptr<float>();  // scale, inv_scale, growth tracker, hysteresis tracker
  if (dynamic && found_inf.has_value()) {
    const bool overflow = found != 0.0;
    const float scale = st[0];
    const float counted = overflow ? 0.0f : st[2] + 1.0f;
    const bool back_off = overflow && st[3] <= 1.0f;
    const bool grow = !overflow && counted >= static_cast<float>(growth_interval);
    // float64 products rounded to float32, as torch's _amp_update_scale_; the bounds as torch.clamp's.
    const float backed = std::max(round_to<float>(static_cast<double>(scale) * backoff_factor),
                                  round_to<float>(min_scale));
    float grown = round_to<float>(static_cast<double>(scale) * growth_factor);
    grown = std::isfinite(grown) ? std::min(grown, round_to<float>(max_scale)) : scale;
    st[0] = back_off ? backed : (grow ? grown : scale);
    st[2] = grow ? 0.0f : counted;
    st[3] = overflow ? std::max(st[3] - 1.0f, 1.0f) : static_cast<float>(hysteresis);
  }
  st[1] = static_cast<float>(1.0 / static_cast<double>(st[0]));
  float* h = history.mutable_data_ptr<float>();
  h[slot] = st[0];
  h[size + slot] = static_cast<float>(found);
  h[2 * size + slot] = round_to<float>(norm);
  for (const auto* t : {&state, &history}) t->unsafeGetTensorImpl()->bump_version();
}

void clip_stats_update_cpu(const at::Tensor& counters, const std::optional<at::Tensor>& layer_stats,
                           const at::Tensor& per_tensor, const at::Tensor& coef, const at::Tensor& found_inf) {
  TORCH_CHECK_VALUE(counters.scalar_type() == at::kDouble && counters.numel() == 2 && counters.is_contiguous() &&
                        counters.device().is_cpu(),
                    "ampclip clip_stats_update: counters must be a contiguous float64 CPU tensor of 2 elements");
  check_cpu(per_tensor, "per_tensor");
  check_cpu(coef, "coef");
  const bool found = read_scalar(found_inf, "found_inf") != 0.0;
  bool clipped = false;
  for (double c : as_doubles(coef)) clipped |= c < 1.0;
  double* count = counters.mutable_data_ptr<double>();
  count[0] += clipped && !found ? 1.0 : 0.0;
  count[1] += found ? 1.0 : 0.0;
  counters.unsafeGetTensorImpl()->bump_version();
  if (!layer_stats.has_value()) return;
  const int64_t n = per_tensor.numel();
  TORCH_CHECK_VALUE(layer_stats->scalar_type() == at::kDouble && layer_stats->dim() == 2 &&
                        layer_stats->size(0) == 3 && layer_stats->size(1) == n && layer_stats->is_contiguous() &&
                        layer_stats->device().is_cpu(),
                    "ampclip clip_stats_update: layer_stats must be a contiguous float64 CPU tensor of shape [3, ",
                    n, "]");
  const auto norms = as_doubles(per_tensor);
  double* sum = layer_stats->mutable_data_ptr<double>();
  double* peak = sum + n;
  double* last = sum + 2 * n;
  for (int64_t t = 0; t < n; ++t) {
    const double finite = std::isfinite(norms[t]) ? norms[t] : 0.0;
    sum[t] += finite;
    peak[t] = std::max(peak[t], finite);
    last[t] = norms[t];
  }
  layer_stats->unsafeGetTensorImpl()->bump_version();
}

}  // namespace ampclip
