"""The installed package, not the source tree: a wheel built from a copy of the checkout, installed into a
fresh venv, run from another folder.

The wheels are built without the compiled extension (fast): once with ``AMPCLIP_SKIP_EXTENSION=1`` and once
with no working compiler (``CXX=/bin/false``), which must install too and record why. The fresh venv gets
torch (and tqdm) by a path entry to the folder torch is installed in, not by a site folder of its own:
the ``.pth`` hooks of that folder, the editable install of this checkout among them, are not run, so
``import ampclip`` can only find the wheel's copy (checked).
"""

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so",
                                "_build_info.py", ".pytest_cache", ".benchmarks", "ampclip-demo")


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMPCLIP_", "PYTHON", "PIP_CONSTRAINT"))}
    env.update(TRITON_INTERPRET="0", **extra)
    return env


def build_wheel(tmp, label, **env):
    source = tmp / f"src-{label}"
    shutil.copytree(ROOT, source, ignore=IGNORE)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w", str(tmp / label),
         str(source)],
        capture_output=True, text=True, env=clean_env(**env), timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (wheel,) = (tmp / label).glob("ampclip-*.whl")
    return wheel, out.stdout + out.stderr


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("install")


@pytest.fixture(scope="module")
def wheel(tmp):
    return build_wheel(tmp, "skip", AMPCLIP_SKIP_EXTENSION="1")[0]


@pytest.fixture(scope="module")
def installed(tmp, wheel):
    """A fresh venv with the wheel installed; returns its python."""
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # This interpreter's pip installs into the venv's site folder (--prefix), so the venv needs no pip of its
    # own; --ignore-installed: the editable install of this environment is neither reused nor touched.
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--ignore-installed",
                          "--prefix", str(env_dir), str(wheel)], capture_output=True, text=True, env=clean_env(),
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (Path(site) / "ampclip" / "__init__.py").is_file(), f"not installed into {site}"
    # torch and the rest of this environment as a plain path entry (see the module docstring).
    # Site folders only: a checkout that an editable install put on sys.path is no site folder.
    folders = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    folders += [str(Path(torch.__file__).parents[1])]
    (Path(site) / "from_test_env.pth").write_text("".join(f"{f}\n" for f in dict.fromkeys(folders)))
    return python, Path(site)


def test_wheel_ships_package_data_sources_and_every_subpackage(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {"ampclip/data/corpus.txt", "ampclip/_build_info.py", "ampclip/_extension_loader.py",
                "ampclip/csrc/python_entry.cpp", "ampclip/csrc/cpu/fused_clip_cpu.cpp",
                "ampclip/csrc/cpu/small_ops_cpu.cpp", "ampclip/csrc/cpu/fused_clip_cpu.h",
                "ampclip/triton_kernels/__init__.py"}
    # Every package of the source tree (ampclip.backends included).
    for init in (ROOT / "ampclip").rglob("__init__.py"):
        expected.add(init.relative_to(ROOT).as_posix())
    assert expected <= names, sorted(expected - names)
    assert not any(n.endswith(".so") for n in names)
    info = zipfile.ZipFile(wheel).read("ampclip/_build_info.py").decode()
    assert "EXTENSION = 'skipped'" in info and "AMPCLIP_SKIP_EXTENSION=1" in info


def test_demo_and_train_run_from_the_installed_package(installed, tmp):
    python, site = installed
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    where = subprocess.run([python, "-c", "import ampclip, ampclip.models as m; print(ampclip.__file__); "
                            "print(m.corpus_bytes().numel())"], capture_output=True, text=True, cwd=elsewhere,
                           env=clean_env(), timeout=120)
    assert where.returncode == 0, where.stderr[-3000:]
    file, corpus = where.stdout.split()
    assert Path(file).is_relative_to(site), file
    assert int(corpus) > 1000
    demo = subprocess.run([python, "-m", "ampclip", "demo", "--steps", "3", "--out", str(tmp / "demo")],
                          capture_output=True, text=True, cwd=elsewhere, env=clean_env(), timeout=300)
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-3000:]
    assert "ampclip run stayed finite: yes" in demo.stdout and (tmp / "demo" / "summary.json").is_file()
    train = subprocess.run([python, "-m", "ampclip.train", "--steps", "2", "--log-every", "1"],
                           capture_output=True, text=True, cwd=elsewhere, env=clean_env(), timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "grad norm" in train.stdout


def test_extension_loader_says_why_the_extension_is_missing(installed, tmp):
    python, _ = installed
    code = "from ampclip import _extension_loader as loader; print(loader.load()[1])"
    out = subprocess.run([python, "-W", "ignore", "-c", code], capture_output=True, text=True, cwd=tmp,
                         env=clean_env(), timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "was not built when ampclip was installed (AMPCLIP_SKIP_EXTENSION=1 was set)" in out.stdout
    assert "pip install . --no-build-isolation" in out.stdout


def test_no_compiler_installs_without_the_extension_and_says_so(tmp):
    wheel, log = build_wheel(tmp, "nocompiler", CXX="/bin/false")
    names = zipfile.ZipFile(wheel).namelist()
    assert "ampclip/__init__.py" in names and not any(n.endswith(".so") for n in names)
    info = zipfile.ZipFile(wheel).read("ampclip/_build_info.py").decode()
    assert "EXTENSION = 'skipped'" in info and "/bin/false" in info
    notes = [line for line in log.splitlines() if "*** ampclip:" in line]
    assert len(notes) == 1, log[-3000:]
    assert "without the compiled extension ampclip._C" in notes[0] and "--no-build-isolation" in notes[0]
    assert "Traceback" not in log
