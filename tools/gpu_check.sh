#!/usr/bin/env bash
# One-shot GPU check for a lent H200 (torch 2.11 + Python 3.12 there, no internet): builds the
# extension, runs the GPU tests (ops, then the CUDA-graph rollout), the op and attention benchmarks and
# the end-to-end step benchmark (bench_step), prints short tables. Under 8 minutes:
# GPU_CHECK_BUDGET_S (default 450, the build included) bounds the whole script; sections that would
# start with less than 20 s left are skipped, and each is cut at its own limit. GPU_CHECK_SECTIONS
# picks some of "tests graphs bench_ops bench_attention bench_step fp8_rollout slow" (default: all, in
# that order: correctness first; fp8_rollout = tools/fp8_rollout_check.py, issue 4's end-to-end check).
#
# From a developer session, with the device tool:
#   run(command="bash tools/gpu_check.sh", timeout_s=540)
# Wheels the device lacks (e.g. nvidia-cutlass for the fp8 kernel, nvtx for real NVTX ranges) travel
# in ./.whl (carry=[".whl"], see the device README) and are installed first when present; without
# the nvtx package a no-op stand-in is used (the ranges only matter under Nsight).
# Results land in $OUT (or ./gpu_check_out), at most 7 files (the device tool returns 8):
#   gpu_check.log (everything printed), build.log, tests_full.log (pytest's whole output),
#   bench_ops_bf16.json, bench_ops_fp32.json, bench_attention.json, bench_step.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
[ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda

t0=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-450}
SECTIONS=${GPU_CHECK_SECTIONS:-"tests graphs bench_ops bench_attention bench_step fp8_rollout slow"}

# section NAME TIMEOUT CMD...: runs CMD when NAME is selected and time is left, bounded by both.
section() {
  local name=$1 limit=$2; shift 2
  case " $SECTIONS " in *" $name "*) ;; *) return 0 ;; esac
  local left=$(( BUDGET - ($(date +%s) - t0) ))
  if [ "$left" -lt 20 ]; then echo "== $name: skipped (time budget of ${BUDGET} s spent)"; return 0; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (at most ${limit} s, $(( $(date +%s) - t0 )) s in)"
  timeout -k 10 "$limit" "$@"
  local rc=$?
  [ "$rc" -eq 124 ] && echo "== $name: cut at its limit of ${limit} s"
  return 0
}

# pytest runs under `section` (timeout needs a command, not a function); `summary` keeps its whole
# output in tests_full.log and shows the section header, the failures and the counts.
PYTEST=(python3 -m pytest -q -rfE --tb=short --maxfail=25 -p no:cacheprovider)
summary() {
  tee -a "$OUT/tests_full.log" | grep -E "^== |passed|failed|error|skipped|^(FAILED|ERROR) " | tail -40
}

main() {
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
  fi
  if ! python3 -c "import nvtx" 2>/dev/null; then  # the sampling/trainer layers import it
    mkdir -p /tmp/nvtx_stub
    cat > /tmp/nvtx_stub/nvtx.py <<'EOF'
"""No-op stand-in for the nvtx package (gpu_check.sh: the image lacks it; ranges only matter under Nsight)."""


class _Domain:
    def get_event_attributes(self, **kwargs):
        return None

    def push_range(self, attributes=None):
        pass

    def pop_range(self):
        pass


def get_domain(name=None):
    return _Domain()
EOF
    export PYTHONPATH=/tmp/nvtx_stub:${PYTHONPATH:-}
    echo "note: no nvtx package here; using a no-op stand-in"
  fi
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv

  echo "== build (setup.py build_ext --inplace, MAX_JOBS=$MAX_JOBS, archs $TORCH_CUDA_ARCH_LIST)"
  python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; return 1; }
  echo "   built in $(( $(date +%s) - t0 )) s"
  python3 -m ddrl_engine.info

  section tests 150 "${PYTEST[@]}" -m "gpu and not slow" tests/test_ops_cuda.py tests/test_ops_cpu.py \
    tests/test_fp8_attention.py 2>&1 | summary
  section graphs 90 "${PYTEST[@]}" -m gpu tests/test_graphs.py 2>&1 | summary
  section bench_ops 75 python3 tools/bench_ops.py --device cuda --dtype bf16 --elems 64M --rows 16 \
    --json "$OUT/bench_ops_bf16.json"
  section bench_ops 45 python3 tools/bench_ops.py --device cuda --dtype fp32 --elems 64M --rows 16 --no-compile \
    --json "$OUT/bench_ops_fp32.json"
  section bench_attention 90 python3 tools/bench_attention.py --seqs 4096,16384,32768,75600 --dims 128,64 --iters 5 \
    --budget-ms 1500 --json "$OUT/bench_attention.json"
  section bench_step 120 python3 tools/bench_step.py --device cuda --steps 2 --json "$OUT/bench_step.json"
  section fp8_rollout 120 python3 tools/fp8_rollout_check.py --device cuda --samples-per-class 32 --train-steps 20 \
    --out /tmp/fp8_rollout_check
  section slow 90 "${PYTEST[@]}" -m "gpu and slow" tests/test_ops_cuda.py 2>&1 | summary
  echo "== total $(( $(date +%s) - t0 )) s"
}

main 2>&1 | tee "$OUT/gpu_check.log" | grep --line-buffered -v "Warning"
