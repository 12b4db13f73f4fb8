// Host-side test of the CUDA kernels' host logic, built with the host compiler against torch's CPU library
// and run by scripts/cuda_check.py: no GPU needed.
//
// * The argument checks (csrc/cuda/fused_clip_cuda_checks.h) take the expected device type as a parameter,
//   so CPU tensors stand in for CUDA ones here and meta tensors play the wrong device.
// * The kernels' arithmetic (csrc/cuda/fused_clip_cuda_math.cuh: chunk split, norm accumulation, scale,
//   clip coefficient, scaled p-norm) is the same source compiled for the host, compared with torch's CPU
//   ops: bit for bit where the kernels promise torch's rounding (scale, coefficient), to float64 precision
//   elsewhere. The device compiler may contract a * b + c into an FMA and its exp2/log2 may differ from the
//   host's by an ulp, so the tolerances leave room for that; kernels themselves are not run (that needs a GPU).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/equal.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "fused_clip_cuda_checks.h"
#include "fused_clip_cuda_math.cuh"

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
  checks::Problem problem;
  return checks::required(
      checks::check_table(t.ptrs, t.numels, t.codes, t.chunk_begin, t.chunk_tensor, t.chunk, "test", kHere, problem),
      problem);
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

// The ticket counters of the 3-tensor table: int32 [T + 1].
at::Tensor tickets_of(int64_t n = 4) { return at::zeros({n}, at::TensorOptions().dtype(at::kInt)); }

checks::NormPlan norm_plan(double norm_type, const std::optional<at::Tensor>& inv_scale = std::nullopt,
                           std::optional<double> lo = std::nullopt, std::optional<double> hi = std::nullopt,
                           bool fp64 = false, const at::Tensor& tickets = tickets_of(), int64_t num_filled = 3) {
  TableArgs t;
  checks::Problem problem;
  return checks::required(checks::check_norm_pass(t.ptrs, t.numels, t.codes, t.chunk_begin, t.chunk_tensor, t.chunk,
                                                  fp64, tickets, num_filled, inv_scale, norm_type, lo, hi, problem,
                                                  kHere),
                          problem);
}

checks::NormPlan clip_plan(double max_norm, double eps = 1e-6, int64_t rule = 0) {
  TableArgs t;
  checks::Problem problem;
  return checks::required(
      checks::check_clip_norm_pass(t.ptrs, t.numels, t.codes, t.chunk_begin, t.chunk_tensor, t.chunk, false,
                                   tickets_of(), 3, std::nullopt, 2.0, std::nullopt, std::nullopt, max_norm, eps, rule,
                                   problem, kHere),
      problem);
}

// A failed check throws nothing: it returns no plan and says why in the Problem, which the Python entries turn
// into a TypeError (wrong kind of tensor) or ValueError (wrong device, size or value).
void problem_checks() {
  TableArgs t;
  t.codes = floats({3});
  checks::Problem problem;
  bool threw = false;
  std::optional<checks::TableInfo> info;
  try {
    info = checks::check_table(t.ptrs, t.numels, t.codes, t.chunk_begin, t.chunk_tensor, t.chunk, "test", kHere,
                               problem);
  } catch (...) {
    threw = true;
  }
  expect("a failed check does not throw", !threw && !info.has_value());
  expect("a wrong dtype is a type error", problem.type_error && problem.message.find("codes must be int64") !=
                                                                    std::string::npos);
  checks::Problem device_problem;
  t = TableArgs{};
  t.numels = on_meta({3}, at::kLong);
  expect("a wrong device is a value error",
         !checks::check_table(t.ptrs, t.numels, t.codes, t.chunk_begin, t.chunk_tensor, t.chunk, "test", kHere,
                              device_problem) &&
             !device_problem.type_error && device_problem.message.find("numels must be a CPU") != std::string::npos);
  checks::Problem sparse_problem;
  TableArgs sparse;
  sparse.ptrs = at::empty({3}, at::TensorOptions().dtype(at::kLong).layout(at::kSparse));
  expect("a sparse section is refused before its strides are read",
         !checks::check_table(sparse.ptrs, sparse.numels, sparse.codes, sparse.chunk_begin, sparse.chunk_tensor,
                              sparse.chunk, "test", kHere, sparse_problem) &&
             sparse_problem.type_error);
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
  // the ticket counters and the count of tensors that draw the launch's ticket
  const auto nil = std::nullopt;
  expect_ok("one tensor with a chunk", [&] { norm_plan(2.0, nil, nil, nil, false, tickets_of(), 1); });
  expect_error("tickets int64", [&] { norm_plan(2.0, nil, nil, nil, false, longs(4)); }, "tickets must be int32");
  expect_error("tickets size", [&] { norm_plan(2.0, nil, nil, nil, false, tickets_of(3)); },
               "tickets must be a contiguous 1-D tensor of 4 counters");
  expect_error("tickets device", [&] { norm_plan(2.0, nil, nil, nil, false, on_meta({4}, at::kInt)); },
               "tickets must be a CPU");
  expect_error("num_filled 0 with chunks", [&] { norm_plan(2.0, nil, nil, nil, false, tickets_of(), 0); },
               "num_filled (the tensors that own a chunk) must be in [1, 3]");
  expect_error("num_filled above T", [&] { norm_plan(2.0, nil, nil, nil, false, tickets_of(), 4); },
               "must be in [1, 3]");
  // a clip's own arguments
  expect_ok("clip arguments", [&] {
    clip_plan(1.0);
    clip_plan(inf, 0.0, 1);
    clip_plan(0.0);
  });
  expect_error("max_norm negative", [] { clip_plan(-1.0); }, "max_norm must be >= 0");
  expect_error("max_norm NaN", [] { clip_plan(std::nan("")); }, "max_norm must be >= 0");
  expect_error("eps inf", [&] { clip_plan(1.0, inf); }, "eps must be finite");
  expect_error("rule 2", [] { clip_plan(1.0, 1e-6, 2); }, "rule must be 0");
}

checks::ScalePlan scale_plan(const at::Tensor& coef, const std::optional<at::Tensor>& found_inf = std::nullopt,
                             std::optional<double> lo = std::nullopt, std::optional<double> hi = std::nullopt) {
  TableArgs t;
  checks::Problem problem;
  return checks::required(checks::check_scale_pass(t.ptrs, t.numels, t.codes, t.chunk_begin, t.chunk_tensor, t.chunk,
                                                   coef, std::nullopt, lo, hi, found_inf, problem, kHere),
                          problem);
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
  checks::Problem problem;
  return checks::required(checks::check_clip_finalize(a.per_tensor, a.total, a.max_norm, a.mode, a.group_index,
                                                      a.num_groups, a.norm_type, a.eps, a.rule, problem, kHere),
                          problem);
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

// ---------------------------------------------------------------------------------------------------------
// The kernels' arithmetic (fused_clip_cuda_math.cuh)
// ---------------------------------------------------------------------------------------------------------

using namespace ampclip::cuda::math;
constexpr double kInf = std::numeric_limits<double>::infinity();

bool close(double a, double b, double rel) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  if (std::isinf(a) || std::isinf(b)) return a == b;
  return std::fabs(a - b) <= rel * std::fmax(std::fabs(a), std::fabs(b));
}

// Every element of every chunk is covered once: head + vectors + tail == n, the vector body starts 16-byte
// aligned, head and tail are shorter than a vector. All element alignments, many lengths.
template <typename scalar_t>
void split_checks(const char* name) {
  constexpr int64_t per_vec = kVecBytes / sizeof(scalar_t);
  bool ok = true;
  std::vector<int64_t> lengths;
  for (int64_t n = 0; n <= 70; ++n) lengths.push_back(n);
  for (int64_t n : {1000, 4097, 32767, 32768, 32769}) lengths.push_back(n);
  for (uintptr_t misalign = 0; misalign < kVecBytes; misalign += sizeof(scalar_t)) {
    const uintptr_t base = 0x10000 + misalign;
    const auto* x = reinterpret_cast<const scalar_t*>(base);  // never dereferenced
    for (int64_t n : lengths) {
      const Split s = split_chunk(x, n);
      ok &= s.head >= 0 && s.head <= n && s.head < per_vec;
      ok &= s.nvec >= 0 && s.tail == s.head + s.nvec * per_vec && s.tail <= n && n - s.tail < per_vec;
      ok &= misalign != 0 || s.head == 0;
      if (s.nvec > 0) ok &= (base + s.head * sizeof(scalar_t)) % kVecBytes == 0;
      if (s.head < n) ok &= (base + s.head * sizeof(scalar_t)) % kVecBytes == 0;  // nothing scalar left ahead
    }
  }
  expect(name, ok);
}

template <NormKind kKind, typename acc_t = float>
NormAccumulator<acc_t, kKind> accumulate(const std::vector<acc_t>& xs, acc_t inv = 1, acc_t lo = -INFINITY,
                                         acc_t hi = INFINITY, double p = 0.0) {
  NormAccumulator<acc_t, kKind> acc{inv, lo, hi, p};
  for (acc_t x : xs) acc.add(x);
  return acc;
}

// torch's float64 vector norm of the same values: the yardstick.
double torch_norm(const std::vector<double>& xs, double p) {
  auto t = at::empty({static_cast<int64_t>(xs.size())}, at::TensorOptions().dtype(at::kDouble));
  std::copy(xs.begin(), xs.end(), t.mutable_data_ptr<double>());
  return at::linalg_vector_norm(t, p).item<double>();
}

void accumulator_checks() {
  const float big = 1e20f;  // its square overflows float32, not float64
  {
    const auto acc = accumulate<NormKind::kL2>(std::vector<float>(1000, big));
    const double norm = root(NormKind::kL2, acc.partial(), acc.flag(), 1.0);
    expect("1000 x 1e20: L2 norm 3.16e21", close(norm, std::sqrt(1000.0) * double(big), 1e-15));
    expect("1000 x 1e20: not found_inf", !acc.nonfinite && acc.flag() == 0.0);
    expect("1000 x 1e20: float32 result finite", std::isfinite(static_cast<float>(norm)));
  }
  {
    const auto acc = accumulate<NormKind::kL2>({1.0f, big}, big);  // 1e20 * 1e20 overflows: u is inf
    expect("unscaled overflow sets found_inf", acc.nonfinite && acc.flag() == kFlagInf);
  }
  {
    const auto acc = accumulate<NormKind::kL2>({1.0f, NAN, 2.0f});
    expect("NaN: found_inf and a NaN L2 sum", acc.nonfinite && std::isnan(acc.partial()));
    const auto inf_norm = accumulate<NormKind::kInf>({1.0f, NAN, 2.0f});
    expect("NaN: inf-norm max drops it, flag keeps it",
           inf_norm.partial() == 2.0 && inf_norm.flag() == kFlagNan &&
               std::isnan(root(NormKind::kInf, inf_norm.partial(), inf_norm.flag(), 1.0)));
  }
  {
    const auto acc = accumulate<NormKind::kL2>({INFINITY, -3.0f, 0.5f}, 1.0f, -1.0f, 1.0f);
    expect("clamp: inf found, clamped to 1", acc.nonfinite && acc.partial() == 1.0 + 1.0 + 0.25);
    const auto nan = accumulate<NormKind::kL1>({NAN, 5.0f}, 1.0f, -1.0f, 1.0f);
    expect("clamp keeps NaN", std::isnan(nan.partial()));
    const auto inf_norm = accumulate<NormKind::kInf>({-7.0f, 0.5f}, 1.0f, -2.0f, 3.0f);
    expect("clamp then inf-norm", inf_norm.partial() == 2.0 && inf_norm.flag() == 0.0);
  }
  {
    const auto acc = accumulate<NormKind::kL2>({2.0f, -4.0f}, 0.5f);
    expect("unscale: (1, -2) -> 5", acc.partial() == 5.0);
  }
  // Random data: every kind against torch's float64 norm.
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1000.0f);
  std::vector<float> xs(10000);
  for (auto& x : xs) x = normal(rng);
  const std::vector<double> xd(xs.begin(), xs.end());
  const auto l2 = accumulate<NormKind::kL2>(xs);
  const auto l1 = accumulate<NormKind::kL1>(xs);
  const auto li = accumulate<NormKind::kInf>(xs);
  const auto l3 = accumulate<NormKind::kP>(xs, 1.0f, -INFINITY, INFINITY, 3.0);
  const auto lh = accumulate<NormKind::kP>(xs, 1.0f, -INFINITY, INFINITY, 0.5);
  expect("random L2", close(root(NormKind::kL2, l2.partial(), 0, 1), torch_norm(xd, 2.0), 1e-13));
  expect("random L1", close(root(NormKind::kL1, l1.partial(), 0, 1), torch_norm(xd, 1.0), 1e-13));
  expect("random inf", root(NormKind::kInf, li.partial(), 0, 1) == torch_norm(xd, kInf));
  expect("random p=3", close(root(NormKind::kP, l3.partial(), 0, 1.0 / 3.0), torch_norm(xd, 3.0), 1e-12));
  expect("random p=0.5", close(root(NormKind::kP, lh.partial(), 0, 2.0), torch_norm(xd, 0.5), 1e-12));
  // A float16 pack (8 values), widened through c10::Half, as the kernel's vector body does.
  Pack<c10::Half> pack;
  std::vector<double> halves;
  for (int i = 0; i < Pack<c10::Half>::kSize; ++i) {
    pack.v[i] = c10::Half(normal(rng) / 100.0f);
    halves.push_back(static_cast<float>(pack.v[i]));
  }
  NormAccumulator<float, NormKind::kL2> acc{1.0f, -INFINITY, INFINITY, 0.0};
  acc.add_pack(pack);
  expect("float16 pack L2", close(std::sqrt(acc.partial()), torch_norm(halves, 2.0), 1e-15));
  // float64 in an fp64 pass
  const auto d = accumulate<NormKind::kL2, double>({3e200, 4e200}, 1.0);
  expect("float64 values: found_inf uses DBL_MAX", !d.nonfinite);
}

template <typename T>
at::Tensor tensor_of(const std::vector<T>& xs, at::ScalarType dtype) {
  auto t = at::empty({static_cast<int64_t>(xs.size())}, at::TensorOptions().dtype(dtype));
  std::copy(xs.begin(), xs.end(), t.template mutable_data_ptr<T>());
  return t;
}

// The scale of one element against torch's ops on the same values, bit for bit, for every dtype.
template <typename scalar_t, typename acc_t>
void scale_op_checks(const char* name, at::ScalarType dtype) {
  const auto acc_dtype = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 4.0f);
  std::vector<scalar_t> xs(4096);
  for (auto& x : xs) x = static_cast<scalar_t>(normal(rng));
  xs[0] = static_cast<scalar_t>(0.0f), xs[1] = static_cast<scalar_t>(-0.0f);
  const at::Tensor g = tensor_of(xs, dtype);
  const float inv_scale = 1.0f / 1024.0f * 3.0f;  // as GradScaler keeps it: float32
  const double coef = 0.3712345678901234;         // a float64 coefficient, rounded once to the compute type
  for (const bool clamp : {false, true}) {
    const double lo = clamp ? -0.0021 : -kInf;
    const double hi = clamp ? 0.00337 : kInf;
    const ScaleOp<scalar_t, acc_t> op{static_cast<acc_t>(inv_scale), static_cast<acc_t>(lo),
                                      static_cast<acc_t>(hi), static_cast<acc_t>(coef)};
    std::vector<scalar_t> out(xs.size());
    for (size_t i = 0; i < xs.size(); ++i) out[i] = op(xs[i]);
    // The reference's scale_pass: u = g.to(acc) * inv_scale.to(acc); u.clamp(lo, hi); u * coef.to(acc).
    auto u = g.to(acc_dtype).mul(at::scalar_tensor(inv_scale, at::kFloat).to(acc_dtype));
    if (clamp) u = u.clamp(lo, hi);
    u = u.mul(at::scalar_tensor(coef, at::kDouble).to(acc_dtype));
    const std::string what = std::string(name) + (clamp ? " with clamp" : " without clamp");
    expect(what.c_str(), at::equal(tensor_of(out, dtype), u.to(dtype)));
  }
  const ScaleOp<scalar_t, acc_t> unit{acc_t(1), static_cast<acc_t>(-kInf), static_cast<acc_t>(kInf), acc_t(1)};
  const scalar_t inf = static_cast<scalar_t>(INFINITY);
  const scalar_t nan = static_cast<scalar_t>(NAN);
  expect((std::string(name) + ": coefficient 1 is the identity, inf and NaN pass").c_str(),
         static_cast<double>(unit(inf)) == kInf && std::isnan(static_cast<double>(unit(nan))) &&
             at::equal(tensor_of(std::vector<scalar_t>{unit(xs[2]), unit(xs[3])}, dtype),
                       tensor_of(std::vector<scalar_t>{xs[2], xs[3]}, dtype)));
}

// rule 0 against torch's own expression, (norm + eps).reciprocal() * max_norm, clamp_max(1), bit for bit.
template <typename T>
void coefficient_checks(const char* name, at::ScalarType dtype) {
  std::vector<T> norms = {T(0), T(1e-9), T(1e-6), T(0.25), T(0.9999999), T(1), T(1.0000001), T(3), T(1e10),
                          std::numeric_limits<T>::max(), T(INFINITY), T(NAN)};
  std::mt19937 rng(3);
  std::lognormal_distribution<double> lognormal(0.0, 3.0);
  for (int i = 0; i < 200; ++i) norms.push_back(static_cast<T>(lognormal(rng)));
  const at::Tensor n = tensor_of(norms, dtype);
  const double eps = 1e-6;
  for (const double max_norm_d : {1.0, 0.3, 5.0, 1e-3}) {
    for (const auto max_dtype : {at::kFloat, at::kDouble}) {
      const at::Tensor max_norm = at::scalar_tensor(max_norm_d, max_dtype);
      const T m = static_cast<T>(max_norm.template item<double>());  // T(max_norm) as the kernel reads it
      std::vector<T> ours(norms.size());
      for (size_t i = 0; i < norms.size(); ++i) ours[i] = clip_coefficient(norms[i], m, T(eps), ClipRule::kTorch);
      const at::Tensor theirs = n.add(eps).reciprocal().mul(max_norm.to(dtype)).clamp_max(1.0);
      const at::Tensor mine = tensor_of(ours, dtype);
      const bool same = at::equal(mine.isnan(), theirs.isnan()) &&
                        at::equal(mine.nan_to_num(0.0), theirs.nan_to_num(0.0));
      expect(name, same);
    }
  }
  expect("rule 1: below max_norm -> 1", clip_coefficient(T(0.5), T(1), T(1e-6), ClipRule::kRatio) == T(1));
  expect("rule 1: above -> max / (n + eps)",
         clip_coefficient(T(4), T(2), T(0), ClipRule::kRatio) == T(0.5));
  expect("rule 1: NaN norm -> NaN", std::isnan(clip_coefficient(T(NAN), T(1), T(1e-6), ClipRule::kRatio)));
  expect("rule 0: NaN norm -> NaN", std::isnan(clip_coefficient(T(NAN), T(1), T(1e-6), ClipRule::kTorch)));
  expect("rule 0: inf norm -> 0", clip_coefficient(T(INFINITY), T(1), T(1e-6), ClipRule::kTorch) == T(0));
}

// The scaled p-norm (group norms, post-clip norms) against torch's float64 norm.
double scaled_norm(const std::vector<double>& xs, double p) {
  const NormKind kind = std::isinf(p) ? NormKind::kInf : p == 2.0 ? NormKind::kL2 : p == 1.0 ? NormKind::kL1
                                                                                             : NormKind::kP;
  const ScaledNorm norm{kind, p, 1.0 / p};
  double m = 0.0;
  bool nan = false;
  for (double x : xs) {
    nan |= std::isnan(x);
    if (!std::isnan(x)) m = std::fmax(m, std::fabs(x));
  }
  double sum = 0.0;
  if (norm.needs_sum(m, nan)) {
    for (double x : xs) sum += norm.term(std::fabs(x), m);
  }
  return norm.finish(m, sum, nan);
}

void scaled_norm_checks() {
  std::mt19937 rng(5);
  std::lognormal_distribution<double> lognormal(0.0, 4.0);
  std::vector<double> xs(3000);
  for (auto& x : xs) x = lognormal(rng);
  for (const double p : {2.0, 1.0, 3.0, 0.5, kInf}) {
    expect("scaled norm vs torch", close(scaled_norm(xs, p), torch_norm(xs, p), 1e-13));
  }
  expect("scaled L2 of 1e300s is finite", close(scaled_norm({1e300, 1e300}, 2.0), std::sqrt(2.0) * 1e300, 1e-15));
  expect("scaled L2 of 1e-300s does not underflow",
         close(scaled_norm({3e-300, 4e-300}, 2.0), 5e-300, 1e-15));
  expect("scaled norm of zeros", scaled_norm({0.0, 0.0}, 2.0) == 0.0);
  expect("scaled norm with inf", scaled_norm({1.0, kInf}, 2.0) == kInf);
  expect("scaled norm with NaN", std::isnan(scaled_norm({1.0, NAN, kInf}, 2.0)));
  expect("scaled inf-norm", scaled_norm({1.0, 7.0, 3.0}, kInf) == 7.0);
}

void math_checks() {
  split_checks<c10::Half>("split: float16");
  split_checks<c10::BFloat16>("split: bfloat16");
  split_checks<float>("split: float32");
  split_checks<double>("split: float64");
  accumulator_checks();
  scale_op_checks<c10::Half, float>("scale float16", at::kHalf);
  scale_op_checks<c10::BFloat16, float>("scale bfloat16", at::kBFloat16);
  scale_op_checks<float, float>("scale float32", at::kFloat);
  scale_op_checks<double, double>("scale float64", at::kDouble);
  coefficient_checks<float>("rule 0 float32 == torch", at::kFloat);
  coefficient_checks<double>("rule 0 float64 == torch", at::kDouble);
  scaled_norm_checks();
  expect("combine", combine(NormKind::kInf, 2.0, 3.0) == 3.0 && combine(NormKind::kL2, 2.0, 3.0) == 5.0);
}

}  // namespace

int main() {
  table_checks();
  problem_checks();
  norm_checks();
  scale_checks();
  finalize_checks();
  math_checks();
  std::printf("host checks: %d passed, %d failed\n", passes, failures);
  return failures == 0 ? 0 : 1;
}
