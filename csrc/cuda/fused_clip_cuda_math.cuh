// The arithmetic of the CUDA kernels (fused_clip_cuda.cu), apart from their memory access and thread
// cooperation: how a chunk splits for 16-byte accesses, the per-element norm accumulation with its exact
// inf/NaN test and value clamp, the scale of one element, the clip coefficient, the scaled p-norm and the
// norm roots.
//
// Everything here is __host__ __device__ under nvcc and plain inline C++ otherwise, so the very code the
// kernels run is also compiled by the host compiler and tested on the CPU (scripts/cuda_host_checks.cpp).
// No CUDA types or intrinsics: loads, stores and reductions stay in the .cu file.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "fused_clip_cuda_checks.h"  // NormKind, ClipRule

#if defined(__CUDACC__)
#define AMPCLIP_HD __host__ __device__ __forceinline__
#else
#define AMPCLIP_HD inline
#endif

namespace ampclip::cuda::math {

constexpr int kVecBytes = 16;  // one ld.global.v4 / st.global.v4: 8 halves, 8 bfloat16, 4 floats or 2 doubles

// Dtype codes of the table (ampclip/backends/tensor_table.py: DTYPE_CODES).
constexpr int64_t kCodeHalf = 0;
constexpr int64_t kCodeBFloat16 = 1;
constexpr int64_t kCodeFloat = 2;
constexpr int64_t kCodeDouble = 3;
// A bit the table adds to a tensor's code when its data and chunk starts are 16-byte aligned (tensor_table.py:
// ALIGNED), for the Triton kernels, which cannot tell at run time. These kernels split every chunk from its
// address and clear the bit before they look at the dtype code.
constexpr int64_t kCodeAligned = 4;

// Chunk and tensor flags, kept as doubles next to the partials: the max over a range is the range's flag.
constexpr double kFlagInf = 1.0;  // some unscaled value is inf or NaN (found_inf)
constexpr double kFlagNan = 2.0;  // some value is NaN (tracked by the inf-norm, whose max drops NaN)

// How a chunk of n elements at x splits for 16-byte accesses: `head` scalar elements up to the first 16-byte
// boundary (a chunk need not start aligned: a view with a storage offset, an odd chunk size; none when
// (addr & 15) == 0), `nvec` 16-byte vectors, then a scalar tail from element `tail`. Assumes element
// alignment, which every torch tensor has.
struct Split {
  int64_t head;
  int64_t nvec;
  int64_t tail;
};

template <typename scalar_t>
AMPCLIP_HD Split split_chunk(const scalar_t* x, int64_t n) {
  constexpr int64_t kPerVec = kVecBytes / sizeof(scalar_t);
  const auto misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(x) & (kVecBytes - 1));
  const int64_t to_boundary = ((kVecBytes - misalign) & (kVecBytes - 1)) / static_cast<int64_t>(sizeof(scalar_t));
  const int64_t head = n < to_boundary ? n : to_boundary;
  const int64_t nvec = (n - head) / kPerVec;
  return {head, nvec, head + nvec * kPerVec};
}

// The elements of one 16-byte vector, in registers.
template <typename scalar_t>
struct Pack {
  static constexpr int kSize = kVecBytes / sizeof(scalar_t);
  scalar_t v[kSize];
};

// Largest finite value of the compute type: |u| <= max is false exactly for inf and NaN.
template <typename acc_t>
AMPCLIP_HD acc_t max_finite() {
  if constexpr (std::is_same_v<acc_t, double>) {
    return DBL_MAX;
  } else {
    return FLT_MAX;
  }
}

AMPCLIP_HD float abs_of(float x) { return fabsf(x); }
AMPCLIP_HD double abs_of(double x) { return fabs(x); }
AMPCLIP_HD float max_of(float a, float b) { return fmaxf(a, b); }  // the non-NaN operand if one is NaN
AMPCLIP_HD double max_of(double a, double b) { return fmax(a, b); }

// |v|^p for a general p, as 2^(p log2 a) in double: 0 -> 0, inf -> inf, NaN -> NaN with no special case.
// Not pow(): CUDA's double pow is an out-of-line call whose register saves show up as spills (16 bytes on
// sm_80) inside the chunk loop. Rounding p log2 a costs about |p log2 a| x 1.1e-16 relative: at most ~1e-13
// for float inputs (|log2 a| <= 149) and p <= 6, far below a float32 norm's precision.
AMPCLIP_HD double pow_p(double a, double p) { return exp2(p * log2(a)); }

// An element in the compute type: float for float16/bfloat16/float32 (exact), double for float64 or in an
// fp64 pass. Half and BFloat16 convert through float (exact), with c10's conversions.
template <typename acc_t, typename scalar_t>
AMPCLIP_HD acc_t widen(scalar_t x) {
  if constexpr (std::is_same_v<scalar_t, double> || std::is_same_v<scalar_t, float>) {
    return static_cast<acc_t>(x);
  } else {
    return static_cast<acc_t>(static_cast<float>(x));
  }
}

// One thread's running partial of a chunk. Sums are kept in double: the square of any float32 is exact in
// double (24-bit mantissas give a 48-bit product) and cannot overflow (FLT_MAX^2 = 1.2e77), so e.g. 1000
// float32 values of 1e20 give their L2 norm 3.16e21 instead of inf; only the additions round. The inf-norm
// keeps its max in the compute type (a max is exact) and NaN in a flag, as fmax drops NaN.
template <typename acc_t, NormKind kKind>
struct NormAccumulator {
  acc_t inv;  // inv_scale in the compute type (1 without unscale: x * 1 == x exactly)
  acc_t lo;   // value clamp bounds (-inf / +inf without a clamp: no effect)
  acc_t hi;
  double p;   // kP only
  double sum = 0.0;
  acc_t max = 0;
  bool nonfinite = false;
  bool nan = false;

  AMPCLIP_HD void add(acc_t x) {
    const acc_t u = x * inv;
    nonfinite |= !(abs_of(u) <= max_finite<acc_t>());  // exact, per element: an overflowing square never sets it
    acc_t v = u < lo ? lo : u;  // compare and select keeps a NaN (fmin / fmax would drop it)
    v = v > hi ? hi : v;
    if constexpr (kKind == NormKind::kInf) {
      max = max_of(max, abs_of(v));
      nan |= v != v;
    } else if constexpr (kKind == NormKind::kL2) {
      const double d = static_cast<double>(v);
      sum = fma(d, d, sum);
    } else if constexpr (kKind == NormKind::kL1) {
      sum += fabs(static_cast<double>(v));
    } else {
      sum += pow_p(fabs(static_cast<double>(v)), p);
    }
  }

  template <typename scalar_t>
  AMPCLIP_HD void add_pack(const Pack<scalar_t>& pack) {
#if defined(__CUDA_ARCH__)  // device pass only: the host compiler does not know the pragma
#pragma unroll
#endif
    for (int i = 0; i < Pack<scalar_t>::kSize; ++i) add(widen<acc_t>(pack.v[i]));
  }

  // Sum of |v|^p (or |v|^2, |v|), or max |v| for the inf-norm.
  AMPCLIP_HD double partial() const { return kKind == NormKind::kInf ? static_cast<double>(max) : sum; }
  // 0, kFlagInf or kFlagNan.
  AMPCLIP_HD double flag() const { return nan ? kFlagNan : nonfinite ? kFlagInf : 0.0; }
};

// How partials combine: a max for the inf-norm (partials are NaN-free), a sum otherwise.
AMPCLIP_HD double combine(NormKind kind, double a, double b) { return kind == NormKind::kInf ? fmax(a, b) : a + b; }

// The norm from its accumulator: sqrt, identity, max (NaN restored from the flag) or acc^(1/p).
AMPCLIP_HD double root(NormKind kind, double acc, double flag, double inv_p) {
  switch (kind) {
    case NormKind::kL2: return sqrt(acc);
    case NormKind::kL1: return acc;
    case NormKind::kInf: return flag >= kFlagNan ? static_cast<double>(NAN) : acc;
    default: return pow(acc, inv_p);
  }
}

// g <- clamp(g * inv, lo, hi) * coef in the compute type, rounded once on the store (c10's conversions:
// round to nearest even). Compare and select keeps a NaN through the clamp, as torch.clamp does.
template <typename scalar_t, typename acc_t>
struct ScaleOp {
  acc_t inv;
  acc_t lo;
  acc_t hi;
  acc_t coef;

  AMPCLIP_HD scalar_t operator()(scalar_t x) const {
    acc_t u = widen<acc_t>(x) * inv;
    u = u < lo ? lo : u;
    u = u > hi ? hi : u;
    return static_cast<scalar_t>(u * coef);
  }
};

// The clip coefficient in the norms' dtype T, rounded step by step as torch rounds it.
// rule 0 (torch.nn.utils.clip_grad_norm_): (n + eps).reciprocal() * max_norm, then clamp(max=1), which keeps
// a NaN. rule 1: max_norm / max(n + eps, max_norm), NaN kept the same way. IEEE division (no fast math).
template <typename T>
AMPCLIP_HD T clip_coefficient(T n, T max_norm, T eps, ClipRule rule) {
  if (rule == ClipRule::kTorch) {
    const T c = T(1) / (n + eps) * max_norm;
    return c > T(1) ? T(1) : c;
  }
  const T d = n + eps;  // max_norm / max(d, max_norm): 1 when d <= max_norm, also for an infinite max_norm
  return (d > max_norm || d != d || max_norm != max_norm) ? max_norm / d : T(1);
}

// A p-norm of non-negative values computed as m * (sum (x / m)^p)^(1/p) with m their max, in double, so that
// no power overflows or underflows (the max of float64 norms squared would overflow double).
struct ScaledNorm {
  NormKind kind;
  double p;
  double inv_p;

  AMPCLIP_HD double term(double x, double m) const {
    const double y = x / m;
    switch (kind) {
      case NormKind::kL2: return y * y;
      case NormKind::kL1: return y;
      default: return pow(y, p);
    }
  }
  // Whether the sum of terms is needed: not for the inf-norm, nor when m is 0, inf or the values had a NaN.
  AMPCLIP_HD bool needs_sum(double m, bool nan) const {
    return !nan && kind != NormKind::kInf && m > 0.0 && m <= DBL_MAX;
  }
  AMPCLIP_HD double finish(double m, double sum, bool nan) const {
    if (nan) return NAN;
    if (!needs_sum(m, nan)) return m;
    switch (kind) {
      case NormKind::kL2: return m * sqrt(sum);
      case NormKind::kL1: return m * sum;
      default: return m * pow(sum, inv_p);
    }
  }
};

}  // namespace ampclip::cuda::math
