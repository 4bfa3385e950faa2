#!/usr/bin/env bash
# Multi-node DDRL training under SLURM: one torchrun per node (8 GPUs each), c10d rendezvous on the
# first node of the allocation. The #SBATCH lines are defaults; sbatch flags override them, e.g.
#   sbatch --nodes 8 --time 48:00:00 tools/launch_slurm.sh
#   sbatch --nodes 2 tools/launch_slurm.sh -- -m ddrl_engine.cli train --config runs/my.toml
#   bash tools/launch_slurm.sh --dry-run --nodes gpu-001,gpu-002     # print the command, no SLURM needed
#
#SBATCH --job-name=ddrl-video
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

usage() {
  cat <<'EOF'
usage: sbatch [sbatch options] tools/launch_slurm.sh [options] [-- PROGRAM ARGS...]
       bash tools/launch_slurm.sh --dry-run [options] [-- PROGRAM ARGS...]

Runs `srun torchrun --nnodes N --nproc_per_node G --rdzv_backend c10d --rdzv_endpoint HEAD:PORT
--rdzv_id JOB_ID --max-restarts R PROGRAM ARGS...` with one torchrun per node of the allocation.

PROGRAM ARGS is what torchrun runs, default:
  examples/wan_video_fsdp.py --config examples/wan_video_fsdp.toml
(the run resumes from its latest checkpoint, so a torchrun restart continues the run), or e.g.
  -m ddrl_engine.cli train --config my.toml

options:
  --dry-run            print the command and exit (works without SLURM)
  --nodes LIST         comma-separated node names, first = rendezvous host (default: the allocation's,
                       from `scontrol show hostnames $SLURM_JOB_NODELIST`; or $DDRL_NODES)
  --gpus-per-node G    processes per node (default 8, or $SLURM_GPUS_ON_NODE)
  --port P             rendezvous port on the head node (default 29500)
  --max-restarts R     torchrun restarts of the whole job after a worker failure (default 2)
  -h, --help           this help

environment: TORCHRUN (default: torchrun) selects the launcher, e.g. TORCHRUN=.venv/bin/torchrun.
EOF
}

dry_run=0
nodes="${DDRL_NODES:-}"
gpus="${SLURM_GPUS_ON_NODE:-8}"
port=29500
max_restarts=2
program=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift ;;
    --nodes|--gpus-per-node|--port|--max-restarts)
      [[ $# -ge 2 ]] || { echo "launch_slurm.sh: $1 needs a value (see --help)" >&2; exit 2; }
      case "$1" in
        --nodes) nodes="$2" ;;
        --gpus-per-node) gpus="$2" ;;
        --port) port="$2" ;;
        --max-restarts) max_restarts="$2" ;;
      esac
      shift 2 ;;
    --) shift; program=("$@"); break ;;
    *) echo "launch_slurm.sh: unknown option '$1' (program arguments go after --; see --help)" >&2; exit 2 ;;
  esac
done
for pair in "gpus-per-node:$gpus" "port:$port" "max-restarts:$max_restarts"; do
  [[ "${pair#*:}" =~ ^[0-9]+$ ]] || { echo "launch_slurm.sh: --${pair%%:*} must be a non-negative integer, got '${pair#*:}'" >&2; exit 2; }
done
if [[ ${#program[@]} -eq 0 ]]; then
  program=(examples/wan_video_fsdp.py --config examples/wan_video_fsdp.toml)
fi

# Node names: --nodes / $DDRL_NODES, else the SLURM allocation.
if [[ -n "$nodes" ]]; then
  IFS=',' read -r -a hosts <<< "$nodes"
elif [[ -n "${SLURM_JOB_NODELIST:-}" ]] && command -v scontrol > /dev/null; then
  mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
else
  echo "launch_slurm.sh: no node list: run inside a SLURM allocation (scontrol needed), or pass --nodes a,b" >&2
  exit 2
fi
[[ ${#hosts[@]} -ge 1 && -n "${hosts[0]}" ]] || { echo "launch_slurm.sh: empty node list" >&2; exit 2; }
head="${hosts[0]}"
num_nodes="${#hosts[@]}"
job_id="${SLURM_JOB_ID:-dry-run}"

# Per-node environment. NCCL hints, to adapt to the cluster (check with your admins):
# export NCCL_DEBUG=WARN                     # INFO while bringing a cluster up
# export NCCL_SOCKET_IFNAME=eth0             # the interface the nodes reach each other on (bootstrap)
# export NCCL_IB_HCA=mlx5                    # InfiniBand HCAs to use (GPUDirect RDMA between nodes)
# export NCCL_NVLS_ENABLE=1                  # NVLink SHARP on H100/H200 NVSwitch systems
# export TORCH_NCCL_ASYNC_ERROR_HANDLING=1   # a hung collective fails the worker, so torchrun can restart
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"  # CPU threads per rank (data loading, rewards)

cmd=(srun --nodes="$num_nodes" --ntasks-per-node=1 --kill-on-bad-exit=1
     "${TORCHRUN:-torchrun}" --nnodes "$num_nodes" --nproc_per_node "$gpus"
     --rdzv_backend c10d --rdzv_endpoint "$head:$port" --rdzv_id "$job_id" --max-restarts "$max_restarts"
     "${program[@]}")

if [[ $dry_run -eq 1 ]]; then
  echo "# $num_nodes node(s) x $gpus GPU(s), rendezvous on $head:$port, job $job_id"
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  echo "launch_slurm.sh: not inside a SLURM job (SLURM_JOB_ID is unset): submit with sbatch, or use --dry-run" >&2
  exit 2
fi
exec "${cmd[@]}"
