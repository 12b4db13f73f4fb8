// Argument checks of the CUDA kernels' host functions, and what they decide before a launch (the norm kind,
// the clamp bounds, the output dtypes, the table's sizes).
//
// Host-only and header-only on purpose: it includes no CUDA header, so the same checks compile with a plain
// C++ compiler and run against CPU tensors (pass the expected device type) on a machine without a GPU; the
// launchers in fused_clip_cuda.cu call them with c10::DeviceType::CUDA before anything is allocated or
// launched. Nothing here reads a tensor's values: every value lives on the device and is read there.
//
// The checks throw nothing: a failed one fills a Problem (its kind and message) and the check returns no plan.
// The Python entries (python_cuda.cpp) turn a Problem into a Python exception, so bad input never sends a C++
// exception through an entry; the launchers, reached only after those checks or from C++, throw it (required()).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <utility>

namespace ampclip::cuda {

// The four norms; a general p > 0 uses kP. Shared by the kernels and the checks.
enum class NormKind : int { kL2 = 0, kL1 = 1, kInf = 2, kP = 3 };

// clip_finalize modes and coefficient rules.
enum class ClipMode : int64_t { kGlobal = 0, kPerTensor = 1, kPerGroup = 2 };
enum class ClipRule : int64_t { kTorch = 0, kRatio = 1 };

namespace checks {

// The first check that failed: a wrong kind of argument (a dtype, a layout: TypeError) or a wrong value (a
// device, a size, a number out of range: ValueError). Empty while every check passes.
struct Problem {
  bool type_error = false;
  std::string message;
  explicit operator bool() const { return !message.empty(); }
};

// Records the first failure in `problem` and leaves the check with no plan.
#define AMPCLIP_REQUIRE(cond, is_type, ...)                                    \
  do {                                                                         \
    if (!(cond)) {                                                             \
      problem = ::ampclip::cuda::checks::Problem{is_type, c10::str(__VA_ARGS__)}; \
      return {};                                                               \
    }                                                                          \
  } while (0)
#define AMPCLIP_REQUIRE_OK(call) \
  do {                           \
    if (!(call)) return {};      \
  } while (0)

// The plan of a check that must pass (the launchers): the problem as a c10::Error otherwise.
template <typename Plan>
Plan required(std::optional<Plan> plan, const Problem& problem) {
  TORCH_CHECK(plan.has_value(), problem.message);
  return *plan;
}

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

// Every check below takes `problem` and returns false (or no plan) with it filled when the check fails.

inline bool check_on(const at::Tensor& t, const char* op, const char* what, c10::DeviceType device_type,
                     Problem& problem) {
  AMPCLIP_REQUIRE(t.defined(), true, op, ": ", what, " is undefined");
  AMPCLIP_REQUIRE(!t.is_nested() && t.layout() == at::kStrided, true, op, ": ", what, " must be a dense tensor");
  AMPCLIP_REQUIRE(t.device().type() == device_type, false, op, ": ", what, " must be a ",
                  c10::DeviceTypeName(device_type), " tensor, got one on ", t.device());
  return true;
}

inline bool check_same_device(const at::Tensor& t, const c10::Device& device, const char* op, const char* what,
                              Problem& problem) {
  AMPCLIP_REQUIRE(t.device() == device, false, op, ": ", what, " is on ", t.device(), ", the table on ", device);
  return true;
}

// One section of the multi-tensor table: a contiguous 1-D int64 tensor of `expected` elements.
inline bool check_section(const at::Tensor& t, int64_t expected, const char* op, const char* what,
                          c10::DeviceType device_type, Problem& problem) {
  AMPCLIP_REQUIRE_OK(check_on(t, op, what, device_type, problem));
  AMPCLIP_REQUIRE(t.scalar_type() == at::kLong, true, op, ": ", what, " must be int64, got ", t.scalar_type());
  AMPCLIP_REQUIRE(t.dim() == 1, false, op, ": ", what, " must be 1-D, got ", t.dim(), " dimensions");
  AMPCLIP_REQUIRE(t.is_contiguous(), false, op, ": ", what, " must be contiguous");
  AMPCLIP_REQUIRE(expected < 0 || t.numel() == expected, false, op, ": ", what, " must hold ", expected,
                  " elements, got ", t.numel());
  return true;
}

// The five table sections (csrc/cuda/README.md): T = ptrs.numel() >= 1 tensors, C = chunk_tensor.numel()
// chunks of `chunk` elements. The sections' values are not read (they are on the device).
inline std::optional<TableInfo> check_table(const at::Tensor& ptrs, const at::Tensor& numels, const at::Tensor& codes,
                                            const at::Tensor& chunk_begin, const at::Tensor& chunk_tensor,
                                            int64_t chunk, const char* op, c10::DeviceType device_type,
                                            Problem& problem) {
  AMPCLIP_REQUIRE_OK(check_section(ptrs, -1, op, "ptrs", device_type, problem));
  const int64_t n = ptrs.numel();
  AMPCLIP_REQUIRE(n >= 1, false, op, ": the table holds no tensor (an empty list is the caller's case)");
  AMPCLIP_REQUIRE_OK(check_section(numels, n, op, "numels", device_type, problem));
  AMPCLIP_REQUIRE_OK(check_section(codes, n, op, "codes", device_type, problem));
  AMPCLIP_REQUIRE_OK(check_section(chunk_begin, n + 1, op, "chunk_begin", device_type, problem));
  AMPCLIP_REQUIRE_OK(check_section(chunk_tensor, -1, op, "chunk_tensor", device_type, problem));
  const c10::Device device = ptrs.device();
  AMPCLIP_REQUIRE_OK(check_same_device(numels, device, op, "numels", problem));
  AMPCLIP_REQUIRE_OK(check_same_device(codes, device, op, "codes", problem));
  AMPCLIP_REQUIRE_OK(check_same_device(chunk_begin, device, op, "chunk_begin", problem));
  AMPCLIP_REQUIRE_OK(check_same_device(chunk_tensor, device, op, "chunk_tensor", problem));
  AMPCLIP_REQUIRE(chunk >= 1, false, op, ": chunk must be >= 1 element, got ", chunk);
  AMPCLIP_REQUIRE(chunk_tensor.numel() <= kMaxChunks, false, op, ": ", chunk_tensor.numel(),
                  " chunks exceed one launch's grid (", kMaxChunks, "); use a larger chunk");
  return TableInfo{n, chunk_tensor.numel(), device};
}

inline std::optional<NormKind> norm_kind(double norm_type, const char* op, Problem& problem) {
  AMPCLIP_REQUIRE(norm_type > 0.0, false, op, ": norm_type must be > 0 or inf, got ", norm_type);  // and not NaN
  if (std::isinf(norm_type)) return NormKind::kInf;
  if (norm_type == 2.0) return NormKind::kL2;
  if (norm_type == 1.0) return NormKind::kL1;
  return NormKind::kP;
}

// A 0-d (or one-element) float32 tensor on the table's device: inv_scale and found_inf.
inline bool check_scalar_float(const at::Tensor& t, const c10::Device& device, const char* op, const char* what,
                               c10::DeviceType device_type, Problem& problem) {
  AMPCLIP_REQUIRE_OK(check_on(t, op, what, device_type, problem));
  AMPCLIP_REQUIRE_OK(check_same_device(t, device, op, what, problem));
  AMPCLIP_REQUIRE(t.scalar_type() == at::kFloat, true, op, ": ", what, " must be float32, got ", t.scalar_type());
  AMPCLIP_REQUIRE(t.numel() == 1, false, op, ": ", what, " must hold exactly one element, got ", t.numel());
  return true;
}

// (lo, hi) of the value clamp: -inf / +inf for an absent bound.
inline std::optional<std::pair<double, double>> clamp_bounds(std::optional<double> clamp_min,
                                                             std::optional<double> clamp_max, const char* op,
                                                             Problem& problem) {
  const double inf = std::numeric_limits<double>::infinity();
  const double lo = clamp_min.value_or(-inf);
  const double hi = clamp_max.value_or(inf);
  AMPCLIP_REQUIRE(!std::isnan(lo), false, op, ": clamp_min is NaN");
  AMPCLIP_REQUIRE(!std::isnan(hi), false, op, ": clamp_max is NaN");
  AMPCLIP_REQUIRE(lo <= hi, false, op, ": clamp_min (", lo, ") must not exceed clamp_max (", hi, ")");
  return std::pair<double, double>{lo, hi};
}

inline std::optional<NormPlan> check_norm_pass(const at::Tensor& ptrs, const at::Tensor& numels,
                                               const at::Tensor& codes, const at::Tensor& chunk_begin,
                                               const at::Tensor& chunk_tensor, int64_t chunk, bool fp64,
                                               const at::Tensor& tickets, int64_t num_filled,
                                               const std::optional<at::Tensor>& inv_scale, double norm_type,
                                               std::optional<double> clamp_min, std::optional<double> clamp_max,
                                               Problem& problem,
                                               c10::DeviceType device_type = c10::DeviceType::CUDA,
                                               const char* op = "ampclip norm_pass (cuda)") {
  const auto table = check_table(ptrs, numels, codes, chunk_begin, chunk_tensor, chunk, op, device_type, problem);
  AMPCLIP_REQUIRE_OK(table);
  // The ticket counters: int32, one per tensor and one for the launch, on the table's device.
  AMPCLIP_REQUIRE_OK(check_on(tickets, op, "tickets", device_type, problem));
  AMPCLIP_REQUIRE_OK(check_same_device(tickets, table->device, op, "tickets", problem));
  AMPCLIP_REQUIRE(tickets.scalar_type() == at::kInt, true, op, ": tickets must be int32, got ", tickets.scalar_type());
  AMPCLIP_REQUIRE(tickets.dim() == 1 && tickets.is_contiguous() && tickets.numel() == table->num_tensors + 1, false,
                  op, ": tickets must be a contiguous 1-D tensor of ", table->num_tensors + 1,
                  " counters (one per tensor, one for the launch), got shape ", tickets.sizes());
  // Every tensor that owns a chunk draws a ticket of the launch: at least one when there is a chunk, at most
  // one per tensor and per chunk.
  const int64_t most = std::min(table->num_tensors, table->num_chunks);
  AMPCLIP_REQUIRE(num_filled >= (table->num_chunks > 0 ? 1 : 0) && num_filled <= most, false, op,
                  ": num_filled (the tensors that own a chunk) must be in [", table->num_chunks > 0 ? 1 : 0, ", ",
                  most, "], got ", num_filled);
  const auto kind = norm_kind(norm_type, op, problem);
  AMPCLIP_REQUIRE_OK(kind);
  if (inv_scale.has_value()) {
    AMPCLIP_REQUIRE_OK(check_scalar_float(*inv_scale, table->device, op, "inv_scale", device_type, problem));
  }
  const auto bounds = clamp_bounds(clamp_min, clamp_max, op, problem);
  AMPCLIP_REQUIRE_OK(bounds);
  return NormPlan{*table, *kind, norm_type, bounds->first, bounds->second, fp64 ? at::kDouble : at::kFloat};
}

// check_norm_pass, and the global clip's own arguments: a bound >= 0 (inf allowed), eps finite and >= 0, rule
// 0 or 1.
inline std::optional<NormPlan> check_clip_norm_pass(const at::Tensor& ptrs, const at::Tensor& numels,
                                                    const at::Tensor& codes, const at::Tensor& chunk_begin,
                                                    const at::Tensor& chunk_tensor, int64_t chunk, bool fp64,
                                                    const at::Tensor& tickets, int64_t num_filled,
                                                    const std::optional<at::Tensor>& inv_scale, double norm_type,
                                                    std::optional<double> clamp_min, std::optional<double> clamp_max,
                                                    double max_norm, double eps, int64_t rule,
                                                    Problem& problem,
                                                    c10::DeviceType device_type = c10::DeviceType::CUDA) {
  constexpr const char* op = "ampclip clip_norm_pass (cuda)";
  const auto plan = check_norm_pass(ptrs, numels, codes, chunk_begin, chunk_tensor, chunk, fp64, tickets, num_filled,
                                    inv_scale, norm_type, clamp_min, clamp_max, problem, device_type, op);
  AMPCLIP_REQUIRE_OK(plan);
  AMPCLIP_REQUIRE(max_norm >= 0.0, false, op, ": max_norm must be >= 0, got ", max_norm);  // and not NaN
  AMPCLIP_REQUIRE(std::isfinite(eps) && eps >= 0.0, false, op, ": eps must be finite and >= 0, got ", eps);
  AMPCLIP_REQUIRE(rule == 0 || rule == 1, false, op,
                  ": rule must be 0 (min(1, max/(n+eps))) or 1 (max/max(n+eps, max)), got ", rule);
  return plan;
}

inline std::optional<ScalePlan> check_scale_pass(const at::Tensor& ptrs, const at::Tensor& numels,
                                                 const at::Tensor& codes, const at::Tensor& chunk_begin,
                                                 const at::Tensor& chunk_tensor, int64_t chunk, const at::Tensor& coef,
                                                 const std::optional<at::Tensor>& inv_scale,
                                                 std::optional<double> clamp_min, std::optional<double> clamp_max,
                                                 const std::optional<at::Tensor>& found_inf, Problem& problem,
                                                 c10::DeviceType device_type = c10::DeviceType::CUDA) {
  constexpr const char* op = "ampclip scale_pass (cuda)";
  const auto table = check_table(ptrs, numels, codes, chunk_begin, chunk_tensor, chunk, op, device_type, problem);
  AMPCLIP_REQUIRE_OK(table);
  AMPCLIP_REQUIRE_OK(check_on(coef, op, "coef", device_type, problem));
  AMPCLIP_REQUIRE_OK(check_same_device(coef, table->device, op, "coef", problem));
  AMPCLIP_REQUIRE(coef.scalar_type() == at::kFloat || coef.scalar_type() == at::kDouble, true, op,
                  ": coef must be float32 or float64, got ", coef.scalar_type());
  const bool one = coef.numel() == 1;
  AMPCLIP_REQUIRE(one || (coef.dim() == 1 && coef.numel() == table->num_tensors), false, op,
                  ": coef must be 0-d (one for all) or hold one value per tensor [", table->num_tensors,
                  "], got shape ", coef.sizes());
  if (inv_scale.has_value()) {
    AMPCLIP_REQUIRE_OK(check_scalar_float(*inv_scale, table->device, op, "inv_scale", device_type, problem));
  }
  if (found_inf.has_value()) {
    AMPCLIP_REQUIRE_OK(check_scalar_float(*found_inf, table->device, op, "found_inf", device_type, problem));
  }
  const auto bounds = clamp_bounds(clamp_min, clamp_max, op, problem);
  AMPCLIP_REQUIRE_OK(bounds);
  return ScalePlan{*table, !one, bounds->first, bounds->second, clamp_min.has_value() || clamp_max.has_value()};
}

inline std::optional<FinalizePlan> check_clip_finalize(const at::Tensor& per_tensor, const at::Tensor& total,
                                                       const at::Tensor& max_norm, int64_t mode,
                                                       const std::optional<at::Tensor>& group_index,
                                                       int64_t num_groups, double norm_type, double eps,
                                                       int64_t rule, Problem& problem,
                                                       c10::DeviceType device_type = c10::DeviceType::CUDA) {
  constexpr const char* op = "ampclip clip_finalize (cuda)";
  AMPCLIP_REQUIRE_OK(check_on(per_tensor, op, "per_tensor", device_type, problem));
  const c10::Device device = per_tensor.device();
  const auto dtype = per_tensor.scalar_type();
  AMPCLIP_REQUIRE(dtype == at::kFloat || dtype == at::kDouble, true, op,
                  ": per_tensor must be float32 or float64, got ", dtype);
  AMPCLIP_REQUIRE(per_tensor.dim() == 1 && per_tensor.numel() >= 1, false, op,
                  ": per_tensor must be 1-D with at least one norm, got shape ", per_tensor.sizes());
  AMPCLIP_REQUIRE(per_tensor.is_contiguous(), false, op, ": per_tensor must be contiguous");
  AMPCLIP_REQUIRE_OK(check_on(total, op, "total", device_type, problem));
  AMPCLIP_REQUIRE_OK(check_same_device(total, device, op, "total", problem));
  AMPCLIP_REQUIRE(total.scalar_type() == dtype, true, op, ": total must be a one-element ", dtype,
                  " tensor (the norms' dtype), got ", total.scalar_type(), " of shape ", total.sizes());
  AMPCLIP_REQUIRE(total.numel() == 1, false, op, ": total must be a one-element ", dtype,
                  " tensor (the norms' dtype), got ", total.scalar_type(), " of shape ", total.sizes());
  AMPCLIP_REQUIRE_OK(check_on(max_norm, op, "max_norm", device_type, problem));
  AMPCLIP_REQUIRE_OK(check_same_device(max_norm, device, op, "max_norm", problem));
  AMPCLIP_REQUIRE(max_norm.scalar_type() == at::kFloat || max_norm.scalar_type() == at::kDouble, true, op,
                  ": max_norm must be float32 or float64, got ", max_norm.scalar_type());
  AMPCLIP_REQUIRE(max_norm.numel() == 1, false, op, ": max_norm must hold exactly one element, got ",
                  max_norm.numel());
  AMPCLIP_REQUIRE(mode >= 0 && mode <= 2, false, op,
                  ": mode must be 0 (global), 1 (per tensor) or 2 (per group), got ", mode);
  AMPCLIP_REQUIRE(rule == 0 || rule == 1, false, op,
                  ": rule must be 0 (min(1, max/(n+eps))) or 1 (max/max(n+eps, max)), got ", rule);
  AMPCLIP_REQUIRE(std::isfinite(eps) && eps >= 0.0, false, op, ": eps must be finite and >= 0, got ", eps);
  const auto kind = norm_kind(norm_type, op, problem);
  AMPCLIP_REQUIRE_OK(kind);
  const int64_t n = per_tensor.numel();
  if (mode == static_cast<int64_t>(ClipMode::kPerGroup)) {
    AMPCLIP_REQUIRE(group_index.has_value() && group_index->defined(), false, op,
                    ": per-group mode needs group_index");
    const at::Tensor& gi = *group_index;
    AMPCLIP_REQUIRE_OK(check_on(gi, op, "group_index", device_type, problem));
    AMPCLIP_REQUIRE_OK(check_same_device(gi, device, op, "group_index", problem));
    AMPCLIP_REQUIRE(gi.scalar_type() == at::kLong, true, op, ": group_index must be int64, got ", gi.scalar_type());
    AMPCLIP_REQUIRE(gi.dim() == 1 && gi.numel() == n && gi.is_contiguous(), false, op,
                    ": group_index must be a contiguous 1-D tensor of ", n, " entries, got shape ", gi.sizes());
    AMPCLIP_REQUIRE(num_groups >= 1 && num_groups <= kMaxGroups, false, op, ": num_groups must be in [1, ",
                    kMaxGroups, "] in per-group mode, got ", num_groups);
  } else {
    AMPCLIP_REQUIRE(!group_index.has_value(), false, op, ": group_index is only taken in per-group mode (mode 2)");
    AMPCLIP_REQUIRE(num_groups == 0, false, op, ": num_groups must be 0 outside per-group mode, got ", num_groups);
  }
  return FinalizePlan{n, num_groups, static_cast<ClipMode>(mode), static_cast<ClipRule>(rule), *kind, dtype, device};
}

}  // namespace checks

#undef AMPCLIP_REQUIRE
#undef AMPCLIP_REQUIRE_OK
}  // namespace ampclip::cuda
