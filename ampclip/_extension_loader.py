"""Loads the compiled extension ``ampclip._C``, making sure it fits the torch that is running.

A C++ extension compiled against one torch release and imported under another fails in the dynamic linker
(``undefined symbol``) at best and misbehaves at worst: torch has no stable C++ ABI across releases. An
isolated ``pip install .`` compiles against the newest torch that pip finds for its build environment, not
the one installed next to ampclip. So ``setup.py`` records the torch it compiled against in
``ampclip/_build_info.py``, and :func:`load` compares it with ``torch.__version__`` before importing
anything. On a mismatch, or when the import fails, it rebuilds the extension against the running torch
with ``torch.utils.cpp_extension.load`` from the C++ sources installed with the package (``ampclip/csrc``,
or ``csrc/`` beside the package in a source checkout), exactly as torch builds JIT extensions: ninja, a
build folder under torch's extensions folder (``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``), one per torch version, so the build runs once, and a file lock so that the
ranks of a torchrun job wait for one build. ``AMPCLIP_NO_JIT_BUILD=1`` turns the rebuild off. When the
extension cannot be had, :func:`load` returns ``None`` and one line that says what happened and how to
build it.

Standalone on purpose: it imports the standard library and torch only, never the package it loads for, so
it can run while that package is being imported.

Example::

    from ampclip import _extension_loader

    _C, problem = _extension_loader.load("ampclip._C")
    if _C is None:
        warnings.warn(f"ampclip: {problem}; CPU gradients use the reference backend", RuntimeWarning)
"""

from __future__ import annotations

import ast
import glob
import importlib.machinery
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
from types import ModuleType
from typing import Optional

import torch

__all__ = ["built_against", "load", "loaded_from"]

HOW_TO_BUILD = "`pip install . --no-build-isolation` (`pip install -e . --no-build-isolation` in a checkout)"
# Where each loaded extension came from (its file), for `python -m ampclip env`.
_LOADED_FROM: dict[str, str] = {}
_log = logging.getLogger("ampclip")


def loaded_from(name: str = "ampclip._C") -> Optional[str]:
    """The file the extension ``name`` was loaded from by :func:`load` (a JIT build's lies under torch's
    extensions folder), or None."""
    return _LOADED_FROM.get(name)


def _package_dirs(package: str) -> list[str]:
    """The folders of ``package``, found without importing it (importing ampclip would load _C)."""
    module = sys.modules.get(package)
    spec = getattr(module, "__spec__", None) if module is not None else None
    if spec is None:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            return []
    return list(spec.submodule_search_locations or []) if spec is not None else []


def _extension_file(dirs: list[str], leaf: str) -> Optional[str]:
    for folder in dirs:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(folder, leaf + suffix)
            if os.path.isfile(path):
                return path
    return None


def _read_build_info(dirs: list[str]) -> dict:
    """The variables of ``_build_info.py`` (written by setup.py), read without importing the package."""
    for folder in dirs:
        path = os.path.join(folder, "_build_info.py")
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    tree = ast.parse(f.read(), path)
                return {
                    node.targets[0].id: ast.literal_eval(node.value)
                    for node in tree.body
                    if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
                }
            except (OSError, SyntaxError, ValueError):  # a damaged file tells nothing: try the import
                return {}
    return {}


def built_against(package: str = "ampclip") -> Optional[str]:
    """The torch version the package's extension was compiled against, as recorded at build time, or None
    when nothing was recorded (an extension built by an older setup.py, or by hand)."""
    info = _read_build_info(_package_dirs(package))
    return info.get("TORCH_VERSION") if info.get("EXTENSION", "built") == "built" else None


def _not_built_note(package: str) -> Optional[str]:
    info = _read_build_info(_package_dirs(package))
    return info.get("NOTE") if info.get("EXTENSION") == "skipped" else None


def _import_file(name: str, path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)  # dlopen and PyInit run here
    spec.loader.exec_module(module)
    return module


def _register(name: str, module: ModuleType, path: str) -> ModuleType:
    """Make ``import name`` and ``from package import leaf`` give this module from now on."""
    sys.modules[name] = module
    package, _, leaf = name.rpartition(".")
    parent = sys.modules.get(package)
    if parent is not None:
        setattr(parent, leaf, module)
    _LOADED_FROM[name] = path
    return module


def _sources(dirs: list[str]) -> Optional[str]:
    """The folder of the C++ sources: ``csrc`` installed inside the package, or beside it in a checkout."""
    for folder in dirs:
        for candidate in (os.path.join(folder, "csrc"), os.path.join(os.path.dirname(folder), "csrc")):
            if os.path.isfile(os.path.join(candidate, "python_entry.cpp")):
                return candidate
    return None


def _scripts_dirs() -> list[str]:
    """Where pip puts console scripts (ninja's among them) for this interpreter: not on PATH in a venv
    that was not activated."""
    import sysconfig

    dirs = [sysconfig.get_path("scripts"), os.path.dirname(sys.executable)]
    try:
        import ninja  # the PyPI package carries the binary

        dirs.append(ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    return [d for d in dirs if d and os.path.isdir(d)]


def _path_with_scripts() -> str:
    path = os.environ.get("PATH", "")
    extra = [d for d in _scripts_dirs() if d not in path.split(os.pathsep)]
    return os.pathsep.join([path, *extra]) if path else os.pathsep.join(extra)


def _jit_problem(sources: Optional[str]) -> Optional[str]:
    """Why the extension cannot be rebuilt here, or None."""
    if os.environ.get("AMPCLIP_NO_JIT_BUILD") == "1":
        return "AMPCLIP_NO_JIT_BUILD=1 is set"
    if sources is None:
        return "its C++ sources are not installed"
    path = _path_with_scripts()
    cxx = os.environ.get("CXX", "c++")
    exe = shutil.which(cxx.split()[0], path=path) if cxx.strip() else None
    if exe is None:
        return f"no C++ compiler: `{cxx}` is not on PATH"
    try:
        subprocess.run([exe, "--version"], check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"the C++ compiler `{cxx}` does not run: `{cxx} --version` failed ({type(exc).__name__})"
    if shutil.which("ninja", path=path) is None:
        return "ninja is not installed (`pip install ninja`)"
    return None


def _build_dir(name: str) -> str:
    from torch.utils import cpp_extension

    # torch's own rule for JIT extensions: TORCH_EXTENSIONS_DIR, else a folder in the user's cache.
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    tag = f"{name.replace('.', '_')}-py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}"
    return os.path.join(root, tag)


def _jit_build(name: str, sources: str) -> tuple[ModuleType, str]:
    """Compiles the extension against the running torch (the same sources and flags as setup.py)."""
    from torch.utils import cpp_extension

    leaf = name.rpartition(".")[2]
    files = sorted(glob.glob(os.path.join(sources, "*.cpp")) + glob.glob(os.path.join(sources, "cpu", "*.cpp")))
    cuda_dir = os.path.join(sources, "cuda")
    cuda_files = sorted(glob.glob(os.path.join(cuda_dir, "*.cu")) + glob.glob(os.path.join(cuda_dir, "*.cpp")))
    with_cuda = bool(
        cuda_files
        and os.environ.get("AMPCLIP_SKIP_CUDA_BUILD") != "1"
        and cpp_extension.CUDA_HOME is not None
        and torch.version.cuda is not None
    )
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    defines = ["-DAMPCLIP_WITH_CUDA=1"] if with_cuda else []
    build_dir = _build_dir(name)
    os.makedirs(build_dir, exist_ok=True)
    if not glob.glob(os.path.join(build_dir, leaf + ".*")):
        _log.warning("ampclip: compiling %s against torch %s, once (cached in %s)", name, torch.__version__, build_dir)
    old_path = os.environ.get("PATH")
    os.environ["PATH"] = _path_with_scripts()  # ninja from this interpreter's scripts folder
    try:
        if with_cuda:
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.6;8.9;9.0+PTX")
        module = cpp_extension.load(
            name=leaf,  # the module's init function is PyInit_<leaf>
            sources=files + (cuda_files if with_cuda else []),
            extra_cflags=["-O3", *openmp, *defines],
            extra_cuda_cflags=["-O3", *defines],
            extra_ldflags=openmp,
            build_directory=build_dir,
            with_cuda=with_cuda,
            verbose=False,
        )
    finally:
        if old_path is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = old_path
    return module, getattr(module, "__file__", None) or build_dir


def _first_line(exc: BaseException, limit: int = 300) -> str:
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load(name: str = "ampclip._C") -> tuple[Optional[ModuleType], Optional[str]]:
    """Imports the compiled extension ``name`` if it fits the running torch, else rebuilds it.

    Returns ``(module, None)`` when the extension is usable (the installed one, or one rebuilt against the
    running torch), ``(None, message)`` otherwise, ``message`` being one line that says what happened and
    how to build. Never raises for a missing, mismatched or broken build. (The extension registers no
    dispatcher ops: those live in ampclip/ops.py, so a rebuilt copy beside a mismatched one is harmless.)

    Example::

        >>> _C, problem = load("ampclip._C")
        >>> _C is not None or print(problem)
    """
    if name in sys.modules and sys.modules[name] is None:  # how a test or an application blocks an import
        return None, f"{name} is disabled in this process (sys.modules[{name!r}] is None)"
    if name in sys.modules and name in _LOADED_FROM:
        return sys.modules[name], None
    package = name.rpartition(".")[0]
    dirs = _package_dirs(package)
    path = _extension_file(dirs, name.rpartition(".")[2])
    running = torch.__version__
    if path is None:
        note = _not_built_note(package)
        why = f"was not built when {package} was installed ({note})" if note else "is not built"
        return None, f"{name} {why}; build it with {HOW_TO_BUILD}, with a C++ compiler and ninja installed"

    recorded = built_against(package)
    if recorded is not None and recorded != running:
        problem = f"{name} was built against torch {recorded} but torch {running} is running"
    elif name in sys.modules:  # imported before, by another route: the same file, already initialised
        return _register(name, sys.modules[name], path), None
    else:
        try:
            return _register(name, _import_file(name, path), path), None
        except Exception as exc:  # ImportError (undefined symbol, wrong architecture), OSError
            problem = f"{name} could not be loaded ({_first_line(exc)})"

    sources = _sources(dirs)
    reason = _jit_problem(sources)
    if reason is not None:
        return None, f"{problem}, and it was not rebuilt ({reason}); rebuild it against this torch with {HOW_TO_BUILD}"
    try:
        module, built = _jit_build(name, sources)
    except Exception as exc:  # a compiler error, a linker error, a lock held by a dead process
        return None, (
            f"{problem}, and rebuilding it against this torch failed ({_first_line(exc)}); "
            f"rebuild it with {HOW_TO_BUILD}"
        )
    _log.info("ampclip: %s; rebuilt against torch %s in %s", problem, running, built)
    return _register(name, module, built), None
