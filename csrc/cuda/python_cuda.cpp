// The CUDA kernels' entries in ampclip._C (csrc/cuda/fused_clip_cuda.h), called by the `cuda` backend adapter
// (ampclip/backends/cuda.py) and nothing else. Compiled by the host compiler in a build with AMPCLIP_WITH_CUDA
// and attached to the module by PyInit__C (csrc/python_entry.cpp).
//
// The adapter owns the tensor table (ampclip/backends/tensor_table.py) and passes its sections; these entries
// convert the arguments with pybind11 and call the host functions, which check everything before they
// allocate or launch (a bad argument is a RuntimeError, nothing written). The one thing added here: the scale
// pass writes the gradients through raw pointers, so it bumps their version counters, as torch's in-place
// mul_ and the CPU kernels do (autograd then refuses a backward through a gradient changed under it).
#include "python_cuda.h"

#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>

#include "fused_clip_cuda.h"

namespace ampclip::cuda {
namespace {

namespace py = pybind11;

// The tensors of a list or tuple, each checked to be a tensor, without copying them out (a scale pass over
// 10,000 gradients would spend about a millisecond converting a std::vector<at::Tensor>).
PyObject* const* tensor_items(py::handle seq, Py_ssize_t& count) {
  if (!PyList_Check(seq.ptr()) && !PyTuple_Check(seq.ptr())) {
    throw py::type_error("cuda_scale_pass: grads must be a list or a tuple of tensors");
  }
  count = PySequence_Fast_GET_SIZE(seq.ptr());
  PyObject* const* items = PySequence_Fast_ITEMS(seq.ptr());
  for (Py_ssize_t i = 0; i < count; ++i) {
    if (!THPVariable_Check(items[i])) {
      throw py::type_error("cuda_scale_pass: grads[" + std::to_string(i) + "] is not a tensor");
    }
  }
  return items;
}

// scale_pass, then a version bump of every gradient in `grads` (the tensors the table points at, or whose
// staging buffers it points at). All gradients are bumped: whether a block wrote its chunk (found_inf, a
// coefficient of exactly 1) is decided on the device, and a bump too many costs nothing.
void scale_pass_entry(py::handle grads, const at::Tensor& ptrs, const at::Tensor& numels, const at::Tensor& codes,
                      const at::Tensor& chunk_begin, const at::Tensor& chunk_tensor, int64_t chunk,
                      const at::Tensor& coef, const std::optional<at::Tensor>& inv_scale,
                      std::optional<double> clamp_min, std::optional<double> clamp_max,
                      const std::optional<at::Tensor>& found_inf, bool zero_if_inf) {
  Py_ssize_t count = 0;
  PyObject* const* items = tensor_items(grads, count);  // every check before the launch
  scale_pass(ptrs, numels, codes, chunk_begin, chunk_tensor, chunk, coef, inv_scale, clamp_min, clamp_max, found_inf,
             zero_if_inf);
  for (Py_ssize_t i = 0; i < count; ++i) {
    c10::TensorImpl* impl = THPVariable_Unpack(items[i]).unsafeGetTensorImpl();
    if (!impl->is_inference()) impl->bump_version();
  }
}

}  // namespace

bool add_bindings(PyObject* module) {
  try {
    auto m = py::reinterpret_borrow<py::module_>(module);
    m.def("cuda_norm_pass", &norm_pass,
          "(per_tensor_norms, total_norm, found_inf) of a table's tensors on their GPU (csrc/cuda/README.md).",
          py::arg("ptrs"), py::arg("numels"), py::arg("codes"), py::arg("chunk_begin"), py::arg("chunk_tensor"),
          py::arg("chunk"), py::arg("fp64"), py::arg("inv_scale"), py::arg("norm_type"), py::arg("clamp_min"),
          py::arg("clamp_max"));
    m.def("cuda_scale_pass", &scale_pass_entry,
          "In place g <- clamp(g * inv_scale) * coef over a table's tensors; bumps the version of each of grads.",
          py::arg("grads"), py::arg("ptrs"), py::arg("numels"), py::arg("codes"), py::arg("chunk_begin"),
          py::arg("chunk_tensor"), py::arg("chunk"), py::arg("coef"), py::arg("inv_scale"), py::arg("clamp_min"),
          py::arg("clamp_max"), py::arg("found_inf"), py::arg("zero_if_inf"));
    m.def("cuda_clip_finalize", &clip_finalize,
          "(coef, group_coef, group_norms, post_clip_norm) from the norms, in one block on the GPU.",
          py::arg("per_tensor"), py::arg("total"), py::arg("max_norm"), py::arg("mode"), py::arg("group_index"),
          py::arg("num_groups"), py::arg("norm_type"), py::arg("eps"), py::arg("rule"));
    return true;
  } catch (py::error_already_set& e) {
    e.restore();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ImportError, e.what());
  }
  return false;
}

}  // namespace ampclip::cuda
