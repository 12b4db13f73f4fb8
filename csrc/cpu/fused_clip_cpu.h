// The CPU kernels' view of a list of gradients, and the entries that are called from C++ outside the
// dispatcher (csrc/python_entry.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace ampclip {

// One gradient as the kernels see it: a dense run of elements. Gathered once per call, so that each pass
// walks a flat array instead of the tensors' metadata (on thousands of small gradients that walk, not the
// arithmetic, is the cost).
struct GradSpan {
  void* data;
  int64_t numel;
  at::ScalarType dtype;
  int32_t itemsize;
  c10::TensorImpl* impl;  // the gradient's own, for its version counter
};

// Dense CPU float16/bfloat16/float32/float64 gradients (the caller checks) that outlive this object.
struct CpuGrads {
  std::vector<GradSpan> spans;
  // (index, gradient, contiguous copy) of non-contiguous gradients: read from the copy, written back.
  std::vector<std::tuple<int64_t, at::Tensor, at::Tensor>> strided;
  bool any_double = false;

  // writable: the data pointer is taken for writing (a copy-on-write storage is materialised).
  void add(const at::Tensor& grad, bool writable);
};

// Whether the kernels take g: a dense CPU float16/bfloat16/float32/float64 tensor.
bool is_kernel_grad(const at::Tensor& g);
// Throws (a RuntimeError in Python) naming what is wrong unless is_kernel_grad(g).
void check_grad(const at::Tensor& g, size_t index, const char* op);

// The ops of ampclip/ops.py on gathered gradients (see there for the contract).
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_pass_cpu(const CpuGrads& grads,
                                                             const std::optional<at::Tensor>& inv_scale,
                                                             double norm_type);
void scale_pass_cpu(CpuGrads& grads, const at::Tensor& coef, const std::optional<at::Tensor>& inv_scale,
                    std::optional<double> clip_value, const std::optional<at::Tensor>& found_inf, bool zero_if_inf);

// Clips the gradients in place to a total norm of max_norm (coefficient min(1, max_norm / (norm + 1e-6)))
// and returns the pre-clip norm: 0-d, float32, or float64 when a gradient is float64.
at::Tensor clip_grad_norm_cpu(CpuGrads& grads, double max_norm, double norm_type);

}  // namespace ampclip
