#!/usr/bin/env bash
# GPU machine: CUDA tests and measurements, by stage: tests resident offload int4 (default: all).
# Run from the repo root; logs and JSON go to $OUT (or ./out).
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
stages=${*:-tests resident offload int4}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
for stage in $stages; do
    case $stage in
    tests) python3 -m pytest tests/test_gpu.py -m gpu -o addopts="" -q -s 2>&1 \
        | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|Error|budget|assert" | tail -25 ;;
    resident) python3 -m duoserve.bench.resident --out "$OUT/resident.json" 2>&1 \
        | tee "$OUT/resident.log" | tail -8 ;;
    offload) python3 -m duoserve.bench.offload --out "$OUT/offload.json" 2>&1 \
        | grep -v "^{" | tee "$OUT/offload.log" | tail -14 ;;
    int4) python3 -m duoserve.bench.int4_kernels --out "$OUT/int4_kernels.json" 2>&1 \
        | tee "$OUT/int4.log" | tail -40 ;;
    esac
done
