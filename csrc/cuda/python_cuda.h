// The CUDA kernels' entries in the Python module ampclip._C, in a build with AMPCLIP_WITH_CUDA (setup.py
// defines it when it compiles csrc/cuda/). Host-only: no CUDA header.
#pragma once

#include <Python.h>

namespace ampclip::cuda {

// Adds cuda_norm_pass, cuda_scale_pass and cuda_clip_finalize to `module`. False, with a Python error set,
// when that fails.
bool add_bindings(PyObject* module);

}  // namespace ampclip::cuda
