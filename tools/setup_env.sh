#!/usr/bin/env bash
# Sets up ./.venv on a fresh machine (python3 >= 3.10; nvcc optional) and builds the extension.
#   DDRL_TORCH_SPEC   torch requirement to install (default: torch==2.14.1)
#   DDRL_ENGINE_CUDA  0 for a CPU-only build (default: build CUDA kernels when nvcc is found)
#   VENV              where to put the virtual environment (default: .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${DDRL_TORCH_SPEC:-torch==2.14.1}

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
echo "== installing $TORCH_SPEC and the build/runtime dependencies"
"$PY" -m pip install -q --upgrade pip setuptools wheel
"$PY" -m pip install -q "$TORCH_SPEC" ninja pybind11 numpy scipy scikit-learn safetensors tqdm matplotlib pillow nvtx pytest pytest-xdist nvidia-cutlass \
  "diffusers==0.42.1" "peft==0.21.2" "open_clip_torch==3.3.0" "av==18.1.0"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
echo "== building ddrl_engine (CUDA kernels: $([ "${DDRL_ENGINE_CUDA:-1}" = 0 ] && echo off || { [ -n "${CUDA_HOME:-}" ] && echo "on, $CUDA_HOME" || echo 'off, no nvcc'; }))"
MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install -q --no-build-isolation -e .
"$PY" -m ddrl_engine.info
