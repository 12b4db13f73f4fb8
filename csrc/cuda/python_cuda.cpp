// The CUDA kernels' entries in ampclip._C (csrc/cuda/fused_clip_cuda.h), called by the `cuda` backend adapter
// (ampclip/backends/cuda.py) and nothing else. Compiled by the host compiler in a build with AMPCLIP_WITH_CUDA
// and attached to the module by PyInit__C (csrc/python_entry.cpp).
//
// The adapter owns the tensor table (ampclip/backends/tensor_table.py) and passes its sections. Each entry reads
// its arguments (csrc/python_args.h) and runs the host function's checks (fused_clip_cuda_checks.h) before it
// calls anything: bad input leaves through one path, a Python TypeError or ValueError (ampclip.errors), with
// nothing allocated, launched or written, and no C++ exception. The one thing added here: the scale pass writes
// the gradients through raw pointers, so it bumps their version counters, as torch's in-place mul_ and the CPU
// kernels do (autograd then refuses a backward through a gradient changed under it).
#include "python_cuda.h"

#include <torch/csrc/Exceptions.h>

#include <optional>
#include <string>

#include "../python_args.h"
#include "fused_clip_cuda.h"
#include "fused_clip_cuda_checks.h"

namespace ampclip::cuda {
namespace {

using namespace ampclip::py;

// A tensor argument the adapter made: a plain tensor (a wrapper subclass has no data for the kernels to read).
bool plain_tensor(PyObject* obj, const char* op, const char* what, at::Tensor& out) {
  const Read read = tensor_arg(obj, op, what, out);
  if (read == Read::kDispatcher) return fail(Bad::kType, where(op, what) + " must be a plain tensor, not a subclass");
  return read == Read::kOk;
}

bool optional_plain(PyObject* obj, const char* op, const char* what, std::optional<at::Tensor>& out) {
  if (obj == Py_None) return true;
  at::Tensor t;
  if (!plain_tensor(obj, op, what, t)) return false;
  out = std::move(t);
  return true;
}

bool optional_double(PyObject* obj, const char* op, const char* what, std::optional<double>& out) {
  if (obj == Py_None) return true;
  double value = 0.0;
  if (!double_arg(obj, op, what, value)) return false;
  out = value;
  return true;
}

// The five table sections, args[0..4], and the chunk length, args[5].
struct Sections {
  at::Tensor ptrs, numels, codes, chunk_begin, chunk_tensor;
  int64_t chunk = 0;
};

bool sections(PyObject* const* args, const char* op, Sections& out) {
  return plain_tensor(args[0], op, "ptrs", out.ptrs) && plain_tensor(args[1], op, "numels", out.numels) &&
         plain_tensor(args[2], op, "codes", out.codes) && plain_tensor(args[3], op, "chunk_begin", out.chunk_begin) &&
         plain_tensor(args[4], op, "chunk_tensor", out.chunk_tensor) && int_arg(args[5], op, "chunk", out.chunk);
}

// A failed host check as the Python exception of its kind.
PyObject* raise(const checks::Problem& problem) {
  return error(problem.type_error ? Bad::kType : Bad::kValue, problem.message);
}

// cuda_norm_pass(ptrs, numels, codes, chunk_begin, chunk_tensor, chunk, fp64, inv_scale, norm_type, clamp_min,
//                clamp_max) -> (per_tensor_norms, total_norm, found_inf)
PyObject* norm_pass_entry(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  constexpr const char* op = "ampclip norm_pass (cuda)";
  if (!check_nargs(nargs, 11, "cuda_norm_pass(ptrs, numels, codes, chunk_begin, chunk_tensor, chunk, fp64, "
                              "inv_scale, norm_type, clamp_min, clamp_max)")) {
    return nullptr;
  }
  Sections t;
  bool fp64 = false;
  std::optional<at::Tensor> inv_scale;
  double norm_type = 0.0;
  std::optional<double> lo, hi;
  if (!sections(args, op, t) || !bool_arg(args[6], op, "fp64", fp64) ||
      !optional_plain(args[7], op, "inv_scale", inv_scale) || !double_arg(args[8], op, "norm_type", norm_type) ||
      !optional_double(args[9], op, "clamp_min", lo) || !optional_double(args[10], op, "clamp_max", hi)) {
    return nullptr;
  }
  checks::Problem problem;
  if (!checks::check_norm_pass(t.ptrs, t.numels, t.codes, t.chunk_begin, t.chunk_tensor, t.chunk, fp64, inv_scale,
                               norm_type, lo, hi, problem)) {
    return raise(problem);
  }
  auto [per_tensor, total, found_inf] =
      norm_pass(t.ptrs, t.numels, t.codes, t.chunk_begin, t.chunk_tensor, t.chunk, fp64, inv_scale, norm_type, lo, hi);
  return tuple_of(std::move(per_tensor), std::move(total), std::move(found_inf));
  END_HANDLE_TH_ERRORS
}

// cuda_scale_pass(grads, ptrs, numels, codes, chunk_begin, chunk_tensor, chunk, coef, inv_scale, clamp_min,
//                 clamp_max, found_inf, zero_if_inf) -> None
// The scale pass, then a version bump of every gradient in `grads` (the tensors the table points at, or whose
// staging buffers it points at). All gradients are bumped: whether a block wrote its chunk (found_inf, a
// coefficient of exactly 1) is decided on the device, and a bump too many costs nothing.
PyObject* scale_pass_entry(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  constexpr const char* op = "ampclip scale_pass (cuda)";
  if (!check_nargs(nargs, 13, "cuda_scale_pass(grads, ptrs, numels, codes, chunk_begin, chunk_tensor, chunk, coef, "
                              "inv_scale, clamp_min, clamp_max, found_inf, zero_if_inf)")) {
    return nullptr;
  }
  PyObject** items = nullptr;
  Py_ssize_t count = 0;
  if (tensor_items(args[0], op, "grads", items, count) == Read::kError) return nullptr;
  Sections t;
  at::Tensor coef;
  std::optional<at::Tensor> inv_scale, found_inf;
  std::optional<double> lo, hi;
  bool zero_if_inf = false;
  if (!sections(args + 1, op, t) || !plain_tensor(args[7], op, "coef", coef) ||
      !optional_plain(args[8], op, "inv_scale", inv_scale) || !optional_double(args[9], op, "clamp_min", lo) ||
      !optional_double(args[10], op, "clamp_max", hi) || !optional_plain(args[11], op, "found_inf", found_inf) ||
      !bool_arg(args[12], op, "zero_if_inf", zero_if_inf)) {
    return nullptr;
  }
  checks::Problem problem;
  if (!checks::check_scale_pass(t.ptrs, t.numels, t.codes, t.chunk_begin, t.chunk_tensor, t.chunk, coef, inv_scale,
                                lo, hi, found_inf, problem)) {
    return raise(problem);
  }
  scale_pass(t.ptrs, t.numels, t.codes, t.chunk_begin, t.chunk_tensor, t.chunk, coef, inv_scale, lo, hi, found_inf,
             zero_if_inf);
  bump_versions(items, count);
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// cuda_clip_finalize(per_tensor, total, max_norm, mode, group_index, num_groups, norm_type, eps, rule)
//   -> (coef, group_coef, group_norms, post_clip_norm)
PyObject* clip_finalize_entry(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  constexpr const char* op = "ampclip clip_finalize (cuda)";
  if (!check_nargs(nargs, 9, "cuda_clip_finalize(per_tensor, total, max_norm, mode, group_index, num_groups, "
                             "norm_type, eps, rule)")) {
    return nullptr;
  }
  at::Tensor per_tensor, total, max_norm;
  std::optional<at::Tensor> group_index;
  int64_t mode = 0, num_groups = 0, rule = 0;
  double norm_type = 0.0, eps = 0.0;
  if (!plain_tensor(args[0], op, "per_tensor", per_tensor) || !plain_tensor(args[1], op, "total", total) ||
      !plain_tensor(args[2], op, "max_norm", max_norm) || !int_arg(args[3], op, "mode", mode) ||
      !optional_plain(args[4], op, "group_index", group_index) || !int_arg(args[5], op, "num_groups", num_groups) ||
      !double_arg(args[6], op, "norm_type", norm_type) || !double_arg(args[7], op, "eps", eps) ||
      !int_arg(args[8], op, "rule", rule)) {
    return nullptr;
  }
  checks::Problem problem;
  if (!checks::check_clip_finalize(per_tensor, total, max_norm, mode, group_index, num_groups, norm_type, eps, rule,
                                   problem)) {
    return raise(problem);
  }
  auto [coef, group_coef, group_norms, post] =
      clip_finalize(per_tensor, total, max_norm, mode, group_index, num_groups, norm_type, eps, rule);
  return tuple_of(std::move(coef), std::move(group_coef), std::move(group_norms), std::move(post));
  END_HANDLE_TH_ERRORS
}

#define AMPCLIP_FASTCALL(fn) reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fn)), METH_FASTCALL

PyMethodDef cuda_methods[] = {
    {"cuda_norm_pass", AMPCLIP_FASTCALL(norm_pass_entry),
     "(per_tensor_norms, total_norm, found_inf) of a table's tensors on their GPU (csrc/cuda/README.md)."},
    {"cuda_scale_pass", AMPCLIP_FASTCALL(scale_pass_entry),
     "In place g <- clamp(g * inv_scale) * coef over a table's tensors; bumps the version of each of grads."},
    {"cuda_clip_finalize", AMPCLIP_FASTCALL(clip_finalize_entry),
     "(coef, group_coef, group_norms, post_clip_norm) from the norms, in one block on the GPU."},
    {nullptr, nullptr, 0, nullptr},
};

#undef AMPCLIP_FASTCALL

}  // namespace

bool add_bindings(PyObject* module) { return PyModule_AddFunctions(module, cuda_methods) == 0; }

}  // namespace ampclip::cuda
