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
    torch_cuda = __import__("torch").version.cuda
    build_cuda = (
        cuda_sources
        and os.environ.get("AMPCLIP_SKIP_CUDA_BUILD") != "1"
        and cpp_extension.CUDA_HOME is not None
        and torch_cuda is not None
    )
    if build_cuda:
        # Fail before compiling anything when the toolkit cannot build for this torch (torch's own check
        # comes only after the CPU sources are compiled).
        import re
        import subprocess

        nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
        try:
            found = re.search(r"release (\d+)\.(\d+)", subprocess.run([nvcc, "--version"], capture_output=True,
                                                                      text=True).stdout)
        except OSError:
            found = None
        nvcc_cuda = f"{found.group(1)}.{found.group(2)}" if found else "unknown"
        if nvcc_cuda.split(".")[0] != torch_cuda.split(".")[0]:
            sys.exit(f"ampclip: nvcc at {nvcc} is CUDA {nvcc_cuda}, torch {__import__('torch').__version__} was "
                     f"built with CUDA {torch_cuda}; the major versions must match. Point CUDA_HOME at a CUDA "
                     f"{torch_cuda.split('.')[0]} toolkit, or set AMPCLIP_SKIP_CUDA_BUILD=1 to build the CPU "
                     "kernels only.")
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.6;8.9;9.0+PTX")
        # The GPU code compiled in, as torch.cuda.get_arch_list() names it, for ampclip._C.cuda_archs().
        archs = [flag.rsplit("code=", 1)[1] for flag in cpp_extension._get_cuda_arch_flags() if "code=" in flag]
        ext = cpp_extension.CUDAExtension(
            "ampclip._C",
            sources + cuda_sources + sorted(glob.glob("csrc/cuda/*.cpp")),
            define_macros=[("AMPCLIP_WITH_CUDA", "1")],
            extra_compile_args={"cxx": [*cxx_flags, f'-DAMPCLIP_CUDA_ARCHS="{",".join(archs)}"'], "nvcc": ["-O3"]},
            extra_link_args=openmp,
        )
    else:
        ext = cpp_extension.CppExtension(
            "ampclip._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=openmp
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
