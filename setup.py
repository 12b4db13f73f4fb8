"""Builds the optional compiled extension ``ampclip._C`` against the installed torch.

CPU kernels are always built. CUDA C++ kernels (``csrc/cuda/*.cu``) are built for sm_80+ into the same
extension when torch is a CUDA build and a CUDA toolkit of the same major version is found
(:func:`cuda_plan`), unless ``AMPCLIP_SKIP_CUDA_BUILD=1``. The architecture list comes from
``TORCH_CUDA_ARCH_LIST`` (default 8.0;8.6;8.9;9.0+PTX when no GPU is visible). Set
``AMPCLIP_SKIP_EXTENSION=1`` to install the pure-Python package only (reference and Triton backends).

A part that cannot be built never fails the install: without a working C++ compiler (``$CXX``, else
``c++``) the extension is skipped; without a usable toolkit, or when nvcc or the linker fails on the CUDA
kernels, the extension holds the CPU kernels only; when the CPU kernels fail to compile too, the package
installs without the extension. Each prints one note. ``AMPCLIP_STRICT_BUILD=1`` turns a compiler or linker
error into a failed install instead (the Makefile sets it: a kernel that stops compiling must fail
``make test``, not skip its tests).

``pip install . --no-build-isolation`` builds against the torch you have. ``pip install .`` builds in an
isolated environment against the newest torch pip finds there; the torch it compiled against is recorded
in ``ampclip/_build_info.py``, and ``ampclip._extension_loader`` rebuilds the extension against the running
torch when the two differ, instead of importing a binary that does not fit.

The C++ standard is left to torch's build helpers: they add ``-std=c++20`` (torch 2.13 and 2.14), and
torch 2.14's headers refuse anything older.

Importing this file (the tests do) builds nothing: the build runs only as ``__main__``, which is how pip's
build backend and ``python setup.py`` run it.
"""

import glob
import json
import os
import re
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
ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0+PTX"

# What the build decided, for ampclip/_build_info.py: set by main(), and by BuildExt when the C++ build fails.
BUILD = {"torch_version": None, "skipped": None}


def _note(message: str) -> None:
    # pip shows a build's output only with -v or on failure; the same reason reaches the user at import
    # time through ampclip/_build_info.py.
    print(f"\n*** ampclip: {message}\n", file=sys.stderr, flush=True)


def _failure(exc: BaseException) -> str:
    """The exception in a few words: a failed compiler or linker command comes with the whole command line
    (hundreds of characters), and its output is in the log already."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines and len(lines[0]) <= 120 else type(exc).__name__


def _strict() -> bool:
    return os.environ.get("AMPCLIP_STRICT_BUILD") == "1"


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


# ---- the CUDA kernels: whether, and with which toolkit --------------------------------------------------


def _cuda_lib_dir(home: str) -> str:
    """Where torch's build helpers look for the CUDA runtime (cpp_extension.library_paths): <home>/lib64,
    or <home>/lib when only that exists."""
    lib64, lib = os.path.join(home, "lib64"), os.path.join(home, "lib")
    return lib if not os.path.exists(lib64) and os.path.exists(lib) else lib64


def toolkit_problem(home: str):
    """Why ``home`` cannot build the CUDA kernels, or None. torch's build helpers run <home>/bin/nvcc,
    include <home>/include and link ``-lcudart`` from <home>/lib64 (or lib): a folder that lacks one fails
    only at the link, minutes of nvcc later."""
    lib_dir = _cuda_lib_dir(home)
    if not os.path.isfile(os.path.join(home, "bin", "nvcc")):
        return f"{home} has no bin/nvcc"
    if not os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
        return f"{home} has no include/cuda_runtime.h"
    if not any(os.path.isfile(os.path.join(lib_dir, name)) for name in ("libcudart.so", "libcudart.a")):
        return f"{home} has no {os.path.basename(lib_dir)}/libcudart.so (the CUDA runtime the kernels link)"
    return None


def _nvcc_own_home(nvcc: str):
    """The toolkit folder of the nvcc that ``nvcc`` runs, as nvcc reports it (``_HERE_``, its bin folder, in
    its dry-run output), or None. A wrapper script on PATH (/usr/local/bin/nvcc running
    /usr/local/cuda-13.0/bin/nvcc) is neither inside the toolkit nor a symlink into it."""
    try:
        out = subprocess.run([nvcc, "-dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.dirname(os.path.realpath(found.group(1).strip())) if found else None


def find_cuda_home(environ=None):
    """(the CUDA toolkit folder to build with, None), or (None, why no toolkit can build the kernels).

    ``CUDA_HOME`` (else ``CUDA_PATH``) when set, as torch takes it. Else the toolkit of the ``nvcc`` on PATH:
    torch takes the folder above nvcc's ``bin/`` (``/usr/local`` for ``/usr/local/bin/nvcc``); this also tries
    the folder a symlinked nvcc points into and the one nvcc itself reports, and takes the first that holds
    nvcc, the headers and the runtime library. Without nvcc on PATH, ``/usr/local/cuda`` (torch's default).
    """
    environ = os.environ if environ is None else environ
    explicit = environ.get("CUDA_HOME") or environ.get("CUDA_PATH")
    if explicit:
        problem = toolkit_problem(explicit)
        return (None, f"CUDA_HOME={explicit} is no usable toolkit: {problem}") if problem else (explicit, None)
    nvcc = shutil.which("nvcc", path=environ.get("PATH", os.defpath))
    if nvcc is None:
        default = "/usr/local/cuda"
        if not os.path.isdir(default):
            return None, "no CUDA toolkit found (no nvcc on PATH, no CUDA_HOME, no /usr/local/cuda)"
        problem = toolkit_problem(default)
        return (None, f"{default} is no usable toolkit: {problem}") if problem else (default, None)

    def candidates():  # cheapest first: the last one runs nvcc
        yield os.path.dirname(os.path.dirname(nvcc))
        yield os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        yield _nvcc_own_home(nvcc)

    problems = {}
    for home in candidates():
        if home and home not in problems:
            problems[home] = toolkit_problem(home)
            if problems[home] is None:
                return home, None
    return None, f"the nvcc on PATH ({nvcc}) belongs to no usable toolkit: {'; '.join(problems.values())}"


def nvcc_cuda_version(nvcc: str):
    """The CUDA version ``nvcc --version`` reports ("13.0"), or None."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+)\.(\d+)", out)
    return f"{found.group(1)}.{found.group(2)}" if found else None


def torch_in_use():
    """(version, CUDA version or None, file) of the torch this interpreter imports outside the build, or
    None when it imports none. ``pip install .`` builds in an isolated environment, its own torch first on
    ``sys.path`` (through PYTHONPATH); ``python -E`` ignores that and sees the environment being installed
    into, whose torch is the one ampclip will run with."""
    code = "import json, torch; print(json.dumps([torch.__version__, torch.version.cuda, torch.__file__]))"
    try:
        out = subprocess.run([sys.executable, "-E", "-c", code], capture_output=True, text=True, timeout=300)
        return tuple(json.loads(out.stdout.strip().splitlines()[-1])) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def cuda_plan(torch, environ=None, running=torch_in_use):
    """(toolkit folder, None) when the CUDA kernels are to be built with ``torch``; else (None, why not), the
    reason None when there is nothing to say (no CUDA sources, ``AMPCLIP_SKIP_CUDA_BUILD=1``, a CPU build
    of torch). ``running`` tells which torch ampclip will run with (:func:`torch_in_use`): kernels built
    against another would never be loaded, so they are not built (the cheap checks come first)."""
    environ = os.environ if environ is None else environ
    torch_cuda = torch.version.cuda
    has_sources = bool(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    if not has_sources or environ.get("AMPCLIP_SKIP_CUDA_BUILD") == "1" or torch_cuda is None:
        return None, None
    home, problem = find_cuda_home(environ)
    if problem:
        return None, problem
    nvcc = os.path.join(home, "bin", "nvcc")
    nvcc_cuda = nvcc_cuda_version(nvcc)
    if nvcc_cuda is None or nvcc_cuda.split(".")[0] != torch_cuda.split(".")[0]:
        return None, (f"{nvcc} is CUDA {nvcc_cuda or '(version unknown)'} and torch {torch.__version__} was built "
                      f"with CUDA {torch_cuda}; the major versions must match (point CUDA_HOME at a CUDA "
                      f"{torch_cuda.split('.')[0]} toolkit)")
    other = running()
    if other is not None and other[2] != torch.__file__ and tuple(other[:2]) != (torch.__version__, torch_cuda):
        version, cuda = other[:2]
        if cuda is None:
            return None, (f"this Python runs torch {version}, a build without CUDA (the isolated build compiles "
                          f"against torch {torch.__version__})")
        return None, (f"this Python runs torch {version}, not the isolated build's torch {torch.__version__}: "
                      "ampclip._C is rebuilt against it when first imported")
    return home, None


# ---- build commands ---------------------------------------------------------------------------------------


def _write_build_info(package_dir: str) -> None:
    os.makedirs(package_dir, exist_ok=True)
    with open(os.path.join(package_dir, "_build_info.py"), "w") as f:
        f.write(
            "# Written by setup.py when ampclip was built; read by ampclip._extension_loader. Not in git.\n"
            f"TORCH_VERSION = {BUILD['torch_version']!r}  # the torch ampclip._C was compiled against\n"
            f"EXTENSION = {'skipped' if BUILD['skipped'] else 'built'!r}\n"
            f"NOTE = {BUILD['skipped']!r}  # why it was skipped\n"
        )


def _remove_stale_extension(package_dir: str) -> None:
    # An extension left by an earlier build would otherwise ship with, or shadow, this one.
    for stale in glob.glob(os.path.join(package_dir, "_C.*")):
        os.remove(stale)


def _skip_note(reason: str) -> str:
    return (f"installing without the compiled extension ampclip._C: {reason}. The reference and Triton backends "
            "work without it; to build the CPU kernels later, install a C++ compiler with OpenMP and ninja and run "
            f"`{HOW_TO_BUILD}` in this folder.")


def _cuda_note(reason: str) -> str:
    return (f"building ampclip._C without its CUDA kernels: {reason}. CUDA gradients use the Triton backend; "
            "see docs/install.md, \"The CUDA C++ kernels\", to build them.")


class BuildPy(build_py):
    """Adds ampclip/_build_info.py and ampclip/csrc/ to the build (to the source tree for an editable
    install, where the extension is built in place and the loader finds ../csrc)."""

    def run(self):
        super().run()
        if BUILD["skipped"]:
            _note(_skip_note(BUILD["skipped"]))
        source_dir = self.get_package_dir("ampclip")
        package_dir = source_dir if self.editable_mode else os.path.join(self.build_lib, "ampclip")
        _write_build_info(package_dir)
        if BUILD["skipped"]:
            _remove_stale_extension(package_dir)
        if not self.editable_mode:
            target = os.path.join(package_dir, "csrc")
            shutil.rmtree(target, ignore_errors=True)
            for pattern in CSRC_FILES:
                for path in glob.glob(os.path.join("csrc", pattern)):
                    dest = os.path.join(target, os.path.relpath(path, "csrc"))
                    self.mkpath(os.path.dirname(dest))
                    self.copy_file(path, dest, preserve_mode=False)


def _compile_flags():
    # at::parallel_for is a header template: without -fopenmp the kernels would silently run on one thread.
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    return ["-O3", *openmp], openmp  # the -std flag is torch's to choose (see the docstring)


def _cpu_extension():
    from torch.utils import cpp_extension

    cxx_flags, openmp = _compile_flags()
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    return cpp_extension.CppExtension("ampclip._C", sources, extra_compile_args={"cxx": cxx_flags},
                                      extra_link_args=openmp)


def _cuda_extension(home: str):
    """The extension with the CPU and the CUDA kernels, built with the toolkit in ``home``."""
    from torch.utils import cpp_extension

    # torch's helpers read the toolkit from this module global (their own guess is the folder above nvcc's
    # bin/, which is wrong for /usr/local/bin/nvcc); set it before the extension asks for its paths.
    cpp_extension.CUDA_HOME = home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    # The GPU code compiled in, as torch.cuda.get_arch_list() names it, for ampclip._C.cuda_archs().
    archs = [flag.rsplit("code=", 1)[1] for flag in cpp_extension._get_cuda_arch_flags() if "code=" in flag]
    cxx_flags, openmp = _compile_flags()
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    return cpp_extension.CUDAExtension(
        "ampclip._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp")),
        define_macros=[("AMPCLIP_WITH_CUDA", "1")],
        extra_compile_args={"cxx": [*cxx_flags, f'-DAMPCLIP_CUDA_ARCHS="{",".join(archs)}"'], "nvcc": ["-O3"]},
        extra_link_args=openmp,
    )


def _adopt(ext, other) -> None:
    """Makes ``ext`` build what ``other`` describes. The build command keeps records of the extension objects
    it was given (setuptools' ext_map, output names), so the object stays and its contents change."""
    for key, value in vars(other).items():
        if not key.startswith("_"):
            setattr(ext, key, value)


def _build_ext_command():
    from torch.utils import cpp_extension

    class BuildExt(cpp_extension.BuildExtension.with_options(use_ninja=True)):
        """torch's build_ext, deciding on the CUDA kernels when it runs (not each time pip runs this file),
        and falling back when a part fails to compile or link: the CUDA kernels to the CPU kernels alone,
        those to no extension (unless AMPCLIP_STRICT_BUILD=1)."""

        def run(self):
            import torch

            home, reason = cuda_plan(torch)
            if home:
                for ext in self.extensions:
                    _adopt(ext, _cuda_extension(home))
            elif reason:
                _note(_cuda_note(reason))
            super().run()
            # The extension's folder: the source tree's package for an in-place (editable) build.
            package_dir = os.path.dirname(self.get_ext_fullpath("ampclip._C"))
            if BUILD["skipped"]:
                _remove_stale_extension(package_dir)
                _write_build_info(package_dir)

        def build_extensions(self):
            compiler_state = dict(vars(self.compiler))  # torch's build_extensions patches the compiler
            try:
                return super().build_extensions()
            except Exception as exc:  # a compiler or linker error (their output is above), a failed check
                if _strict():
                    raise
                failed = exc
            if any(source.endswith(".cu") for ext in self.extensions for source in ext.sources):
                _note(_cuda_note(f"compiling or linking them failed ({_failure(failed)}; the compiler's output "
                                 "is above)"))
                for ext in self.extensions:
                    _adopt(ext, _cpu_extension())
                vars(self.compiler).clear()
                vars(self.compiler).update(compiler_state)
                try:
                    return super().build_extensions()
                except Exception as exc:
                    if _strict():
                        raise
                    failed = exc
            BUILD["skipped"] = f"compiling it failed ({_failure(failed)})"
            _note(_skip_note(BUILD["skipped"]))
            self.extensions = []  # nothing to copy into the source tree or to list as an output

    return BuildExt


def main():
    BUILD["torch_version"], BUILD["skipped"] = _plan()
    ext_modules, cmdclass = [], {"build_py": BuildPy}
    if not BUILD["skipped"]:
        ext_modules, cmdclass["build_ext"] = [_cpu_extension()], _build_ext_command()
    setup(packages=PACKAGES, package_dir=PACKAGE_DIR, package_data=PACKAGE_DATA, ext_modules=ext_modules,
          cmdclass=cmdclass)


if __name__ == "__main__":
    main()
