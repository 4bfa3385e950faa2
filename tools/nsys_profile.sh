#!/usr/bin/env bash
# Nsight Systems timeline of N DDRL training steps, with the engine's NVTX phase ranges.
#
# Usage: tools/nsys_profile.sh [--steps N] [--warmup W] [--config FILE.toml] [--cuda-graph]
#                              [--out DIR] [--help] [-- extra profiling/harness.py args]
#   --steps N       steps inside the capture range (default 3)
#   --warmup W      steps before it, not recorded (default 2; graphs are captured there)
#   --config FILE   a TOML run config (default: built-in defaults, the tiny digits DiT)
#   --cuda-graph    rollout.cuda_graph = true (kernels of each replay shown per node)
#   --out DIR       output folder (default profiling/out/nsys)
#
# What runs: nsys profile --trace=cuda,nvtx,cudnn,cublas,osrt --cuda-graph-trace=node
#   --capture-range=cudaProfilerApi --capture-range-end=stop  python profiling/harness.py --device cuda
#   --no-torch-profiler --nvtx-capture ...  (the harness calls cudaProfilerStart/Stop around the measured
#   steps), then `nsys stats` writes the NVTX-range and kernel summaries as CSV next to the report.
# Open DIR/ddrl_steps.nsys-rep in the Nsight Systems GUI; NVTX ranges are in the "ddrl" domain, named
# as in profiling/README.md. Needs a CUDA GPU and nsys on PATH (or $NSYS).
set -euo pipefail
cd "$(dirname "$0")/.."
steps=3 warmup=2 config="" graph="" out=profiling/out/nsys extra=()
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --steps) steps=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    --cuda-graph) graph=--cuda-graph; shift ;;
    --out) out=$2; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "nsys_profile.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
NSYS=${NSYS:-nsys}
command -v "$NSYS" >/dev/null || { echo "nsys_profile.sh: '$NSYS' not found; install Nsight Systems or set NSYS" >&2; exit 1; }
mkdir -p "$out"
args=(--device cuda --steps "$steps" --warmup "$warmup" --no-torch-profiler --no-checkpoint --nvtx-capture --out "$out/harness")
[ -n "$config" ] && args+=(--config "$config")
[ -n "$graph" ] && args+=("$graph")
"$NSYS" profile --trace=cuda,nvtx,cudnn,cublas,osrt --cuda-graph-trace=node --sample=none --cpuctxsw=none \
  --capture-range=cudaProfilerApi --capture-range-end=stop --force-overwrite=true -o "$out/ddrl_steps" \
  python3 profiling/harness.py "${args[@]}" "${extra[@]}"
for report in nvtx_sum nvtx_gpu_proj_sum cuda_gpu_kern_sum; do
  "$NSYS" stats --report "$report" --format csv --force-export=true -o "$out/$report" "$out/ddrl_steps.nsys-rep" >/dev/null 2>&1 \
    || echo "nsys_profile.sh: report $report not available in this nsys version"
done
echo "report: $out/ddrl_steps.nsys-rep; summaries: $out/*.csv"
