#!/usr/bin/env bash
# One prepared GPU check for a single H100/H200 with the usual CUDA PyTorch stack and no network
# (see docs/benchmarks.md). Installs carried wheels if a package is missing, installs ftk, runs the
# 7B-shaped benchmark. `bench/gpu.sh --tiny` runs the same path with a tiny shape on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -d .gpu-wheels ]; then
  $PY -m pip install -q --no-index --no-deps .gpu-wheels/*.whl 2>&1 | grep -v -i warning || true
fi
$PY -c "import ftk" 2>/dev/null || $PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v -i warning || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec $PY bench/gpu_bench.py "$@"
