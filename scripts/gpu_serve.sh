#!/usr/bin/env bash
# GPU machine: the serving sweep (goodput, p99 TTFT/TPOT vs request rate for duoserve, lru,
# uniform on a full-size synthetic Qwen3-30B-A3B with replayed routing), then the GPU server
# test. One call, under ~9.5 minutes: the sweep stops starting points after SWEEP_BUDGET_S
# (default 480 s, load included), the test gets at most 60 s.
# Run from the repo root; JSON, PNG and logs go to $OUT (or ./out). SMOKE=1: tiny model, CPU.
# Then, here: duoserve bench serve-sweep --report $OUT/serve_sweep.json \
#     --plot docs/figures/serve_sweep.png --doc docs/serving.md
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ "${SMOKE:-0}" = 1 ]; then
    $PY -m duoserve.bench.serve_sweep --smoke --out "$OUT/serve_sweep.json" 2>&1 \
        | grep -v "^ *|" | tee "$OUT/serve_sweep.log" | grep -E "serve-sweep|Error" | tail -20
    exit 0
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
$PY -m duoserve.bench.serve_sweep --out "$OUT/serve_sweep.json" \
    --time-budget-s "${SWEEP_BUDGET_S:-480}" 2>&1 \
    | tee "$OUT/serve_sweep.log" | grep -E "serve-sweep|Error|error" | tail -30
timeout 60 $PY -m pytest tests/test_server.py -m gpu -o addopts="" -q -s 2>&1 \
    | tee "$OUT/gpu_serve_tests.log" | grep -E "passed|failed|skipped:|Error|assert" | tail -15
