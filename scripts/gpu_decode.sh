#!/usr/bin/env bash
# GPU machine: decode prefetch and segment-graph tests and the decode benchmark in one call
# (~6 min; pinning Qwen3 ~90 s). BUDGETS, TEST_TIMEOUT, BENCH_TIMEOUT override the defaults.
#   OUT=out bash scripts/gpu_decode.sh          # GPU tests, then python -m duoserve.bench.decode
#   SMOKE=1 bash scripts/gpu_decode.sh          # CPU smoke run: tiny model, tiny budgets
# Extra arguments go to the benchmark (e.g. --max-tokens 128 --distance 2).
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
if [ "${SMOKE:-0}" = 1 ]; then
    $PY -m duoserve.bench.decode --scale tiny --device cpu --dtype float32 --budgets 0.006 \
        --batches 1 --policies lru uniform --prompt-len 16 --max-tokens 4 --no-full-gpu \
        --out "$OUT/decode_smoke.json" "$@" 2>&1 | grep -v "^{" | tail -8
    exit 0
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
timeout ${TEST_TIMEOUT:-150} $PY -m pytest tests/test_prefetch.py tests/test_segments.py -m gpu \
    -o addopts="" -q -s 2>&1 | tee "$OUT/decode_tests.log" \
    | grep -E "passed|failed|Error|assert|graphed|segment graphs" | tail -25
timeout ${BENCH_TIMEOUT:-420} $PY -m duoserve.bench.decode --budgets ${BUDGETS:-8 12 16} \
    --batches 1 4 --max-tokens 64 --out "$OUT/decode.json" "$@" 2>&1 \
    | tee "$OUT/decode.log" | grep -v "^{" | tail -30
