"""The Makefile's set-up: what `make demo` and `make test` install on a fresh clone, read with `make -n` in
a temporary copy (nothing runs), against pyproject's dependencies and extras."""

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower().replace("_", "-")


def names(requirements) -> set:
    return {name(r) for r in requirements}


def without_substitutions(command: str) -> str:
    """``command`` without its ``$( ... )`` parts (the torch pin, computed when the recipe runs)."""
    kept, depth, i = [], 0, 0
    while i < len(command):
        if command.startswith("$(", i):
            depth, i = depth + 1, i + 2
            continue
        if depth and command[i] in "()":
            depth += 1 if command[i] == "(" else -1
        elif not depth:
            kept.append(command[i])
        i += 1
    return "".join(kept)


def pip_installs(target: str, tmp_path: Path) -> list:
    """The ``pip install`` commands ``make -n <target>`` prints in a fresh copy, each as (requirements,
    whether it installs into a --target folder)."""
    for file in ("Makefile", "pyproject.toml", "setup.py"):
        shutil.copy(ROOT / file, tmp_path / file)
    out = subprocess.run(["make", "-n", target, f"PYTHON={sys.executable}"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    commands = []
    for line in out.stdout.replace("\\\n", " ").splitlines():
        for command in re.findall(r"pip install (.*?)(?:\|\||&&|;|$)", without_substitutions(line)):
            words = shlex.split(command)
            requirements = [w for i, w in enumerate(words)
                            if not w.startswith("-") and (i == 0 or words[i - 1] != "--target") and w != "."]
            commands.append((requirements, "--target" in words))
    return commands


def installed(commands) -> set:
    return {name(r) for requirements, _ in commands for r in requirements}


def test_demo_installs_what_the_demo_needs_and_no_test_dependency(tmp_path):
    demo = installed(pip_installs("demo", tmp_path))
    runtime = names(PROJECT["dependencies"]) | names(PROJECT["optional-dependencies"]["demo"])
    assert demo == runtime | {"ninja"}  # ninja: builds ampclip._C
    test_only = names(PROJECT["optional-dependencies"]["test"]) - runtime
    assert {"pytest", "transformers", "lightning"} <= test_only
    assert not demo & test_only


def test_test_installs_the_test_extra_and_accelerate_1_15(tmp_path):
    commands = pip_installs("test", tmp_path)
    extras = PROJECT["optional-dependencies"]
    expected = (names(PROJECT["dependencies"]) | names(extras["demo"]) | names(extras["test"])
                | names(extras["triton"]) | {"ninja"})
    assert installed(commands) == expected
    assert (["accelerate==1.15.0"], True) in commands  # the integration tests' second accelerate


def test_makefile_and_pyproject_pin_the_same_versions(tmp_path):
    pinned = {name(r): r for r in [*PROJECT["dependencies"], *sum(PROJECT["optional-dependencies"].values(), [])]}
    for requirements, into_folder in pip_installs("test", tmp_path):
        for requirement in requirements:
            if into_folder or name(requirement) == "torch" or requirement == name(requirement):
                continue  # a second copy in a folder; torch picked by TORCH_SPEC; no version asked
            assert requirement == pinned[name(requirement)]
