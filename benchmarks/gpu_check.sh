#!/usr/bin/env bash
# The GPU check in one command, for a CUDA machine whose python3 already holds torch and triton (no network
# needed): build the extension, record the environment, run the GPU test suite, then the benchmarks that
# carry the GPU targets. Everything lands in $OUT (default ./gpu-check): one log per step, the test suite's
# JUnit XML, and a results JSON/CSV/PNG per benchmark run. Copy the results into benchmarks/results/.
#
#   benchmarks/gpu_check.sh                 # build (CPU + CUDA C++ kernels), env, tests, target benchmarks
#   benchmarks/gpu_check.sh tests           # build, env, tests
#   benchmarks/gpu_check.sh bench           # build, env, target benchmarks
#   benchmarks/gpu_check.sh full            # build, env, the harness's whole GPU default set (long)
#
# TEST_TIMEOUT and BENCH_TIMEOUT (seconds) bound the steps; a step that runs out still leaves its log.
set -u
cd "$(dirname "$0")/.."
WHAT=${1:-all}
OUT=${OUT:-gpu-check}
PY=${PYTHON:-python3}
TEST_TIMEOUT=${TEST_TIMEOUT:-240}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-180}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1  # a step cut off by its timeout keeps what it printed
failed=0

step() {  # step NAME COMMAND...: runs it with its output in $OUT/NAME.log and reports exit status and time
    local name=$1
    shift
    local start=$SECONDS
    echo "== $name: $*"
    "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    tail -n 15 "$OUT/$name.log"
    [ "$rc" -eq 0 ] || failed=1
}

# The CUDA C++ kernels build for the visible GPU's architecture only (a few minutes less than the default list);
# set TORCH_CUDA_ARCH_LIST to build others. Without nvcc or a CUDA build of torch the extension has no CUDA
# kernels, and cuda-archs below fails.
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
    export TORCH_CUDA_ARCH_LIST
fi
step build "$PY" -m pip install -e . --no-build-isolation --no-deps
step env "$PY" -m ampclip env
# The extension holds the CUDA kernels for this GPU (sm_90 on an H100/H200) and the cuda backend loads.
step cuda-archs "$PY" -c "
import torch
from ampclip import _C, ops
archs = _C.cuda_archs()
want = 'sm_%d%d' % torch.cuda.get_device_capability()
print('cuda_archs', archs, 'want', want, 'cuda backend:', ops.available_backends()['cuda'])
assert want in archs and ops.available_backends()['cuda'], ops.backend()['unavailable']
"
step nvidia-smi nvidia-smi

if [ "$WHAT" = all ] || [ "$WHAT" = tests ]; then
    # Compiled kernels, not the interpreter that tests/conftest.py turns on by default.
    step test-gpu env TRITON_INTERPRET=0 timeout "$TEST_TIMEOUT" "$PY" -m pytest -q -m gpu -rA -s \
        --junitxml "$OUT/test-gpu.xml"
fi
if [ "$WHAT" = all ] || [ "$WHAT" = bench ]; then
    # The workloads of the GPU targets: GPT-2-1.5B fp32, LLaMA-7B bf16, 2000 x 512 and 10000 x 4, and the
    # host time per step with 2000 cached parameters (benchmarks/test_step.py).
    step bench-fp32 timeout "$BENCH_TIMEOUT" "$PY" -m pytest benchmarks -p no:cacheprovider -q \
        --workloads gpt2-1.5b 2000x512 10000x4 --dtypes fp32 --benchmark-json "$OUT/bench-fp32.json"
    step bench-llama-bf16 timeout "$BENCH_TIMEOUT" "$PY" -m pytest benchmarks/test_clip.py -p no:cacheprovider -q \
        --workloads llama-7b --dtypes bf16 --benchmark-json "$OUT/bench-llama-bf16.json"
    step bench-report "$PY" -m benchmarks.report "$OUT"/bench-*.json --out "$OUT"
fi
if [ "$WHAT" = full ]; then
    step bench-full timeout "$BENCH_TIMEOUT" "$PY" -m pytest benchmarks -p no:cacheprovider -q \
        --benchmark-json "$OUT/bench-full.json"
fi
exit "$failed"
