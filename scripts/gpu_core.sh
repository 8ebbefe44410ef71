#!/usr/bin/env bash
# GPU machine: the CUDA tests and the measurements of the engine-core and offloading issues.
# Run from the repo root; logs and JSON go to $OUT (or ./out).
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest tests/test_gpu.py -m gpu -o addopts="" -q -x -s 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
python3 -m duoserve.bench.resident --out "$OUT/resident.json" 2>&1 | tee "$OUT/resident.log" | tail -8
python3 -m duoserve.bench.offload --out "$OUT/offload.json" 2>&1 | grep -v "^{" | tee "$OUT/offload.log" | tail -14
