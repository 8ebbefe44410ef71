#!/usr/bin/env bash
# GPU machine: one benchmark-suite scenario per call (<= ~9.5 min): S1 | S2 | S3a | S3b | S3.
#   S3a = S3's 128- and 2048-token prompts, S3b = S3's batch of 4 (S3 = both: too long for one call).
# Run from the repo root: `OUT=/some/dir scripts/gpu_bench.sh S1`; log, JSON, report and plots go
# to $OUT. Extra arguments go to `duoserve bench suite` (e.g. --policies lru duoserve).
# SMOKE=1: the same path on the CPU with tiny models of the same routing topology (a minute or two).
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
scenario=${1:?usage: scripts/gpu_bench.sh S1|S2|S3a|S3b|S3 [suite flags...]}
shift
case $scenario in
S1 | S2 | S3) args=(--scenario "$scenario") ;;
S3a) args=(--scenario S3 --cases b1-p128,b1-p2048) ;;
S3b) args=(--scenario S3 --cases b4-p512) ;;
*) echo "unknown scenario $scenario" >&2; exit 2 ;;
esac
if [[ ${SMOKE:-0} == 1 ]]; then
    case $scenario in
    S1) model=synthetic:mixtral-8x7b:tiny budget=0.004 ;;
    *) model=synthetic:qwen3-30b-a3b:tiny budget=0.01 ;;
    esac
    args+=(--model "$model" --device cpu --budget-gib "$budget" --prompt-len 16 --max-tokens 4
        --bandwidth-gbps 50 --quick)
else
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
    free -g | tee -a "$OUT/gpu.txt"
fi
# the JSON's commit: DUOSERVE_COMMIT if set, else git (the device copy may have no .git)
export DUOSERVE_COMMIT=${DUOSERVE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || true)}
timeout 570 "$PY" -m duoserve.bench.suite "${args[@]}" --out "$OUT" --time-budget-s 520 "$@" \
    >"$OUT/suite-$scenario.log" 2>&1
rc=$?
# the per-run lines, then each scenario's summary table
grep -E "^\[suite\]" "$OUT/suite-$scenario.log" | tail -40
awk '/^S[123]: /{on=1} on && !/^\[duoserve\]/' "$OUT/suite-$scenario.log" | tail -60
"$PY" -m duoserve.bench.report --results "$OUT" --out "$OUT/benchmarks.md" --figures "$OUT/figures"
echo "suite exit code: $rc; files in $OUT:"
ls -R "$OUT"
exit $rc
