#!/usr/bin/env bash
# The GPU check in one command, for a CUDA machine whose python3 already holds torch and triton (no network
# needed): build the extension, record the environment, run the GPU test suite, then the benchmarks that
# carry the GPU targets. Everything lands in $OUT (default ./gpu-check): one log per step, the test suite's
# JUnit XML, the benchmark runs' JSON and their report (CSV, PNG), and summary.txt. Copy the results into
# benchmarks/results/.
#
#   benchmarks/gpu_check.sh                 # build (CPU + CUDA C++ kernels), env, tests, target benchmarks
#   benchmarks/gpu_check.sh tests           # build, env, tests
#   benchmarks/gpu_check.sh bench           # build, env, target benchmarks
#   benchmarks/gpu_check.sh full            # build, env, the harness's whole GPU default set (long)
#
# BUDGET (seconds, default 330; 7200 for full) bounds the whole check: every step runs under `timeout`, with at most its own
# limit and at most what is left of the budget; a step cut off keeps its log, and a step with under 20 s
# left is skipped. The steps run in order of what they prove, the longest last. BUNDLE=1 packs everything
# into $OUT/gpu-check.tar.gz beside summary.txt (two files in $OUT, for a machine that returns only a few).
set -u
cd "$(dirname "$0")/.."
WHAT=${1:-all}
OUT=${OUT:-gpu-check}
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-$([ "$WHAT" = full ] && echo 7200 || echo 330)}
mkdir -p "$OUT"
LOGS=$OUT
[ "${BUNDLE:-0}" = 1 ] && LOGS=$(mktemp -d)
SUMMARY=$LOGS/summary.txt
export PYTHONUNBUFFERED=1  # a step cut off by its timeout keeps what it printed
failed=0

say() { echo "$*" | tee -a "$SUMMARY"; }

step() {  # step NAME LIMIT COMMAND...: runs it under timeout, its output in $LOGS/NAME.log
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - SECONDS))
    if [ "$left" -lt 20 ]; then
        say "== $name: skipped, $left s of the $BUDGET s budget left"
        failed=1
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local start=$SECONDS
    say "== $name (limit $limit s): $*"
    timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    say "== $name: exit $rc after $((SECONDS - start)) s$([ "$rc" -eq 124 ] && echo ', cut off by its limit')"
    tail -n 15 "$LOGS/$name.log" | tee -a "$SUMMARY"
    [ "$rc" -eq 0 ] || failed=1
}

finish() {
    say "== done after $SECONDS s, $([ "$failed" -eq 0 ] && echo 'every step passed' || echo 'some step failed')"
    if [ "$LOGS" != "$OUT" ]; then
        tar czf "$OUT/gpu-check.tar.gz" -C "$LOGS" .
        cp "$SUMMARY" "$OUT/summary.txt"
        rm -rf "$LOGS"
    fi
    exit "$failed"
}

# The CUDA C++ kernels build for the visible GPU's architecture only (a few minutes less than the default
# list); set TORCH_CUDA_ARCH_LIST to build others. Without nvcc or a CUDA build of torch the extension has no
# CUDA kernels, and cuda-archs below fails.
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
    export TORCH_CUDA_ARCH_LIST
fi
step build 240 "$PY" -m pip install -e . --no-build-isolation --no-deps
step env 60 "$PY" -m ampclip env
# The extension holds the CUDA kernels for this GPU (sm_90 on an H100/H200) and the cuda backend loads.
step cuda-archs 60 "$PY" -c "
import torch
from ampclip import _C, ops
archs = _C.cuda_archs()
want = 'sm_%d%d' % torch.cuda.get_device_capability()
print('cuda_archs', archs, 'want', want, 'cuda backend:', ops.available_backends()['cuda'])
assert want in archs and ops.available_backends()['cuda'], ops.backend()['unavailable']
"
step nvidia-smi 30 nvidia-smi

if [ "$WHAT" = all ] || [ "$WHAT" = tests ]; then
    # Compiled kernels, not the interpreter that tests/conftest.py turns on by default.
    step test-gpu 150 env TRITON_INTERPRET=0 "$PY" -m pytest -q -m gpu -rA -s -p no:cacheprovider \
        --junitxml "$LOGS/test-gpu.xml"
fi
if [ "$WHAT" = all ] || [ "$WHAT" = bench ]; then
    # The workloads of the GPU targets: GPT-2-1.5B fp32, LLaMA-7B bf16, 2000 x 512 and 10000 x 4, and the
    # host time per step with 2000 cached parameters (benchmarks/test_step.py). ampclip's GPU providers and
    # torch's chain (the baselines, floors and the copy come along); torch.compile of the chain last.
    providers="ampclip_dropin ampclip_dropin_noclip ampclip_triton clipper_triton"
    if "$PY" -c "import sys; from ampclip import ops; sys.exit(not ops.available_backends()['cuda'])" 2>/dev/null; then
        providers="$providers ampclip_cuda clipper_cuda"
    fi
    fast="--rounds 30 --sets 2 --providers $providers"
    step bench-fp32 120 "$PY" -m pytest benchmarks/test_clip.py benchmarks/test_step.py -p no:cacheprovider -q $fast \
        --workloads gpt2-1.5b 2000x512 10000x4 --dtypes fp32 --benchmark-json "$LOGS/bench-fp32.json"
    # The host path per call on both GPU backends (what decides the default on CUDA), and the exposed clip time
    # of a step with and without overlap on GPT-2 124M and 355M.
    step bench-host 60 "$PY" -m pytest benchmarks/test_host_path.py -p no:cacheprovider -q -s \
        --benchmark-json "$LOGS/bench-host.json"
    step bench-overlap 90 "$PY" -m pytest benchmarks/test_step_overlap.py -p no:cacheprovider -q --rounds 10 \
        --benchmark-json "$LOGS/bench-overlap.json"
    step bench-llama-bf16 60 "$PY" -m pytest benchmarks/test_clip.py -p no:cacheprovider -q $fast \
        --workloads llama-7b --dtypes bf16 --benchmark-json "$LOGS/bench-llama-bf16.json"
    step bench-report 30 "$PY" -m benchmarks.report "$LOGS"/bench-*.json --out "$LOGS"
    step bench-compile 120 "$PY" -m pytest benchmarks/test_clip.py -p no:cacheprovider -q --rounds 30 --sets 2 \
        --providers torch_compile_chain --workloads gpt2-1.5b --dtypes fp32 --benchmark-json "$LOGS/compile-fp32.json"
fi
if [ "$WHAT" = full ]; then
    step bench-full 3600 "$PY" -m pytest benchmarks -p no:cacheprovider -q --benchmark-json "$LOGS/bench-full.json"
fi
finish
