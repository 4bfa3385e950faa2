#!/usr/bin/env bash
# One-shot GPU check for a lent H200 (torch 2.11 + Python 3.12 there, no internet), one call of the
# device tool, under 8 minutes so a rerun fits: builds the extension; runs every test file that holds
# GPU tests, each alone under `timeout 120` (a hang names its file, not the whole run); checks the
# fp8 kernel against the CPU emulation at the extra shapes (Sk = 129 and 1025, Sq = 129, B*H = 1);
# runs `compute-sanitizer --tool memcheck` on one small fp8 call and on the row ops at (3, 7) and
# (5, 8193); then the op, attention and end-to-end step benchmarks. Every section lands in one table
# (section, status, seconds), printed at the end and written to $OUT/summary.md.
#
# GPU_CHECK_BUDGET_S (default 450, the build included) bounds the whole script; sections that would
# start with less than 20 s left are skipped (and say so in the table), each is cut at its own limit.
# GPU_CHECK_SECTIONS picks some of "build tests fp8_shapes sanitizer bench_ops bench_attention
# bench_step fp8_rollout slow" (default: all, in that order: correctness first; fp8_rollout =
# tools/fp8_rollout_check.py, issue 4's end-to-end check). GPU_CHECK_TEST_TIMEOUT_S (default 120)
# is the per-test-file limit.
# GPU_CHECK_DRY_RUN=1 runs no command: each section prints what it would run and runs
# GPU_CHECK_DRY_CMD instead (default `true`); GPU_CHECK_DRY_FAIL / GPU_CHECK_DRY_HANG name sections
# (shell patterns) whose stand-in exits 3 / sleeps past its limit. tests/test_gpu_check.py uses it.
#
# From a developer session, with the device tool:
#   run(command="bash tools/gpu_check.sh", timeout_s=540)
# Wheels the device lacks (e.g. nvidia-cutlass for the fp8 kernel, nvtx for real NVTX ranges) travel
# in ./.whl (carry=[".whl"], see the device README) and are installed first when present; without
# the nvtx package a no-op stand-in is used (the ranges only matter under Nsight).
# Results land in $OUT (or ./gpu_check_out), at most 8 files (what the device tool returns):
#   summary.md (the table), gpu_check.log (everything printed), build.log, tests_full.log (pytest's
#   and compute-sanitizer's whole output), bench_ops_bf16.json, bench_ops_fp32.json,
#   bench_attention.json, bench_step.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
[ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda

t0=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-450}
SECTIONS=${GPU_CHECK_SECTIONS:-"build tests fp8_shapes sanitizer bench_ops bench_attention bench_step fp8_rollout slow"}
TEST_TIMEOUT=${GPU_CHECK_TEST_TIMEOUT_S:-120}
DRY=${GPU_CHECK_DRY_RUN:-0}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")  # scratch outside $OUT (its file count is capped)
RESULTS=$WORK/sections.tsv
: > "$RESULTS"

# record NAME STATUS SECONDS: one row of the final table.
record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$RESULTS"; }

# run_section NAME GROUP LIMIT CMD...: runs CMD when GROUP is selected and time is left, bounded by
# both, and records how it ended: ok, FAILED (rc N), TIMEOUT (cut at N s), or skipped.
run_section() {
  local name=$1 group=$2 limit=$3; shift 3
  case " $SECTIONS " in *" $group "*) ;; *) return 0 ;; esac
  local start; start=$(date +%s)
  local left=$(( BUDGET - (start - t0) ))
  if [ "$left" -lt 20 ]; then
    echo "== $name: skipped (time budget of ${BUDGET} s spent)"
    record "$name" "skipped (budget spent)" 0
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (at most ${limit} s, $(( start - t0 )) s in)"
  local rc
  if [ "$DRY" = 1 ]; then
    echo "   dry run: would run: $*"
    local stand_in=${GPU_CHECK_DRY_CMD:-true}
    # shellcheck disable=SC2254
    case "$name" in ${GPU_CHECK_DRY_FAIL:-/}) stand_in="exit 3" ;; esac
    # shellcheck disable=SC2254
    case "$name" in ${GPU_CHECK_DRY_HANG:-/}) stand_in="sleep $(( limit + 30 ))" ;; esac
    timeout -k 5 "$limit" bash -c "$stand_in"
    rc=$?
  else
    timeout -k 10 "$limit" "$@"
    rc=$?
  fi
  local took=$(( $(date +%s) - start ))
  case $rc in
    0) record "$name" ok "$took" ;;
    124|137) echo "== $name: cut at its limit of ${limit} s"; record "$name" "TIMEOUT (cut at ${limit} s)" "$took" ;;
    *) record "$name" "FAILED (rc $rc)" "$took" ;;
  esac
  return 0
}

# write_table: the recorded sections as a markdown table, to stdout and $OUT/summary.md.
write_table() {
  {
    echo "# gpu_check summary ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(( $(date +%s) - t0 )) s)"
    echo
    echo "| section | status | s |"
    echo "|---|---|---|"
    while IFS=$'\t' read -r name status secs; do
      echo "| $name | $status | $secs |"
    done < "$RESULTS"
    local bad; bad=$(grep -cv $'\tok\t' "$RESULTS")
    echo
    echo "$(grep -c . "$RESULTS") sections, $bad not ok"
  } | tee "$OUT/summary.md"
}

# pytest runs under `run_section` (timeout needs a command, not a function); `summary` keeps its
# whole output in tests_full.log and shows the section header, the failures and the counts.
PYTEST=(python3 -m pytest -q -rfE --tb=short --maxfail=25 -p no:cacheprovider)
summary() {
  tee -a "$OUT/tests_full.log" | grep -E "^== |passed|failed|error|skipped|^(FAILED|ERROR) |dry run|ERROR SUMMARY|^fp8 " | tail -40
}

# The test files that hold GPU tests (a `gpu` mark or a CUDA parametrisation), each run alone.
gpu_test_files() { grep -l -E "mark\.gpu|CUDA_PARAM" tests/test_*.py; }

# The fp8 kernel against the CPU emulation at the shapes the test file does not cover.
cat > "$WORK/fp8_shapes.py" <<'EOF'
import sys
import torch
from ddrl_engine.ops.fp8_attention import (QuantizedQKV, fp8_attention_quantize, fp8_attention_quantized,
                                           fp8_cuda_status)

ok, why = fp8_cuda_status()
if not ok:
    print(f"fp8 shapes: skipped ({why})")
    sys.exit(0)
bad = 0
for B, H, Sq, Sk in ((2, 3, 257, 129), (2, 3, 257, 1025), (2, 3, 129, 300), (1, 1, 257, 300), (1, 1, 129, 129)):
    for D in (64, 128):
        g = torch.Generator().manual_seed(Sq * 7 + Sk + D)
        q, k, v = (torch.randn(B, H, S, D, generator=g).bfloat16() for S in (Sq, Sk, Sk))
        tc = fp8_attention_quantize(q.cuda(), k.cuda(), v.cuda())
        tcpu = fp8_attention_quantize(q, k, v)
        same = all(torch.equal(a.cpu(), b) for n, a, b in zip(QuantizedQKV._fields, tc, tcpu) if n != "v_mean")
        got = fp8_attention_quantized(tc, Sq, Sk, torch.float32).cpu().double()
        emu = fp8_attention_quantized(tcpu, Sq, Sk, torch.float32).double()
        err = ((got - emu).norm() / emu.norm()).item()
        good = same and err < 2e-3 and bool(torch.isfinite(got).all())
        bad += not good
        print(f"fp8 B={B} H={H} Sq={Sq} Sk={Sk} D={D}: quantised equal {same}, rel L2 vs emulation {err:.2e} "
              f"{'ok' if good else 'FAILED'}")
sys.exit(1 if bad else 0)
EOF

# Small CUDA calls for compute-sanitizer (each its own process: the sanitizer wraps one).
cat > "$WORK/sanitize_fp8.py" <<'EOF'
import torch
from ddrl_engine.ops.fp8_attention import fp8_attention, fp8_cuda_status

ok, why = fp8_cuda_status()
assert ok, why
q, k, v = (torch.randn(1, 2, S, 64, device="cuda", dtype=torch.bfloat16) for S in (129, 131, 131))
out = fp8_attention(q, k, v)
# The DiT's [B, S, 3, H, D] projection permuted to [B, H, S, D]: the pre-pass reads it through its strides.
qs, ks, vs = torch.randn(1, 131, 3, 2, 64, device="cuda", dtype=torch.bfloat16).permute(2, 0, 3, 1, 4).unbind(0)
strided = fp8_attention(qs[:, :, :129], ks, vs)
torch.cuda.synchronize()
print("fp8 sanitizer call:", tuple(out.shape), bool(torch.isfinite(out).all()),
      "strided:", tuple(strided.shape), bool(torch.isfinite(strided).all()))
EOF
cat > "$WORK/sanitize_rows.py" <<'EOF'
import sys
import torch
from ddrl_engine import ops

rows, cols = int(sys.argv[1]), int(sys.argv[2])
for dtype in (torch.float32, torch.bfloat16):
    mk = lambda: torch.randn(rows, cols, device="cuda", dtype=dtype).requires_grad_()  # noqa: E731
    a, b, c, o = mk(), mk(), mk(), mk()
    ops.diffusion_loss(a, b, c, noise_coef=1.0, data_coef=-1.0).backward()
    std = torch.rand(rows, device="cuda") + 0.5
    ops.step_logprob(a, b, c, offset=o, x_coef=0.9, out_coef=-0.1, std=std).sum().backward()
torch.cuda.synchronize()
print(f"row ops sanitizer call ({rows}, {cols}): done")
EOF

main() {
  if [ "$DRY" != 1 ]; then
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
  fi

  run_section build build 240 bash -c "python3 setup.py build_ext --inplace > '$OUT/build.log' 2>&1 || { tail -40 '$OUT/build.log'; exit 1; }"
  [ "$DRY" = 1 ] || python3 -m ddrl_engine.info

  local f
  for f in $(gpu_test_files); do
    run_section "tests: $(basename "$f")" tests "$TEST_TIMEOUT" "${PYTEST[@]}" -m "gpu and not slow" "$f" 2>&1 | summary
  done
  run_section "fp8 vs emulation: extra shapes" fp8_shapes 90 python3 "$WORK/fp8_shapes.py" 2>&1 | summary

  local san=compute-sanitizer
  [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" ] && san=${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer
  local MEMCHECK=("$san" --tool memcheck --error-exitcode 1 --print-limit 20)
  run_section "memcheck: fp8 (1, 2, 129, 131, 64)" sanitizer 90 "${MEMCHECK[@]}" python3 "$WORK/sanitize_fp8.py" 2>&1 | summary
  run_section "memcheck: row ops (3, 7)" sanitizer 60 "${MEMCHECK[@]}" python3 "$WORK/sanitize_rows.py" 3 7 2>&1 | summary
  run_section "memcheck: row ops (5, 8193)" sanitizer 60 "${MEMCHECK[@]}" python3 "$WORK/sanitize_rows.py" 5 8193 2>&1 | summary

  run_section "bench_ops bf16 64M" bench_ops 75 python3 tools/bench_ops.py --device cuda --dtype bf16 --elems 64M --rows 16 \
    --json "$OUT/bench_ops_bf16.json"
  run_section "bench_ops fp32 64M" bench_ops 45 python3 tools/bench_ops.py --device cuda --dtype fp32 --elems 64M --rows 16 --no-compile \
    --json "$OUT/bench_ops_fp32.json"
  run_section bench_attention bench_attention 90 python3 tools/bench_attention.py --seqs 4096,16384,32768,75600 --dims 128,64 \
    --iters 5 --budget-ms 1500 --json "$OUT/bench_attention.json"
  run_section bench_step bench_step 120 python3 tools/bench_step.py --device cuda --steps 2 --json "$OUT/bench_step.json"
  run_section fp8_rollout fp8_rollout 120 python3 tools/fp8_rollout_check.py --device cuda --samples-per-class 32 \
    --train-steps 20 --out /tmp/fp8_rollout_check
  for f in tests/test_ops_cuda.py tests/test_graphs.py; do
    run_section "slow: $(basename "$f")" slow 90 "${PYTEST[@]}" -m "gpu and slow" "$f" 2>&1 | summary
  done
  echo "== total $(( $(date +%s) - t0 )) s"
  write_table
}

main 2>&1 | tee "$OUT/gpu_check.log" | grep --line-buffered -v "Warning"
rm -rf "$WORK"
