// CPU kernels of the two ampclip ops (see ampclip/ops.py for the contract).
//
// norm_pass: one read of every gradient. Each element is unscaled on the fly, probed for inf/NaN and
// accumulated in float lanes; every kBlock elements the lanes are folded into a double partial. The work
// is cut into fixed chunks of kChunk elements, each chunk writes its own partial, and the partials are
// reduced in a fixed order afterwards, so the norm is bitwise identical whatever the thread count.
//
// scale_pass: one read and one write, g <- clamp(g * inv_scale, -c, c) * coef. On the CPU the values of
// coef, inv_scale and found_inf cost nothing to read, so tensors that would be multiplied by exactly 1 are
// not touched at all.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace ampclip {
namespace {

// Elements per work item. Fixed, so that the partials (and the result) do not depend on threads.
constexpr int64_t kChunk = 1 << 16;
// Elements summed in float lanes before they are flushed into a double: float SIMD speed, and a rounding
// error of at most ~kBlock / kLanes = 64 float additions per lane before the double takes over.
constexpr int64_t kBlock = 1024;
constexpr int kLanes = 16;

enum class NormKind { kL1, kL2, kInf, kP };

struct WorkItem {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// float for half, bfloat16 and float gradients; double for double ones.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename T>
inline T nan_max(T a, T b) {  // max that propagates NaN, like torch's inf-norm
  return (b > a || b != b) ? b : a;
}

template <NormKind kind, typename acc_t>
inline acc_t accumulate(acc_t lane, acc_t u, acc_t p) {
  if constexpr (kind == NormKind::kL2) return lane + u * u;
  if constexpr (kind == NormKind::kL1) return lane + std::abs(u);
  if constexpr (kind == NormKind::kInf) return nan_max(lane, std::abs(u));
  return lane + std::pow(std::abs(u), p);
}

template <NormKind kind>
inline double fold(double a, double b) {
  return kind == NormKind::kInf ? nan_max(a, b) : a + b;
}

// Reduces x[0, n) to one double partial (sum of |u|^p, or max |u|) and reports whether any u = x * inv is
// not finite. `u - u` is 0 for a finite u and NaN otherwise, so summing it per lane flags inf and NaN exactly
// without a branch in the loop (an overflowing square cannot raise the flag).
template <typename scalar_t, NormKind kind>
double reduce_chunk(const scalar_t* x, int64_t n, acc_type<scalar_t> inv, acc_type<scalar_t> p, bool& nonfinite) {
  using acc_t = acc_type<scalar_t>;
  double partial = 0.0;
  acc_t probe[kLanes] = {};
  for (int64_t block = 0; block < n; block += kBlock) {
    const int64_t end = std::min(n, block + kBlock);
    acc_t lane[kLanes] = {};
    int64_t i = block;
    for (; i + kLanes <= end; i += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        const acc_t u = static_cast<acc_t>(x[i + j]) * inv;
        probe[j] += u - u;
        lane[j] = accumulate<kind>(lane[j], u, p);
      }
    }
    for (; i < end; ++i) {
      const acc_t u = static_cast<acc_t>(x[i]) * inv;
      probe[0] += u - u;
      lane[0] = accumulate<kind>(lane[0], u, p);
    }
    for (int j = 0; j < kLanes; ++j) partial = fold<kind>(partial, static_cast<double>(lane[j]));
  }
  for (int j = 0; j < kLanes; ++j) nonfinite |= probe[j] != probe[j];
  return partial;
}

template <typename scalar_t>
double reduce_chunk_any(const scalar_t* x, int64_t n, double inv, NormKind kind, double p, bool& nonfinite) {
  using acc_t = acc_type<scalar_t>;
  const auto inv_a = static_cast<acc_t>(inv);
  const auto p_a = static_cast<acc_t>(p);
  switch (kind) {
    case NormKind::kL2: return reduce_chunk<scalar_t, NormKind::kL2>(x, n, inv_a, p_a, nonfinite);
    case NormKind::kL1: return reduce_chunk<scalar_t, NormKind::kL1>(x, n, inv_a, p_a, nonfinite);
    case NormKind::kInf: return reduce_chunk<scalar_t, NormKind::kInf>(x, n, inv_a, p_a, nonfinite);
    default: return reduce_chunk<scalar_t, NormKind::kP>(x, n, inv_a, p_a, nonfinite);
  }
}

void check_grads(at::TensorList grads, const char* op) {
  for (size_t i = 0; i < grads.size(); ++i) {
    const auto& g = grads[i];
    TORCH_CHECK(g.layout() == at::kStrided, op, ": gradient ", i, " is not dense (layout ", g.layout(), ")");
    TORCH_CHECK(g.device().is_cpu(), op, ": gradient ", i, " is on ", g.device(), ", expected the CPU");
    const auto t = g.scalar_type();
    TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble, op,
                ": gradient ", i, " has dtype ", t, "; expected float16, bfloat16, float32 or float64");
  }
}

double read_scalar(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.numel() == 1, what, " must hold exactly one element, got ", t.numel());
  TORCH_CHECK(t.device().is_cpu(), what, " must be on the CPU with CPU gradients, got ", t.device());
  return t.item<double>();
}

std::vector<WorkItem> make_work(const std::vector<at::Tensor>& src, const std::vector<bool>& skip) {
  std::vector<WorkItem> items;
  for (int64_t t = 0; t < static_cast<int64_t>(src.size()); ++t) {
    if (!skip.empty() && skip[t]) continue;
    const int64_t n = src[t].numel();
    for (int64_t b = 0; b < n; b += kChunk) items.push_back({t, b, std::min(n, b + kChunk)});
  }
  return items;
}

double finish_norm(double acc, NormKind kind, double p) {
  switch (kind) {
    case NormKind::kL2: return std::sqrt(acc);
    case NormKind::kL1:
    case NormKind::kInf: return acc;
    default: return std::pow(acc, 1.0 / p);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_pass_cpu(at::TensorList grads,
                                                             const std::optional<at::Tensor>& inv_scale,
                                                             double norm_type) {
  check_grads(grads, "ampclip norm_pass");
  TORCH_CHECK(norm_type > 0.0, "ampclip norm_pass: norm_type must be > 0 or inf, got ", norm_type);
  const NormKind kind = std::isinf(norm_type) ? NormKind::kInf
                        : norm_type == 2.0    ? NormKind::kL2
                        : norm_type == 1.0    ? NormKind::kL1
                                              : NormKind::kP;
  const double inv = inv_scale.has_value() ? read_scalar(*inv_scale, "inv_scale") : 1.0;

  bool any_double = false;
  std::vector<at::Tensor> src;
  src.reserve(grads.size());
  for (const auto& g : grads) {
    any_double |= g.scalar_type() == at::kDouble;
    src.push_back(g.contiguous());  // a no-op for contiguous gradients; a copy for strided views
  }
  const auto items = make_work(src, {});
  std::vector<double> partial(items.size());
  std::vector<uint8_t> chunk_nonfinite(items.size(), 0);

  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const auto& item = items[i];
      const auto& t = src[item.tensor];
      bool nonfinite = false;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "ampclip_norm_pass_cpu", [&] {
        partial[i] = reduce_chunk_any<scalar_t>(t.const_data_ptr<scalar_t>() + item.begin, item.end - item.begin,
                                                inv, kind, norm_type, nonfinite);
      });
      chunk_nonfinite[i] = nonfinite;
    }
  });

  // Fixed-order reduction: chunks into tensors, tensors into the total.
  const int64_t num_tensors = static_cast<int64_t>(src.size());
  std::vector<double> per_tensor(num_tensors, 0.0);
  bool found = false;
  for (size_t i = 0; i < items.size(); ++i) {
    auto& acc = per_tensor[items[i].tensor];
    acc = kind == NormKind::kInf ? nan_max(acc, partial[i]) : acc + partial[i];
    found |= chunk_nonfinite[i] != 0;
  }
  double total = 0.0;
  for (double acc : per_tensor) total = kind == NormKind::kInf ? nan_max(total, acc) : total + acc;

  const auto options = at::TensorOptions().dtype(any_double ? at::kDouble : at::kFloat);
  auto norms = at::empty({num_tensors}, options);
  AT_DISPATCH_FLOATING_TYPES(norms.scalar_type(), "ampclip_norm_pass_out", [&] {
    auto* out = norms.mutable_data_ptr<scalar_t>();
    for (int64_t t = 0; t < num_tensors; ++t) out[t] = static_cast<scalar_t>(finish_norm(per_tensor[t], kind, norm_type));
  });
  auto total_norm = at::full({}, finish_norm(total, kind, norm_type), options);
  auto found_inf = at::full({}, found ? 1.0 : 0.0, at::TensorOptions().dtype(at::kFloat));
  return {norms, total_norm, found_inf};
}

template <typename scalar_t>
void scale_chunk(scalar_t* x, int64_t n, double inv, bool has_clip, double clip, double coef) {
  using acc_t = acc_type<scalar_t>;
  const auto inv_a = static_cast<acc_t>(inv);
  const auto lo = static_cast<acc_t>(-clip);
  const auto hi = static_cast<acc_t>(clip);
  const auto coef_a = static_cast<acc_t>(coef);
  if (has_clip) {
    // std::max/min keep a NaN in their first argument, as torch.clamp does.
    for (int64_t i = 0; i < n; ++i) {
      const acc_t u = static_cast<acc_t>(x[i]) * inv_a;
      x[i] = static_cast<scalar_t>(std::min(std::max(u, lo), hi) * coef_a);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) x[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) * inv_a * coef_a);
  }
}

void scale_pass_cpu(at::TensorList grads, const at::Tensor& coef, const std::optional<at::Tensor>& inv_scale,
                    std::optional<double> clip_value, const std::optional<at::Tensor>& found_inf, bool zero_if_inf) {
  check_grads(grads, "ampclip scale_pass");
  const int64_t num_tensors = static_cast<int64_t>(grads.size());
  TORCH_CHECK(coef.numel() == 1 || coef.numel() == num_tensors,
              "ampclip scale_pass: coef must hold 1 or one per gradient (", num_tensors, ") elements, got ",
              coef.numel());
  TORCH_CHECK(coef.device().is_cpu(), "ampclip scale_pass: coef must be on the CPU, got ", coef.device());
  TORCH_CHECK(!clip_value.has_value() || *clip_value >= 0.0,
              "ampclip scale_pass: clip_value must be >= 0, got ", *clip_value);
  if (found_inf.has_value() && read_scalar(*found_inf, "found_inf") != 0.0) {
    if (zero_if_inf) {
      for (const auto& g : grads) const_cast<at::Tensor&>(g).zero_();
    }
    return;
  }
  const bool has_inv = inv_scale.has_value();
  const double inv = has_inv ? read_scalar(*inv_scale, "inv_scale") : 1.0;
  const bool has_clip = clip_value.has_value();
  const auto coef_host = coef.to(at::kDouble).contiguous().reshape({-1});
  const double* coefs = coef_host.const_data_ptr<double>();

  std::vector<at::Tensor> dst;
  std::vector<bool> skip(num_tensors, false);
  std::vector<double> tensor_coef(num_tensors);
  dst.reserve(num_tensors);
  for (int64_t t = 0; t < num_tensors; ++t) {
    tensor_coef[t] = coefs[coef.numel() == 1 ? 0 : t];
    // Multiplying by exactly 1 with no unscale and no clamp changes nothing: skip the read and the write.
    skip[t] = !has_inv && !has_clip && tensor_coef[t] == 1.0;
    dst.push_back(grads[t].is_contiguous() || skip[t] ? grads[t] : grads[t].contiguous());
  }
  const auto items = make_work(dst, skip);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const auto& item = items[i];
      auto& t = dst[item.tensor];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "ampclip_scale_pass_cpu", [&] {
        scale_chunk<scalar_t>(t.mutable_data_ptr<scalar_t>() + item.begin, item.end - item.begin, inv, has_clip,
                              has_clip ? *clip_value : 0.0, tensor_coef[item.tensor]);
      });
    }
  });
  for (int64_t t = 0; t < num_tensors; ++t) {
    if (!skip[t] && !dst[t].is_same(grads[t])) const_cast<at::Tensor&>(grads[t]).copy_(dst[t]);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(ampclip_C, CPU, m) {
  m.impl("norm_pass", &norm_pass_cpu);
  m.impl("scale_pass", &scale_pass_cpu);
}

}  // namespace ampclip
