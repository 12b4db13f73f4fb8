"""Builds the optional compiled extension ``ampclip._C`` against the installed torch.

CPU kernels are always built. CUDA C++ kernels (``csrc/cuda/*.cu``) are built for sm_80+ when a CUDA
toolkit and a CUDA build of torch are present, unless ``AMPCLIP_SKIP_CUDA_BUILD=1``. The architecture list
comes from ``TORCH_CUDA_ARCH_LIST`` (default 8.0;8.6;8.9;9.0+PTX when no GPU is visible). Set
``AMPCLIP_SKIP_EXTENSION=1`` to install the pure-Python package only (reference and Triton backends).

Build with ``pip install -e . --no-build-isolation``: an isolated build fetches another torch and compiles
against the wrong headers.
"""

import glob
import os
import sys

from setuptools import setup

PACKAGES = ["ampclip", "ampclip.backends", "ampclip.triton_kernels"]
PACKAGE_DIR = {"ampclip": "ampclip", "ampclip.backends": "ampclip/backends", "ampclip.triton_kernels": "triton_kernels"}


def _extensions():
    if os.environ.get("AMPCLIP_SKIP_EXTENSION") == "1":
        return [], {}
    from torch.utils import cpp_extension

    # at::parallel_for is a header template: without -fopenmp the kernels would silently run on one thread.
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    cxx_flags = ["-O3", "-std=c++17", *openmp]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    build_cuda = (
        cuda_sources
        and os.environ.get("AMPCLIP_SKIP_CUDA_BUILD") != "1"
        and cpp_extension.CUDA_HOME is not None
        and __import__("torch").version.cuda is not None
    )
    if build_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.6;8.9;9.0+PTX")
        ext = cpp_extension.CUDAExtension(
            "ampclip._C",
            sources + cuda_sources,
            define_macros=[("AMPCLIP_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=openmp,
        )
    else:
        ext = cpp_extension.CppExtension(
            "ampclip._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=openmp
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
