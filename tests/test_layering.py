"""The layers hold: kernels never import the package above them; only ops.py and ampclip/backends/ reach the
compiled extension or the Triton kernels; the public layer goes through ops and never through the test
oracle; the benchmark harness lives outside the installed package."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ampclip"
PUBLIC = ["functional", "clipper", "scaler", "clipping", "trainer", "distributed", "strategies", "config", "nan",
          "adaptive",
          "metrics", "overlap"]


def imports_of(path: pathlib.Path) -> set[str]:
    """Every module a file imports, relative imports written with their leading dots."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names.add(base)
            names.update(f"{base}.{alias.name}" if node.module else f"{base}{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "triton_kernels").glob("*.py")), ids=lambda p: p.name)
def test_kernels_never_import_upward(path):
    bad = [name for name in imports_of(path) if name.startswith("..") or name.startswith("ampclip")]
    assert not bad, f"{path.name} imports {bad}"


def test_only_ops_and_the_backends_reach_the_kernels():
    for path in PACKAGE.glob("*.py"):
        if path.name == "ops.py":
            continue
        bad = [n for n in imports_of(path) if "_C" in n.split(".") or "triton_kernels" in n or n.startswith(".backends")
               or n == ".backends"]
        assert not bad, f"ampclip/{path.name} imports {bad}"


@pytest.mark.parametrize("module", PUBLIC)
def test_the_public_layer_does_not_import_the_oracle(module):
    names = imports_of(PACKAGE / f"{module}.py")
    assert not any(n in (".reference", "ampclip.reference") or n.endswith(".reference") for n in names), names


def test_the_benchmark_harness_is_not_in_the_package():
    assert not (PACKAGE / "benchmark.py").exists()


BELOW_OPS = [PACKAGE / "reference.py", *sorted((PACKAGE / "backends").glob("*.py"))]


@pytest.mark.parametrize("path", BELOW_OPS, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_nothing_below_ops_imports_ops(path):
    # public API -> ops -> backends -> reference and kernels -> contract: the layers below ops take the
    # contract's constants from ampclip/contract.py, so there is no import circle through ops
    names = imports_of(path)
    assert not any(n.split(".")[-1] == "ops" or ".ops." in n or n.endswith(".ops") for n in names), names


def test_the_contract_imports_nothing_of_ampclip_but_its_errors():
    names = imports_of(PACKAGE / "contract.py")
    assert {n for n in names if n.startswith(".")} <= {".errors", ".errors.GradientTypeError",
                                                      ".errors.GradientValueError"}, names
