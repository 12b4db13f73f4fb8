"""Compile proof of the Triton kernels (triton_kernels/) on a machine without a GPU: part of ``make cuda-check``.

Every specialisation the ``triton`` backend can launch is compiled to a cubin for sm_80 and sm_90 with
``triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", arch, 32))``: Triton
ships its own ptxas and cuobjdump, so neither a GPU nor a CUDA toolkit is needed. A specialisation is a
kernel with one combination of the constexpr flags its launcher passes and one set of argument types:

* every pointer argument is declared ``do_not_specialize_on_alignment`` and every integer argument
  ``do_not_specialize`` in the kernels, so a launch's variant depends on its types and constexprs alone
  (this script fails when a kernel stops saying so, as the list below would then miss variants);
* the argument dtypes are those ampclip's callers pass: the table and group indices int64, inv_scale and
  found_inf float32 (GradScaler's), norms, coefficients and bounds float32 or float64, 64-bit float bits
  int64 (annotated), counts int32 (below 2^31); the chunk is the backend's (tensor_table.py: CHUNK);
* tests/test_triton_backend.py records the launches of the CPU suite and checks each is in this list.

For each compiled kernel it reads registers, shared memory, local memory and stack from the cubin
(``cuobjdump --dump-resource-usage``), the spill stores and loads from ptxas's report (Triton prints it with
TRITON_DUMP_PTXAS_LOG=1), and counts the 128-bit global loads and stores in the PTX (``ld.global[.nc].v4.b32``
/ ``.v2.b64`` and the like). A stack frame without spills is the call a float64 division's slow path makes.
It fails on a compile error, on a spill or local memory, when a norm or scale pass has fewer 128-bit loads
than its unmasked full-block loops need (per dtype branch: BLOCK x itemsize / (threads x 16 B); the scale
pass's stores likewise), or when a kernel's specialisation flags change. Compiles run in a
process pool on a fresh cache (cold).

Usage: python scripts/triton_check.py [--arch 80,90] [--jobs N] [--verbose] [--only TEXT]
Run it with another Triton first on PYTHONPATH to check that one (make cuda-check does 3.6 too).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import product
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNEL_DIR = ROOT / "triton_kernels"
PACKAGE = "_ampclip_triton_kernels"  # the kernels loaded from the source tree, not an installed package
DEFAULT_ARCHS = "80,90"

# kernel -> module of triton_kernels/
KERNELS = {
    "_fused_norm_kernel": "fused_norm",
    "_tensor_finalize_kernel": "unitwise",
    "_total_finalize_kernel": "unitwise",
    "_fused_scale_kernel": "fused_scale",
    "_clip_finalize_kernel": "small_ops",
    "_scaler_update_kernel": "small_ops",
    "_clip_stats_kernel": "small_ops",
    "_unit_norm_kernel": "unitwise",
    "_unit_finalize_kernel": "unitwise",
    "_unit_scale_kernel": "unitwise",
    "_unit_clip_finalize_kernel": "unitwise",
    "_zclip_kernel": "zclip",
}
DTYPE_CONSTEXPRS = {"tl.float32", "tl.float64"}  # constexpr values that name a Triton dtype
TORCH_TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64", "int64": "i64",
               "int32": "i32", "bool": "i1"}
ITEM_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4, "fp64": 8}
NUM_WARPS = 4  # the launchers use Triton's default
VEC_LOAD = re.compile(r"\bld\.global(?:\.[A-Za-z0-9_:]+)*\.(?:v4\.[bfsu]32|v2\.[bfsu]64)\b")
VEC_STORE = re.compile(r"\bst\.global(?:\.[A-Za-z0-9_:]+)*\.(?:v4\.[bfsu]32|v2\.[bfsu]64)\b")
ANY_LOAD = re.compile(r"\bld\.global\b")
RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


# Spills that may appear without failing the check: (kernel, Triton version prefix, arch or None for any,
# at most bytes, why).
ALLOWED_SPILLS = [
    ("_clip_finalize_kernel", "3.6.", None, 16,
     "ptxas 12.8 (Triton 3.6) keeps one register in memory across the call to the IEEE division's slow path in "
     "a few per-group variants (MODE=2) of this one-program bookkeeping kernel, for sm_80 and sm_90: one store at "
     "entry, one load after the call; Triton 3.9's ptxas does not"),
    ("_zclip_kernel", "3.6.", 90, 16,
     "the same in ZClip's one-program step: three registers stored before the float64 divisions' slow-path "
     "calls and loaded after them, once a step; Triton 3.9's ptxas does not"),
    ("_fused_norm_kernel", "3.6.", None, 16,
     "ptxas 12.8 (Triton 3.6), in the two variants with both an unscale and a clamp (one float32 L2, one float64 "
     "inf-norm), keeps two values in memory across an element loop: in the SASS two STL before the loop and two "
     "LDL after it, once a program, none inside a loop; Triton 3.9's ptxas does not"),
    ("_unit_norm_kernel", "", None, 16,
     "in a few variants, which change with the Triton version, ptxas stops at 96 registers and keeps one "
     "4-byte value in memory outside the element loops (in the SASS: stored once per program, loaded once per "
     "unit)"),
]


def allowed_spill(spec: "Spec", arch: int, version: str, spilled: int) -> bool:
    return any(spec.kernel == kernel and version.startswith(prefix) and at in (None, arch) and spilled <= limit
               for kernel, prefix, at, limit, _ in ALLOWED_SPILLS)


@dataclass(frozen=True)
class Spec:
    """One specialisation: the kernel, its non-constexpr arguments' types and its constexprs, in order."""

    kernel: str
    types: tuple  # ((name, "*fp32" | "i64" | ...), ...)
    constexprs: tuple  # ((name, value), ...); a dtype as "tl.float32"

    def label(self) -> str:
        flags = ",".join(f"{k}={v.removeprefix('tl.') if isinstance(v, str) else v}" for k, v in self.constexprs
                         if k not in ("CHUNK_SIZE", "BLOCK_SIZE", "MAX_FINITE"))
        ptrs = ",".join(f"{k}:{t}" for k, t in self.types if t.startswith("*") and t != "*i64")
        return f"{self.kernel}[{flags}]({ptrs})"


def _module_constants() -> dict:
    """BLOCK sizes and float limits of the kernel modules, and the backend's CHUNK, read from the sources
    (no import of ampclip: the check needs triton and the source tree only)."""
    values = {}
    for name, path in (("fused_norm", KERNEL_DIR / "fused_norm.py"), ("small_ops", KERNEL_DIR / "small_ops.py"),
                       ("unitwise", KERNEL_DIR / "unitwise.py"), ("zclip", KERNEL_DIR / "zclip.py"),
                       ("tensor_table", ROOT / "ampclip" / "backends" / "tensor_table.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                try:
                    values[f"{name}.{node.targets[0].id}"] = ast.literal_eval(node.value)
                except ValueError:
                    pass
    return values


FP32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max, as fused_norm passes it
FP64_MAX = 1.7976931348623157e308


def specializations() -> list[Spec]:
    """Every specialisation the launchers of triton_kernels/ can produce (see the module docstring)."""
    c = _module_constants()
    chunk, block = c["tensor_table.CHUNK"], c["fused_norm.BLOCK"]
    small_block = c["small_ops.BLOCK"]
    clip_block = c["small_ops.CLIP_BLOCK"]
    table = [(n, "*i64") for n in ("table_ptrs", "table_numels", "table_codes", "chunk_begin", "chunk_tensor")]
    specs = []

    def add(kernel, types, constexprs):
        specs.append(Spec(kernel, tuple(types), tuple(constexprs.items())))

    for acc, norm, has_inv, has_clamp in product(("fp32", "fp64"), range(4), (0, 1), (0, 1)):
        add("_fused_norm_kernel", table + [
            ("inv_scale_ptr", "*fp32" if has_inv else "*i64"), ("partial_out", "*fp64"), ("flag_out", "*fp64"),
            ("tensor_acc", "*fp64"), ("tensor_flag", "*fp64"), ("tickets", "*i32"), ("norm_out", f"*{acc}"),
            ("total_out", f"*{acc}"), ("found_out", "*fp32"), ("coef_out", f"*{acc}"), ("post_out", f"*{acc}"),
            ("grad_scale_out", f"*{acc}"), ("p", "fp32"), ("inv_p", "fp32"), ("lo_bits", "i64"), ("hi_bits", "i64"),
            ("bound_bits", "i64"), ("eps_bits", "i64"), ("num_tensors", "i32"), ("num_filled", "i32"),
            ("mode", "i32"), ("rule", "i32"),
        ], dict(ACC=f"tl.float{acc[2:]}", MAX_FINITE=FP64_MAX if acc == "fp64" else FP32_MAX, NORM=norm,
                HAS_INV=has_inv, HAS_CLAMP=has_clamp, WIDEN=int(acc == "fp32" and norm != 2), CHUNK_SIZE=chunk,
                BLOCK_SIZE=block, FINISH_BLOCK=c["fused_norm.FINISH_BLOCK"],
                TOTAL_BLOCK_SIZE=c["fused_norm.FINISH_BLOCK"]))
    for coef, per_tensor, has_inv, has_clip, (has_found, zero) in product(
            ("fp32", "fp64"), (0, 1), (0, 1), (0, 1), ((0, 0), (1, 0), (1, 1))):
        add("_fused_scale_kernel", table + [
            ("coef_ptr", f"*{coef}"), ("inv_scale_ptr", "*fp32" if has_inv else f"*{coef}"),
            ("found_inf_ptr", "*fp32" if has_found else f"*{coef}"), ("lo_bits", "i64"), ("hi_bits", "i64"),
        ], dict(PER_TENSOR_COEF=per_tensor, HAS_INV=has_inv, HAS_CLIP=has_clip, HAS_FOUND=has_found,
                ZERO_IF_INF=zero, SOFT_BF16=0, CHUNK_SIZE=chunk, BLOCK_SIZE=block))
    for dtype, mode, rule, bound in product(("fp32", "fp64"), range(3), (0, 1), (None, "fp32", "fp64")):
        for norm in range(4) if mode else (0,):  # the global mode is launched with NORM=0 whatever the norm
            add("_clip_finalize_kernel", [
                ("per_tensor", f"*{dtype}"), ("total", f"*{dtype}"), ("bound_ptr", f"*{bound or dtype}"),
                ("bound_bits", "i64"), ("group_index", "*i64" if mode == 2 else f"*{dtype}"), ("count", "i32"),
                ("num_groups", "i32"), ("coef_out", f"*{dtype}"), ("group_coef_out", f"*{dtype}"),
                ("group_norms_out", f"*{dtype}"), ("post_out", f"*{dtype}"), ("p", "fp32"), ("inv_p", "fp32"),
                ("eps_bits", "i64"),
            ], dict(MODE=mode, NORM=norm, RULE=rule, HAS_BOUND_TENSOR=int(bound is not None),
                    BLOCK_SIZE=clip_block))
    for has_found, norm_dtype, dynamic in product((0, 1), (None, "fp32", "fp64"), (0, 1)):
        add("_scaler_update_kernel", [
            ("state", "*fp32"), ("history", "*fp32"), ("found_ptr", "*fp32"), ("norm_ptr", f"*{norm_dtype or 'fp32'}"),
            ("slot", "i32"), ("size", "i32"), ("growth_bits", "i64"), ("backoff_bits", "i64"), ("interval", "i32"),
            ("hysteresis", "i32"), ("min_bits", "i64"), ("max_bits", "i64"),
        ], dict(HAS_FOUND=has_found, HAS_NORM=int(norm_dtype is not None), DYNAMIC=dynamic))
    for has_layers, norms, coef in product((0, 1), ("fp32", "fp64"), ("fp32", "fp64")):
        add("_clip_stats_kernel", [
            ("counters", "*fp64"), ("layer_stats", "*fp64"), ("per_tensor", f"*{norms}"), ("coef", f"*{coef}"),
            ("found_ptr", "*fp32"), ("count", "i32"), ("coef_count", "i32"),
        ], dict(HAS_LAYERS=has_layers, BLOCK_SIZE=small_block))
    specs += _unitwise_specializations(c)
    return specs


def _unitwise_specializations(c: dict) -> list[Spec]:
    """AGC's unit-wise passes (unitwise.py; their per-tensor and total finalizes are fused_norm's, listed above)
    and ZClip's step (zclip.py). The layout's sections are int64; unit norms and coefficients float32 or float64.
    """
    layout = [(n, "*i64") for n in ("seg_tensor", "seg_start", "seg_len")]
    specs = []

    def add(kernel, types, constexprs):
        specs.append(Spec(kernel, tuple(types), tuple(constexprs.items())))

    for acc, norm, has_inv in product(("fp32", "fp64"), range(4), (0, 1)):
        add("_unit_norm_kernel", [("table_ptrs", "*i64"), ("table_codes", "*i64")] + layout + [
            ("seg_slot", "*i64"), ("row_len", "*i64"), ("inv_scale_ptr", "*fp32" if has_inv else "*i64"),
            ("partial_out", "*fp64"), ("flag_out", "*fp64"), ("p", "fp32"),
        ], dict(ACC=f"tl.float{acc[2:]}", MAX_FINITE=FP64_MAX if acc == "fp64" else FP32_MAX, NORM=norm,
                HAS_INV=has_inv, WIDEN=int(acc == "fp32" and norm != 2), BLOCK_SIZE=c["unitwise.BLOCK"]))
        if not has_inv:
            add("_unit_finalize_kernel", [
                ("partials", "*fp64"), ("flags", "*fp64"), ("unit_slot_begin", "*i64"), ("num_units", "i32"),
                ("max_slots", "i32"), ("norm_out", f"*{acc}"), ("acc_out", "*fp64"), ("flag_out", "*fp64"),
                ("inv_p", "fp32"),
            ], dict(NORM=norm, BLOCK_SIZE=c["unitwise.UNIT_BLOCK"]))
            add("_tensor_finalize_kernel", [
                ("partials", "*fp64"), ("flags", "*fp64"), ("chunk_begin", "*i64"), ("norm_out", f"*{acc}"),
                ("acc_out", "*fp64"), ("flag_out", "*fp64"), ("inv_p", "fp32"),
            ], dict(NORM=norm, BLOCK_SIZE=c["unitwise.TENSOR_BLOCK"]))
            add("_total_finalize_kernel", [
                ("accs", "*fp64"), ("flags", "*fp64"), ("num_tensors", "i32"), ("total_out", f"*{acc}"),
                ("found_out", "*fp32"), ("inv_p", "fp32"),
            ], dict(NORM=norm, BLOCK_SIZE=c["unitwise.TOTAL_BLOCK"]))
    for coef, has_inv, (has_found, zero) in product(("fp32", "fp64"), (0, 1), ((0, 0), (1, 0), (1, 1))):
        add("_unit_scale_kernel", [("table_ptrs", "*i64"), ("table_codes", "*i64")] + layout + [
            ("seg_unit", "*i64"), ("row_len", "*i64"), ("coef_ptr", f"*{coef}"),
            ("inv_scale_ptr", "*fp32" if has_inv else f"*{coef}"),
            ("found_inf_ptr", "*fp32" if has_found else f"*{coef}"),
        ], dict(HAS_INV=has_inv, HAS_FOUND=has_found, ZERO_IF_INF=zero, SOFT_BF16=0,
                BLOCK_SIZE=c["unitwise.BLOCK"]))
    for params, grads, norm in product(("fp32", "fp64"), ("fp32", "fp64"), range(4)):
        add("_unit_clip_finalize_kernel", [
            ("param_norms", f"*{params}"), ("grad_norms", f"*{grads}"), ("coef_out", f"*{grads}"),
            ("post_out", f"*{grads}"), ("count", "i32"), ("factor_bits", "i64"), ("eps_bits", "i64"), ("p", "fp32"),
            ("inv_p", "fp32"),
        ], dict(NORM=norm, BLOCK_SIZE=c["unitwise.TOTAL_BLOCK"]))
    for total, rule, skip in product(("fp32", "fp64"), range(3), (0, 1)):
        add("_zclip_kernel", [
            ("state", "*fp64"), ("warmup", "*fp64"), ("total_ptr", f"*{total}"), ("found_ptr", "*fp32"),
            ("bound_out", f"*{total}"), ("size", "i32"),
        ] + [(n, "i64") for n in ("alpha_bits", "z_bits", "cap_bits", "eps_bits", "factor_bits", "no_clip_bits")],
            dict(RULE=rule, SKIP_ON_SPIKE=skip, BLOCK_SIZE=c["zclip.BLOCK"]))
    return specs


# ------------------------------------------------------------------------------- what a launch specialises on


def _normalize_annotation(annotation) -> str:
    text = str(annotation).strip().removeprefix("tl.")
    return {"int64": "i64", "int32": "i32", "float32": "fp32", "float64": "fp64"}.get(text, text)


def arg_type(value, annotation: str = "") -> str:
    """The Triton signature type of one launch argument (as Triton's launcher derives it)."""
    if annotation and "constexpr" not in annotation:
        return _normalize_annotation(annotation)
    if hasattr(value, "data_ptr") and hasattr(value, "dtype"):
        return "*" + TORCH_TYPES[str(value.dtype).removeprefix("torch.")]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64" if value < 2**63 else "u64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def launch_spec(kernel_name: str, fn, args: tuple, kwargs: dict) -> Spec:
    """The Spec of one launch of kernel ``fn`` (the @triton.jit function's Python function) with ``args``."""
    import inspect

    import triton.language as tl

    params = inspect.signature(fn).parameters
    bound = inspect.signature(fn).bind(*args, **kwargs)
    types, constexprs = [], []
    for name, param in params.items():
        value = bound.arguments[name]
        annotation = param.annotation if param.annotation is not inspect.Parameter.empty else ""
        if "constexpr" in str(annotation):
            if isinstance(value, tl.dtype):
                value = {"fp32": "tl.float32", "fp64": "tl.float64"}[value.name]
            constexprs.append((name, value))
        else:
            types.append((name, arg_type(value, str(annotation))))
    return Spec(kernel_name, tuple(types), tuple(constexprs))


def specialisation_flags_problems(kernel_name: str, jit_fn, types: dict) -> list[str]:
    """Arguments whose values, not only their types, would pick a variant: a pointer without
    do_not_specialize_on_alignment, an integer without do_not_specialize (``jit_fn``: the compiled-mode
    JITFunction; ``types``: its arguments' types in this list)."""
    problems = []
    for p in jit_fn.params:
        kind = types.get(p.name, "constexpr")
        if kind.startswith("*") and not p.do_not_specialize_on_alignment:
            problems.append(f"{kernel_name}: pointer {p.name} is specialised on its alignment (add it to "
                            "do_not_specialize_on_alignment, or list both variants here)")
        elif kind[:1] in ("i", "u") and not p.do_not_specialize:
            problems.append(f"{kernel_name}: integer {p.name} is specialised on its value (add it to "
                            "do_not_specialize, or list its variants here)")
    return problems


# ------------------------------------------------------------------------------------------------ compiling

_kernels: dict = {}
_cuobjdump = ""


def load_kernels() -> dict:
    """The @triton.jit kernels of triton_kernels/, from the source tree, compiled mode."""
    os.environ["TRITON_INTERPRET"] = "0"  # read when a kernel is decorated
    spec = importlib.util.spec_from_file_location(PACKAGE, KERNEL_DIR / "__init__.py",
                                                  submodule_search_locations=[str(KERNEL_DIR)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = package
    spec.loader.exec_module(package)
    return {name: getattr(sys.modules[f"{PACKAGE}.{module}"], name) for name, module in KERNELS.items()}


def _worker_init(cache_dir: str) -> None:
    global _kernels, _cuobjdump
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # Triton prints ptxas -v's report: the spill counts
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    import triton

    _kernels = load_kernels()
    _cuobjdump = str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def compile_spec(job: tuple[Spec, int]) -> dict:
    spec, arch = job
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernels[spec.kernel]
    signature = dict(spec.types)
    constexprs = {}
    for name, value in spec.constexprs:
        signature[name] = "constexpr"
        constexprs[name] = getattr(tl, value.removeprefix("tl.")) if value in DTYPE_CONSTEXPRS else value
    signature = {name: signature[name] for name in fn.arg_names}  # in parameter order
    result = {"spec": spec, "arch": arch, "error": None}
    start = time.monotonic()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32))
    except Exception as exc:  # a compile error: reported, not raised, so every other variant is still tried
        result["error"] = f"{type(exc).__name__}: {str(exc).strip()[-2000:]}"
        return result
    result["seconds"] = time.monotonic() - start
    frames = [tuple(map(int, m)) for m in PTXAS_FRAME.findall(log.getvalue())]
    if not frames:
        result["error"] = f"no ptxas report in Triton's output: {log.getvalue().strip()[-500:]}"
        return result
    result["spill_stores"] = max(f[1] for f in frames)
    result["spill_loads"] = max(f[2] for f in frames)
    ptx = compiled.asm["ptx"]
    result["vec_loads"] = len(VEC_LOAD.findall(ptx))
    result["vec_stores"] = len(VEC_STORE.findall(ptx))
    result["loads"] = len(ANY_LOAD.findall(ptx))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        dump = subprocess.run([_cuobjdump, "--dump-resource-usage", cubin.name], capture_output=True, text=True)
    found = RESOURCES.search(dump.stdout)
    if found is None:
        result["error"] = f"cuobjdump gave no resource usage: {dump.stdout.strip()} {dump.stderr.strip()}"
        return result
    result["regs"], result["stack"], result["shared"], result["local"] = map(int, found.groups())
    return result


def expected_vector_ops(spec: Spec) -> tuple[int, int]:
    """(128-bit loads, 128-bit stores) the unmasked full-block loops of a norm or scale pass need at least:
    per dtype branch BLOCK x itemsize / (threads x 16 B) per block step (the norm pass's rare float64 re-read
    under WIDEN is masked)."""
    constexprs = dict(spec.constexprs)
    if spec.kernel not in ("_fused_norm_kernel", "_fused_scale_kernel"):
        return 0, 0
    per_step = sum(constexprs["BLOCK_SIZE"] * size // (32 * NUM_WARPS * 16) for size in ITEM_BYTES.values())
    return per_step, per_step if spec.kernel == "_fused_scale_kernel" else 0


# ------------------------------------------------------------------------------------------------ report


def _span(values) -> str:
    values = list(values)
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def print_table(results: list[dict]) -> None:
    groups: dict = {}
    for r in results:
        groups.setdefault((r["spec"].kernel, r["arch"]), []).append(r)
    headers = ["kernel", "arch", "variants", "regs", "smem B", "spill st B", "spill ld B", "local B", "stack B",
               "ld.128", "st.128", "ld.global", "compile s"]
    rows = []
    for (kernel, arch), rs in sorted(groups.items()):
        rows.append([kernel, f"sm_{arch}", str(len(rs)), _span(r["regs"] for r in rs),
                     str(max(r["shared"] for r in rs)), str(max(r["spill_stores"] for r in rs)),
                     str(max(r["spill_loads"] for r in rs)), str(max(r["local"] for r in rs)),
                     str(max(r["stack"] for r in rs)), _span(r["vec_loads"] for r in rs),
                     _span(r["vec_stores"] for r in rs), _span(r["loads"] for r in rs),
                     f"{sum(r['seconds'] for r in rs):.0f}"])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    print(fmt.format(*headers))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(fmt.format(*row))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default=DEFAULT_ARCHS, help="comma-separated SM versions (default 80,90)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: cores)")
    parser.add_argument("--verbose", action="store_true", help="one line per compiled variant")
    parser.add_argument("--only", default="", help="compile the variants whose label contains this text")
    args = parser.parse_args()
    archs = [int(a) for a in args.arch.split(",") if a.strip()]

    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    import triton

    print(f"triton {triton.__version__} ({Path(triton.__file__).parent}); archs sm_{', sm_'.join(map(str, archs))}")
    failures = []
    specs = specializations()
    for name, fn in load_kernels().items():
        failures += specialisation_flags_problems(name, fn, dict(next(s.types for s in specs if s.kernel == name)))
    # the heavy kernels first, so that the pool ends evenly
    chosen = [s for s in specs if args.only in s.label()]
    jobs = sorted(((s, a) for s in chosen for a in archs),
                  key=lambda j: j[0].kernel not in ("_fused_norm_kernel", "_fused_scale_kernel"))
    print(f"{len(chosen)} specialisations x {len(archs)} archs = {len(jobs)} compiles on {args.jobs} processes")
    cache = tempfile.mkdtemp(prefix="ampclip-triton-check-")  # cold: nothing compiled before is reused
    started = time.monotonic()
    try:
        with ProcessPoolExecutor(max_workers=args.jobs, initializer=_worker_init, initargs=(cache,)) as pool:
            results = list(pool.map(compile_spec, jobs, chunksize=4))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    elapsed = time.monotonic() - started

    compiled = [r for r in results if r["error"] is None]
    allowed: list[str] = []
    for r in results:
        label = f"{r['spec'].label()} sm_{r['arch']}"
        if r["error"] is not None:
            failures.append(f"{label}: {r['error']}")
            continue
        if args.verbose:
            print(f"{label}: regs {r['regs']} smem {r['shared']} spills {r['spill_stores']}/{r['spill_loads']} "
                  f"local {r['local']} stack {r['stack']} ld.128 {r['vec_loads']} st.128 {r['vec_stores']}")
        spilled = max(r["spill_stores"], r["spill_loads"])
        if spilled and not r["local"] and allowed_spill(r["spec"], r["arch"], triton.__version__, spilled):
            allowed.append(f"{label}: {r['spill_stores']} B spill stores, {r['spill_loads']} B spill loads")
        elif spilled or r["local"]:
            failures.append(f"{label}: spills ({r['spill_stores']} B stores, {r['spill_loads']} B loads, "
                            f"{r['local']} B local memory)")
        want_loads, want_stores = expected_vector_ops(r["spec"])
        if r["vec_loads"] < want_loads or r["vec_stores"] < want_stores:
            failures.append(f"{label}: {r['vec_loads']} 128-bit loads and {r['vec_stores']} stores in its PTX, "
                            f"its full-block loops need {want_loads} and {want_stores}")
    if compiled:
        print()
        print_table(compiled)
        print()
    print(f"{len(compiled)} of {len(jobs)} compiled in {elapsed:.0f} s wall")
    if allowed:
        print("allowed spills (ALLOWED_SPILLS):")
        for line in allowed:
            print(f"  {line}")
    if failures:
        print(f"triton-check FAILED (triton {triton.__version__}):")
        for f in failures:
            print(f"  {f}")
        return 1
    print(f"triton-check passed (triton {triton.__version__}): every specialisation compiles for "
          f"sm_{', sm_'.join(map(str, archs))}, no spill{' beyond ALLOWED_SPILLS' if allowed else ''}, "
          "128-bit loads in every norm and scale pass")
    return 0


if __name__ == "__main__":
    sys.exit(main())
