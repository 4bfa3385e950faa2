#!/usr/bin/env bash
# One-shot GPU check for a lent H200 (torch 2.11 + Python 3.12 there, no internet): builds the
# extension, runs the GPU tests, the op and attention benchmarks and the end-to-end step benchmark
# (bench_step), prints short tables. Under 8 minutes: GPU_CHECK_BUDGET_S (default 450) bounds the
# sections after the build; GPU_CHECK_SECTIONS picks some of
# "tests bench_ops bench_attention graphs bench_step slow" (default: all, in that order).
#
# From a developer session, with the device tool:
#   run(command="bash tools/gpu_check.sh", timeout_s=540)
# Wheels the device lacks (e.g. nvidia-cutlass once a kernel needs it) travel in ./.whl (see the
# device README) and are installed first when present. Results land in $OUT (or ./gpu_check_out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
[ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/gpu.txt"

t0=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-450}  # the whole script stays under 8 minutes: later sections are skipped
SECTIONS=${GPU_CHECK_SECTIONS:-"tests bench_ops bench_attention graphs bench_step slow"}
# section NAME TIMEOUT CMD...: runs CMD when NAME is selected and time is left, bounded by both.
section() {
  local name=$1 limit=$2; shift 2
  case " $SECTIONS " in *" $name "*) ;; *) return 0 ;; esac
  local left=$(( BUDGET - ($(date +%s) - t0) ))
  if [ "$left" -lt 20 ]; then echo "== $name: skipped (time budget of ${BUDGET} s spent)"; return 0; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (at most ${limit} s)"
  timeout "$limit" "$@"
}

echo "== build (setup.py build_ext --inplace)"
python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "   built in $(( $(date +%s) - t0 )) s"
python3 -m ddrl_engine.info | tee "$OUT/info.txt"

section tests 180 python3 -m pytest -q -x -m "gpu and not slow" tests/test_ops_cuda.py tests/test_ops_cpu.py tests/test_fp8_attention.py 2>&1 | tail -15 | tee "$OUT/tests.txt"
for dt in bf16 fp32; do
  section bench_ops 90 python3 tools/bench_ops.py --device cuda --dtype $dt --elems 64M --rows 16 --json "$OUT/bench_ops_$dt.json" 2>&1 | grep -v Warning | tee -a "$OUT/bench.txt"
done
section bench_attention 120 python3 tools/bench_attention.py --seqs 4096,16384,32768,75600 --dims 128,64 --iters 5 --budget-ms 1500 --json "$OUT/bench_attention.json" 2>&1 | grep -v Warning | tee -a "$OUT/bench.txt"
section graphs 60 python3 -m pytest -q -m gpu tests/test_graphs.py 2>&1 | tail -5 | tee -a "$OUT/tests.txt"
section bench_step 120 python3 tools/bench_step.py --device cuda --steps 2 --json "$OUT/bench_step.json" 2>&1 | grep -v Warning | tee "$OUT/bench_step.txt"
section slow 90 python3 -m pytest -q -m "gpu and slow" tests/test_ops_cuda.py 2>&1 | tail -5 | tee -a "$OUT/tests.txt"
echo "== total $(( $(date +%s) - t0 )) s"
