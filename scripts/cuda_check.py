"""Compile proof of the CUDA kernels (csrc/cuda/*.cu) on a machine without a GPU: ``make cuda-check``.

1. nvcc compiles every ``csrc/cuda/*.cu`` once per architecture (sm_80, sm_90 by default), compile only
   (``-c``), against the installed torch's headers with the flags torch's extension builder uses, plus
   ``-Xptxas -v`` and ``--keep`` for the PTX. Nothing is cached between runs: all output goes to a
   temporary folder that is removed at the end.
2. ptxas's report becomes a table per kernel and architecture: registers, shared memory, spill stores and
   loads, stack frame, and the 128-bit global loads/stores found in the kernel's PTX.
3. It fails (exit 1) on a compile error, on any warning not in ALLOWED_WARNINGS, on any spill, when a norm or
   scale kernel has no 128-bit global load (``ld.global[.nc|.cg].v4``), or when a source breaks a rule
   the kernels keep (no host synchronisation, no atomic but the ticket counters, no ATen/cuda/CUDAContext.h).
4. scripts/cuda_host_checks.cpp is built with the host compiler against torch's CPU library and run: the
   argument checks (csrc/cuda/fused_clip_cuda_checks.h, which take the expected device type as a parameter,
   so CPU tensors stand in for CUDA ones) and the kernels' arithmetic (csrc/cuda/fused_clip_cuda_math.cuh,
   the same __host__ __device__ source) against torch's CPU ops. Kernels need a GPU and are not run.

A CPU build of torch ships the CUDA headers but not the generated ``c10/cuda/impl/cuda_cmake_macros.h``;
a one-line stub of it is written into the temporary folder, first on the include path (never into the
source tree or site-packages).

Usage: python scripts/cuda_check.py [--arch 80,90] [--keep-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "csrc" / "cuda"
HOST_TEST = ROOT / "scripts" / "cuda_host_checks.cpp"
DEFAULT_ARCHS = "80,90"

# Warnings that may appear in the compile output without failing the check: (regex, why it is harmless).
# Empty: the kernels compile without a single warning, and any new one should be looked at.
ALLOWED_WARNINGS: list[tuple[str, str]] = []

# Kernels whose PTX must hold 128-bit global loads (the chunk bodies are read 16 bytes at a time).
VECTOR_KERNELS = ("norm_chunks_kernel", "scale_chunks_kernel")
VEC_LOAD = re.compile(r"\bld\.global(?:\.[a-z0-9]+)*\.v4\.")
VEC_STORE = re.compile(r"\bst\.global(?:\.[a-z0-9]+)*\.v4\.")

# What the kernel sources must not contain (comments are ignored): each would break a promise of the
# kernels (no host synchronisation, deterministic reductions, headers a CPU machine has).
SOURCE_RULES = [
    (re.compile(r"\.item\s*[<(]"), "reads a value on the host (.item)"),
    (re.compile(r"\bcudaMemcpy\w*\s*\("), "copies memory (outputs come from at::empty and kernels)"),
    (re.compile(r"\bcuda(?:Device|Stream|Event)Synchronize\b"), "synchronises with the host"),
    (re.compile(r"\.(?:cpu|to)\s*\(\s*(?:at::)?(?:kCPU|c10::kCPU|\"cpu\")"), "moves a tensor to the host"),
    # the one atomic allowed: the integer ticket counters that elect the finishing blocks (never a sum's order)
    (re.compile(r"\batomic[A-Z]\w*\s*\((?!\s*fin\.tickets\b)"), "uses an atomic other than the ticket counters "
     "(reductions must be fixed-order)"),
    (re.compile(r"#\s*include\s*<ATen/cuda/CUDAContext\.h>"), "includes ATen/cuda/CUDAContext.h (cuBLAS headers)"),
]

PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
PTXAS_PROPS = re.compile(r"Function properties for (\S+)")
PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_USED = re.compile(r"Used (\d+) registers")
PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
NORM_KINDS = {"0": "L2", "1": "L1", "2": "inf", "3": "p"}


@dataclass
class Kernel:
    mangled: str
    arch: str
    registers: int = 0
    smem: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    callee_spills: list[str] = field(default_factory=list)  # out-of-line functions it calls that spill
    vec_loads: int = 0
    vec_stores: int = 0
    name: str = ""


@dataclass
class Job:
    label: str
    cmd: list[str]
    returncode: int = 0
    output: str = ""
    seconds: float = 0.0


def find_nvcc() -> str:
    candidates = [os.environ.get("NVCC"), shutil.which("nvcc")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(str(Path(home) / "bin" / "nvcc"))
    for c in candidates:
        if c and Path(c).is_file():
            return c
    sys.exit("cuda-check: nvcc not found (set NVCC or CUDA_HOME)")


def run(job: Job) -> Job:
    start = time.monotonic()
    proc = subprocess.run(job.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    job.returncode, job.output, job.seconds = proc.returncode, proc.stdout, time.monotonic() - start
    return job


def nvcc_job(nvcc: str, source: Path, arch: str, work: Path, stub_dir: Path, torch_includes: list[str],
             common_flags: list[str]) -> tuple[Job, Path]:
    keep = work / f"{source.stem}-sm_{arch}"
    keep.mkdir(parents=True)
    cmd = [
        nvcc, "-c", str(source), "-o", str(keep / f"{source.stem}.o"),
        f"-gencode=arch=compute_{arch},code=sm_{arch}",
        "-std=c++20", "-O3", *common_flags,
        "-Xcompiler", "-fPIC,-Wall,-Wextra",
        "-Xptxas", "-v",
        "--keep", "--keep-dir", str(keep),
        "-I", str(stub_dir),  # first: the stub of the generated CUDA macros header
        "-I", str(CUDA_DIR),
    ]
    for inc in torch_includes:  # system includes: torch's own warnings are not the kernels'
        cmd += ["-isystem", inc]
    return Job(f"{source.relative_to(ROOT)} sm_{arch}", cmd), keep / f"{source.stem}.ptx"


def host_job(work: Path, torch_includes: list[str], torch_lib: str, cxx11_abi: bool) -> Job:
    cxx = shlex.split(os.environ.get("CXX", "g++"))  # may be a launcher and a compiler ("ccache g++")
    exe = work / "cuda_host_checks"
    cmd = [*cxx, "-std=c++20", "-O1", "-Wall", "-Wextra", f"-D_GLIBCXX_USE_CXX11_ABI={int(cxx11_abi)}",
           "-I", str(CUDA_DIR)]
    for inc in torch_includes:
        cmd += ["-isystem", inc]
    cmd += [str(HOST_TEST), "-o", str(exe), "-L", torch_lib, f"-Wl,-rpath,{torch_lib}", "-ltorch_cpu", "-lc10"]
    # build, then run: one shell step so that it runs in the same worker
    return Job("host checks", ["sh", "-c", shlex.join(cmd) + " && " + shlex.quote(str(exe))])


def entries_job(torch_includes: list[str], cxx11_abi: bool) -> Job:
    """The CUDA kernels' Python entries (csrc/cuda/python_cuda.cpp, host code) compiled with the host compiler, as
    the extension build compiles them: they are built only with a CUDA build of torch, which CI does not have."""
    import sysconfig

    cxx = shlex.split(os.environ.get("CXX", "g++"))
    cmd = [*cxx, "-std=c++20", "-O1", "-Wall", "-Wextra", "-fsyntax-only", f"-D_GLIBCXX_USE_CXX11_ABI={int(cxx11_abi)}",
           "-I", str(CUDA_DIR), "-isystem", sysconfig.get_paths()["include"]]
    for inc in torch_includes:
        cmd += ["-isystem", inc]
    return Job("entries", [*cmd, str(CUDA_DIR / "python_cuda.cpp")])


def parse_ptxas(output: str) -> list[Kernel]:
    kernels: list[Kernel] = []
    current: Kernel | None = None
    props_for: str | None = None
    for line in output.splitlines():
        if m := PTXAS_ENTRY.search(line):
            current = Kernel(m.group(1), m.group(2))
            kernels.append(current)
            props_for = None
        elif m := PTXAS_PROPS.search(line):
            props_for = m.group(1)
        elif (m := PTXAS_FRAME.search(line)) and current is not None:
            stack, stores, loads = map(int, m.groups())
            if props_for == current.mangled:
                current.stack, current.spill_stores, current.spill_loads = stack, stores, loads
            elif stores or loads:  # an out-of-line callee (a math library function) compiled for this kernel
                current.callee_spills.append(f"{props_for}: {stores} B spill stores, {loads} B spill loads")
        elif (m := PTXAS_USED.search(line)) and current is not None:
            current.registers = int(m.group(1))
            s = PTXAS_SMEM.search(line)
            current.smem = int(s.group(1)) if s else 0
    return kernels


def ptx_vector_ops(ptx: Path) -> dict[str, tuple[int, int]]:
    """(128-bit global loads, 128-bit global stores) per .entry of a PTX file."""
    counts: dict[str, list[int]] = {}
    entry = None
    for line in ptx.read_text().splitlines():
        if m := re.match(r"\s*(?:\.visible\s+|\.weak\s+)?\.entry\s+(\S+?)\(", line):
            entry = m.group(1)
            counts[entry] = [0, 0]
        elif re.match(r"\s*(?:\.visible\s+|\.weak\s+)?\.func\b", line):
            entry = None  # an out-of-line function: not part of any kernel's body
        elif entry is not None:
            if VEC_LOAD.search(line):
                counts[entry][0] += 1
            if VEC_STORE.search(line):
                counts[entry][1] += 1
    return {k: (v[0], v[1]) for k, v in counts.items()}


def short_names(mangled: list[str]) -> dict[str, str]:
    """Readable kernel names: 'norm_chunks_kernel<float, L2>' from the mangled symbol."""
    demangled = mangled
    if shutil.which("c++filt"):
        proc = subprocess.run(["c++filt"], input="\n".join(mangled), stdout=subprocess.PIPE, text=True)
        lines = proc.stdout.splitlines()
        if len(lines) == len(mangled):
            demangled = lines
    out = {}
    for m, d in zip(mangled, demangled):
        d = d.replace("(anonymous namespace)::", "")
        d = re.sub(r"^void ", "", d)
        d = re.sub(r"\b(?:ampclip::cuda::)", "", d)
        d = re.sub(r"\(NormKind\)(\d)", lambda k: NORM_KINDS.get(k.group(1), k.group(1)), d)
        depth, cut = 0, len(d)
        for i, ch in enumerate(d):  # drop the argument list: the first '(' outside template brackets
            if ch == "<":
                depth += 1
            elif ch == ">":
                depth -= 1
            elif ch == "(" and depth == 0:
                cut = i
                break
        out[m] = d[:cut]
    return out


def is_vector_kernel(k: Kernel) -> bool:
    return any(name in k.mangled for name in VECTOR_KERNELS)  # works on the mangled name, with or without c++filt


def warning_lines(output: str) -> list[str]:
    """Compiler and assembler warnings in a job's output, with the allowed ones left out."""
    found = []
    for line in output.splitlines():
        if not re.search(r"warning", line, re.IGNORECASE):
            continue
        if any(re.search(pattern, line) for pattern, _ in ALLOWED_WARNINGS):
            continue
        found.append(line.strip())
    return found


def check_sources() -> list[str]:
    problems = []
    for path in sorted(CUDA_DIR.glob("*")):
        if path.suffix not in (".cu", ".cuh", ".h", ".cpp"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("//", 1)[0]
            for pattern, why in SOURCE_RULES:
                if pattern.search(code):
                    problems.append(f"{path.relative_to(ROOT)}:{number}: {why}: {line.strip()}")
    return problems


def print_table(kernels: list[Kernel]) -> None:
    headers = ["kernel", "arch", "regs", "smem B", "spill st B", "spill ld B", "stack B", "ld.v4", "st.v4"]
    rows = [[k.name, k.arch, str(k.registers), str(k.smem), str(k.spill_stores), str(k.spill_loads), str(k.stack),
             str(k.vec_loads), str(k.vec_stores)] for k in kernels]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    print(fmt.format(*headers))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(fmt.format(*r))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default=DEFAULT_ARCHS, help="comma-separated SM versions (default 80,90)")
    parser.add_argument("--keep-dir", help="keep objects, PTX and logs here instead of a temporary folder")
    args = parser.parse_args()
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]

    import torch
    from torch.utils import cpp_extension

    nvcc = find_nvcc()
    sources = sorted(CUDA_DIR.glob("*.cu"))
    if not sources:
        print("cuda-check: no csrc/cuda/*.cu to compile")
        return 1
    torch_includes = cpp_extension.include_paths()
    torch_lib = str(Path(torch.__file__).parent / "lib")
    common_flags = list(cpp_extension.COMMON_NVCC_FLAGS)  # what the extension build passes to nvcc
    version = subprocess.run([nvcc, "--version"], stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()
    print(f"nvcc: {nvcc} ({version[-1] if version else '?'}); torch {torch.__version__}; "
          f"archs sm_{', sm_'.join(archs)}")

    tmp = None
    if args.keep_dir:
        work = Path(args.keep_dir).resolve()
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="ampclip-cuda-check-")
        work = Path(tmp.name)
    try:
        stub_dir = work / "include"
        stub = stub_dir / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
        stub.parent.mkdir(parents=True)
        stub.write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")  # what a CUDA build of torch generates

        jobs, ptx_files = [], {}
        for source in sources:
            for arch in archs:
                job, ptx = nvcc_job(nvcc, source, arch, work, stub_dir, torch_includes, common_flags)
                jobs.append(job)
                ptx_files[job.label] = (ptx, f"sm_{arch}")
        jobs.append(host_job(work, torch_includes, torch_lib, bool(torch._C._GLIBCXX_USE_CXX11_ABI)))
        jobs.append(entries_job(torch_includes, bool(torch._C._GLIBCXX_USE_CXX11_ABI)))
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            done = list(pool.map(run, jobs))
        elapsed = time.monotonic() - started

        failures: list[str] = []
        kernels: list[Kernel] = []
        for job in done:
            print(f"{job.label}: {'ok' if job.returncode == 0 else 'FAILED'} in {job.seconds:.0f} s")
            if args.keep_dir:
                (work / (re.sub(r"\W+", "_", job.label) + ".log")).write_text(job.output)
            if job.returncode != 0:
                failures.append(f"{job.label}: exit status {job.returncode}")
                print(job.output)
                continue
            for w in warning_lines(job.output):
                failures.append(f"{job.label}: warning not allowed: {w}")
            if job.label == "host checks":
                print("  " + (job.output.strip().splitlines() or ["(no output)"])[-1])
                continue
            if job.label == "entries":
                continue
            found = parse_ptxas(job.output)
            ptx, arch = ptx_files[job.label]
            vec = ptx_vector_ops(ptx) if ptx.is_file() else {}
            if not ptx.is_file():
                failures.append(f"{job.label}: no PTX kept at {ptx}")
            for k in found:
                k.vec_loads, k.vec_stores = vec.get(k.mangled, (0, 0))
            kernels += found
            if not found:
                failures.append(f"{job.label}: ptxas reported no kernel")

        names = short_names(sorted({k.mangled for k in kernels}))
        for k in kernels:
            k.name = names.get(k.mangled, k.mangled)
        kernels.sort(key=lambda k: (k.name, k.arch))
        if kernels:
            print()
            print_table(kernels)
            print()
        for k in kernels:
            if k.spill_stores or k.spill_loads:
                failures.append(f"{k.name} {k.arch}: {k.spill_stores} B spill stores, {k.spill_loads} B spill loads")
            for callee in k.callee_spills:
                failures.append(f"{k.name} {k.arch}: a function it calls spills: {callee}")
            if is_vector_kernel(k) and k.vec_loads == 0:
                failures.append(f"{k.name} {k.arch}: no 128-bit global load (ld.global.v4) in its PTX")
        for kernel in VECTOR_KERNELS:
            for arch in archs:
                if not any(kernel in k.mangled and k.arch == f"sm_{arch}" for k in kernels):
                    failures.append(f"{kernel}: not compiled for sm_{arch}")
        failures += check_sources()

        if ALLOWED_WARNINGS:
            print("allowed warnings:")
            for pattern, why in ALLOWED_WARNINGS:
                print(f"  {pattern}: {why}")
        print(f"{len(sources)} source(s) x {len(archs)} arch(s) compiled in {elapsed:.0f} s wall")
        if failures:
            print("cuda-check FAILED:")
            for f in failures:
                print(f"  {f}")
            return 1
        print("cuda-check passed: no error, no warning, no spill; 128-bit loads in the norm and scale kernels; "
              "host checks pass; the Python entries compile")
        return 0
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
