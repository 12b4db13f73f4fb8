// Argument checks of the CUDA kernels' host functions, and what they decide before a launch (the norm kind,
// the clamp bounds, the output dtypes, the table's sizes).
//
// Host-only and header-only on purpose: it includes no CUDA header, so the same checks compile with a plain
// C++ compiler and run against CPU tensors (pass the expected device type) on a machine without a GPU; the
// launchers in fused_clip_cuda.cu call them with c10::DeviceType::CUDA before anything is allocated or
// launched. Nothing here reads a tensor's values: every value lives on the device and is read there.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <utility>

namespace ampclip::cuda {

// The four norms; a general p > 0 uses kP. Shared by the kernels and the checks.
enum class NormKind : int { kL2 = 0, kL1 = 1, kInf = 2, kP = 3 };

// clip_finalize modes and coefficient rules.
enum class ClipMode : int64_t { kGlobal = 0, kPerTensor = 1, kPerGroup = 2 };
enum class ClipRule : int64_t { kTorch = 0, kRatio = 1 };

namespace checks {

// A launch is one block per chunk: gridDim.x is at most 2^31 - 1.
constexpr int64_t kMaxChunks = std::numeric_limits<int32_t>::max();
// Group indices are compared as int64 in the kernel, but a block scans groups by thread index (int32).
constexpr int64_t kMaxGroups = std::numeric_limits<int32_t>::max();

struct TableInfo {
  int64_t num_tensors;  // T >= 1
  int64_t num_chunks;   // C >= 0 (0 when every tensor is zero-size)
  c10::Device device;
};

struct NormPlan {
  TableInfo table;
  NormKind kind;
  double p;                   // norm_type (used by kP only)
  double lo;                  // value clamp bounds; -inf / +inf when absent
  double hi;
  c10::ScalarType out_dtype;  // float32, or float64 when fp64
};

struct ScalePlan {
  TableInfo table;
  bool per_tensor_coef;       // coef holds T values (else one for all)
  double lo;
  double hi;
  bool has_clamp;
};

struct FinalizePlan {
  int64_t num_tensors;
  int64_t num_groups;         // G (0 unless per-group)
  ClipMode mode;
  ClipRule rule;
  NormKind kind;
  c10::ScalarType dtype;      // the norms' dtype: the coefficients and post-clip norm have it too
  c10::Device device;
};

inline void check_on(const at::Tensor& t, const char* op, const char* what, c10::DeviceType device_type) {
  TORCH_CHECK(t.device().type() == device_type, op, ": ", what, " must be a ", c10::DeviceTypeName(device_type),
              " tensor, got one on ", t.device());
}

inline void check_same_device(const at::Tensor& t, const c10::Device& device, const char* op, const char* what) {
  TORCH_CHECK(t.device() == device, op, ": ", what, " is on ", t.device(), ", the table on ", device);
}

// One section of the multi-tensor table: a contiguous 1-D int64 tensor of `expected` elements.
inline void check_section(const at::Tensor& t, int64_t expected, const char* op, const char* what,
                          c10::DeviceType device_type) {
  TORCH_CHECK(t.defined(), op, ": ", what, " is undefined");
  check_on(t, op, what, device_type);
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", what, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1, op, ": ", what, " must be 1-D, got ", t.dim(), " dimensions");
  TORCH_CHECK(t.is_contiguous(), op, ": ", what, " must be contiguous");
  TORCH_CHECK(expected < 0 || t.numel() == expected, op, ": ", what, " must hold ", expected,
              " elements, got ", t.numel());
}

// The five table sections (csrc/cuda/README.md): T = ptrs.numel() >= 1 tensors, C = chunk_tensor.numel()
// chunks of `chunk` elements. The sections' values are not read (they are on the device).
inline TableInfo check_table(const at::Tensor& ptrs, const at::Tensor& numels, const at::Tensor& codes,
                             const at::Tensor& chunk_begin, const at::Tensor& chunk_tensor, int64_t chunk,
                             const char* op, c10::DeviceType device_type) {
  check_section(ptrs, -1, op, "ptrs", device_type);
  const int64_t n = ptrs.numel();
  TORCH_CHECK(n >= 1, op, ": the table holds no tensor (an empty list is the caller's case)");
  check_section(numels, n, op, "numels", device_type);
  check_section(codes, n, op, "codes", device_type);
  check_section(chunk_begin, n + 1, op, "chunk_begin", device_type);
  check_section(chunk_tensor, -1, op, "chunk_tensor", device_type);
  const c10::Device device = ptrs.device();
  check_same_device(numels, device, op, "numels");
  check_same_device(codes, device, op, "codes");
  check_same_device(chunk_begin, device, op, "chunk_begin");
  check_same_device(chunk_tensor, device, op, "chunk_tensor");
  TORCH_CHECK(chunk >= 1, op, ": chunk must be >= 1 element, got ", chunk);
  TORCH_CHECK(chunk_tensor.numel() <= kMaxChunks, op, ": ", chunk_tensor.numel(),
              " chunks exceed one launch's grid (", kMaxChunks, "); use a larger chunk");
  return {n, chunk_tensor.numel(), device};
}

inline NormKind norm_kind(double norm_type, const char* op) {
  TORCH_CHECK(norm_type > 0.0, op, ": norm_type must be > 0 or inf, got ", norm_type);  // also rejects NaN
  if (std::isinf(norm_type)) return NormKind::kInf;
  if (norm_type == 2.0) return NormKind::kL2;
  if (norm_type == 1.0) return NormKind::kL1;
  return NormKind::kP;
}

// A 0-d (or one-element) float32 tensor on the table's device: inv_scale and found_inf.
inline void check_scalar_float(const at::Tensor& t, const c10::Device& device, const char* op, const char* what,
                               c10::DeviceType device_type) {
  TORCH_CHECK(t.defined(), op, ": ", what, " is undefined");
  check_on(t, op, what, device_type);
  check_same_device(t, device, op, what);
  TORCH_CHECK(t.numel() == 1, op, ": ", what, " must hold exactly one element, got ", t.numel());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", what, " must be float32, got ", t.scalar_type());
}

// (lo, hi) of the value clamp: -inf / +inf for an absent bound.
inline std::pair<double, double> clamp_bounds(std::optional<double> clamp_min, std::optional<double> clamp_max,
                                              const char* op) {
  const double inf = std::numeric_limits<double>::infinity();
  const double lo = clamp_min.value_or(-inf);
  const double hi = clamp_max.value_or(inf);
  TORCH_CHECK(!std::isnan(lo), op, ": clamp_min is NaN");
  TORCH_CHECK(!std::isnan(hi), op, ": clamp_max is NaN");
  TORCH_CHECK(lo <= hi, op, ": clamp_min (", lo, ") must not exceed clamp_max (", hi, ")");
  return {lo, hi};
}

inline NormPlan check_norm_pass(const at::Tensor& ptrs, const at::Tensor& numels, const at::Tensor& codes,
                                const at::Tensor& chunk_begin, const at::Tensor& chunk_tensor, int64_t chunk,
                                bool fp64, const std::optional<at::Tensor>& inv_scale, double norm_type,
                                std::optional<double> clamp_min, std::optional<double> clamp_max,
                                c10::DeviceType device_type = c10::DeviceType::CUDA) {
  constexpr const char* op = "ampclip norm_pass (cuda)";
  const TableInfo table = check_table(ptrs, numels, codes, chunk_begin, chunk_tensor, chunk, op, device_type);
  const NormKind kind = norm_kind(norm_type, op);
  if (inv_scale.has_value()) check_scalar_float(*inv_scale, table.device, op, "inv_scale", device_type);
  const auto [lo, hi] = clamp_bounds(clamp_min, clamp_max, op);
  return {table, kind, norm_type, lo, hi, fp64 ? at::kDouble : at::kFloat};
}

inline ScalePlan check_scale_pass(const at::Tensor& ptrs, const at::Tensor& numels, const at::Tensor& codes,
                                  const at::Tensor& chunk_begin, const at::Tensor& chunk_tensor, int64_t chunk,
                                  const at::Tensor& coef, const std::optional<at::Tensor>& inv_scale,
                                  std::optional<double> clamp_min, std::optional<double> clamp_max,
                                  const std::optional<at::Tensor>& found_inf,
                                  c10::DeviceType device_type = c10::DeviceType::CUDA) {
  constexpr const char* op = "ampclip scale_pass (cuda)";
  const TableInfo table = check_table(ptrs, numels, codes, chunk_begin, chunk_tensor, chunk, op, device_type);
  TORCH_CHECK(coef.defined(), op, ": coef is undefined");
  check_on(coef, op, "coef", device_type);
  check_same_device(coef, table.device, op, "coef");
  TORCH_CHECK(coef.scalar_type() == at::kFloat || coef.scalar_type() == at::kDouble, op,
              ": coef must be float32 or float64, got ", coef.scalar_type());
  const bool one = coef.numel() == 1;
  TORCH_CHECK(one || (coef.dim() == 1 && coef.numel() == table.num_tensors), op,
              ": coef must be 0-d (one for all) or hold one value per tensor [", table.num_tensors, "], got shape ",
              coef.sizes());
  if (inv_scale.has_value()) check_scalar_float(*inv_scale, table.device, op, "inv_scale", device_type);
  if (found_inf.has_value()) check_scalar_float(*found_inf, table.device, op, "found_inf", device_type);
  const auto [lo, hi] = clamp_bounds(clamp_min, clamp_max, op);
  return {table, !one, lo, hi, clamp_min.has_value() || clamp_max.has_value()};
}

inline FinalizePlan check_clip_finalize(const at::Tensor& per_tensor, const at::Tensor& total,
                                        const at::Tensor& max_norm, int64_t mode,
                                        const std::optional<at::Tensor>& group_index, int64_t num_groups,
                                        double norm_type, double eps, int64_t rule,
                                        c10::DeviceType device_type = c10::DeviceType::CUDA) {
  constexpr const char* op = "ampclip clip_finalize (cuda)";
  TORCH_CHECK(per_tensor.defined() && total.defined() && max_norm.defined(), op, ": undefined tensor argument");
  check_on(per_tensor, op, "per_tensor", device_type);
  const c10::Device device = per_tensor.device();
  const auto dtype = per_tensor.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op, ": per_tensor must be float32 or float64, got ",
              dtype);
  TORCH_CHECK(per_tensor.dim() == 1 && per_tensor.numel() >= 1, op,
              ": per_tensor must be 1-D with at least one norm, got shape ", per_tensor.sizes());
  TORCH_CHECK(per_tensor.is_contiguous(), op, ": per_tensor must be contiguous");
  check_on(total, op, "total", device_type);
  check_same_device(total, device, op, "total");
  TORCH_CHECK(total.numel() == 1 && total.scalar_type() == dtype, op, ": total must be a one-element ", dtype,
              " tensor (the norms' dtype), got ", total.scalar_type(), " of shape ", total.sizes());
  check_on(max_norm, op, "max_norm", device_type);
  check_same_device(max_norm, device, op, "max_norm");
  TORCH_CHECK(max_norm.numel() == 1, op, ": max_norm must hold exactly one element, got ", max_norm.numel());
  TORCH_CHECK(max_norm.scalar_type() == at::kFloat || max_norm.scalar_type() == at::kDouble, op,
              ": max_norm must be float32 or float64, got ", max_norm.scalar_type());
  TORCH_CHECK(mode >= 0 && mode <= 2, op, ": mode must be 0 (global), 1 (per tensor) or 2 (per group), got ", mode);
  TORCH_CHECK(rule == 0 || rule == 1, op, ": rule must be 0 (min(1, max/(n+eps))) or 1 (max/max(n+eps, max)), got ",
              rule);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0.0, op, ": eps must be finite and >= 0, got ", eps);
  const NormKind kind = norm_kind(norm_type, op);
  const int64_t n = per_tensor.numel();
  if (mode == static_cast<int64_t>(ClipMode::kPerGroup)) {
    TORCH_CHECK(group_index.has_value() && group_index->defined(), op, ": per-group mode needs group_index");
    const at::Tensor& gi = *group_index;
    check_on(gi, op, "group_index", device_type);
    check_same_device(gi, device, op, "group_index");
    TORCH_CHECK(gi.scalar_type() == at::kLong, op, ": group_index must be int64, got ", gi.scalar_type());
    TORCH_CHECK(gi.dim() == 1 && gi.numel() == n && gi.is_contiguous(), op,
                ": group_index must be a contiguous 1-D tensor of ", n, " entries, got shape ", gi.sizes());
    TORCH_CHECK(num_groups >= 1 && num_groups <= kMaxGroups, op, ": num_groups must be in [1, ", kMaxGroups,
                "] in per-group mode, got ", num_groups);
  } else {
    TORCH_CHECK(!group_index.has_value(), op, ": group_index is only taken in per-group mode (mode 2)");
    TORCH_CHECK(num_groups == 0, op, ": num_groups must be 0 outside per-group mode, got ", num_groups);
  }
  return {n, num_groups, static_cast<ClipMode>(mode), static_cast<ClipRule>(rule), kind, dtype, device};
}

}  // namespace checks
}  // namespace ampclip::cuda
