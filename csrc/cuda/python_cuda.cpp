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

// The arguments of a norm pass, args[0..12]: the table (0..5), fp64, tickets, num_filled, inv_scale,
// norm_type, clamp_min, clamp_max.
struct NormArgs {
  Sections t;
  bool fp64 = false;
  at::Tensor tickets;
  int64_t num_filled = 0;
  std::optional<at::Tensor> inv_scale;
  double norm_type = 0.0;
  std::optional<double> lo, hi;
};

bool norm_args(PyObject* const* args, const char* op, NormArgs& out) {
  return sections(args, op, out.t) && bool_arg(args[6], op, "fp64", out.fp64) &&
         plain_tensor(args[7], op, "tickets", out.tickets) && int_arg(args[8], op, "num_filled", out.num_filled) &&
         optional_plain(args[9], op, "inv_scale", out.inv_scale) &&
         double_arg(args[10], op, "norm_type", out.norm_type) && optional_double(args[11], op, "clamp_min", out.lo) &&
         optional_double(args[12], op, "clamp_max", out.hi);
}

// cuda_norm_pass(ptrs, numels, codes, chunk_begin, chunk_tensor, chunk, fp64, tickets, num_filled, inv_scale,
//                norm_type, clamp_min, clamp_max) -> (per_tensor_norms, total_norm, found_inf)
PyObject* norm_pass_entry(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  constexpr const char* op = "ampclip norm_pass (cuda)";
  if (!check_nargs(nargs, 13, "cuda_norm_pass(ptrs, numels, codes, chunk_begin, chunk_tensor, chunk, fp64, tickets, "
                              "num_filled, inv_scale, norm_type, clamp_min, clamp_max)")) {
    return nullptr;
  }
  NormArgs a;
  if (!norm_args(args, op, a)) return nullptr;
  checks::Problem problem;
  if (!checks::check_norm_pass(a.t.ptrs, a.t.numels, a.t.codes, a.t.chunk_begin, a.t.chunk_tensor, a.t.chunk, a.fp64,
                               a.tickets, a.num_filled, a.inv_scale, a.norm_type, a.lo, a.hi, problem)) {
    return raise(problem);
  }
  auto [per_tensor, total, found_inf] =
      norm_pass(a.t.ptrs, a.t.numels, a.t.codes, a.t.chunk_begin, a.t.chunk_tensor, a.t.chunk, a.fp64, a.tickets,
                a.num_filled, a.inv_scale, a.norm_type, a.lo, a.hi);
  return tuple_of(std::move(per_tensor), std::move(total), std::move(found_inf));
  END_HANDLE_TH_ERRORS
}

// cuda_clip_norm_pass(<the 13 arguments of cuda_norm_pass>, max_norm, eps, rule)
//   -> (per_tensor_norms, total_norm, found_inf, coef, post_clip_norm, grad_scale): a global clip
PyObject* clip_norm_pass_entry(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  constexpr const char* op = "ampclip clip_norm_pass (cuda)";
  if (!check_nargs(nargs, 16, "cuda_clip_norm_pass(ptrs, numels, codes, chunk_begin, chunk_tensor, chunk, fp64, "
                              "tickets, num_filled, inv_scale, norm_type, clamp_min, clamp_max, max_norm, eps, "
                              "rule)")) {
    return nullptr;
  }
  NormArgs a;
  double max_norm = 0.0, eps = 0.0;
  int64_t rule = 0;
  if (!norm_args(args, op, a) || !double_arg(args[13], op, "max_norm", max_norm) ||
      !double_arg(args[14], op, "eps", eps) || !int_arg(args[15], op, "rule", rule)) {
    return nullptr;
  }
  checks::Problem problem;
  if (!checks::check_clip_norm_pass(a.t.ptrs, a.t.numels, a.t.codes, a.t.chunk_begin, a.t.chunk_tensor, a.t.chunk,
                                    a.fp64, a.tickets, a.num_filled, a.inv_scale, a.norm_type, a.lo, a.hi, max_norm,
                                    eps, rule, problem)) {
    return raise(problem);
  }
  auto [per_tensor, total, found_inf, coef, post, grad_scale] =
      clip_norm_pass(a.t.ptrs, a.t.numels, a.t.codes, a.t.chunk_begin, a.t.chunk_tensor, a.t.chunk, a.fp64,
                     a.tickets, a.num_filled, a.inv_scale, a.norm_type, a.lo, a.hi, max_norm, eps, rule);
  return tuple_of(std::move(per_tensor), std::move(total), std::move(found_inf), std::move(coef), std::move(post),
                  std::move(grad_scale));
  END_HANDLE_TH_ERRORS
}

// cuda_launch_count() -> int: the kernels the CUDA functions have launched in this process.
PyObject* launch_count_entry(PyObject* /*module*/, PyObject* /*unused*/) {
  return PyLong_FromLongLong(launch_count());
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
    {"cuda_clip_norm_pass", AMPCLIP_FASTCALL(clip_norm_pass_entry),
     "The norm pass and a global clip's coefficient in one launch: (per_tensor_norms, total_norm, found_inf, coef, "
     "post_clip_norm, grad_scale)."},
    {"cuda_launch_count", launch_count_entry, METH_NOARGS,
     "The kernels the CUDA functions have launched in this process (a test counts a step's with it)."},
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
