#!/usr/bin/env bash
# The GPU figures of README.md ("What the loop costs"), in one run of under 8 minutes on one
# GPU: Demo-3's smoke command on a synthetic VOC tree with random weights, then
# benchmarks.train (VGG16 at 320 px, batch 64; TinyConv at 32 px, batch 16) with bf16 and
# channels_last, without and with compile.
#
#   bash benchmarks/gpu_benchmark.sh [OUT]        # OUT: where the logs and CSVs go (default results/gpu)
#
# A machine without the package index: install MLflow and the rest from wheels downloaded
# beforehand (`pip download -r requirements.txt -d wheels`), with
# `pip install --no-index --find-links wheels -r requirements.txt`.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/gpu}
PY=${PYTHON:-python}
mkdir -p "$OUT"
export MLFLOW_TRACKING_URI="sqlite:///$PWD/$OUT/mlflow.db" MLFLOW_DISABLE_TELEMETRY=true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

$PY -m load_dataset.generators.make_synthetic_voc --out "$OUT/voc" --n 512 --n-val 128
time $PY Demo-3-VGG16-PASCAL.py --voc-dir "$OUT/voc" --sbd-dir '' --no-pretrained \
    --epochs 2 --results-dir "$OUT/results" 2>&1 | tee "$OUT/demo3.log"

time $PY -m benchmarks.train --amp bf16 --channels-last on --compile off on \
    --out "$OUT/benchmark_train" 2>&1 | tee "$OUT/benchmark_train.log"
