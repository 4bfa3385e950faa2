#!/usr/bin/env bash
# Nsight Compute on the engine's own kernels during a DDRL training step.
#
# Usage: tools/ncu_kernels.sh [--range NAME] [--kernel REGEX] [--count N] [--set SET] [--config FILE.toml]
#                             [--out DIR] [--help] [-- extra profiling/harness.py args]
#   --range NAME    only kernels inside this NVTX phase range of the "ddrl" domain, e.g. rollout/step,
#                   train/forward, train/data_loss (names: profiling/README.md); default: no range filter
#   --kernel REGEX  kernel-name regex (default: the engine's kernels,
#                   row_chunks_kernel|finalize_rows_kernel|scale_rows_kernel); "." for every kernel
#   --count N       kernels to profile (default 12)
#   --set SET       ncu section set (default full)
#   --config FILE   a TOML run config (default: the built-in tiny digits DiT)
#   --out DIR       output folder (default profiling/out/ncu)
#
# What runs: ncu --clock-control none --nvtx [--nvtx-include "ddrl@NAME/"] --kernel-name regex:REGEX
#   --launch-skip 0 --launch-count N --set SET -o DIR/ddrl_kernels  python profiling/harness.py --device cuda
#   --steps 1 --warmup 1 --no-torch-profiler --no-checkpoint. --clock-control none keeps the GPU's own
#   boost clocks, so times match the rest of our measurements. Kernels inside a CUDA graph replay are
#   not profiled by default; run without --cuda-graph (the default) to see them.
# Then `ncu --import ... --page details --csv` writes DIR/ddrl_kernels.csv. Needs a CUDA GPU and ncu
# on PATH (or $NCU), and permission to read GPU counters.
set -euo pipefail
cd "$(dirname "$0")/.."
range="" regex="row_chunks_kernel|finalize_rows_kernel|scale_rows_kernel" count=12 set=full config="" out=profiling/out/ncu extra=()
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --range) range=$2; shift 2 ;;
    --kernel) regex=$2; shift 2 ;;
    --count) count=$2; shift 2 ;;
    --set) set=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "ncu_kernels.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
NCU=${NCU:-ncu}
command -v "$NCU" >/dev/null || { echo "ncu_kernels.sh: '$NCU' not found; install Nsight Compute or set NCU" >&2; exit 1; }
mkdir -p "$out"
filter=(--nvtx)
[ -n "$range" ] && filter+=(--nvtx-include "ddrl@$range/")
args=(--device cuda --steps 1 --warmup 1 --no-torch-profiler --no-checkpoint --out "$out/harness")
[ -n "$config" ] && args+=(--config "$config")
"$NCU" --clock-control none "${filter[@]}" --kernel-name "regex:$regex" --launch-count "$count" --set "$set" \
  --force-overwrite -o "$out/ddrl_kernels" python3 profiling/harness.py "${args[@]}" "${extra[@]}"
"$NCU" --import "$out/ddrl_kernels.ncu-rep" --page details --csv > "$out/ddrl_kernels.csv"
echo "report: $out/ddrl_kernels.ncu-rep; details: $out/ddrl_kernels.csv"
