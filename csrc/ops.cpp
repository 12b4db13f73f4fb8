// Schemas of the compiled ampclip kernels. The Python op layer (ampclip/ops.py) defines the public
// ampclip:: ops and calls these as the "cpp" backend; registering them with TORCH_LIBRARY (not bare pybind)
// makes them real dispatcher ops that torch.compile and opcheck can see. Device kernels are registered
// with TORCH_LIBRARY_IMPL next to them: cpu/ always, cuda/ when built with a CUDA toolkit.

#include <torch/library.h>

namespace ampclip {

bool built_with_cuda() {
#ifdef AMPCLIP_WITH_CUDA
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY(ampclip_C, m) {
  m.def("norm_pass(Tensor[] grads, Tensor? inv_scale, float norm_type) -> (Tensor, Tensor, Tensor)");
  m.def(
      "scale_pass(Tensor(a!)[] grads, Tensor coef, Tensor? inv_scale, float? clip_value, Tensor? found_inf, "
      "bool zero_if_inf) -> ()");
  // norm_pass, the coefficient min(1, max_norm / (norm + 1e-6)) and scale_pass in one call; returns the norm.
  m.def("clip_grad_norm_(Tensor(a!)[] grads, float max_norm, float norm_type) -> Tensor");
  m.def("built_with_cuda() -> bool", &built_with_cuda);
}

}  // namespace ampclip
