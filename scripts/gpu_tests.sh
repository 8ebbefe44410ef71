#!/usr/bin/env bash
# GPU machine: every `gpu`-marked test, one pytest process per file (a file's CUDA state, e.g.
# a per-process memory cap or captured graphs, never meets another's). Summary:
# $OUT/gpu-tests.log; every file's output: $OUT/gpu-tests-full.log.
#   OUT=out bash scripts/gpu_tests.sh [files...]      # default: every tests/test_*.py with gpu tests
# PER_FILE_TIMEOUT (default 150 s) bounds each file.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
files=("$@")
[ ${#files[@]} -eq 0 ] && mapfile -t files < <(grep -l "mark.gpu" tests/test_*.py)
log=$OUT/gpu-tests.log
echo "# GPU tests, $(date -u +%F), one pytest process per file" >>"$log"
for f in "${files[@]}"; do
    start=$(date +%s)
    one=$(mktemp)
    timeout "${PER_FILE_TIMEOUT:-150}" $PY -m pytest "$f" -m gpu -o addopts="" -q -s --tb=short \
        >"$one" 2>&1
    rc=$?
    { echo "===== $f (rc=$rc)"; cat "$one"; } >>"$OUT/gpu-tests-full.log"
    summary=$(grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)" "$one" | tail -4 | tr '\n' ' ')
    echo "$f rc=$rc $(( $(date +%s) - start ))s: $summary" | tee -a "$log"
done
