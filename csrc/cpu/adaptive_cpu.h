// The CPU kernels of adaptive clipping (see ampclip/ops.py): the unit-wise passes of AGC and ZClip's step.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

#include "fused_clip_cpu.h"

namespace ampclip {

// The units of a tensor: its rows along dim 0 when it has more than one dimension, else one (ops.unit_count).
int64_t unit_count(const at::Tensor& t);

// (unit_norms, per_tensor_norms, total_norm, found_inf) of tensors * inv_scale, in one read (csrc/cpu/unitwise_cpu.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> unit_norm_pass_cpu(
    const std::vector<at::Tensor>& tensors, const std::optional<at::Tensor>& inv_scale, double norm_type);

// In place: every unit of every gradient <- unit * inv_scale * coef[unit]; zeroed or left when found_inf is set.
void unit_scale_pass_cpu(const std::vector<at::Tensor>& grads, const at::Tensor& coef,
                         const std::optional<at::Tensor>& inv_scale, const std::optional<at::Tensor>& found_inf,
                         bool zero_if_inf);

// (coef, post_clip_norm): AGC's coefficient of every unit and the norm after clipping.
std::tuple<at::Tensor, at::Tensor> unit_clip_finalize_cpu(const at::Tensor& param_norms, const at::Tensor& grad_norms,
                                                          double clip_factor, double eps, double norm_type);

// One ZClip step on its state, returning the step's bound (csrc/cpu/zclip_cpu.cpp).
at::Tensor zclip_update_cpu(const at::Tensor& state, const at::Tensor& warmup, const at::Tensor& total,
                            const at::Tensor& found_inf, double alpha, double z_thresh, double max_grad_norm,
                            double eps, int64_t rule, double clip_factor, bool skip_update_on_spike);

}  // namespace ampclip
