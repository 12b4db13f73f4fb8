"""ampclip._extension_loader: an extension built against another torch never crashes the import.

Most cases use a stand-in package in a temporary folder: a file named like the extension (garbage, or a
library with an undefined symbol) and a ``_build_info.py``, so that they do not depend on how this
checkout was built. The rebuild runs in a subprocess that never imports ampclip.
"""

import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch

from ampclip import _extension_loader as loader

ROOT = Path(__file__).resolve().parents[1]
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
OTHER_TORCH = "2.0.0+other"


def make_package(tmp_path, torch_version=None, extension=b"not a shared library", skipped=None, csrc=False):
    """A package ``pkg_<random>`` holding ``_C<suffix>`` (unless ``extension`` is None) and a build info."""
    name = f"pkg_{uuid.uuid4().hex[:8]}"
    folder = tmp_path / name
    folder.mkdir()
    (folder / "__init__.py").write_text("raise AssertionError('the loader must not import the package')\n")
    if extension is not None:
        (folder / f"_C{SUFFIX}").write_bytes(extension)
    (folder / "_build_info.py").write_text(
        f"TORCH_VERSION = {torch_version!r}\nEXTENSION = {'skipped' if skipped else 'built'!r}\nNOTE = {skipped!r}\n"
    )
    if csrc:
        shutil.copytree(ROOT / "csrc", folder / "csrc", ignore=shutil.ignore_patterns("*.md"))
    return name, folder


@pytest.fixture
def on_path(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    return tmp_path


def assert_one_clear_line(message, *needles):
    assert message and "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)


def test_mismatch_is_never_imported_and_says_how_to_build(on_path, monkeypatch):
    monkeypatch.setenv("AMPCLIP_NO_JIT_BUILD", "1")
    name, _ = make_package(on_path, torch_version=OTHER_TORCH)
    module, message = loader.load(f"{name}._C")
    assert module is None and f"{name}._C" not in sys.modules
    assert_one_clear_line(
        message, f"built against torch {OTHER_TORCH}", f"torch {torch.__version__} is running",
        "AMPCLIP_NO_JIT_BUILD=1", "pip install . --no-build-isolation",
    )


def test_mismatch_of_the_real_extension_with_a_monkeypatched_record(monkeypatch):
    if loader._extension_file(loader._package_dirs("ampclip"), "_C") is None:
        pytest.skip("ampclip._C is not built here")
    monkeypatch.setattr(loader, "built_against", lambda package="ampclip": OTHER_TORCH)
    monkeypatch.setattr(loader, "_LOADED_FROM", {})
    monkeypatch.setenv("AMPCLIP_NO_JIT_BUILD", "1")
    module, message = loader.load()
    assert module is None
    assert_one_clear_line(message, f"ampclip._C was built against torch {OTHER_TORCH}", "--no-build-isolation")


def test_broken_file_gives_the_import_error(on_path, monkeypatch):
    monkeypatch.delenv("AMPCLIP_NO_JIT_BUILD", raising=False)
    name, _ = make_package(on_path, torch_version=torch.__version__)
    module, message = loader.load(f"{name}._C")
    assert module is None
    assert_one_clear_line(message, f"{name}._C could not be loaded (ImportError", "sources are not installed",
                          "--no-build-isolation")


def test_undefined_symbol_gives_the_import_error(on_path, tmp_path, monkeypatch):
    """What an extension built against another torch without a record looks like to the dynamic linker."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    source = tmp_path / "undefined.c"
    source.write_text("void ampclip_missing_symbol(void);\n"
                      "void *PyInit__C(void) { ampclip_missing_symbol(); return 0; }\n")
    library = tmp_path / "undefined.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(library), str(source)], check=True, capture_output=True)
    monkeypatch.setenv("AMPCLIP_NO_JIT_BUILD", "1")
    name, _ = make_package(on_path, torch_version=None, extension=library.read_bytes())
    module, message = loader.load(f"{name}._C")
    assert module is None
    assert_one_clear_line(message, "undefined symbol: ampclip_missing_symbol", "AMPCLIP_NO_JIT_BUILD=1")


def test_not_built_at_install_says_why(on_path):
    name, _ = make_package(on_path, extension=None, skipped="no C++ compiler found (`c++` is not on PATH)")
    module, message = loader.load(f"{name}._C")
    assert module is None
    assert_one_clear_line(message, f"was not built when {name} was installed (no C++ compiler found",
                          "pip install . --no-build-isolation")


def test_an_import_blocked_in_sys_modules_stays_blocked(on_path, monkeypatch):
    name, _ = make_package(on_path, torch_version=torch.__version__)
    monkeypatch.setitem(sys.modules, f"{name}._C", None)
    module, message = loader.load(f"{name}._C")
    assert module is None
    assert_one_clear_line(message, f"{name}._C is disabled in this process")


def test_loads_the_extension_that_fits():
    if loader._extension_file(loader._package_dirs("ampclip"), "_C") is None:
        pytest.skip("ampclip._C is not built here")
    recorded = loader.built_against("ampclip")
    if recorded not in (None, torch.__version__):
        pytest.skip(f"ampclip._C here was built against torch {recorded}")
    module, message = loader.load()
    assert message is None and module is sys.modules["ampclip._C"]
    assert loader.loaded_from().endswith(SUFFIX)


REBUILD = textwrap.dedent(
    """
    import importlib.util, json, sys, torch
    spec = importlib.util.spec_from_file_location("loader", sys.argv[1])
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)
    module, message = loader.load(sys.argv[2] + "._C")
    assert message is None, message
    grads = [torch.randn(1000, dtype=torch.float64), torch.randn(37, dtype=torch.float64)]
    total = module.norm_pass(grads, None, 2.0, None)[1]
    expected = torch.linalg.vector_norm(torch.cat(grads))
    name = sys.argv[2] + "._C"
    print(json.dumps({"norm": float(total), "expected": float(expected), "file": loader.loaded_from(name),
                      "same": sys.modules[name] is module, "entry": hasattr(module, "clip_params")}))
    """
)


def test_mismatch_is_rebuilt_against_the_running_torch(tmp_path):
    """The installed layout (sources in <package>/csrc), a build recorded against another torch: the loader
    compiles the sources against this torch with ninja into the extensions folder, once (about 20 s on two
    cores), and the second process reuses the build."""
    name, _ = make_package(tmp_path, torch_version=OTHER_TORCH, csrc=True)
    problem = loader._jit_problem(str(tmp_path / name / "csrc"))
    if problem:
        pytest.skip(f"cannot rebuild here: {problem}")
    env = {k: v for k, v in os.environ.items() if k != "AMPCLIP_NO_JIT_BUILD"}
    env.update(PYTHONPATH=str(tmp_path), TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"))
    for attempt in ("build", "cached"):
        out = subprocess.run([sys.executable, "-c", REBUILD, loader.__file__, name], capture_output=True, text=True,
                             env=env, timeout=300, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["norm"] == pytest.approx(result["expected"], rel=1e-12)
        assert result["file"].startswith(str(tmp_path / "extensions")) and result["same"] and result["entry"]
        assert ("compiling" in out.stderr) == (attempt == "build"), out.stderr
