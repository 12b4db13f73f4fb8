// Host-side test of the CUDA kernels' argument checks (csrc/cuda/fused_clip_cuda_checks.h), built with the
// host compiler against torch's CPU library and run by scripts/cuda_check.py: no GPU needed. The checks take
// the expected device type as a parameter, so CPU tensors stand in for CUDA ones here and meta tensors play
// the wrong device. Kernels are not run: their results need a GPU.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <string>

#include "fused_clip_cuda_checks.h"

namespace {

using namespace ampclip::cuda;
constexpr auto kHere = c10::DeviceType::CPU;
int failures = 0;
int passes = 0;

void expect_ok(const char* name, const std::function<void()>& fn) {
  try {
    fn();
    ++passes;
  } catch (const c10::Error& e) {
    ++failures;
    std::printf("FAIL %s: unexpected error: %s\n", name, e.what_without_backtrace());
  }
}

void expect_error(const char* name, const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
    ++failures;
    std::printf("FAIL %s: no error (expected one containing \"%s\")\n", name, needle.c_str());
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    if (msg.find(needle) == std::string::npos) {
      ++failures;
      std::printf("FAIL %s: error \"%s\" lacks \"%s\"\n", name, msg.c_str(), needle.c_str());
    } else {
      ++passes;
    }
  }
}

void expect(const char* name, bool ok) {
  if (ok) {
    ++passes;
  } else {
    ++failures;
    std::printf("FAIL %s\n", name);
  }
}

at::Tensor longs(int64_t n) { return at::zeros({n}, at::TensorOptions().dtype(at::kLong)); }
at::Tensor floats(at::IntArrayRef shape, at::ScalarType dtype = at::kFloat) {
  return at::zeros(shape, at::TensorOptions().dtype(dtype));
}
at::Tensor on_meta(at::IntArrayRef shape, at::ScalarType dtype) {
  return at::empty(shape, at::TensorOptions().dtype(dtype).device(at::kMeta));
}

// A table of T = 3 tensors and C = 5 chunks (values are irrelevant: the checks never read them).
struct TableArgs {
  at::Tensor ptrs = longs(3), numels = longs(3), codes = longs(3), chunk_begin = longs(4), chunk_tensor = longs(5);
  int64_t chunk = 32768;
};

checks::TableInfo table_of(const TableArgs& t) {
  return checks::check_table(t.ptrs, t.numels, t.codes, t.chunk_begin, t.chunk_tensor, t.chunk, "test", kHere);
}

void table_checks() {
  expect_ok("table ok", [] {
    const auto info = table_of(TableArgs{});
    expect("table sizes", info.num_tensors == 3 && info.num_chunks == 5);
  });
  expect_ok("table of zero-size tensors only", [] {
    TableArgs t;
    t.chunk_tensor = longs(0);
    expect("no chunk", table_of(t).num_chunks == 0);
  });
  expect_error("ptrs int32", [] { TableArgs t; t.ptrs = t.ptrs.to(at::kInt); table_of(t); }, "ptrs must be int64");
  expect_error("numels size", [] { TableArgs t; t.numels = longs(4); table_of(t); }, "numels must hold 3 elements");
  expect_error("codes size", [] { TableArgs t; t.codes = longs(2); table_of(t); }, "codes must hold 3 elements");
  expect_error("chunk_begin size", [] { TableArgs t; t.chunk_begin = longs(3); table_of(t); },
               "chunk_begin must hold 4 elements");
  expect_error("2-D section", [] { TableArgs t; t.chunk_tensor = longs(6).view({2, 3}); table_of(t); },
               "chunk_tensor must be 1-D");
  expect_error("strided section", [] { TableArgs t; t.numels = longs(6).slice(0, 0, 6, 2); table_of(t); },
               "numels must be contiguous");
  expect_error("empty table", [] {
    TableArgs t;
    t.ptrs = longs(0), t.numels = longs(0), t.codes = longs(0), t.chunk_begin = longs(1);
    table_of(t);
  }, "holds no tensor");
  expect_error("chunk 0", [] { TableArgs t; t.chunk = 0; table_of(t); }, "chunk must be >= 1");
  expect_error("wrong device", [] { TableArgs t; t.codes = on_meta({3}, at::kLong); table_of(t); },
               "codes must be a CPU tensor");
}

checks::NormPlan norm_plan(double norm_type, const std::optional<at::Tensor>& inv_scale = std::nullopt,
                           std::optional<double> lo = std::nullopt, std::optional<double> hi = std::nullopt,
                           bool fp64 = false) {
  TableArgs t;
  return checks::check_norm_pass(t.ptrs, t.numels, t.codes, t.chunk_begin, t.chunk_tensor, t.chunk, fp64, inv_scale,
                                 norm_type, lo, hi, kHere);
}

void norm_checks() {
  const double inf = std::numeric_limits<double>::infinity();
  expect_ok("norm kinds", [&] {
    expect("L2", norm_plan(2.0).kind == NormKind::kL2);
    expect("L1", norm_plan(1.0).kind == NormKind::kL1);
    expect("inf", norm_plan(inf).kind == NormKind::kInf);
    expect("p=3", norm_plan(3.0).kind == NormKind::kP);
    expect("p=0.5", norm_plan(0.5).kind == NormKind::kP);
  });
  expect_ok("dtypes and clamp", [&] {
    expect("float32 norms", norm_plan(2.0).out_dtype == at::kFloat);
    expect("float64 norms", norm_plan(2.0, std::nullopt, std::nullopt, std::nullopt, true).out_dtype == at::kDouble);
    const auto plan = norm_plan(2.0, floats({}), -1.0);
    expect("clamp_min only", plan.lo == -1.0 && plan.hi == inf);
    const auto none = norm_plan(2.0);
    expect("no clamp", none.lo == -inf && none.hi == inf);
  });
  expect_error("norm_type 0", [] { norm_plan(0.0); }, "norm_type must be > 0");
  expect_error("norm_type -inf", [&] { norm_plan(-inf); }, "norm_type must be > 0");
  expect_error("norm_type NaN", [] { norm_plan(std::nan("")); }, "norm_type must be > 0");
  expect_error("inv_scale float64", [] { norm_plan(2.0, floats({}, at::kDouble)); }, "inv_scale must be float32");
  expect_error("inv_scale 2 elements", [] { norm_plan(2.0, floats({2})); }, "inv_scale must hold exactly one");
  expect_error("inv_scale device", [] { norm_plan(2.0, on_meta({}, at::kFloat)); }, "inv_scale must be a CPU");
  expect_error("clamp reversed", [] { norm_plan(2.0, std::nullopt, 1.0, -1.0); }, "must not exceed clamp_max");
  expect_error("clamp NaN", [] { norm_plan(2.0, std::nullopt, std::nan(""), 1.0); }, "clamp_min is NaN");
}

checks::ScalePlan scale_plan(const at::Tensor& coef, const std::optional<at::Tensor>& found_inf = std::nullopt,
                             std::optional<double> lo = std::nullopt, std::optional<double> hi = std::nullopt) {
  TableArgs t;
  return checks::check_scale_pass(t.ptrs, t.numels, t.codes, t.chunk_begin, t.chunk_tensor, t.chunk, coef,
                                  std::nullopt, lo, hi, found_inf, kHere);
}

void scale_checks() {
  expect_ok("coef shapes", [] {
    expect("0-d coef", !scale_plan(floats({})).per_tensor_coef);
    expect("[1] coef", !scale_plan(floats({1})).per_tensor_coef);
    expect("[T] coef", scale_plan(floats({3}, at::kDouble)).per_tensor_coef);
    expect("no clamp", !scale_plan(floats({})).has_clamp);
    expect("clamp_max only", scale_plan(floats({}), std::nullopt, std::nullopt, 1.0).has_clamp);
  });
  expect_ok("found_inf", [] { scale_plan(floats({}), floats({})); });
  expect_error("coef int", [] { scale_plan(longs(3)); }, "coef must be float32 or float64");
  expect_error("coef half", [] { scale_plan(floats({}, at::kHalf)); }, "coef must be float32 or float64");
  expect_error("coef size", [] { scale_plan(floats({2})); }, "one value per tensor [3]");
  expect_error("coef 2-D", [] { scale_plan(floats({3, 1})); }, "one value per tensor [3]");
  expect_error("coef device", [] { scale_plan(on_meta({}, at::kFloat)); }, "coef must be a CPU");
  expect_error("found_inf float64", [] { scale_plan(floats({}), floats({}, at::kDouble)); },
               "found_inf must be float32");
  expect_error("clamp reversed", [] { scale_plan(floats({}), std::nullopt, 2.0, 1.0); }, "must not exceed clamp_max");
}

struct FinalizeArgs {
  at::Tensor per_tensor = floats({3}), total = floats({}), max_norm = floats({});
  int64_t mode = 0;
  std::optional<at::Tensor> group_index;
  int64_t num_groups = 0;
  double norm_type = 2.0, eps = 1e-6;
  int64_t rule = 0;
};

checks::FinalizePlan finalize_plan(const FinalizeArgs& a) {
  return checks::check_clip_finalize(a.per_tensor, a.total, a.max_norm, a.mode, a.group_index, a.num_groups,
                                     a.norm_type, a.eps, a.rule, kHere);
}

void finalize_checks() {
  expect_ok("global", [] {
    const auto plan = finalize_plan(FinalizeArgs{});
    expect("global plan", plan.mode == ClipMode::kGlobal && plan.num_tensors == 3 && plan.dtype == at::kFloat);
  });
  expect_ok("per tensor, float64, rule 1", [] {
    FinalizeArgs a;
    a.per_tensor = floats({3}, at::kDouble), a.total = floats({}, at::kDouble), a.mode = 1, a.rule = 1;
    const auto plan = finalize_plan(a);
    expect("per-tensor plan", plan.mode == ClipMode::kPerTensor && plan.rule == ClipRule::kRatio &&
                                  plan.dtype == at::kDouble);
  });
  expect_ok("per group", [] {
    FinalizeArgs a;
    a.mode = 2, a.group_index = longs(3), a.num_groups = 2, a.max_norm = floats({}, at::kDouble);
    expect("per-group plan", finalize_plan(a).num_groups == 2);
  });
  expect_error("per_tensor int", [] { FinalizeArgs a; a.per_tensor = longs(3); finalize_plan(a); },
               "per_tensor must be float32 or float64");
  expect_error("per_tensor empty", [] { FinalizeArgs a; a.per_tensor = floats({0}); finalize_plan(a); },
               "at least one norm");
  expect_error("total dtype", [] { FinalizeArgs a; a.total = floats({}, at::kDouble); finalize_plan(a); },
               "total must be a one-element");
  expect_error("max_norm int", [] { FinalizeArgs a; a.max_norm = longs(1); finalize_plan(a); },
               "max_norm must be float32 or float64");
  expect_error("max_norm device", [] { FinalizeArgs a; a.max_norm = on_meta({}, at::kFloat); finalize_plan(a); },
               "max_norm must be a CPU");
  expect_error("mode 3", [] { FinalizeArgs a; a.mode = 3; finalize_plan(a); }, "mode must be 0");
  expect_error("rule 2", [] { FinalizeArgs a; a.rule = 2; finalize_plan(a); }, "rule must be 0");
  expect_error("eps NaN", [] { FinalizeArgs a; a.eps = std::nan(""); finalize_plan(a); }, "eps must be finite");
  expect_error("eps < 0", [] { FinalizeArgs a; a.eps = -1.0; finalize_plan(a); }, "eps must be finite");
  expect_error("norm_type 0", [] { FinalizeArgs a; a.norm_type = 0.0; finalize_plan(a); }, "norm_type must be > 0");
  expect_error("group mode without index", [] { FinalizeArgs a; a.mode = 2, a.num_groups = 2; finalize_plan(a); },
               "needs group_index");
  expect_error("group index size", [] {
    FinalizeArgs a;
    a.mode = 2, a.group_index = longs(2), a.num_groups = 2;
    finalize_plan(a);
  }, "group_index must be a contiguous 1-D tensor of 3");
  expect_error("group index int32", [] {
    FinalizeArgs a;
    a.mode = 2, a.group_index = longs(3).to(at::kInt), a.num_groups = 2;
    finalize_plan(a);
  }, "group_index must be int64");
  expect_error("no groups", [] { FinalizeArgs a; a.mode = 2, a.group_index = longs(3); finalize_plan(a); },
               "num_groups must be in [1");
  expect_error("index in global mode", [] { FinalizeArgs a; a.group_index = longs(3); finalize_plan(a); },
               "only taken in per-group mode");
  expect_error("groups in per-tensor mode", [] { FinalizeArgs a; a.mode = 1, a.num_groups = 2; finalize_plan(a); },
               "num_groups must be 0");
}

}  // namespace

int main() {
  table_checks();
  norm_checks();
  scale_checks();
  finalize_checks();
  std::printf("host checks: %d passed, %d failed\n", passes, failures);
  return failures == 0 ? 0 : 1;
}
