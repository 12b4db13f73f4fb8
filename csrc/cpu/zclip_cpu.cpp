// ZClip's step on the CPU (see ampclip/ops.py and ampclip/reference.py's zclip_update): the warm-up buffer, the
// EMA of the norm's mean and variance, and the step's bound, in float64 with the zclip package's order of
// operations, so that its decisions and coefficients come out the same.

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "adaptive_cpu.h"

namespace ampclip {

namespace {
// The layout of ZClip's state (ops.ZCLIP_MEAN, ZCLIP_VAR, ZCLIP_READY, ZCLIP_COUNT) and its bound rules.
enum StateSlot { kMeanSlot = 0, kVarSlot = 1, kReadySlot = 2, kCountSlot = 3 };
enum Rule { kAdaptiveScaling = 0, kMeanRule = 1, kPercentile = 2 };
}  // namespace

at::Tensor zclip_update_cpu(const at::Tensor& state, const at::Tensor& warmup, const at::Tensor& total,
                            const at::Tensor& found_inf, double alpha, double z_thresh, double max_grad_norm,
                            double eps, int64_t rule, double clip_factor, bool skip_update_on_spike) {
  TORCH_CHECK_VALUE(state.device().is_cpu() && state.scalar_type() == at::kDouble && state.numel() == 4 &&
                        state.is_contiguous(),
                    "ampclip zclip_update: state must be a contiguous float64 CPU tensor of 4 elements");
  TORCH_CHECK_VALUE(warmup.device().is_cpu() && warmup.scalar_type() == at::kDouble && warmup.dim() == 1 &&
                        warmup.numel() >= 1 && warmup.is_contiguous(),
                    "ampclip zclip_update: warmup must be a contiguous 1-D float64 CPU tensor");
  TORCH_CHECK_VALUE(rule >= 0 && rule <= 2, "ampclip zclip_update: rule must be 0, 1 or 2, got ", rule);
  TORCH_CHECK_VALUE(total.scalar_type() == at::kFloat || total.scalar_type() == at::kDouble,
                    "ampclip zclip_update: total must be float32 or float64");
  double* s = state.mutable_data_ptr<double>();
  double* w = warmup.mutable_data_ptr<double>();
  const int64_t size = warmup.numel();
  const double norm = read_scalar(total, "total");
  const bool clean = read_scalar(found_inf, "found_inf") == 0.0 && std::isfinite(norm);
  // "no clip" under either coefficient rule: the largest finite value of the norm's dtype
  const double no_clip = total.scalar_type() == at::kFloat ? std::numeric_limits<float>::max()
                                                           : std::numeric_limits<double>::max();
  double bound;
  if (s[kReadySlot] == 0.0) {
    bound = std::min(max_grad_norm, no_clip);
    if (clean) {
      w[std::min(static_cast<int64_t>(s[kCountSlot]), size - 1)] = norm;
      s[kCountSlot] += 1.0;
      if (s[kCountSlot] >= static_cast<double>(size)) {  // the package's _initialize_ema: plain sums, in order
        double sum = 0.0;
        for (int64_t i = 0; i < size; ++i) sum += w[i];
        const double mean = sum / static_cast<double>(size);
        double squares = 0.0;
        for (int64_t i = 0; i < size; ++i) squares += (w[i] - mean) * (w[i] - mean);
        s[kMeanSlot] = mean;
        s[kVarSlot] = squares / static_cast<double>(size);
        s[kReadySlot] = 1.0;
      }
    }
  } else {
    const double mean = s[kMeanSlot];
    const double std_dev = std::pow(s[kVarSlot], 0.5);  // Python's var ** 0.5
    double threshold;
    bool spike;
    if (rule == kPercentile) {
      threshold = mean + z_thresh * std_dev;
      spike = norm > threshold;
    } else {
      const double z = (norm - mean) / (std_dev + eps);
      spike = z > z_thresh;
      if (rule == kAdaptiveScaling) {
        const double eta = z / z_thresh;
        threshold = (mean + (z_thresh * std_dev) / eta) * clip_factor;
      } else {
        threshold = mean;
      }
    }
    const double effective = std::min(spike ? threshold : std::numeric_limits<double>::infinity(), max_grad_norm);
    bound = norm > effective ? effective : no_clip;
    if (clean && !(spike && skip_update_on_spike)) {
      const double x = spike ? threshold : norm;
      s[kMeanSlot] = alpha * mean + (1.0 - alpha) * x;
      s[kVarSlot] = alpha * s[kVarSlot] + (1.0 - alpha) * ((x - s[kMeanSlot]) * (x - s[kMeanSlot]));
    }
  }
  return scalar_of(bound, total.options().dtype(total.scalar_type()));
}

}  // namespace ampclip
