// CPU kernels of the two gradient passes of the op contract (see ampclip/ops.py).
//
// norm_pass: one read of every gradient. Each element is unscaled on the fly and accumulated in float SIMD
// lanes; every kBlock elements the lanes are folded into a double partial. The work is cut into fixed
// chunks of kChunk elements, each chunk writes its own partial, and the partials are reduced in a fixed
// order afterwards, so the norm is bitwise identical whatever the thread count. A chunk whose float lanes
// overflowed although every element is finite (squares past 3.4e38: |g| > 1.8e19), or whose squares may have
// underflowed (a tiny sum from elements that are not all zero: |g| < 1e-19), is measured again with double
// accumulation, so the norm is right whenever a double holds its sum of squares; a norm past float32's range
// comes back as inf, as torch returns it.
//
// scale_pass: one read and one write, g <- clamp(g * inv_scale, lo, hi) * coef. On the CPU the values of
// coef, inv_scale and found_inf cost nothing to read, so tensors that would be multiplied by exactly 1 are
// not touched at all.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>

#include "fused_clip_cpu.h"

#include <algorithm>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif
#include <cmath>
#include <cstring>
#include <type_traits>
#include <limits>
#include <vector>

namespace ampclip {
namespace {

// Elements per work item. Fixed, so that the partials (and the result) do not depend on threads.
constexpr int64_t kChunk = 1 << 16;
// Elements summed in float lanes before they are flushed into a double: float SIMD speed, and at most
// kBlock / 16 = 128 float additions per lane before the double takes over. Larger blocks amortise the
// flush (a serial chain of double additions) better; smaller ones round less.
constexpr int64_t kBlock = 2048;

enum class NormKind { kL1, kL2, kInf, kP };

// x86-64 with GCC or clang: kernels written with AVX2 and F16C intrinsics, chosen at run time.
#if defined(__x86_64__) && defined(__GNUC__)
#define AMPCLIP_X86 1
bool has_avx2() {
  static const bool supported = __builtin_cpu_supports("avx2");
  return supported;
}
#endif

struct WorkItem {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// Four float lanes: SSE2 on any x86-64, NEON on arm64. Four independent vectors per step hide the add
// latency; without them the reduction is latency-bound at about a quarter of memory bandwidth.
typedef float vfloat4 __attribute__((vector_size(16)));
typedef int32_t vint4 __attribute__((vector_size(16)));
constexpr int kVecs = 4;
constexpr int kStep = 4 * kVecs;

inline vfloat4 load4(const float* p) {
  vfloat4 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// bfloat16 is the top half of a float: four of them widen with a shift each, in registers.
typedef uint32_t vuint4 __attribute__((vector_size(16)));
inline vfloat4 load4(const c10::BFloat16* p) {
  uint16_t b[4];
  std::memcpy(b, p, sizeof(b));
  const vuint4 wide = {uint32_t{b[0]} << 16, uint32_t{b[1]} << 16, uint32_t{b[2]} << 16, uint32_t{b[3]} << 16};
  return reinterpret_cast<vfloat4>(wide);
}

inline vfloat4 abs4(vfloat4 v) {
  return reinterpret_cast<vfloat4>(reinterpret_cast<vint4>(v) & 0x7fffffff);
}

inline vfloat4 select4(vint4 mask, vfloat4 a, vfloat4 b) {  // mask ? a : b, lane by lane
  return reinterpret_cast<vfloat4>((mask & reinterpret_cast<vint4>(a)) | (~mask & reinterpret_cast<vint4>(b)));
}

template <typename T>
inline T nan_max(T a, T b) {  // max that propagates NaN, like torch's inf-norm
  return (b > a || b != b) ? b : a;
}

template <NormKind kind, typename T>
inline T accumulate(T acc, T u, T p) {
  if constexpr (kind == NormKind::kL2) return acc + u * u;
  if constexpr (kind == NormKind::kL1) return acc + std::abs(u);
  if constexpr (kind == NormKind::kInf) return nan_max(acc, std::abs(u));
  return acc + std::pow(std::abs(u), p);
}

template <NormKind kind>
inline vfloat4 accumulate4(vfloat4 acc, vfloat4 u) {
  if constexpr (kind == NormKind::kL2) return acc + u * u;
  if constexpr (kind == NormKind::kL1) return acc + abs4(u);
  const vfloat4 a = abs4(u);  // kInf: NaN-propagating max
  return select4((a > acc) | (a != a), a, acc);
}

template <NormKind kind>
inline vfloat4 combine4(vfloat4 a, vfloat4 b) {
  if constexpr (kind == NormKind::kInf) return select4((b > a) | (b != b), b, a);
  return a + b;
}

template <NormKind kind>
inline double fold(double a, double b) {
  return kind == NormKind::kInf ? nan_max(a, b) : a + b;
}

// One block (at most kBlock floats) of x * inv, reduced in float lanes, folded in a fixed order into a double.
template <NormKind kind, bool kUnscale, typename T>
double reduce_block(const T* x, int64_t n, float inv, float p) {
  float tail = 0.0f;
  int64_t i = 0;
  double out = 0.0;
  if constexpr (kind == NormKind::kP) {  // pow() does not vectorise; 4 scalar lanes keep the fixed order
    float lane[4] = {};
    for (; i + 4 <= n; i += 4) {
      for (int j = 0; j < 4; ++j) {
        const float u = static_cast<float>(x[i + j]);
        lane[j] = accumulate<kind>(lane[j], kUnscale ? u * inv : u, p);
      }
    }
    for (int j = 0; j < 4; ++j) out += lane[j];
  } else {
    const vfloat4 vinv = {inv, inv, inv, inv};
    vfloat4 acc[kVecs] = {};
    for (; i + kStep <= n; i += kStep) {
      for (int j = 0; j < kVecs; ++j) {
        vfloat4 u = load4(x + i + 4 * j);
        if constexpr (kUnscale) u *= vinv;
        acc[j] = accumulate4<kind>(acc[j], u);
      }
    }
    // Pairwise in float, then four lanes into the double: a short fixed-order chain.
    const vfloat4 folded = combine4<kind>(combine4<kind>(acc[0], acc[1]), combine4<kind>(acc[2], acc[3]));
    for (int k = 0; k < 4; ++k) out = fold<kind>(out, folded[k]);
  }
  for (; i < n; ++i) {
    const float u = static_cast<float>(x[i]);
    tail = accumulate<kind>(tail, kUnscale ? u * inv : u, p);
  }
  return fold<kind>(out, tail);
}

// Reduces n floats like reduce_block, reading four interleaved streams (the quarters of the range) at once:
// more reads in flight than one stream keeps the memory bus busier (measured on this 2-core Xeon: one stream
// reads 9.4 GB/s per core, four streams 11.9 GB/s, torch's own sum 12.4 GB/s).
template <NormKind kind, bool kUnscale, typename T>
double reduce_streams(const T* x, int64_t n, float inv, float p) {
  if constexpr (kind == NormKind::kP) {
    double out = 0.0;
    for (int64_t b = 0; b < n; b += kBlock) out += reduce_block<kind, kUnscale, T>(x + b, std::min(kBlock, n - b), inv, p);
    return out;
  } else {
    constexpr int kStreams = 4;
    constexpr int64_t kSub = kBlock / kStreams;  // elements per stream between two flushes
    const int64_t per_stream = n / (kStreams * kSub) * kSub;
    const vfloat4 vinv = {inv, inv, inv, inv};
    double out = 0.0;
    for (int64_t b = 0; b < per_stream; b += kSub) {
      vfloat4 acc[kStreams][2] = {};
      for (int64_t i = b; i < b + kSub; i += 8) {
        for (int s = 0; s < kStreams; ++s) {
          for (int j = 0; j < 2; ++j) {
            vfloat4 u = load4(x + s * per_stream + i + 4 * j);
            if constexpr (kUnscale) u *= vinv;
            acc[s][j] = accumulate4<kind>(acc[s][j], u);
          }
        }
      }
      const vfloat4 folded = combine4<kind>(
          combine4<kind>(combine4<kind>(acc[0][0], acc[0][1]), combine4<kind>(acc[1][0], acc[1][1])),
          combine4<kind>(combine4<kind>(acc[2][0], acc[2][1]), combine4<kind>(acc[3][0], acc[3][1])));
      for (int k = 0; k < 4; ++k) out = fold<kind>(out, folded[k]);
    }
    for (int64_t b = kStreams * per_stream; b < n; b += kBlock) {
      out = fold<kind>(out, reduce_block<kind, kUnscale, T>(x + b, std::min(kBlock, n - b), inv, p));
    }
    return out;
  }
}

// float16 <-> float32 in hardware (F16C, on x86-64 CPUs since 2012), eight values an instruction. c10::Half's
// portable conversion costs a dozen scalar instructions a value: a GPT-2-124M fp16 scale pass took 378 ms
// with it, torch's mul_ 21 ms. Chosen at run time, as the CPUs the build targets need not have F16C.
// F16C rounds to nearest even like c10::Half, and keeps a NaN a NaN.
#ifdef AMPCLIP_X86
bool has_f16c() {
  static const bool supported = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
  return supported;
}

__attribute__((target("avx,f16c"))) void widen_f16c(const uint16_t* x, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i))));
  }
  for (; i < n; ++i) out[i] = _cvtsh_ss(x[i]);
}

// x <- x * inv * coef, computed in float and rounded once to float16.
__attribute__((target("avx,f16c"))) void scale_f16c(uint16_t* x, int64_t n, float inv, float coef) {
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m256 vcoef = _mm256_set1_ps(coef);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    auto* p = reinterpret_cast<__m128i*>(x + i);
    const __m256 u = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(p)), vinv), vcoef);
    _mm_storeu_si128(p, _mm256_cvtps_ph(u, _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < n; ++i) x[i] = _cvtss_sh(_cvtsh_ss(x[i]) * inv * coef, _MM_FROUND_TO_NEAREST_INT);
}
#endif

void widen(const c10::Half* x, int64_t n, float* out) {
#ifdef AMPCLIP_X86
  if (has_f16c()) return widen_f16c(reinterpret_cast<const uint16_t*>(x), n, out);
#endif
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(x[i]);
}

// float -> bfloat16, round to nearest even, NaN to the quiet NaN 0x7fc0: c10's rounding, bit for bit, on raw
// bits so that the loop vectorises.
inline uint16_t narrow_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return f != f ? uint16_t{0x7fc0} : static_cast<uint16_t>(rounded);
}

// Reduces a chunk to one double partial: the sum of |x * inv|^p, or max |x * inv|. float and bfloat16
// gradients are read in place (bfloat16 widened in registers); float16 is widened a block at a time into a
// buffer that stays in L1.
template <typename scalar_t, NormKind kind, bool kUnscale>
double reduce_chunk(const scalar_t* x, int64_t n, double inv, double p) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    double acc = 0.0;
    for (int64_t i = 0; i < n; ++i) acc = accumulate<kind>(acc, kUnscale ? x[i] * inv : x[i], p);
    return acc;
  } else {
    const auto inv_f = static_cast<float>(inv);
    const auto p_f = static_cast<float>(p);
    if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>) {
      return reduce_streams<kind, kUnscale, scalar_t>(x, n, inv_f, p_f);
    } else {
      double partial = 0.0;
      float buffer[kBlock];
      for (int64_t block = 0; block < n; block += kBlock) {
        const int64_t m = std::min(n - block, kBlock);
        widen(x + block, m, buffer);
        partial = fold<kind>(partial, reduce_block<kind, kUnscale, float>(buffer, m, inv_f, p_f));
      }
      return partial;
    }
  }
}

// What happens to each element before it is measured: u = x * inv (when `unscale`), then the optional
// value clamp to [lo, hi]. The inf/NaN check always sees u before the clamp.
struct Transform {
  bool unscale = false;
  double inv = 1.0;
  bool clamp = false;
  double lo = 0.0;
  double hi = 0.0;
};

template <typename T>
inline T clamp_to(T u, T lo, T hi) {  // compares and selects: a NaN passes through, as in torch.clamp
  u = u < lo ? lo : u;
  return u > hi ? hi : u;
}

// Exact inf/NaN test of x * inv, run only when a chunk's partial is not finite: that is the case whenever an
// element is inf or NaN, so the fast loop needs no probe, and a partial that merely overflowed (squares of
// finite values past 3.4e38) is not reported as inf/NaN.
template <typename scalar_t>
bool has_nonfinite(const scalar_t* x, int64_t n, double inv) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const auto inv_a = static_cast<acc_t>(inv);
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(static_cast<acc_t>(x[i]) * inv_a)) return true;
  }
  return false;
}

// A block of x as floats in `out` (float16 with F16C where the CPU has it, bfloat16 by a shift).
template <typename scalar_t>
void widen_block(const scalar_t* x, int64_t n, float* out) {
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    widen(x, n, out);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(x[i]);
  }
}

// The clamped norm: each block is widened, unscaled and clamped into a buffer that stays in L1, then reduced
// like an unclamped block. `nonfinite` is set from the values before the clamp (inf * 0 is NaN, so the
// probe sum is NaN exactly when some u is inf or NaN), since after it an inf would look finite.
template <typename scalar_t, NormKind kind>
double reduce_clamped(const scalar_t* x, int64_t n, const Transform& tr, double p, bool& nonfinite) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const auto inv = static_cast<acc_t>(tr.inv);
  const auto lo = static_cast<acc_t>(tr.lo);
  const auto hi = static_cast<acc_t>(tr.hi);
  acc_t probe = 0;
  double partial = 0.0;
  if constexpr (std::is_same_v<scalar_t, double>) {
    for (int64_t i = 0; i < n; ++i) {
      const double u = tr.unscale ? x[i] * inv : x[i];
      probe += u * 0.0;
      partial = accumulate<kind>(partial, clamp_to(u, lo, hi), p);
    }
  } else {
    float buffer[kBlock];
    for (int64_t block = 0; block < n; block += kBlock) {
      const int64_t m = std::min(n - block, kBlock);
      widen_block(x + block, m, buffer);
      for (int64_t i = 0; i < m; ++i) {
        const float u = tr.unscale ? buffer[i] * inv : buffer[i];
        probe += u * 0.0f;
        buffer[i] = clamp_to(u, lo, hi);
      }
      partial = fold<kind>(partial, reduce_block<kind, false, float>(buffer, m, 1.0f, static_cast<float>(p)));
    }
  }
  nonfinite = probe != probe;
  return partial;
}

// The chunk again, every |u|^p summed in double: taken only when the float lanes overflowed although every
// element is finite. Each u is rounded as in the fast loop (float for 16- and 32-bit gradients).
template <typename scalar_t, NormKind kind>
double reduce_wide(const scalar_t* x, int64_t n, const Transform& tr, double p) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const auto inv = static_cast<acc_t>(tr.inv);
  double acc = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    acc_t u = static_cast<acc_t>(x[i]);
    if (tr.unscale) u *= inv;
    if (tr.clamp) u = clamp_to(u, static_cast<acc_t>(tr.lo), static_cast<acc_t>(tr.hi));
    acc = accumulate<kind>(acc, static_cast<double>(u), p);
  }
  return acc;
}

// Whether any of x[0:n] is not zero (either sign): its bits with the sign masked off, OR-ed together.
template <typename scalar_t>
bool any_nonzero(const scalar_t* x, int64_t n) {
  using bits_t = std::conditional_t<sizeof(scalar_t) == 2, uint16_t, std::conditional_t<sizeof(scalar_t) == 4,
                                                                                          uint32_t, uint64_t>>;
  constexpr bits_t kMagnitude = static_cast<bits_t>(~bits_t{0}) >> 1;
  bits_t seen = 0;
  for (int64_t i = 0; i < n; ++i) {
    bits_t b;
    std::memcpy(&b, x + i, sizeof(b));
    seen |= b & kMagnitude;
  }
  return seen != 0;
}

// A chunk's sum of |u|^p below this is measured again in double when the chunk is not all zeros: p-th
// powers below float's smallest normal (1.2e-38) lose their bits in float lanes (the square of |u| < 2.6e-23
// is 0), which at a sum past 2^-64 moves it by at most 2^16 * 2^-126 / 2^-64 = 2^-46 of itself.
constexpr double kTinyPartial = 5.421010862427522e-20;  // 2^-64

template <typename scalar_t, NormKind kind>
double reduce_kind(const scalar_t* x, int64_t n, const Transform& tr, double p, bool& nonfinite) {
  double partial;
  if (tr.clamp) {
    partial = reduce_clamped<scalar_t, kind>(x, n, tr, p, nonfinite);
  } else {
    partial = tr.unscale ? reduce_chunk<scalar_t, kind, true>(x, n, tr.inv, p)
                         : reduce_chunk<scalar_t, kind, false>(x, n, tr.inv, p);
    nonfinite = !std::isfinite(partial) && has_nonfinite(x, n, tr.unscale ? tr.inv : 1.0);
  }
  if (!std::isfinite(partial) && !nonfinite) return reduce_wide<scalar_t, kind>(x, n, tr, p);  // overflowed
  if constexpr ((kind == NormKind::kL2 || kind == NormKind::kP) && !std::is_same_v<scalar_t, double>) {
    if (partial < kTinyPartial && any_nonzero(x, n)) return reduce_wide<scalar_t, kind>(x, n, tr, p);  // underflowed
  }
  return partial;
}

template <typename scalar_t>
double reduce_any(const scalar_t* x, int64_t n, const Transform& tr, NormKind kind, double p, bool& nonfinite) {
  switch (kind) {
    case NormKind::kL2: return reduce_kind<scalar_t, NormKind::kL2>(x, n, tr, p, nonfinite);
    case NormKind::kL1: return reduce_kind<scalar_t, NormKind::kL1>(x, n, tr, p, nonfinite);
    case NormKind::kInf: return reduce_kind<scalar_t, NormKind::kInf>(x, n, tr, p, nonfinite);
    default: return reduce_kind<scalar_t, NormKind::kP>(x, n, tr, p, nonfinite);
  }
}

// x <- x * inv * coef for floats, over four interleaved streams like reduce_streams: more reads in flight
// (one 124M-element pass on this 2-core Xeon: 28.5 ms with one stream, 22.1 ms with four; torch mul_ 21.6 ms).
inline void scale_floats(float* x, int64_t n, float inv, float coef) {
  constexpr int kStreams = 4;
  const int64_t per_stream = n / (kStreams * kStep) * kStep;
  const vfloat4 vinv = {inv, inv, inv, inv};
  const vfloat4 vcoef = {coef, coef, coef, coef};
  for (int64_t i = 0; i < per_stream; i += kStep) {
    for (int s = 0; s < kStreams; ++s) {
      float* p = x + s * per_stream + i;
      for (int j = 0; j < kVecs; ++j) {
        const vfloat4 u = load4(p + 4 * j) * vinv * vcoef;
        std::memcpy(p + 4 * j, &u, sizeof(u));
      }
    }
  }
  for (int64_t i = kStreams * per_stream; i < n; ++i) x[i] = x[i] * inv * coef;
}

// bfloat16 x <- x * inv * coef on raw bits, one value at a time.
void scale_bf16_portable(uint16_t* __restrict bits, int64_t n, float inv, float coef) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t wide = static_cast<uint32_t>(bits[i]) << 16;
    float u;
    std::memcpy(&u, &wide, sizeof(u));
    bits[i] = narrow_bf16(u * inv * coef);
  }
}

#ifdef AMPCLIP_X86
// Eight floats to bfloat16 bits (in the low half of each 32-bit lane): narrow_bf16, 8 at a time.
__attribute__((target("avx2"))) inline __m256i narrow_bf16_avx2(__m256 u) {
  const __m256i b = _mm256_castps_si256(u);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(u, u, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), nan);
}

// bfloat16 x <- x * inv * coef, sixteen values a step with AVX2: the compiler's own vectorisation of the
// portable loop spends most of its time in shuffles (GPT-2-124M: 31 ms against 22 ms with this).
// unpack/packus work within 128-bit lanes, so the order of the sixteen values survives the round trip.
__attribute__((target("avx2"))) void scale_bf16_avx2(uint16_t* bits, int64_t n, float inv, float coef) {
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m256 vcoef = _mm256_set1_ps(coef);
  const __m256i zero = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    auto* p = reinterpret_cast<__m256i*>(bits + i);
    const __m256i raw = _mm256_loadu_si256(p);
    const __m256 lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, raw));
    const __m256 hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, raw));
    const __m256i narrow_lo = narrow_bf16_avx2(_mm256_mul_ps(_mm256_mul_ps(lo, vinv), vcoef));
    const __m256i narrow_hi = narrow_bf16_avx2(_mm256_mul_ps(_mm256_mul_ps(hi, vinv), vcoef));
    _mm256_storeu_si256(p, _mm256_packus_epi32(narrow_lo, narrow_hi));
  }
  scale_bf16_portable(bits + i, n - i, inv, coef);
}
#endif

void scale_bf16(uint16_t* bits, int64_t n, float inv, float coef) {
#ifdef AMPCLIP_X86
  if (has_avx2()) return scale_bf16_avx2(bits, n, inv, coef);
#endif
  scale_bf16_portable(bits, n, inv, coef);
}

// x <- clamp(x * inv, lo, hi) * coef, rounded once. Written as compares and selects so that the float
// loop vectorises; a NaN passes through the clamp, as in torch.clamp.
template <typename scalar_t>
void scale_chunk(scalar_t* x, int64_t n, const Transform& tr, double coef) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const auto inv_a = static_cast<acc_t>(tr.unscale ? tr.inv : 1.0);
  const auto lo = static_cast<acc_t>(tr.lo);
  const auto hi = static_cast<acc_t>(tr.hi);
  const auto coef_a = static_cast<acc_t>(coef);
  if (tr.clamp) {
    for (int64_t i = 0; i < n; ++i) {
      x[i] = static_cast<scalar_t>(clamp_to(static_cast<acc_t>(x[i]) * inv_a, lo, hi) * coef_a);
    }
  } else if constexpr (std::is_same_v<scalar_t, float>) {
    scale_floats(x, n, inv_a, coef_a);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    scale_bf16(reinterpret_cast<uint16_t*>(x), n, inv_a, coef_a);
#ifdef AMPCLIP_X86
  } else if (std::is_same_v<scalar_t, c10::Half> && has_f16c()) {
    scale_f16c(reinterpret_cast<uint16_t*>(x), n, inv_a, coef_a);
#endif
  } else {
    for (int64_t i = 0; i < n; ++i) x[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) * inv_a * coef_a);
  }
}


double finish_norm(double acc, NormKind kind, double p) {
  switch (kind) {
    case NormKind::kL2: return std::sqrt(acc);
    case NormKind::kL1:
    case NormKind::kInf: return acc;
    default: return std::pow(acc, 1.0 / p);
  }
}

NormKind norm_kind(double norm_type) {
  TORCH_CHECK(norm_type > 0.0, "ampclip: norm_type must be > 0 or inf, got ", norm_type);
  return std::isinf(norm_type) ? NormKind::kInf
         : norm_type == 2.0    ? NormKind::kL2
         : norm_type == 1.0    ? NormKind::kL1
                               : NormKind::kP;
}

// Work items of at most kChunk elements, gradient by gradient; `skip` (when given) leaves gradients out.
std::vector<WorkItem> make_work(const std::vector<GradSpan>& spans, const std::vector<uint8_t>* skip) {
  std::vector<WorkItem> items;
  items.reserve(spans.size());
  for (int64_t t = 0; t < static_cast<int64_t>(spans.size()); ++t) {
    if (skip != nullptr && (*skip)[t]) continue;
    const int64_t n = spans[t].numel;
    for (int64_t b = 0; b < n; b += kChunk) items.push_back({t, b, std::min(n, b + kChunk)});
  }
  return items;
}

// Small gradients each sit in their own allocation, so each of their work items starts with a cache miss
// that the loop cannot overlap with the work before it; fetching the item kPrefetchAhead places ahead hides
// it (2000 gradients of 512 floats with cold caches: the norm pass went from about 420 to 350 us).
constexpr int64_t kPrefetchAhead = 8;

template <int kForWrite>
inline void prefetch_ahead(const std::vector<GradSpan>& spans, const std::vector<WorkItem>& items, int64_t i,
                           int64_t hi) {
  if (i + kPrefetchAhead >= hi) return;
  const auto& ahead = items[i + kPrefetchAhead];
  const auto& span = spans[ahead.tensor];
  __builtin_prefetch(static_cast<const char*>(span.data) + ahead.begin * span.itemsize, kForWrite);
}

struct Reduction {
  std::vector<double> per_tensor;  // before finish_norm: sums of |g|^p, or max |g|
  double total = 0.0;
  bool found_inf = false;
};

// The norm pass proper: one read of every gradient, partials per chunk, then a fixed-order reduction of
// chunks into gradients and gradients into the total.
Reduction reduce(const CpuGrads& grads, const Transform& tr, NormKind kind, double p) {
  const auto& spans = grads.spans;
  const auto items = make_work(spans, nullptr);
  std::vector<double> partial(items.size());
  std::vector<uint8_t> chunk_nonfinite(items.size(), 0);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      prefetch_ahead<0>(spans, items, i, hi);
      const auto& item = items[i];
      const auto& span = spans[item.tensor];
      bool nonfinite = false;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, span.dtype, "ampclip_norm_pass_cpu", [&] {
        partial[i] = reduce_any<scalar_t>(static_cast<const scalar_t*>(span.data) + item.begin,
                                          item.end - item.begin, tr, kind, p, nonfinite);
      });
      chunk_nonfinite[i] = nonfinite;
    }
  });
  Reduction out;
  out.per_tensor.assign(spans.size(), 0.0);
  for (size_t i = 0; i < items.size(); ++i) {
    auto& acc = out.per_tensor[items[i].tensor];
    acc = kind == NormKind::kInf ? nan_max(acc, partial[i]) : acc + partial[i];
    out.found_inf |= chunk_nonfinite[i] != 0;
  }
  for (double acc : out.per_tensor) out.total = kind == NormKind::kInf ? nan_max(out.total, acc) : out.total + acc;
  return out;
}

at::TensorOptions norm_options(const CpuGrads& grads) {
  return at::TensorOptions().dtype(grads.any_double ? at::kDouble : at::kFloat);
}

// Gradients that share memory, one after the other in list order: each reads what the ones before it wrote,
// as torch's per-tensor mul_ does (a tensor that is the .grad of two parameters is scaled twice).
void scale_in_order(CpuGrads& grads, const std::vector<double>& coefs, const Transform& tr,
                    const std::vector<uint8_t>& skip) {
  std::vector<const std::tuple<int64_t, at::Tensor, at::Tensor>*> staged(grads.spans.size(), nullptr);
  for (const auto& entry : grads.strided) staged[std::get<0>(entry)] = &entry;
  for (size_t t = 0; t < grads.spans.size(); ++t) {
    if (skip[t]) continue;
    const auto& span = grads.spans[t];
    if (staged[t] != nullptr) std::get<2>(*staged[t]).copy_(std::get<1>(*staged[t]));  // read it again now
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, span.dtype, "ampclip_scale_in_order", [&] {
      scale_chunk<scalar_t>(static_cast<scalar_t*>(span.data), span.numel, tr, coefs[coefs.size() == 1 ? 0 : t]);
    });
    if (staged[t] != nullptr) std::get<1>(*staged[t]).copy_(std::get<2>(*staged[t]));
    if (!span.impl->is_inference()) span.impl->bump_version();
  }
}

// The scale pass proper: g <- clamp(g * inv, lo, hi) * coef, coefs holding one value or one per gradient.
// Multiplying by exactly 1 with no unscale and no clamp changes nothing: those gradients are not read or
// written.
void scale(CpuGrads& grads, const std::vector<double>& coefs, const Transform& tr) {
  const auto& spans = grads.spans;
  const int64_t num_tensors = static_cast<int64_t>(spans.size());
  const auto coef_of = [&](int64_t t) { return coefs[coefs.size() == 1 ? 0 : t]; };
  std::vector<uint8_t> skip(num_tensors);
  bool any_written = false;
  for (int64_t t = 0; t < num_tensors; ++t) {
    skip[t] = !tr.unscale && !tr.clamp && coef_of(t) == 1.0;
    any_written |= !skip[t];
  }
  if (!any_written) return;
  if (grads.overlapping()) return scale_in_order(grads, coefs, tr, skip);
  const auto items = make_work(spans, &skip);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      prefetch_ahead<1>(spans, items, i, hi);
      const auto& item = items[i];
      const auto& span = spans[item.tensor];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, span.dtype, "ampclip_scale_pass_cpu", [&] {
        scale_chunk<scalar_t>(static_cast<scalar_t*>(span.data) + item.begin, item.end - item.begin, tr,
                              coef_of(item.tensor));
      });
    }
  });
  for (int64_t t = 0; t < num_tensors; ++t) {
    // Written through its data pointer: bump the version counter, as torch's in-place mul_ would.
    if (!skip[t] && !spans[t].impl->is_inference()) spans[t].impl->bump_version();
  }
  for (auto& [index, grad, copy] : grads.strided) {
    if (!skip[index]) grad.copy_(copy);
  }
}

// Zeroes every gradient (the found_inf case of scale_pass with zero_if_inf). All-zero bits are +0.0 in
// every float format.
void zero_all(CpuGrads& grads) {
  std::vector<uint8_t> is_strided(grads.spans.size(), 0);
  for (auto& [index, grad, copy] : grads.strided) {
    grad.zero_();
    is_strided[index] = 1;
  }
  for (size_t t = 0; t < grads.spans.size(); ++t) {
    const auto& span = grads.spans[t];
    if (is_strided[t] || span.numel == 0) continue;
    std::memset(span.data, 0, static_cast<size_t>(span.numel) * span.itemsize);
    if (!span.impl->is_inference()) span.impl->bump_version();
  }
}

Transform make_transform(const std::optional<at::Tensor>& inv_scale, const std::optional<Clamp>& clamp) {
  Transform tr;
  if (inv_scale.has_value()) {
    tr.unscale = true;
    tr.inv = read_scalar(*inv_scale, "inv_scale");
  }
  if (clamp.has_value()) {
    TORCH_CHECK_VALUE(clamp->first <= clamp->second, "ampclip: the clamp needs lo <= hi, got [", clamp->first,
                      ", ", clamp->second, "]");
    tr.clamp = true;
    tr.lo = clamp->first;
    tr.hi = clamp->second;
  }
  return tr;
}

}  // namespace

static bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

bool is_kernel_grad(const at::Tensor& g) {
  return !g.is_nested() && g.layout() == at::kStrided && g.device().is_cpu() && is_kernel_dtype(g.scalar_type());
}

void check_kernel_grad(const at::Tensor& g, size_t index, const char* op, bool writable) {
  TORCH_CHECK_TYPE(!g.is_nested() && g.layout() == at::kStrided, op, ": gradient ", index, " is not dense");
  TORCH_CHECK_VALUE(g.device().is_cpu(), op, ": gradient ", index, " is on ", g.device(), ", expected the CPU");
  TORCH_CHECK_TYPE(is_kernel_dtype(g.scalar_type()), op, ": gradient ", index, " has dtype ", g.scalar_type(),
                   "; expected float16, bfloat16, float32 or float64");
  TORCH_CHECK_VALUE(!writable || at::has_internal_overlap(g) != at::MemOverlap::Yes, op, ": gradient ", index,
                    " has elements that share memory (an expanded tensor, stride 0): it cannot be written in "
                    "place; clone it first");
}

at::Tensor scalar_of(double value, const at::TensorOptions& options) {
  auto out = at::empty({}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "ampclip_scalar_of", [&] {
    *out.mutable_data_ptr<scalar_t>() = round_to<scalar_t>(value);
  });
  return out;
}

double read_scalar(const at::Tensor& t, const char* what) {
  TORCH_CHECK_VALUE(t.numel() == 1, what, " must hold exactly one element, got ", t.numel());
  TORCH_CHECK_VALUE(t.device().is_cpu(), what, " must be on the CPU with CPU gradients, got ", t.device());
  return t.item<double>();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_pass_cpu(const CpuGrads& grads,
                                                             const std::optional<at::Tensor>& inv_scale,
                                                             double norm_type, const std::optional<Clamp>& clamp) {
  const NormKind kind = norm_kind(norm_type);
  const auto sums = reduce(grads, make_transform(inv_scale, clamp), kind, norm_type);

  const auto options = norm_options(grads);
  const int64_t num_tensors = static_cast<int64_t>(grads.spans.size());
  auto norms = at::empty({num_tensors}, options);
  AT_DISPATCH_FLOATING_TYPES(norms.scalar_type(), "ampclip_norm_pass_out", [&] {
    auto* out = norms.mutable_data_ptr<scalar_t>();
    for (int64_t t = 0; t < num_tensors; ++t) out[t] = round_to<scalar_t>(finish_norm(sums.per_tensor[t], kind, norm_type));
  });
  auto total_norm = scalar_of(finish_norm(sums.total, kind, norm_type), options);
  auto found_inf = scalar_of(sums.found_inf ? 1.0 : 0.0, at::TensorOptions().dtype(at::kFloat));
  return {norms, total_norm, found_inf};
}

void scale_pass_cpu(CpuGrads& grads, const at::Tensor& coef, const std::optional<at::Tensor>& inv_scale,
                    const std::optional<Clamp>& clamp, const std::optional<at::Tensor>& found_inf, bool zero_if_inf) {
  const int64_t num_tensors = static_cast<int64_t>(grads.spans.size());
  TORCH_CHECK_VALUE(coef.numel() == 1 || coef.numel() == num_tensors,
                    "ampclip scale_pass: coef must hold 1 or one per gradient (", num_tensors, ") elements, got ",
                    coef.numel());
  TORCH_CHECK_VALUE(coef.device().is_cpu(), "ampclip scale_pass: coef must be on the CPU, got ", coef.device());
  const Transform tr = make_transform(inv_scale, clamp);
  if (found_inf.has_value() && read_scalar(*found_inf, "found_inf") != 0.0) {
    if (zero_if_inf) zero_all(grads);
    return;
  }
  std::vector<double> coefs;
  if (coef.numel() == 1 && coef.scalar_type() == at::kFloat) {
    coefs.push_back(*coef.const_data_ptr<float>());  // the common case, without a conversion op
  } else {
    const auto coef_host = coef.to(at::kDouble).contiguous().reshape({-1});
    const double* coef_data = coef_host.const_data_ptr<double>();
    coefs.assign(coef_data, coef_data + coef_host.numel());
  }
  scale(grads, coefs, tr);
}

void CpuGrads::add(const at::Tensor& grad, bool writable) {
  any_double |= grad.scalar_type() == at::kDouble;
  const at::Tensor* dense = &grad;
  if (!grad.is_contiguous()) {  // rare: read (and write back) a contiguous copy
    strided.push_back({static_cast<int64_t>(spans.size()), grad, grad.contiguous()});
    dense = &std::get<2>(strided.back());
  }
  // const_data_ptr for a read-only pass: it does not materialise a copy-on-write storage.
  void* data = writable ? dense->mutable_data_ptr() : const_cast<void*>(dense->const_data_ptr());
  spans.push_back({data, grad.numel(), grad.scalar_type(), static_cast<int32_t>(grad.element_size()),
                   grad.unsafeGetTensorImpl()});
}

bool CpuGrads::overlapping() const {
  // The memory each gradient covers, [first byte, past the last byte): built here, when a pass is about to
  // write, so that a call that only measures (or clips nothing) pays nothing for it.
  std::vector<std::pair<uintptr_t, uintptr_t>> extents(spans.size());
  for (size_t t = 0; t < spans.size(); ++t) {
    const auto first = reinterpret_cast<uintptr_t>(spans[t].data);
    extents[t] = {first, first + static_cast<uintptr_t>(spans[t].numel * spans[t].itemsize)};
  }
  for (const auto& [index, grad, copy] : strided) {  // the gradient itself, not the contiguous copy
    int64_t last = 0;  // offset of the last element it reaches
    for (int64_t d = 0; d < grad.dim(); ++d) last += (grad.size(d) - 1) * grad.stride(d);
    const auto first = reinterpret_cast<uintptr_t>(grad.const_data_ptr());
    const int64_t bytes = grad.numel() == 0 ? 0 : (last + 1) * grad.element_size();
    extents[index] = {first, first + static_cast<uintptr_t>(bytes)};
  }
  // an empty gradient writes nothing and shares nothing
  extents.erase(std::remove_if(extents.begin(), extents.end(), [](const auto& e) { return e.first == e.second; }),
                extents.end());
  // Gradients usually sit in address order, or in reverse (backward allocates them last layer first):
  // one linear scan settles those. Anything else is sorted, and the answer kept for the next call with the
  // same memory (a training loop clips the same gradients every step): comparing is one sequential read,
  // cheaper than the sort.
  bool ascending = true, descending = true;
  for (size_t i = 1; i < extents.size() && (ascending || descending); ++i) {
    ascending &= extents[i].first >= extents[i - 1].second;
    descending &= extents[i - 1].first >= extents[i].second;
  }
  if (ascending || descending) return false;
  thread_local std::vector<std::pair<uintptr_t, uintptr_t>> last_extents;
  thread_local bool last_answer = false;
  if (extents == last_extents) return last_answer;
  auto order = extents;
  std::sort(order.begin(), order.end());
  bool answer = false;
  for (size_t i = 1; i < order.size() && !answer; ++i) answer = order[i].first < order[i - 1].second;
  last_extents = std::move(extents);
  last_answer = answer;
  return answer;
}

// The whole drop-in clip in one call: norm pass, coefficient, scale pass.
at::Tensor clip_grad_norm_cpu(CpuGrads& grads, double max_norm, double norm_type) {
  const NormKind kind = norm_kind(norm_type);
  const auto sums = reduce(grads, Transform{}, kind, norm_type);
  const double norm = finish_norm(sums.total, kind, norm_type);
  const double coef = grads.any_double ? clip_coefficient<double>(norm, max_norm, kTorchEps, 0)
                                       : clip_coefficient<float>(round_to<float>(norm), max_norm, kTorchEps, 0);
  scale(grads, {coef}, Transform{});
  return scalar_of(norm, norm_options(grads));
}

}  // namespace ampclip
