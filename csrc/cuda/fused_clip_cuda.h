// CUDA multi-tensor kernels of the ampclip op contract: the norm pass (alone or with the clip coefficient),
// the scale pass and the clip finalize.
//
// Every function takes the int64 device sections of a multi-tensor table (csrc/cuda/README.md):
//   ptrs[T]          data address of tensor t (contiguous data)
//   numels[T]        elements of tensor t
//   codes[T]         dtype code of tensor t: 0 float16, 1 bfloat16, 2 float32, 3 float64
//   chunk_begin[T+1] first chunk of tensor t; its chunks are chunk_begin[t] .. chunk_begin[t+1] - 1
//   chunk_tensor[C]  tensor of chunk c; its first element is (c - chunk_begin[t]) * chunk
// and launches on the current stream of the table's device. No function synchronises with the host (every
// scalar is read on the device), so all of them can be captured in a CUDA graph; results are bitwise
// deterministic (fixed-order reductions, no floating-point atomics).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace ampclip::cuda {

// (per_tensor_norms[T], total_norm (0-d), found_inf (0-d float32)) of u = g * inv_scale, after the optional
// value clamp v = min(max(u, clamp_min), clamp_max). found_inf is 1.0 exactly when some u is inf or NaN.
// Norms are float32, or float64 when fp64 (set it when any gradient is float64: every gradient is then
// unscaled and accumulated in float64). norm_type: 2, 1, inf or any p > 0. One launch: the last block of each
// tensor finishes its norm and the last of those the total, drawing tickets from `tickets` (int32 [T + 1],
// zero between launches, left at zero; one launch at a time may use them); num_filled is the number of
// tensors that own a chunk (numels[t] > 0).
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_pass(const at::Tensor& ptrs, const at::Tensor& numels,
                                                         const at::Tensor& codes, const at::Tensor& chunk_begin,
                                                         const at::Tensor& chunk_tensor, int64_t chunk, bool fp64,
                                                         const at::Tensor& tickets, int64_t num_filled,
                                                         const std::optional<at::Tensor>& inv_scale,
                                                         double norm_type, std::optional<double> clamp_min,
                                                         std::optional<double> clamp_max);

// norm_pass and a global clip's coefficient in the same launch: (per_tensor_norms, total_norm, found_inf, coef
// (0-d), post_clip_norm, grad_scale), coef and post_clip_norm as clip_finalize computes them (mode 0) from
// norm_pass's norms, and grad_scale = 1 / (inv_scale * coef) in the norms' dtype: what a fused optimizer
// divides the gradients by. (Per tensor or per group: norm_pass, then clip_finalize.)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> clip_norm_pass(
    const at::Tensor& ptrs, const at::Tensor& numels, const at::Tensor& codes, const at::Tensor& chunk_begin,
    const at::Tensor& chunk_tensor, int64_t chunk, bool fp64, const at::Tensor& tickets, int64_t num_filled,
    const std::optional<at::Tensor>& inv_scale, double norm_type, std::optional<double> clamp_min,
    std::optional<double> clamp_max, double max_norm, double eps, int64_t rule);

// In place g <- clamp(g * inv_scale, clamp_min, clamp_max) * coef, in float32 (float64 for float64
// tensors), rounded once on the store. coef: float32 or float64, 0-d or [T]. With found_inf given and
// non-zero (read on the device) the gradients are left untouched, or zeroed when zero_if_inf.
void scale_pass(const at::Tensor& ptrs, const at::Tensor& numels, const at::Tensor& codes,
                const at::Tensor& chunk_begin, const at::Tensor& chunk_tensor, int64_t chunk, const at::Tensor& coef,
                const std::optional<at::Tensor>& inv_scale, std::optional<double> clamp_min,
                std::optional<double> clamp_max, const std::optional<at::Tensor>& found_inf, bool zero_if_inf);

// (coef, group_coef, group_norms, post_clip_norm) from the norm pass's norms, in the norms' dtype.
// mode 0 global (coef 0-d from total), 1 per tensor (coef[T]), 2 per group (group_index[T] int64 in
// [0, num_groups): group_norms[G], group_coef[G], coef[T] = group_coef[group_index[t]]); group_coef and
// group_norms are empty unless mode 2. rule 0: min(1, max_norm / (n + eps)) as torch computes it;
// rule 1: max_norm / max(n + eps, max_norm). max_norm: a one-element float32/float64 device tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> clip_finalize(const at::Tensor& per_tensor,
                                                                         const at::Tensor& total,
                                                                         const at::Tensor& max_norm, int64_t mode,
                                                                         const std::optional<at::Tensor>& group_index,
                                                                         int64_t num_groups, double norm_type,
                                                                         double eps, int64_t rule);

// Kernels launched by the functions above since the process started: a test reads it to count a step's.
int64_t launch_count();

}  // namespace ampclip::cuda
