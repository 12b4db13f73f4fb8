// The Python module ampclip._C: the CPU kernels' entry points, called by the `cpp` backend adapter
// (ampclip/backends/cpp.py) and nothing else.
//
// A clip of 2000 small gradients spends more time getting to the kernel than in it: reading `p.grad` in
// Python costs about 0.1 us a parameter and a boxed Tensor[] conversion about 0.15 us a tensor. Here the
// lists are read in C++ and the kernels are called directly. The op registration lives once, in Python
// (ampclip/ops.py, torch.library): torch.compile, opcheck and dispatch modes see those ops, whose
// implementation calls back into these entries. So each entry returns None, having changed nothing, when
// its input needs the dispatcher first (tensor subclasses, tensors with a Python dispatch key, an active
// TorchDispatchMode): the adapter then calls the registered op, which unwraps the input and comes back here.

#include <ATen/MemoryOverlap.h>
#include <torch/csrc/Exceptions.h>

#include <vector>

#include "cpu/fused_clip_cpu.h"
#include "python_args.h"
#ifdef AMPCLIP_WITH_CUDA
#include "cuda/python_cuda.h"
#endif

namespace ampclip {
namespace {

using namespace py;

// Runs fn(), without the GIL when the gradients are large; hold() lists the tensors to keep alive meanwhile.
template <typename Hold, typename Fn>
auto run_releasing_gil_if_large(const CpuGrads& grads, Hold hold, Fn fn) {
  int64_t numel = 0;
  for (const auto& span : grads.spans) numel += span.numel;
  const std::vector<at::Tensor> held = numel >= kReleaseGilFrom ? hold() : std::vector<at::Tensor>{};
  return py::run_releasing_gil_if_large(numel, fn);
}

// The tensors of a list or tuple that gather_list accepted, for run_releasing_gil_if_large.
std::vector<at::Tensor> tensors_of(PyObject* seq) {
  std::vector<at::Tensor> out;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); ++i) {
    out.push_back(THPVariable_Unpack(PySequence_Fast_GET_ITEM(seq, i)));
  }
  return out;
}

// None -> nullopt, a (lo, hi) pair of numbers -> it. A Python error is set on failure.
bool clamp_arg(PyObject* obj, std::optional<Clamp>& out) {
  if (obj == Py_None) return true;
  if (!PyTuple_Check(obj) || PyTuple_GET_SIZE(obj) != 2) {
    PyErr_SetString(PyExc_TypeError, "clamp must be None or a (lo, hi) tuple");
    return false;
  }
  const double lo = PyFloat_AsDouble(PyTuple_GET_ITEM(obj, 0));
  const double hi = PyFloat_AsDouble(PyTuple_GET_ITEM(obj, 1));
  if (PyErr_Occurred()) return false;
  out = Clamp{lo, hi};
  return true;
}

// The tensors of a list or tuple, checked and gathered; false when one needs the dispatcher.
bool gather_list(PyObject* seq, bool writable, const char* op, CpuGrads& out) {
  if (!PyList_Check(seq) && !PyTuple_Check(seq)) return false;
  const Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  out.spans.reserve(count);
  for (Py_ssize_t i = 0; i < count; ++i) {
    if (!is_plain(items[i])) return false;
  }
  for (Py_ssize_t i = 0; i < count; ++i) {  // every check before anything is written
    check_grad(THPVariable_Unpack(items[i]), static_cast<size_t>(i), op, writable);
  }
  for (Py_ssize_t i = 0; i < count; ++i) out.add(THPVariable_Unpack(items[i]), writable);
  return true;
}

// norm_pass(grads, inv_scale, norm_type, clamp) -> (per_tensor_norms, total_norm, found_inf) | None
PyObject* norm_pass(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!check_nargs(nargs, 4, "norm_pass(grads, inv_scale, norm_type, clamp)")) return nullptr;
  const double norm_type = PyFloat_AsDouble(args[2]);
  std::optional<Clamp> clamp;
  if (PyErr_Occurred() || !clamp_arg(args[3], clamp)) return nullptr;
  std::optional<at::Tensor> inv_scale;
  CpuGrads grads;
  if (modes_active() || !optional_tensor(args[1], inv_scale) ||
      !gather_list(args[0], /*writable=*/false, "ampclip norm_pass", grads)) {
    Py_RETURN_NONE;
  }
  auto [norms, total, found_inf] = run_releasing_gil_if_large(
      grads, [&] { return tensors_of(args[0]); }, [&] { return norm_pass_cpu(grads, inv_scale, norm_type, clamp); });
  return PyTuple_Pack(3, THPVariable_Wrap(std::move(norms)), THPVariable_Wrap(std::move(total)),
                      THPVariable_Wrap(std::move(found_inf)));
  END_HANDLE_TH_ERRORS
}

// scale_pass(grads, coef, inv_scale, clamp, found_inf, zero_if_inf) -> True | None
PyObject* scale_pass(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!check_nargs(nargs, 6, "scale_pass(grads, coef, inv_scale, clamp, found_inf, zero_if_inf)")) return nullptr;
  std::optional<Clamp> clamp;
  if (!clamp_arg(args[3], clamp)) return nullptr;
  const int zero_if_inf = PyObject_IsTrue(args[5]);
  if (zero_if_inf < 0) return nullptr;
  at::Tensor coef;
  std::optional<at::Tensor> inv_scale, found_inf;
  CpuGrads grads;
  if (modes_active() || !tensor_arg(args[1], coef) || !optional_tensor(args[2], inv_scale) ||
      !optional_tensor(args[4], found_inf) || !gather_list(args[0], /*writable=*/true, "ampclip scale_pass", grads)) {
    Py_RETURN_NONE;
  }
  run_releasing_gil_if_large(grads, [&] { return tensors_of(args[0]); }, [&] {
    scale_pass_cpu(grads, coef, inv_scale, clamp, found_inf, zero_if_inf != 0);
  });
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

// clip_grad_norm(grads, max_norm, norm_type) -> Tensor | None: norm pass, coefficient and scale pass in one
// call (on 10,000 tiny gradients, crossing into C++ once instead of three times saves about 1.5 ms).
PyObject* clip_grad_norm(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!check_nargs(nargs, 3, "clip_grad_norm(grads, max_norm, norm_type)")) return nullptr;
  const double max_norm = PyFloat_AsDouble(args[1]);
  const double norm_type = PyFloat_AsDouble(args[2]);
  if (PyErr_Occurred()) return nullptr;
  CpuGrads grads;
  if (modes_active() || !gather_list(args[0], /*writable=*/true, "ampclip clip_grad_norm_", grads)) Py_RETURN_NONE;
  at::Tensor total = run_releasing_gil_if_large(
      grads, [&] { return tensors_of(args[0]); }, [&] { return clip_grad_norm_cpu(grads, max_norm, norm_type); });
  return THPVariable_Wrap(std::move(total));
  END_HANDLE_TH_ERRORS
}

// clip_params(params: list | tuple, max_norm: float, norm_type: float) -> Tensor | None
//
// Clips the gradients of `params` in place like clip_grad_norm_ and returns the pre-clip total norm, or
// returns None, having changed nothing, when the input needs the general Python path: a parameter that is
// not a Tensor or Parameter (tensor subclasses such as DTensor), or a gradient that is not a dense CPU
// float tensor that can be written in place (other devices, sparse, tensor subclasses, other dtypes,
// expanded tensors; the general path gives the errors). No gradient at all also returns None.
PyObject* clip_params(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!check_nargs(nargs, 3, "clip_params(params, max_norm, norm_type)")) return nullptr;
  if (!PyList_Check(args[0]) && !PyTuple_Check(args[0])) {
    PyErr_SetString(PyExc_TypeError, "clip_params: params must be a list or a tuple");
    return nullptr;
  }
  const double max_norm = PyFloat_AsDouble(args[1]);
  const double norm_type = PyFloat_AsDouble(args[2]);
  if (PyErr_Occurred()) return nullptr;
  if (modes_active()) Py_RETURN_NONE;

  const Py_ssize_t count = PySequence_Fast_GET_SIZE(args[0]);
  PyObject** items = PySequence_Fast_ITEMS(args[0]);
  CpuGrads grads;
  grads.spans.reserve(count);
  for (Py_ssize_t i = 0; i < count; ++i) {
    if (!THPVariable_CheckExact(items[i])) Py_RETURN_NONE;  // a subclass's .grad may mean something else
    const at::Tensor& grad = THPVariable_Unpack(items[i]).grad();
    if (!grad.defined()) continue;
    if (!is_kernel_grad(grad) || grad.key_set().has(c10::DispatchKey::Python) ||
        (!grad.is_contiguous() && at::has_internal_overlap(grad) == at::MemOverlap::Yes)) {
      Py_RETURN_NONE;
    }
    grads.add(grad, /*writable=*/true);
  }
  if (grads.spans.empty()) Py_RETURN_NONE;

  const auto gradients = [&] {
    std::vector<at::Tensor> out;
    for (Py_ssize_t i = 0; i < count; ++i) {
      const at::Tensor& grad = THPVariable_Unpack(items[i]).grad();
      if (grad.defined()) out.push_back(grad);
    }
    return out;
  };
  at::Tensor total = run_releasing_gil_if_large(
      grads, gradients, [&] { return clip_grad_norm_cpu(grads, max_norm, norm_type); });
  return THPVariable_Wrap(std::move(total));
  END_HANDLE_TH_ERRORS
}

// clip_finalize(per_tensor, total, max_norm, mode, group_index, num_groups, norm_type, eps, rule)
//   -> (coef, group_coef, group_norms, post_clip_norm) | None;  max_norm is a number or a 0-d tensor.
PyObject* clip_finalize(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!check_nargs(nargs, 9, "clip_finalize(per_tensor, total, max_norm, mode, group_index, num_groups, "
                             "norm_type, eps, rule)")) {
    return nullptr;
  }
  at::Tensor per_tensor, total;
  std::optional<at::Tensor> max_norm_tensor, group_index;
  double max_norm = 0.0;
  if (THPVariable_Check(args[2])) {
    if (!optional_tensor(args[2], max_norm_tensor)) Py_RETURN_NONE;
  } else {
    max_norm = PyFloat_AsDouble(args[2]);
  }
  const int64_t mode = PyLong_AsLongLong(args[3]);
  const int64_t num_groups = PyLong_AsLongLong(args[5]);
  const double norm_type = PyFloat_AsDouble(args[6]);
  const double eps = PyFloat_AsDouble(args[7]);
  const int64_t rule = PyLong_AsLongLong(args[8]);
  if (PyErr_Occurred()) return nullptr;
  if (modes_active() || !tensor_arg(args[0], per_tensor) || !tensor_arg(args[1], total) ||
      !optional_tensor(args[4], group_index)) {
    Py_RETURN_NONE;
  }
  auto [coef, group_coef, group_norms, post] = clip_finalize_cpu(per_tensor, total, max_norm_tensor, max_norm, mode,
                                                                 group_index, num_groups, norm_type, eps, rule);
  return PyTuple_Pack(4, THPVariable_Wrap(std::move(coef)), THPVariable_Wrap(std::move(group_coef)),
                      THPVariable_Wrap(std::move(group_norms)), THPVariable_Wrap(std::move(post)));
  END_HANDLE_TH_ERRORS
}

// scaler_update(state, history, found_inf, grad_norm, slot, growth_factor, backoff_factor, growth_interval,
//               hysteresis, min_scale, max_scale, dynamic) -> True | None
PyObject* scaler_update(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!check_nargs(nargs, 12, "scaler_update(state, history, found_inf, grad_norm, slot, growth_factor, "
                              "backoff_factor, growth_interval, hysteresis, min_scale, max_scale, dynamic)")) {
    return nullptr;
  }
  const int64_t slot = PyLong_AsLongLong(args[4]);
  const double growth_factor = PyFloat_AsDouble(args[5]);
  const double backoff_factor = PyFloat_AsDouble(args[6]);
  const int64_t growth_interval = PyLong_AsLongLong(args[7]);
  const int64_t hysteresis = PyLong_AsLongLong(args[8]);
  const double min_scale = PyFloat_AsDouble(args[9]);
  const double max_scale = PyFloat_AsDouble(args[10]);
  const int dynamic = PyObject_IsTrue(args[11]);
  if (PyErr_Occurred() || dynamic < 0) return nullptr;
  at::Tensor state, history;
  std::optional<at::Tensor> found_inf, grad_norm;
  if (modes_active() || !tensor_arg(args[0], state) || !tensor_arg(args[1], history) ||
      !optional_tensor(args[2], found_inf) || !optional_tensor(args[3], grad_norm)) {
    Py_RETURN_NONE;
  }
  scaler_update_cpu(state, history, found_inf, grad_norm, slot, growth_factor, backoff_factor, growth_interval,
                    hysteresis, min_scale, max_scale, dynamic != 0);
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

// clip_stats_update(counters, layer_stats, per_tensor, coef, found_inf) -> True | None
PyObject* clip_stats_update(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!check_nargs(nargs, 5, "clip_stats_update(counters, layer_stats, per_tensor, coef, found_inf)")) return nullptr;
  at::Tensor counters, per_tensor, coef, found_inf;
  std::optional<at::Tensor> layer_stats;
  if (modes_active() || !tensor_arg(args[0], counters) || !optional_tensor(args[1], layer_stats) ||
      !tensor_arg(args[2], per_tensor) || !tensor_arg(args[3], coef) || !tensor_arg(args[4], found_inf)) {
    Py_RETURN_NONE;
  }
  clip_stats_update_cpu(counters, layer_stats, per_tensor, coef, found_inf);
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

// present_grads(params: list | tuple) -> (grads, indices | None) | None
//
// The gradients that exist, in parameter order, and their parameters' indices (None when every parameter
// has one, the common case). None when a parameter is not a plain Tensor or Parameter.
PyObject* present_grads(PyObject* /*module*/, PyObject* params) {
  HANDLE_TH_ERRORS
  if (!PyList_Check(params) && !PyTuple_Check(params)) Py_RETURN_NONE;
  const Py_ssize_t count = PySequence_Fast_GET_SIZE(params);
  PyObject** items = PySequence_Fast_ITEMS(params);
  for (Py_ssize_t i = 0; i < count; ++i) {
    if (!THPVariable_CheckExact(items[i])) Py_RETURN_NONE;
  }
  pybind11::list grads;
  pybind11::object indices = pybind11::none();  // a list from the first parameter without a gradient
  for (Py_ssize_t i = 0; i < count; ++i) {
    const at::Tensor& grad = THPVariable_Unpack(items[i]).grad();
    if (!grad.defined()) {
      if (indices.is_none()) {
        pybind11::list before;
        for (Py_ssize_t j = 0; j < i; ++j) before.append(j);
        indices = before;
      }
      continue;
    }
    grads.append(pybind11::reinterpret_steal<pybind11::object>(THPVariable_Wrap(grad)));
    if (!indices.is_none()) indices.cast<pybind11::list>().append(i);
  }
  return pybind11::make_tuple(grads, indices).release().ptr();
  END_HANDLE_TH_ERRORS
}

// tensor_signature(tensors: list | tuple) -> (hash: int, signature: bytes) | None
//
// What a kernel table of these tensors depends on, per tensor: data pointer, element count, dtype, device,
// sizes and strides (all of them: equal signatures mean equal layouts, never a hash collision). Not the
// tensor's identity: the new gradients a backward allocates after zero_grad(set_to_none=True) can land at
// the old addresses, and then the old table fits them. Comparing two signatures is a memcmp; the 64-bit
// hash is the dictionary key. None when an item is not a plain tensor.
PyObject* tensor_signature(PyObject* /*module*/, PyObject* tensors) {
  HANDLE_TH_ERRORS
  if (!PyList_Check(tensors) && !PyTuple_Check(tensors)) Py_RETURN_NONE;
  const Py_ssize_t count = PySequence_Fast_GET_SIZE(tensors);
  PyObject** items = PySequence_Fast_ITEMS(tensors);
  constexpr uint64_t kPrime = 0x100000001b3ULL;  // FNV-1a's multiplier, applied per 64-bit word
  std::vector<uint64_t> words;
  words.reserve(static_cast<size_t>(count) * 6);
  uint64_t hash = 0xcbf29ce484222325ULL;
  const auto push = [&](uint64_t w) {
    words.push_back(w);
    hash = (hash ^ w) * kPrime;
  };
  for (Py_ssize_t i = 0; i < count; ++i) {
    if (!is_plain(items[i])) Py_RETURN_NONE;
    const at::Tensor& t = THPVariable_Unpack(items[i]);
    push(t.has_storage() ? reinterpret_cast<uintptr_t>(t.const_data_ptr()) : 0);
    push(static_cast<uint64_t>(t.numel()));
    push(static_cast<uint64_t>(t.scalar_type()) | (static_cast<uint64_t>(t.device().index() + 1) << 16) |
         (static_cast<uint64_t>(t.device().type()) << 32) | (static_cast<uint64_t>(t.dim()) << 48));
    for (int64_t d = 0; d < t.dim(); ++d) {
      push(static_cast<uint64_t>(t.sizes()[d]));
      push(static_cast<uint64_t>(t.strides()[d]));
    }
  }
  pybind11::bytes packed(reinterpret_cast<const char*>(words.data()), words.size() * sizeof(uint64_t));
  return pybind11::make_tuple(hash, packed).release().ptr();
  END_HANDLE_TH_ERRORS
}

// cuda_archs() -> tuple of str: the GPU code the CUDA kernels hold, named as torch.cuda.get_arch_list() names
// it ('sm_90': machine code for sm_90; 'compute_90': PTX, compiled for newer GPUs when loaded). setup.py passes
// the list as AMPCLIP_CUDA_ARCHS ("sm_80,sm_90,compute_90"); empty in a build without the CUDA kernels.
PyObject* cuda_archs(PyObject* /*module*/, PyObject* /*unused*/) {
#ifdef AMPCLIP_CUDA_ARCHS
  PyObject* joined = PyUnicode_FromString(AMPCLIP_CUDA_ARCHS);
  if (joined == nullptr) return nullptr;
  PyObject* comma = PyUnicode_FromString(",");
  PyObject* parts = comma == nullptr ? nullptr : PyUnicode_Split(joined, comma, -1);
  Py_XDECREF(comma);
  Py_DECREF(joined);
  if (parts == nullptr) return nullptr;
  PyObject* out = PyList_AsTuple(parts);
  Py_DECREF(parts);
  return out;
#else
  return PyTuple_New(0);
#endif
}

#define AMPCLIP_FASTCALL(fn) reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fn)), METH_FASTCALL

PyMethodDef methods[] = {
    {"norm_pass", AMPCLIP_FASTCALL(norm_pass), "The norm pass on CPU gradients; None when the call needs the dispatcher."},
    {"scale_pass", AMPCLIP_FASTCALL(scale_pass), "The scale pass on CPU gradients; None when it needs the dispatcher."},
    {"clip_grad_norm", AMPCLIP_FASTCALL(clip_grad_norm), "Norm pass, coefficient and scale pass in one call."},
    {"clip_params", AMPCLIP_FASTCALL(clip_params),
     "clip_grad_norm_ straight from parameters; None when the input needs the general path."},
    {"clip_finalize", AMPCLIP_FASTCALL(clip_finalize), "The clip coefficient and post-clip norm from the norms."},
    {"scaler_update", AMPCLIP_FASTCALL(scaler_update), "One dynamic loss-scale update and its history entry."},
    {"clip_stats_update", AMPCLIP_FASTCALL(clip_stats_update), "Clipped/skipped counts and per-layer norms."},
    {"present_grads", present_grads, METH_O,
     "(gradients that exist, their parameter indices or None when all exist); None for non-plain parameters."},
    {"tensor_signature", tensor_signature, METH_O,
     "(hash, bytes) of each tensor's data pointer, size, dtype, device, sizes and strides, for table caches."},
    {"cuda_archs", cuda_archs, METH_NOARGS, "The GPU architectures the CUDA kernels were built for; () without them."},
    {nullptr, nullptr, 0, nullptr},
};

#undef AMPCLIP_FASTCALL

}  // namespace

int add_adaptive_methods(PyObject* module);  // csrc/adaptive_entry.cpp
}  // namespace ampclip

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, ampclip::methods};
  PyObject* m = PyModule_Create(&module);
  if (m != nullptr && ampclip::add_adaptive_methods(m) < 0) Py_CLEAR(m);
#ifdef AMPCLIP_WITH_CUDA
  if (m != nullptr && !ampclip::cuda::add_bindings(m)) Py_CLEAR(m);  // the CUDA kernels' entries
#endif
  return m;
}
