#!/usr/bin/env bash
# GPU machine, issue 5: the prefill pipeline's GPU tests (tests/test_prefill.py -m gpu: outputs
# equal full-gpu with poisoned ring slots, peak memory <= budget on full-size OLMoE), then the
# prefill bench: Qwen3-30B-A3B bf16 (budgets 8/12/16 GiB) and Mixtral-8x7B int4 (15% and 25% of
# the bf16 model's bytes), prompts 128/512/2048, each model in its own process (pinned memory is
# given back between them), plus a copy/compute timeline PNG per model.
# Expected: ~1 min tests, ~2.5 min Qwen3 (60 s of it pinning 57 GB), ~1.5 min Mixtral int4.
# Run from the repo root; logs, JSON and PNGs go to $OUT (or ./out), 8 files at most.
# SKIP_MIXTRAL=1 skips the Mixtral run; SKIP_TESTS=1 the tests.
# SMOKE=1: CPU smoke run (tiny topologies, trace replay, no GPU tests).
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
start=$SECONDS
rc=0
if [ "${SMOKE:-0}" = 1 ]; then
    COMMON=(--device cpu --scale tiny --prompts 32 96 --timeline-prompt 64)
    QWEN=(--budgets 0.03 0.05)
    MIXTRAL=(--budgets 0.005 0.01)
else
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    COMMON=(--prompts 128 512 2048)
    QWEN=(--budgets 8 12 16)
    MIXTRAL=(--budget-fractions 0.15 0.25)
    if [ "${SKIP_TESTS:-0}" != 1 ]; then
        "$PY" -m pytest tests/test_prefill.py -m gpu -o addopts="" -q -s 2>&1 \
            | tee "$OUT/prefill_tests.log" | tail -15
        rc=$((rc | PIPESTATUS[0]))
        echo "tests done after $((SECONDS - start)) s"
    fi
fi
"$PY" -m duoserve.bench.prefill --arch qwen3-30b-a3b "${COMMON[@]}" "${QWEN[@]}" \
    --timeline "$OUT/prefill_timeline_qwen3.png" --out "$OUT/prefill_qwen3.json" 2>&1 \
    | grep -vE "^(part|dense weights|KV cache|activations|prefill staging|int4 dequant|expert slots|allocator|total) " \
    | grep -v "memory plan" | tee "$OUT/prefill_qwen3.log" | tail -40
rc=$((rc | PIPESTATUS[0]))
echo "qwen3 done after $((SECONDS - start)) s"
if [ "${SKIP_MIXTRAL:-0}" != 1 ]; then
    "$PY" -m duoserve.bench.prefill --arch mixtral-8x7b --expert-dtype int4 "${COMMON[@]}" \
        "${MIXTRAL[@]}" --timeline "$OUT/prefill_timeline_mixtral_int4.png" \
        --out "$OUT/prefill_mixtral_int4.json" 2>&1 \
        | grep -vE "^(part|dense weights|KV cache|activations|prefill staging|int4 dequant|expert slots|allocator|total) " \
        | grep -v "memory plan" | tee "$OUT/prefill_mixtral_int4.log" | tail -30
    rc=$((rc | PIPESTATUS[0]))
fi
echo "gpu_prefill: exit $rc after $((SECONDS - start)) s"
exit $rc
