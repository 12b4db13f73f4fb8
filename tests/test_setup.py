"""setup.py's decisions: which CUDA toolkit builds the CUDA kernels, whether to build them at all, and the
fallbacks when a part fails to compile or link.

The decisions are unit-tested on fake toolkits in a temporary folder (a stand-in ``nvcc`` script, an empty
``libcudart.so``). The fallbacks run the real ``setup.py build_ext`` on a tiny stand-in extension (a few
lines of C, no torch headers: seconds, where ampclip's own kernels take minutes to compile twice on two
cores), with ``torch.version.cuda`` set so that a CPU build of torch takes the CUDA path, and a fake
toolkit whose link must fail.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("ampclip_setup", ROOT / "setup.py")
setup_py = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(setup_py)  # builds nothing: setup() runs only as __main__


def fake_toolkit(root: Path, cuda: str = "13.0", runtime: bool = True) -> Path:
    """A CUDA toolkit folder laid out as the installers do (lib64 -> lib), whose nvcc reports ``cuda``,
    answers ``-dryrun`` with its own folder, and "compiles" a .cu file into an empty object. Its
    libcudart.so is an empty file: found, but the link against it fails."""
    home = root / f"cuda-{cuda}"
    for folder in ("bin", "include", "lib"):
        (home / folder).mkdir(parents=True)
    (home / "lib64").symlink_to("lib")
    (home / "include" / "cuda_runtime.h").write_text("")
    if runtime:
        (home / "lib" / "libcudart.so").write_bytes(b"")
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        case " $* " in *" --version "*) echo "Cuda compilation tools, release {cuda}, V{cuda}.0"; exit 0;; esac
        case " $* " in *" -dryrun "*) echo "#\\$ _HERE_={home}/bin" >&2; exit 0;; esac
        out=; dep=; prev=
        for arg in "$@"; do
          [ "$prev" = "-o" ] && out=$arg
          [ "$prev" = "--dependency-output" ] && dep=$arg
          prev=$arg
        done
        [ -n "$dep" ] && printf '%s:\\n' "$out" > "$dep"
        exec cc -c -x c /dev/null -o "$out"
        """))
    nvcc.chmod(0o755)
    return home


def wrapper_on_path(root: Path, home: Path) -> Path:
    """/usr/local as some images lay it out: bin/nvcc a script that runs the toolkit's nvcc, lib/ without
    the CUDA runtime. torch takes the folder above nvcc's bin/ as the toolkit."""
    local = root / "usr-local"
    (local / "bin").mkdir(parents=True)
    (local / "lib").mkdir()
    wrapper = local / "bin" / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {home}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    return local


def fake_torch(version="2.14.1+cu130", cuda="13.0", file="/isolated/torch/__init__.py"):
    return types.SimpleNamespace(__version__=version, version=types.SimpleNamespace(cuda=cuda), __file__=file)


# ---- which toolkit ------------------------------------------------------------------------------------------


def test_toolkit_behind_a_wrapper_script_on_path_is_found(tmp_path):
    home = fake_toolkit(tmp_path)
    local = wrapper_on_path(tmp_path, home)
    assert setup_py.toolkit_problem(str(local)) is not None  # what torch would take: the link would fail
    assert setup_py.find_cuda_home({"PATH": str(local / "bin")}) == (str(home), None)


def test_toolkit_behind_a_symlinked_nvcc_is_found(tmp_path):
    home = fake_toolkit(tmp_path)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").symlink_to(home / "bin" / "nvcc")
    assert setup_py.find_cuda_home({"PATH": str(tmp_path / "bin")}) == (str(home), None)


def test_cuda_home_without_the_runtime_library_is_refused(tmp_path):
    home = fake_toolkit(tmp_path, runtime=False)
    found, problem = setup_py.find_cuda_home({"CUDA_HOME": str(home), "PATH": ""})
    assert found is None
    assert f"CUDA_HOME={home}" in problem and "lib64/libcudart.so" in problem


def test_nvcc_of_no_toolkit_is_refused_and_each_place_tried_is_named(tmp_path):
    (tmp_path / "bin").mkdir()
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\nexit 1\n")
    nvcc.chmod(0o755)
    found, problem = setup_py.find_cuda_home({"PATH": str(tmp_path / "bin")})
    assert found is None
    assert str(nvcc) in problem and f"{tmp_path} has no include/cuda_runtime.h" in problem


def test_nvcc_version_is_read_from_nvcc(tmp_path):
    home = fake_toolkit(tmp_path, cuda="12.8")
    assert setup_py.nvcc_cuda_version(str(home / "bin" / "nvcc")) == "12.8"
    assert setup_py.nvcc_cuda_version(str(tmp_path / "missing")) is None


# ---- whether to build the CUDA kernels ------------------------------------------------------------------


def test_cpu_torch_or_skip_flag_builds_no_cuda_kernels_and_says_nothing(tmp_path):
    home = fake_toolkit(tmp_path)
    environ = {"CUDA_HOME": str(home)}
    assert setup_py.cuda_plan(fake_torch(cuda=None), environ, running=lambda: None) == (None, None)
    skip = {**environ, "AMPCLIP_SKIP_CUDA_BUILD": "1"}
    assert setup_py.cuda_plan(fake_torch(), skip, running=lambda: None) == (None, None)
    assert setup_py.cuda_plan(fake_torch(), environ, running=lambda: None) == (str(home), None)


def test_toolkit_of_another_cuda_major_is_skipped_with_a_note(tmp_path):
    home = fake_toolkit(tmp_path, cuda="12.8")
    home_, note = setup_py.cuda_plan(fake_torch(), {"CUDA_HOME": str(home)}, running=lambda: None)
    assert home_ is None
    assert "is CUDA 12.8" in note and "with CUDA 13.0" in note and "CUDA 13 toolkit" in note


def test_toolkit_problem_is_the_note(tmp_path):
    home = fake_toolkit(tmp_path, runtime=False)
    home_, note = setup_py.cuda_plan(fake_torch(), {"CUDA_HOME": str(home)}, running=lambda: None)
    assert home_ is None and "libcudart.so" in note


@pytest.mark.parametrize(
    "running, expected",
    [
        pytest.param(lambda t: None, "build", id="no-torch-installed-yet"),
        pytest.param(lambda t: (t.__version__, t.version.cuda, t.__file__), "build", id="the-same-torch"),
        pytest.param(lambda t: (t.__version__, t.version.cuda, "/elsewhere/torch/__init__.py"), "build",
                     id="the-same-version-elsewhere"),
        pytest.param(lambda t: ("2.13.0+cpu", None, "/venv/torch/__init__.py"), "a build without CUDA",
                     id="a-cpu-torch"),
        pytest.param(lambda t: ("2.13.0+cu130", "13.0", "/venv/torch/__init__.py"), "rebuilt against it",
                     id="another-cuda-torch"),
    ],
)
def test_kernels_are_built_only_for_the_torch_that_will_run(tmp_path, running, expected):
    """pip's isolated build compiles against a torch of its own: kernels for it would never be loaded when
    the environment being installed into runs another."""
    home = fake_toolkit(tmp_path)
    build_torch = fake_torch()
    found, note = setup_py.cuda_plan(build_torch, {"CUDA_HOME": str(home)}, running=lambda: running(build_torch))
    if expected == "build":
        assert (found, note) == (str(home), None)
    else:
        assert found is None and expected in note and "2.13.0" in note and build_torch.__version__ in note


def test_torch_in_use_sees_through_pythonpath(tmp_path, monkeypatch):
    """What pip's isolation does: PYTHONPATH puts the build environment's torch first."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("__version__ = 'isolated'\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    version, cuda, file = setup_py.torch_in_use()
    assert (version, cuda) == (torch.__version__, torch.version.cuda)
    assert Path(file).resolve() == Path(torch.__file__).resolve()


# ---- fallbacks when a part fails to compile or link ------------------------------------------------------

ENTRY = """
#include <Python.h>
#ifdef AMPCLIP_WITH_CUDA
extern "C" int ampclip_cuda_kernels(void);  // from the .cu file
#else
static int ampclip_cuda_kernels(void) { return 0; }
#endif
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&module);
  if (m) PyModule_AddIntConstant(m, "cuda_kernels", ampclip_cuda_kernels());
  return m;
}
"""


def build_stand_in(tmp_path, cpu_source=ENTRY, **env):
    """``setup.py build_ext`` on a stand-in extension, under a torch that says it is a CUDA build; returns
    (exit status, log, the extension's build folder)."""
    project = tmp_path / "project"
    (project / "csrc" / "cuda").mkdir(parents=True)
    shutil.copy(ROOT / "setup.py", project / "setup.py")
    (project / "csrc" / "entry.cpp").write_text(cpu_source)
    (project / "csrc" / "cuda" / "kernels.cu").write_text('extern "C" int ampclip_cuda_kernels(void) { return 1; }\n')
    driver = ("import runpy, sys, torch; torch.version.cuda = '13.0'; "
              "sys.argv = ['setup.py', 'build_ext', '--build-lib', 'out', '--build-temp', 'temp']; "
              "runpy.run_path('setup.py', run_name='__main__')")
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("AMPCLIP_", "PYTHON", "CUDA_"))}
    environ.update(CUDA_HOME=str(fake_toolkit(tmp_path)), TORCH_CUDA_ARCH_LIST="9.0", **env)
    out = subprocess.run([sys.executable, "-c", driver], cwd=project, env=environ, capture_output=True, text=True,
                         timeout=300)
    return out.returncode, out.stdout + out.stderr, project / "out" / "ampclip"


def notes(log):
    return [line for line in log.splitlines() if line.startswith("*** ampclip:")]


needs_compiler = pytest.mark.skipif(shutil.which("c++") is None or shutil.which("cc") is None,
                                    reason="needs a C and a C++ compiler")


@needs_compiler
def test_failed_cuda_link_falls_back_to_the_cpu_kernels(tmp_path):
    status, log, package = build_stand_in(tmp_path)
    assert status == 0, log[-3000:]
    assert "-lcudart" in log  # the CUDA build reached the link, and failed there
    (note,) = notes(log)
    assert "without its CUDA kernels" in note and "LinkError" in note
    (extension,) = package.glob("_C.*")
    load = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('_C', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); print(m.cuda_kernels)")
    loaded = subprocess.run([sys.executable, "-c", load, str(extension)], capture_output=True, text=True, timeout=60)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "0", loaded.stderr[-2000:]


@needs_compiler
def test_failed_cpu_compile_installs_without_the_extension_and_records_why(tmp_path):
    status, log, package = build_stand_in(tmp_path, cpu_source='#error "does not compile"\n')
    assert status == 0, log[-3000:]
    cuda_note, skip_note = notes(log)
    assert "without its CUDA kernels" in cuda_note
    assert "installing without the compiled extension ampclip._C: compiling it failed" in skip_note
    assert not list(package.glob("_C.*"))
    info = (package / "_build_info.py").read_text()
    assert "EXTENSION = 'skipped'" in info and "compiling it failed" in info


@needs_compiler
def test_strict_build_fails_on_the_link_error(tmp_path):
    status, log, package = build_stand_in(tmp_path, AMPCLIP_STRICT_BUILD="1")
    assert status != 0 and not notes(log)
    assert not list(package.glob("_C.*"))

