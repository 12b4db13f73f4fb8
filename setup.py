"""Builds the optional compiled extension ``ampclip._C`` against the installed torch.

CPU kernels are always built. CUDA C++ kernels (``csrc/cuda/*.cu``) are built for sm_80+ when a CUDA
toolkit and a CUDA build of torch are present, unless ``AMPCLIP_SKIP_CUDA_BUILD=1``. The architecture list
comes from ``TORCH_CUDA_ARCH_LIST`` (default 8.0;8.6;8.9;9.0+PTX when no GPU is visible). Set
``AMPCLIP_SKIP_EXTENSION=1`` to install the pure-Python package only (reference and Triton backends).
Without a working C++ compiler (``$CXX``, else ``c++``) the extension is skipped the same way, with a note.

``pip install . --no-build-isolation`` builds against the torch you have. ``pip install .`` builds in an
isolated environment against the newest torch pip finds there; the torch it compiled against is recorded
in ``ampclip/_build_info.py``, and ``ampclip._extension_loader`` rebuilds the extension against the running
torch when the two differ, instead of importing a binary that does not fit.

The C++ standard is left to torch's build helpers: they add ``-std=c++20`` (torch 2.13 and 2.14), and
torch 2.14's headers refuse anything older.
"""

import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

# ampclip and its subpackages (ampclip.backends, ...) live in ampclip/; the Triton kernels live at the top
# of the repository and install as ampclip.triton_kernels (a top-level triton_kernels clashes with Triton's).
# ampclip/data (the demo's corpus) is a package of data files only: listed, so that setuptools ships it.
PACKAGES = [*find_packages(include=["ampclip", "ampclip.*"]), "ampclip.data", "ampclip.triton_kernels"]
PACKAGE_DIR = {"ampclip": "ampclip", "ampclip.triton_kernels": "triton_kernels"}
PACKAGE_DATA = {"ampclip.data": ["*.txt"]}
# The C++ sources travel with the package (as ampclip/csrc/) so that the extension can be rebuilt against
# another torch after installation (ampclip._extension_loader).
CSRC_FILES = ("*.cpp", "*.h", "cpu/*.cpp", "cpu/*.h", "cuda/*.cu", "cuda/*.cuh", "cuda/*.h", "cuda/*.cpp")
HOW_TO_BUILD = "pip install . --no-build-isolation"


def _note(message: str) -> None:
    # pip shows a build's output only with -v or on failure; the same reason reaches the user at import
    # time through ampclip/_build_info.py.
    print(f"\n*** ampclip: {message}\n", file=sys.stderr, flush=True)


def _torch_version():
    try:
        import torch
    except ImportError as exc:
        return None, f"torch could not be imported when ampclip was built ({exc})"
    return torch.__version__, None


def _compiler_problem():
    """Why no C++ compiler can build the extension, or None. torch's build helpers call ``$CXX`` (else
    ``c++``) for the ABI check and for ninja builds."""
    cxx = os.environ.get("CXX", "c++")
    exe = shutil.which(cxx.split()[0]) if cxx.strip() else None
    if exe is None:
        return f"no C++ compiler found (`{cxx}` is not on PATH)"
    try:
        subprocess.run([exe, "--version"], check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"the C++ compiler `{cxx}` does not run: `{cxx} --version` failed ({type(exc).__name__})"
    return None


def _plan():
    """(torch version or None, None when the extension is built, else why it is skipped)."""
    torch_version, torch_problem = _torch_version()
    if os.environ.get("AMPCLIP_SKIP_EXTENSION") == "1":
        return torch_version, "AMPCLIP_SKIP_EXTENSION=1 was set"
    if torch_problem:
        return None, torch_problem
    return torch_version, _compiler_problem()


TORCH_VERSION, SKIPPED = _plan()


def _build_info() -> str:
    return (
        "# Written by setup.py when ampclip was built; read by ampclip._extension_loader. Not in git.\n"
        f"TORCH_VERSION = {TORCH_VERSION!r}  # the torch ampclip._C was compiled against\n"
        f"EXTENSION = {'skipped' if SKIPPED else 'built'!r}\n"
        f"NOTE = {SKIPPED!r}  # why it was skipped\n"
    )


class BuildPy(build_py):
    """Adds ampclip/_build_info.py and ampclip/csrc/ to the build (to the source tree for an editable
    install, where the extension is built in place and the loader finds ../csrc)."""

    def run(self):
        super().run()
        if SKIPPED:
            _note(
                f"installing without the compiled extension ampclip._C: {SKIPPED}. The reference and Triton "
                "backends work without it; to build the CPU kernels later, install a C++ compiler with OpenMP "
                f"and ninja and run `{HOW_TO_BUILD}` in this folder."
            )
        source_dir = self.get_package_dir("ampclip")
        package_dir = source_dir if self.editable_mode else os.path.join(self.build_lib, "ampclip")
        os.makedirs(package_dir, exist_ok=True)
        with open(os.path.join(package_dir, "_build_info.py"), "w") as f:
            f.write(_build_info())
        if SKIPPED:
            # An extension left by an earlier build would otherwise ship with, or shadow, this one.
            for stale in glob.glob(os.path.join(package_dir, "_C.*")):
                os.remove(stale)
        if not self.editable_mode:
            target = os.path.join(package_dir, "csrc")
            shutil.rmtree(target, ignore_errors=True)
            for pattern in CSRC_FILES:
                for path in glob.glob(os.path.join("csrc", pattern)):
                    dest = os.path.join(target, os.path.relpath(path, "csrc"))
                    self.mkpath(os.path.dirname(dest))
                    self.copy_file(path, dest, preserve_mode=False)


def _extensions():
    if SKIPPED:
        return [], {}
    import torch
    from torch.utils import cpp_extension

    # at::parallel_for is a header template: without -fopenmp the kernels would silently run on one thread.
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    cxx_flags = ["-O3", *openmp]  # the -std flag is torch's to choose (see the docstring)
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    torch_cuda = torch.version.cuda
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
            sys.exit(f"ampclip: nvcc at {nvcc} is CUDA {nvcc_cuda}, torch {torch.__version__} was "
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
setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data=PACKAGE_DATA,
    ext_modules=ext_modules,
    cmdclass={**cmdclass, "build_py": BuildPy},
)
