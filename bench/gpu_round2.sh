#!/usr/bin/env bash
# The prepared GPU checks of performance round 2 for a lent device machine, at most 9 minutes in all
# (run it with timeout_s 600; each part has its own time limit):
#   1. the torch-ops 4-bit dequantization (model.quantization.dequantize "torch") bit-identical to
#      bitsandbytes' CUDA kernels: tests/test_bnb_dequant.py's CUDA cases
#   2. LLaMA-7B shape, 4 x 512: the baseline, ftk's default, and ftk with dequantize "torch"
#   3. long context within 24 GiB: one 32,768-token sequence per step with model.activation_offloading,
#      then 65,536 tokens with offloading and model.tiled_mlp (ftk plan: 13.6 and 16.0 GiB)
# Each part's output goes to $OUT (default: a new temporary folder) as it finishes, so a run cut short
# keeps what it measured. Set-up on the development machine (the data is never committed):
#   mkdir -p .gpu-data && cp -r ../shared/models/stories260K ../shared/data/alpaca/alpaca_sample.json .gpu-data/
# then on the device: FTK_BENCH_DATA=.gpu-data bash bench/gpu_round2.sh   (carry .gpu-data, and .gpu-wheels
# when the machine lacks this project's transformers/peft/bitsandbytes versions; bench/gpu.sh installs them).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}
export FTK_BENCH_DATA=${FTK_BENCH_DATA:-.gpu-data}
echo "output: $OUT"
bash bench/gpu.sh --help > "$OUT/setup.txt" 2>&1 || true  # installs the carried wheels and ftk, prints the card
if $PY -c "import pytest" 2>/dev/null; then
  timeout 60 $PY -m pytest -q -p no:cacheprovider tests/test_bnb_dequant.py -k cuda 2>&1 | tail -5 | tee "$OUT/dequant.txt"
else
  echo "pytest missing: dequantization check skipped" | tee "$OUT/dequant.txt"
fi
timeout 240 bash bench/gpu.sh --setups baseline,ftk,ftk-torchdq --steps 6 --out "$OUT/speed.json" 2>&1 \
  | grep -v -i warning | tee "$OUT/speed.txt"
timeout 120 bash bench/gpu.sh --setups ftk-offload --batch 1 --length 32768 --cap-gib 24 --steps 3 \
  --out "$OUT/context.json" 2>&1 | grep -v -i warning | tee "$OUT/context.txt"
timeout 120 bash bench/gpu.sh --setups ftk-tiled --batch 1 --length 65536 --cap-gib 24 --steps 3 \
  --out "$OUT/context64k.json" 2>&1 | grep -v -i warning | tee "$OUT/context64k.txt"
