// CUDA multi-tensor kernels of ampclip: the norm pass, the scale pass and the clip finalize (see
// fused_clip_cuda.h for the contract and csrc/cuda/README.md for the table they read).
//
// Launches, whatever the number of tensors or their dtypes:
//   norm_pass      1: norm_chunks_kernel (one block per chunk: a float64 partial and a flag per chunk; the last
//                     block of each tensor reduces its partials, the last of those the tensors' accumulators).
//   clip_norm_pass 1: the same kernel, whose last block also computes the clip coefficient.
//   scale_pass     1: scale_chunks_kernel (one block per chunk, in place).
//   clip_finalize  1: clip_finalize_kernel (one block).
// (A list of zero-size tensors only has no chunk: its norm pass is one block, empty_norm_kernel.)
//
// Grid: one block per chunk rather than a persistent grid. A chunk (32768 elements, 64-256 KiB) is far more
// work than starting a block costs, and the ~48K blocks of GPT-2-1.5B are 45-60 waves of the 800-1,056
// blocks an H100 keeps resident (6-8 per SM at 32-40 registers), so the last partial wave costs ~2%.
// Slot c of the partials is simply blockIdx.x, every slot is written exactly once, and the scale pass drops a
// chunk by returning early. A persistent grid would add a loop and a slot mapping for no bandwidth gain.
//
// Every scalar (inv_scale, coef, found_inf, max_norm) is read on the device and nothing is copied to the
// host, so each function is CUDA-graph capturable. Reductions use fixed trees (warp butterflies, then a
// fixed combine across warps) and fixed strides, never floating-point atomics: the same gradients at the
// same addresses give bitwise identical results run after run. The one atomic is an integer ticket counter
// (the table's `tickets`) that only decides which block finishes, never the order of a sum; the finishing
// block resets it, so the counters are zero between launches (and a CUDA graph replays the kernel).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "fused_clip_cuda.h"
#include "fused_clip_cuda_checks.h"
#include "fused_clip_cuda_math.cuh"

namespace ampclip::cuda {
namespace {

// The arithmetic shared with the host-compiled tests: chunk split, accumulators, scale, coefficient.
using namespace math;

// ---------------------------------------------------------------------------------------------------------
// Constants
// ---------------------------------------------------------------------------------------------------------

constexpr int kWarp = 32;
// Chunk kernels: 256 threads, each keeping kUnroll 16-byte loads in flight, i.e. 16 KiB per block per step.
// Six to eight resident blocks on an SM then have 96-128 KiB in flight, several times the ~25 KiB per SM that
// bandwidth x latency asks for on an H100 (3.35 TB/s x ~1 us / 132 SMs).
constexpr int kThreads = 256;
constexpr int kUnroll = 4;
// One-block kernel (clip finalize): 512 threads, 10,000 tensors in 20 strided steps.
constexpr int kOneBlockThreads = 512;
// clip_finalize's per-group scan stages this many (norm, group) pairs in shared memory at a time: 12 KiB.
constexpr int kGroupTile = 1024;

// ---------------------------------------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------------------------------------

// The table's device sections, passed by value as one kernel argument.
struct Table {
  const int64_t* ptrs;
  const int64_t* numels;
  const int64_t* codes;
  const int64_t* chunk_begin;
  const int64_t* chunk_tensor;
  int64_t chunk;
};

// Chunk c of the table: its tensor, the tensor's dtype code and data address, the chunk's first element and
// length. Offsets are int64: a tensor may pass 2^31 elements.
struct Chunk {
  int64_t tensor;
  int64_t code;
  int64_t start;
  int64_t n;
  uintptr_t data;
};

__device__ __forceinline__ Chunk locate(const Table& table, int64_t c) {
  Chunk ch;
  ch.tensor = __ldg(table.chunk_tensor + c);
  ch.code = __ldg(table.codes + ch.tensor) & ~kCodeAligned;  // the dtype code alone
  ch.start = (c - __ldg(table.chunk_begin + ch.tensor)) * table.chunk;
  ch.n = min(__ldg(table.numels + ch.tensor) - ch.start, table.chunk);
  ch.data = static_cast<uintptr_t>(__ldg(table.ptrs + ch.tensor));
  return ch;
}

template <typename scalar_t>
__device__ __forceinline__ scalar_t* chunk_data(const Chunk& ch) {
  return reinterpret_cast<scalar_t*>(ch.data) + ch.start;
}

// Element loads and stores on the raw bits. Read-only (the norm pass never writes its input): the
// non-coherent path, ld.global.nc. Read-write (the scale pass): cached in L2 only (ld/st.global.cg), as each
// element is touched once.
__device__ __forceinline__ float load_ro(const float* p) { return __ldg(p); }
__device__ __forceinline__ double load_ro(const double* p) { return __ldg(p); }
__device__ __forceinline__ c10::Half load_ro(const c10::Half* p) {
  return c10::Half(__ldg(reinterpret_cast<const unsigned short*>(p)), c10::Half::from_bits());
}
__device__ __forceinline__ c10::BFloat16 load_ro(const c10::BFloat16* p) {
  return c10::BFloat16(__ldg(reinterpret_cast<const unsigned short*>(p)), c10::BFloat16::from_bits());
}

__device__ __forceinline__ float load_rw(const float* p) { return __ldcg(p); }
__device__ __forceinline__ double load_rw(const double* p) { return __ldcg(p); }
__device__ __forceinline__ c10::Half load_rw(const c10::Half* p) {
  return c10::Half(__ldcg(reinterpret_cast<const unsigned short*>(p)), c10::Half::from_bits());
}
__device__ __forceinline__ c10::BFloat16 load_rw(const c10::BFloat16* p) {
  return c10::BFloat16(__ldcg(reinterpret_cast<const unsigned short*>(p)), c10::BFloat16::from_bits());
}

__device__ __forceinline__ void store(float* p, float v) { __stcg(p, v); }
__device__ __forceinline__ void store(double* p, double v) { __stcg(p, v); }
__device__ __forceinline__ void store(c10::Half* p, c10::Half v) { __stcg(reinterpret_cast<unsigned short*>(p), v.x); }
__device__ __forceinline__ void store(c10::BFloat16* p, c10::BFloat16 v) {
  __stcg(reinterpret_cast<unsigned short*>(p), v.x);
}

// The 16 loaded bytes as elements and back: register moves only (no local memory: stack frame 0 in ptxas).
template <typename scalar_t>
__device__ __forceinline__ Pack<scalar_t> unpack(const uint4& raw) {
  Pack<scalar_t> pack;
  memcpy(&pack, &raw, kVecBytes);
  return pack;
}

template <typename scalar_t>
__device__ __forceinline__ uint4 repack(const Pack<scalar_t>& pack) {
  uint4 raw;
  memcpy(&raw, &pack, kVecBytes);
  return raw;
}

// Fixed-order reductions. A butterfly gives every lane the same value (a + b == b + a exactly), the cross-warp
// step always combines the warps' values in the same tree, so the result depends only on the inputs.
struct Sum {
  __device__ __forceinline__ double operator()(double a, double b) const { return a + b; }
};
struct Max {  // operands are NaN-free here (NaN travels in the flags)
  __device__ __forceinline__ double operator()(double a, double b) const { return fmax(a, b); }
};

template <typename Op>
__device__ __forceinline__ double warp_reduce(double x, Op op) {
#pragma unroll
  for (int mask = kWarp / 2; mask > 0; mask /= 2) x = op(x, __shfl_xor_sync(0xffffffffu, x, mask));
  return x;
}

// Block-wide reduce of one double per thread; the result is returned to every thread. `scratch` holds at
// least blockDim.x / 32 doubles of shared memory. Two barriers; safe to call again right after.
template <typename Op>
__device__ double block_reduce(double x, Op op, double identity, double* scratch) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
  x = warp_reduce(x, op);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = lane < warps ? scratch[lane] : identity;
  return warp_reduce(x, op);  // every warp reduces the same values in the same tree
}

// ---------------------------------------------------------------------------------------------------------
// Norm pass: one block per chunk
// ---------------------------------------------------------------------------------------------------------

// This thread's share of a chunk: the head and tail one element per thread, the body in 16-byte vectors,
// kUnroll of them loaded before any is used. A general p spends ~100 instructions an element on exp2/log2
// in double, so it is compute-bound: it loads one vector at a time and keeps its code 4x smaller.
template <typename scalar_t, typename acc_t, NormKind kKind>
__device__ __forceinline__ void norm_chunk(const Chunk& ch, NormAccumulator<acc_t, kKind>& acc) {
  constexpr int kLoads = kKind == NormKind::kP ? 1 : kUnroll;
  const scalar_t* x = chunk_data<scalar_t>(ch);
  const Split split = split_chunk(x, ch.n);
  const int64_t tid = threadIdx.x;
  if (tid < split.head) acc.add(widen<acc_t>(load_ro(x + tid)));
  const auto* vec = reinterpret_cast<const uint4*>(x + split.head);
  int64_t i = tid;
  for (; i + (kLoads - 1) * kThreads < split.nvec; i += kLoads * kThreads) {
    uint4 raw[kLoads];
#pragma unroll
    for (int u = 0; u < kLoads; ++u) raw[u] = __ldg(vec + i + u * kThreads);
#pragma unroll
    for (int u = 0; u < kLoads; ++u) acc.add_pack(unpack<scalar_t>(raw[u]));
  }
  for (; i < split.nvec; i += kThreads) acc.add_pack(unpack<scalar_t>(__ldg(vec + i)));
  if (split.tail + tid < ch.n) acc.add(widen<acc_t>(load_ro(x + split.tail + tid)));
}

// What the finishing blocks of a norm pass read and write: the ticket counters, the outputs (in out_t, the
// pass's float32 or float64), the per-tensor scratch, and for a global clip its bound, eps and rule.
template <typename out_t>
struct Finish {
  int* tickets;                // [T + 1]: one counter per tensor, then the launch's; zero between launches
  const int64_t* chunk_begin;  // [T + 1], the table's
  int64_t num_tensors;         // T
  int64_t num_filled;          // tensors that own a chunk (zero-size ones own none and draw no ticket)
  double inv_p;
  out_t* norms;                // [T]
  double* tensor_acc;          // [T] scratch: each tensor's accumulator and flag, for the total
  double* tensor_flag;
  out_t* total;
  float* found_inf;
  bool clips;                  // a global clip: the outputs below are written
  double max_norm;
  double eps;
  ClipRule rule;
  out_t* coef;                 // 0-d
  out_t* post_clip;
  out_t* grad_scale;
};

// The last block of the launch: the total and found_inf from the tensors' accumulators (thread i combines
// tensors i, i + 256, ... in index order, then the block tree), a zero norm for every zero-size tensor, and
// for a global clip the coefficient, the norm after clipping and grad_scale = 1 / (inv_scale * coef), what a
// fused optimizer divides the gradients by. The other blocks' values are read from L2 (.cg): their stores were
// made visible before their tickets were drawn.
template <NormKind kKind, typename out_t>
__device__ __forceinline__ void finish_launch(const Finish<out_t>& fin, float inv, double* scratch) {
  double acc = 0.0;
  double f = 0.0;
#pragma unroll 2  // as in finish_tensor: the chunk loop keeps its registers
  for (int64_t t = threadIdx.x; t < fin.num_tensors; t += blockDim.x) {
    if (fin.chunk_begin[t + 1] == fin.chunk_begin[t]) {  // zero-size: norm 0
      fin.norms[t] = out_t(0);
      continue;
    }
    acc = combine(kKind, acc, __ldcg(fin.tensor_acc + t));
    f = fmax(f, __ldcg(fin.tensor_flag + t));
  }
  acc = kKind == NormKind::kInf ? block_reduce(acc, Max{}, 0.0, scratch) : block_reduce(acc, Sum{}, 0.0, scratch);
  f = block_reduce(f, Max{}, 0.0, scratch);
  if (threadIdx.x == 0) {
    const auto total = static_cast<out_t>(root(kKind, acc, f, fin.inv_p));
    *fin.total = total;
    *fin.found_inf = f > 0.0 ? 1.0f : 0.0f;
    fin.tickets[fin.num_tensors] = 0;
    if (fin.clips) {
      const out_t c = clip_coefficient(total, static_cast<out_t>(fin.max_norm), static_cast<out_t>(fin.eps),
                                       fin.rule);
      *fin.coef = c;
      *fin.post_clip = static_cast<out_t>(fabs(static_cast<double>(total) * static_cast<double>(c)));
      *fin.grad_scale = out_t(1) / (static_cast<out_t>(inv) * c);
    }
  }
}

// The last block of tensor t's chunks: warp 0 reduces t's chunk slots in a fixed order (lane l combines slots
// l, l + 32, ... in index order, then a butterfly) into its norm, its accumulator and flag; then the block draws
// a ticket of the launch, and the last to draw finishes it.
template <NormKind kKind, typename out_t>
__device__ __forceinline__ void finish_tensor(int64_t t, const double* partial, const double* flag,
                                              const Finish<out_t>& fin, float inv, double* scratch) {
  __shared__ bool last;
  if (threadIdx.x < kWarp) {
    const int lane = threadIdx.x;
    const int64_t end = fin.chunk_begin[t + 1];
    double acc = 0.0;
    double f = 0.0;
#pragma unroll 2  // unrolled further, the slot loads would take registers from the chunk loop (make cuda-check)
    for (int64_t j = fin.chunk_begin[t] + lane; j < end; j += kWarp) {
      acc = combine(kKind, acc, __ldcg(partial + j));
      f = fmax(f, __ldcg(flag + j));
    }
    acc = kKind == NormKind::kInf ? warp_reduce(acc, Max{}) : warp_reduce(acc, Sum{});
    f = warp_reduce(f, Max{});
    if (lane == 0) {
      fin.norms[t] = static_cast<out_t>(root(kKind, acc, f, fin.inv_p));
      fin.tensor_acc[t] = acc;
      fin.tensor_flag[t] = f;
      fin.tickets[t] = 0;  // every chunk of t has drawn: ready for the next launch
      __threadfence();     // t's results visible GPU-wide before the launch's ticket
      last = atomicAdd(fin.tickets + fin.num_tensors, 1) == fin.num_filled - 1;
    }
  }
  __syncthreads();
  if (last) {
    __threadfence();
    finish_launch<kKind>(fin, inv, scratch);
  }
}

// Writes partial[c] (sum of |v|^p, or max |v|, in double) and flag[c] (0, kFlagInf or kFlagNan) of chunk
// c = blockIdx.x, then draws a ticket of its tensor: the last of the tensor's blocks finishes the tensor
// (finish_tensor). acc_t is float, or double in an fp64 pass (the outputs' type too); float64 tensors always
// compute in double.
template <typename acc_t, NormKind kKind>
__global__ void __launch_bounds__(kThreads) norm_chunks_kernel(Table table, const float* inv_scale, double lo,
                                                               double hi, double p, double* partial, double* flag,
                                                               Finish<acc_t> fin) {
  __shared__ double scratch[kThreads / kWarp];
  __shared__ bool finisher;
  const int64_t c = blockIdx.x;
  const Chunk ch = locate(table, c);
  const float inv = inv_scale != nullptr ? *inv_scale : 1.0f;  // on the device: the host never waits
  double value = 0.0;
  bool nonfinite = false;
  bool nan = false;
  const auto run = [&](auto* tag, auto* acc_tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    using compute_t = std::remove_pointer_t<decltype(acc_tag)>;
    NormAccumulator<compute_t, kKind> acc{static_cast<compute_t>(inv), static_cast<compute_t>(lo),
                                          static_cast<compute_t>(hi), p};
    norm_chunk<scalar_t>(ch, acc);
    value = acc.partial();
    nonfinite = acc.nonfinite;
    nan = acc.nan;
  };
  switch (ch.code) {  // uniform within a block: one launch covers a mixed-dtype list
    case kCodeHalf: run(static_cast<c10::Half*>(nullptr), static_cast<acc_t*>(nullptr)); break;
    case kCodeBFloat16: run(static_cast<c10::BFloat16*>(nullptr), static_cast<acc_t*>(nullptr)); break;
    case kCodeFloat: run(static_cast<float*>(nullptr), static_cast<acc_t*>(nullptr)); break;
    case kCodeDouble: run(static_cast<double*>(nullptr), static_cast<double*>(nullptr)); break;
    default:  // not a dtype code: a corrupt table poisons the result (found_inf 1, a NaN norm), reads nothing
      value = NAN;
      nonfinite = nan = true;
  }
  if constexpr (kKind == NormKind::kInf) {
    value = block_reduce(value, Max{}, 0.0, scratch);
  } else {
    value = block_reduce(value, Sum{}, 0.0, scratch);
  }
  const bool any_nan = __syncthreads_or(nan);
  const bool any_nonfinite = __syncthreads_or(nonfinite);
  if (threadIdx.x == 0) {
    partial[c] = value;
    flag[c] = any_nan ? kFlagNan : any_nonfinite ? kFlagInf : 0.0;
    __threadfence();  // the slot visible GPU-wide before the ticket
    const int64_t t = __ldcg(table.chunk_tensor + c);  // read again: nothing of the chunk stays live in the loop
    finisher = atomicAdd(fin.tickets + t, 1) == fin.chunk_begin[t + 1] - fin.chunk_begin[t] - 1;
  }
  __syncthreads();
  if (finisher) {
    __threadfence();
    finish_tensor<kKind>(__ldcg(table.chunk_tensor + c), partial, flag, fin, inv, scratch);
  }
}

// The norm pass of a table of zero-size tensors only (no chunk, so no norm_chunks_kernel): one block finishes
// it as the last block of a launch would.
template <typename out_t, NormKind kKind>
__global__ void __launch_bounds__(kThreads) empty_norm_kernel(const float* inv_scale, Finish<out_t> fin) {
  __shared__ double scratch[kThreads / kWarp];
  finish_launch<kKind>(fin, inv_scale != nullptr ? *inv_scale : 1.0f, scratch);
}

// ---------------------------------------------------------------------------------------------------------
// Scale pass: one block per chunk, in place
// ---------------------------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void scale_chunk(const Chunk& ch, const ScaleOp<scalar_t, acc_t>& op) {
  scalar_t* x = chunk_data<scalar_t>(ch);
  const Split split = split_chunk(x, ch.n);
  const int64_t tid = threadIdx.x;
  if (tid < split.head) store(x + tid, op(load_rw(x + tid)));
  auto* vec = reinterpret_cast<uint4*>(x + split.head);
  int64_t i = tid;
  // The stores may alias later loads as far as the compiler knows: all kUnroll loads are issued first.
  for (; i + (kUnroll - 1) * kThreads < split.nvec; i += kUnroll * kThreads) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) raw[u] = __ldcg(vec + i + u * kThreads);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      auto pack = unpack<scalar_t>(raw[u]);
#pragma unroll
      for (int k = 0; k < Pack<scalar_t>::kSize; ++k) pack.v[k] = op(pack.v[k]);
      __stcg(vec + i + u * kThreads, repack(pack));
    }
  }
  for (; i < split.nvec; i += kThreads) {
    auto pack = unpack<scalar_t>(__ldcg(vec + i));
#pragma unroll
    for (int k = 0; k < Pack<scalar_t>::kSize; ++k) pack.v[k] = op(pack.v[k]);
    __stcg(vec + i, repack(pack));
  }
  if (split.tail + tid < ch.n) store(x + split.tail + tid, op(load_rw(x + split.tail + tid)));
}

// All-zero bits are +0.0 in every float format: stores only, no read.
template <typename scalar_t>
__device__ __forceinline__ void zero_chunk(const Chunk& ch) {
  scalar_t* x = chunk_data<scalar_t>(ch);
  const Split split = split_chunk(x, ch.n);
  const int64_t tid = threadIdx.x;
  const scalar_t zero = static_cast<scalar_t>(0.0f);
  if (tid < split.head) store(x + tid, zero);
  auto* vec = reinterpret_cast<uint4*>(x + split.head);
  for (int64_t i = tid; i < split.nvec; i += kThreads) __stcg(vec + i, make_uint4(0u, 0u, 0u, 0u));
  if (split.tail + tid < ch.n) store(x + split.tail + tid, zero);
}

// Chunk blockIdx.x of g <- clamp(g * inv_scale, lo, hi) * coef. Every decision is taken on the device and is
// uniform within the block: found_inf set -> leave (or zero) the chunk; no unscale, no clamp and a
// coefficient of exactly 1 -> return without touching memory (the common "norm below max_norm" step costs
// one coefficient read per block instead of 2N bytes).
__global__ void __launch_bounds__(kThreads)
    scale_chunks_kernel(Table table, const void* coef, bool coef_double, bool coef_per_tensor,
                        const float* inv_scale, double lo, double hi, bool has_clamp, const float* found_inf,
                        bool zero_if_inf) {
  const Chunk ch = locate(table, blockIdx.x);
  const bool found = found_inf != nullptr && *found_inf != 0.0f;  // NaN counts as found
  if (found) {
    if (zero_if_inf) {
      switch (ch.code) {
        case kCodeHalf: zero_chunk<c10::Half>(ch); break;
        case kCodeBFloat16: zero_chunk<c10::BFloat16>(ch); break;
        case kCodeFloat: zero_chunk<float>(ch); break;
        case kCodeDouble: zero_chunk<double>(ch); break;
        default: break;  // not a dtype code: nothing is written
      }
    }
    return;
  }
  const int64_t k = coef_per_tensor ? ch.tensor : 0;
  const double c = coef_double ? static_cast<const double*>(coef)[k] : static_cast<const float*>(coef)[k];
  const bool plain = inv_scale == nullptr && !has_clamp;
  const float inv = inv_scale != nullptr ? *inv_scale : 1.0f;
  const auto run = [&](auto* tag, auto* acc_tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    using compute_t = std::remove_pointer_t<decltype(acc_tag)>;
    // The coefficient rounded once to the compute type, as torch's `coef.to(float32)` would.
    const ScaleOp<scalar_t, compute_t> op{static_cast<compute_t>(inv), static_cast<compute_t>(lo),
                                          static_cast<compute_t>(hi), static_cast<compute_t>(c)};
    if (plain && op.coef == compute_t(1)) return;  // x * 1 rounds back to x: skip the read and the write
    scale_chunk(ch, op);
  };
  switch (ch.code) {
    case kCodeHalf: run(static_cast<c10::Half*>(nullptr), static_cast<float*>(nullptr)); break;
    case kCodeBFloat16: run(static_cast<c10::BFloat16*>(nullptr), static_cast<float*>(nullptr)); break;
    case kCodeFloat: run(static_cast<float*>(nullptr), static_cast<float*>(nullptr)); break;
    case kCodeDouble: run(static_cast<double*>(nullptr), static_cast<double*>(nullptr)); break;
    default: break;  // not a dtype code: nothing is written
  }
}

// ---------------------------------------------------------------------------------------------------------
// Clip finalize: one block
// ---------------------------------------------------------------------------------------------------------

// The scaled p-norm of value(i), i in [0, count), over the whole block: a max pass, then a sum pass, both
// fixed-order. Every thread gets the result.
template <typename Value>
__device__ double block_scaled_norm(int64_t count, Value value, const ScaledNorm& norm, double* scratch) {
  double m = 0.0;
  bool nan = false;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    const double x = fabs(value(i));
    nan |= x != x;
    m = fmax(m, x);
  }
  m = block_reduce(m, Max{}, 0.0, scratch);
  nan = __syncthreads_or(nan);
  double sum = 0.0;
  if (norm.needs_sum(m, nan)) {
    for (int64_t i = threadIdx.x; i < count; i += blockDim.x) sum += norm.term(fabs(value(i)), m);
  }
  sum = block_reduce(sum, Sum{}, 0.0, scratch);
  return norm.finish(m, sum, nan);
}

template <typename out_t>
__global__ void __launch_bounds__(kOneBlockThreads)
    clip_finalize_kernel(const out_t* per_tensor, const out_t* total, const void* max_norm_ptr, bool max_norm_double,
                         ClipMode mode, const int64_t* group_index, int64_t num_tensors, int64_t num_groups,
                         ScaledNorm norm, double eps_d, ClipRule rule, out_t* coef, out_t* group_coef,
                         out_t* group_norms, out_t* post_clip) {
  __shared__ double scratch[kOneBlockThreads / kWarp];
  __shared__ double tile_norm[kGroupTile];
  __shared__ int64_t tile_group[kGroupTile];
  const out_t max_norm = max_norm_double ? static_cast<out_t>(*static_cast<const double*>(max_norm_ptr))
                                         : static_cast<out_t>(*static_cast<const float*>(max_norm_ptr));
  const auto eps = static_cast<out_t>(eps_d);

  if (mode == ClipMode::kGlobal) {
    if (threadIdx.x == 0) {
      const out_t n = *total;
      const out_t c = clip_coefficient(n, max_norm, eps, rule);
      *coef = c;
      *post_clip = static_cast<out_t>(fabs(static_cast<double>(n) * static_cast<double>(c)));
    }
    return;
  }

  if (mode == ClipMode::kPerTensor) {
    for (int64_t t = threadIdx.x; t < num_tensors; t += blockDim.x) {
      coef[t] = clip_coefficient(per_tensor[t], max_norm, eps, rule);
    }
    __syncthreads();  // coef[] written by other threads is read below
    const double post = block_scaled_norm(
        num_tensors, [&](int64_t t) { return static_cast<double>(per_tensor[t]) * static_cast<double>(coef[t]); },
        norm, scratch);
    if (threadIdx.x == 0) *post_clip = static_cast<out_t>(post);
    return;
  }

  // Per group. Each thread owns groups threadIdx.x, threadIdx.x + blockDim.x, ... and scans all tensors
  // twice (max, then the scaled sum), the tensors staged through shared memory kGroupTile at a time, so a
  // warp reads one broadcast value per step. O(T * ceil(G / 512)) work: microseconds for thousands of
  // tensors and hundreds of groups. Tensors whose group index is out of range belong to no group.
  const auto sweep = [&](int64_t g, auto visit) {
    for (int64_t t0 = 0; t0 < num_tensors; t0 += kGroupTile) {
      const int64_t count = min(static_cast<int64_t>(kGroupTile), num_tensors - t0);
      __syncthreads();  // the previous tile has been read by everyone
      for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
        tile_norm[i] = fabs(static_cast<double>(per_tensor[t0 + i]));
        tile_group[i] = group_index[t0 + i];
      }
      __syncthreads();
      if (g < num_groups) {
        for (int64_t i = 0; i < count; ++i) {
          if (tile_group[i] == g) visit(tile_norm[i]);
        }
      }
    }
  };
  for (int64_t g0 = 0; g0 < num_groups; g0 += blockDim.x) {
    const int64_t g = g0 + threadIdx.x;
    double m = 0.0;
    bool nan = false;
    sweep(g, [&](double x) {
      nan |= x != x;
      m = fmax(m, x);
    });
    // The sum pass, for the groups that need it. Every thread runs the sweep (its barriers need the whole
    // block); a thread whose group needs no sum sweeps as group num_groups, which matches no tensor.
    double sum = 0.0;
    sweep(norm.needs_sum(m, nan) ? g : num_groups, [&](double x) { sum += norm.term(x, m); });
    if (g < num_groups) {
      const auto gn = static_cast<out_t>(norm.finish(m, sum, nan));
      group_norms[g] = gn;
      group_coef[g] = clip_coefficient(gn, max_norm, eps, rule);
    }
  }
  __syncthreads();  // group_coef[] is read by every thread below
  for (int64_t t = threadIdx.x; t < num_tensors; t += blockDim.x) {
    const int64_t g = group_index[t];
    coef[t] = (g >= 0 && g < num_groups) ? group_coef[g] : static_cast<out_t>(NAN);
  }
  const double post = block_scaled_norm(
      num_groups, [&](int64_t g) { return static_cast<double>(group_norms[g]) * static_cast<double>(group_coef[g]); },
      norm, scratch);
  if (threadIdx.x == 0) *post_clip = static_cast<out_t>(post);
}

// ---------------------------------------------------------------------------------------------------------
// Host launchers
// ---------------------------------------------------------------------------------------------------------

Table make_table(const at::Tensor& ptrs, const at::Tensor& numels, const at::Tensor& codes,
                 const at::Tensor& chunk_begin, const at::Tensor& chunk_tensor, int64_t chunk) {
  return {ptrs.const_data_ptr<int64_t>(), numels.const_data_ptr<int64_t>(), codes.const_data_ptr<int64_t>(),
          chunk_begin.const_data_ptr<int64_t>(), chunk_tensor.const_data_ptr<int64_t>(), chunk};
}

// Every launch of this file, counted (launch_count(): what a test reads to check the launches of a step).
std::atomic<int64_t> launches{0};

void counted_launch_check() {
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  launches.fetch_add(1, std::memory_order_relaxed);
}

// The kernel for a norm kind, as a compile-time value.
template <typename Fn>
void with_kind(NormKind kind, Fn&& fn) {
  switch (kind) {
    case NormKind::kL2: fn(std::integral_constant<NormKind, NormKind::kL2>{}); break;
    case NormKind::kL1: fn(std::integral_constant<NormKind, NormKind::kL1>{}); break;
    case NormKind::kInf: fn(std::integral_constant<NormKind, NormKind::kInf>{}); break;
    case NormKind::kP: fn(std::integral_constant<NormKind, NormKind::kP>{}); break;
  }
}

const float* optional_float_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<float>() : nullptr;
}

// What a global clip adds to a norm pass: the bound, eps and rule (none for a norm pass alone).
struct ClipArgs {
  double max_norm;
  double eps;
  ClipRule rule;
};

// (per_tensor, total, found_inf, coef, post_clip, grad_scale) in one launch (the last four empty without a clip).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_norm_pass(
    const checks::NormPlan& plan, const at::Tensor& ptrs, const at::Tensor& numels, const at::Tensor& codes,
    const at::Tensor& chunk_begin, const at::Tensor& chunk_tensor, int64_t chunk, bool fp64, const at::Tensor& tickets,
    int64_t num_filled, const std::optional<at::Tensor>& inv_scale, const std::optional<ClipArgs>& clip) {
  const c10::cuda::CUDAGuard guard(plan.table.device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = plan.table.num_tensors;
  const int64_t c = plan.table.num_chunks;
  const auto options = ptrs.options().dtype(plan.out_dtype);
  const bool clips = clip.has_value();
  // outputs of their own: a registered op's outputs may not alias one another
  auto per_tensor = at::empty({n}, options);
  auto total = at::empty({}, options);
  auto found_inf = at::empty({}, options.dtype(at::kFloat));
  at::Tensor coef, post_clip, grad_scale;  // a clip's (undefined for a norm pass alone)
  if (clips) {
    coef = at::empty({}, options);
    post_clip = at::empty({}, options);
    grad_scale = at::empty({}, options);
  }
  // Scratch, all written before read: chunk partials [C], chunk flags [C], tensor accumulators [T],
  // tensor flags [T]. (8 bytes x (2C + 2T): 0.8 MB for GPT-2-1.5B's 48K chunks.)
  auto scratch = at::empty({2 * c + 2 * n}, ptrs.options().dtype(at::kDouble));
  double* partial = scratch.mutable_data_ptr<double>();
  double* flag = partial + c;
  const Table table = make_table(ptrs, numels, codes, chunk_begin, chunk_tensor, chunk);
  const float* inv = optional_float_ptr(inv_scale);
  const auto launch = [&](auto* tag) {
    using out_t = std::remove_pointer_t<decltype(tag)>;
    Finish<out_t> fin{tickets.mutable_data_ptr<int>(), chunk_begin.const_data_ptr<int64_t>(), n, num_filled,
                      plan.kind == NormKind::kP ? 1.0 / plan.p : 1.0, per_tensor.mutable_data_ptr<out_t>(),
                      flag + c, flag + c + n, total.mutable_data_ptr<out_t>(), found_inf.mutable_data_ptr<float>(),
                      clips, clips ? clip->max_norm : 0.0, clips ? clip->eps : 0.0,
                      clips ? clip->rule : ClipRule::kTorch,
                      clips ? coef.mutable_data_ptr<out_t>() : nullptr,
                      clips ? post_clip.mutable_data_ptr<out_t>() : nullptr,
                      clips ? grad_scale.mutable_data_ptr<out_t>() : nullptr};
    with_kind(plan.kind, [&](auto kind_tag) {
      constexpr NormKind kKind = decltype(kind_tag)::value;
      if (c > 0) {
        norm_chunks_kernel<out_t, kKind><<<static_cast<unsigned>(c), kThreads, 0, stream>>>(
            table, inv, plan.lo, plan.hi, plan.p, partial, flag, fin);
      } else {  // every tensor zero-size: no chunk to launch (a 0-block grid is an error)
        empty_norm_kernel<out_t, kKind><<<1, kThreads, 0, stream>>>(inv, fin);
      }
      counted_launch_check();
    });
  };
  if (fp64) {
    launch(static_cast<double*>(nullptr));
  } else {
    launch(static_cast<float*>(nullptr));
  }
  return {per_tensor, total, found_inf, coef, post_clip, grad_scale};
}

}  // namespace

int64_t launch_count() { return launches.load(std::memory_order_relaxed); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_pass(const at::Tensor& ptrs, const at::Tensor& numels,
                                                         const at::Tensor& codes, const at::Tensor& chunk_begin,
                                                         const at::Tensor& chunk_tensor, int64_t chunk, bool fp64,
                                                         const at::Tensor& tickets, int64_t num_filled,
                                                         const std::optional<at::Tensor>& inv_scale,
                                                         double norm_type, std::optional<double> clamp_min,
                                                         std::optional<double> clamp_max) {
  checks::Problem problem;
  const auto plan = checks::required(
      checks::check_norm_pass(ptrs, numels, codes, chunk_begin, chunk_tensor, chunk, fp64, tickets, num_filled,
                              inv_scale, norm_type, clamp_min, clamp_max, problem),
      problem);
  auto out = run_norm_pass(plan, ptrs, numels, codes, chunk_begin, chunk_tensor, chunk, fp64, tickets, num_filled,
                           inv_scale, std::nullopt);
  return {std::get<0>(out), std::get<1>(out), std::get<2>(out)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> clip_norm_pass(
    const at::Tensor& ptrs, const at::Tensor& numels, const at::Tensor& codes, const at::Tensor& chunk_begin,
    const at::Tensor& chunk_tensor, int64_t chunk, bool fp64, const at::Tensor& tickets, int64_t num_filled,
    const std::optional<at::Tensor>& inv_scale, double norm_type, std::optional<double> clamp_min,
    std::optional<double> clamp_max, double max_norm, double eps, int64_t rule) {
  checks::Problem problem;
  const auto plan = checks::required(
      checks::check_clip_norm_pass(ptrs, numels, codes, chunk_begin, chunk_tensor, chunk, fp64, tickets, num_filled,
                                   inv_scale, norm_type, clamp_min, clamp_max, max_norm, eps, rule, problem),
      problem);
  return run_norm_pass(plan, ptrs, numels, codes, chunk_begin, chunk_tensor, chunk, fp64, tickets, num_filled,
                       inv_scale, ClipArgs{max_norm, eps, static_cast<ClipRule>(rule)});
}

void scale_pass(const at::Tensor& ptrs, const at::Tensor& numels, const at::Tensor& codes,
                const at::Tensor& chunk_begin, const at::Tensor& chunk_tensor, int64_t chunk, const at::Tensor& coef,
                const std::optional<at::Tensor>& inv_scale, std::optional<double> clamp_min,
                std::optional<double> clamp_max, const std::optional<at::Tensor>& found_inf, bool zero_if_inf) {
  checks::Problem problem;
  const auto plan = checks::required(checks::check_scale_pass(ptrs, numels, codes, chunk_begin, chunk_tensor, chunk,
                                                              coef, inv_scale, clamp_min, clamp_max, found_inf, problem),
                                     problem);
  if (plan.table.num_chunks == 0) return;  // only zero-size tensors: nothing to scale
  const c10::cuda::CUDAGuard guard(plan.table.device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor coef_dense = coef.contiguous();  // [T] coefficients are read by index
  scale_chunks_kernel<<<static_cast<unsigned>(plan.table.num_chunks), kThreads, 0, stream>>>(
      make_table(ptrs, numels, codes, chunk_begin, chunk_tensor, chunk), coef_dense.const_data_ptr(),
      coef_dense.scalar_type() == at::kDouble, plan.per_tensor_coef, optional_float_ptr(inv_scale), plan.lo, plan.hi,
      plan.has_clamp, optional_float_ptr(found_inf), zero_if_inf);
  counted_launch_check();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> clip_finalize(const at::Tensor& per_tensor,
                                                                         const at::Tensor& total,
                                                                         const at::Tensor& max_norm, int64_t mode,
                                                                         const std::optional<at::Tensor>& group_index,
                                                                         int64_t num_groups, double norm_type,
                                                                         double eps, int64_t rule) {
  checks::Problem problem;
  const auto plan = checks::required(checks::check_clip_finalize(per_tensor, total, max_norm, mode, group_index,
                                                                 num_groups, norm_type, eps, rule, problem),
                                     problem);
  const c10::cuda::CUDAGuard guard(plan.device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto options = per_tensor.options();
  const bool per_group = plan.mode == ClipMode::kPerGroup;
  auto coef = plan.mode == ClipMode::kGlobal ? at::empty({}, options) : at::empty({plan.num_tensors}, options);
  auto group_coef = at::empty({per_group ? plan.num_groups : 0}, options);
  auto group_norms = at::empty({per_group ? plan.num_groups : 0}, options);
  auto post_clip = at::empty({}, options);
  const ScaledNorm norm{plan.kind, norm_type, plan.kind == NormKind::kP ? 1.0 / norm_type : 1.0};
  const int64_t* groups = per_group ? group_index->const_data_ptr<int64_t>() : nullptr;
  const bool max_norm_double = max_norm.scalar_type() == at::kDouble;
  const auto launch = [&](auto* tag) {
    using out_t = std::remove_pointer_t<decltype(tag)>;
    clip_finalize_kernel<out_t><<<1, kOneBlockThreads, 0, stream>>>(
        per_tensor.const_data_ptr<out_t>(), total.const_data_ptr<out_t>(), max_norm.const_data_ptr(),
        max_norm_double, plan.mode, groups, plan.num_tensors, plan.num_groups, norm, eps, plan.rule,
        coef.mutable_data_ptr<out_t>(), per_group ? group_coef.mutable_data_ptr<out_t>() : nullptr,
        per_group ? group_norms.mutable_data_ptr<out_t>() : nullptr, post_clip.mutable_data_ptr<out_t>());
    counted_launch_check();
  };
  if (plan.dtype == at::kDouble) {
    launch(static_cast<double*>(nullptr));
  } else {
    launch(static_cast<float*>(nullptr));
  }
  return {coef, group_coef, group_norms, post_clip};
}

}  // namespace ampclip::cuda
