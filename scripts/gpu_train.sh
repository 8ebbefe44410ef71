#!/usr/bin/env bash
# Train duoserve's three MoE models on one GPU (issue 4), all three at once.
#
# Run from the repo root on the GPU machine, with .carry/corpus carried
# (built by scripts/build_corpus.sh):
#     PYTHONPATH=. bash scripts/gpu_train.sh
# The presets train concurrently (each small model leaves the GPU idle between kernels);
# each stops at TRAIN_MINUTES or at its epoch limit, then exports, evaluates and exits.
# SIGTERM at TRAIN_MINUTES + 2.5 min (the loop stops, still exports), SIGKILL 45 s later.
#
# Written under $OUT (default out/gpu-train): default-model/ (the 5 checkpoint files),
# default-model.tar (the same, <= 16 MiB), training-results.tar.gz (per run: train_log.json,
# eval.json, routing_trace.safetensors, the model's config/tokenizer files, stdout log;
# plus models.generated.md and figures/*.png). Full checkpoints stay in $RUNS_DIR
# (default out/train, git-ignored) for a later logits check.
# Env: TRAIN_MINUTES (5.5), DEVICE (cuda), PYTHON (python3), CORPUS_DIR (.carry/corpus),
#      SEQUENTIAL=1 (one run at a time), SMOKE=1 (2-layer versions: quick CPU check).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-out/gpu-train}
RUNS=${RUNS_DIR:-out/train}
CORPUS=${CORPUS_DIR:-.carry/corpus}
TRAIN_MINUTES=${TRAIN_MINUTES:-5.5}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
export PYTHONPATH=${PYTHONPATH:-.}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
SMOKE_ARGS=()
if [ "${SMOKE:-0}" = 1 ]; then
    SMOKE_ARGS=(--num-layers 2 --batch-size 2 --seq-len 64 --eval-every-steps 5
        --log-every-steps 5 --heldout-eval-seqs 2)
fi

if [ ! -f "$CORPUS/train.tokens.npy" ]; then
    echo "missing $CORPUS/train.tokens.npy: run scripts/build_corpus.sh and carry .carry/corpus"
    exit 1
fi
mkdir -p "$OUT" "$RUNS"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
LIMIT_S=$("$PY" -c "print(int(float('$TRAIN_MINUTES') * 60 + 150))")
START_S=$SECONDS

declare -A PIDS
launch() {  # launch NAME PRESET [extra args]: one background training run
    local name=$1 preset=$2
    shift 2
    rm -rf "${RUNS:?}/$name"
    timeout -s TERM -k 45 "$LIMIT_S" "$PY" -m duoserve.training.train --preset "$preset" \
        --corpus "$CORPUS" --out "$RUNS/$name" --device "$DEVICE" \
        --max-minutes "$TRAIN_MINUTES" "${SMOKE_ARGS[@]}" "$@" >"$RUNS/$name.log" 2>&1 &
    PIDS[$name]=$!
    echo "started $name (pid ${PIDS[$name]})"
}
STATUS=()
finish() {  # finish NAME: wait for one run (once) and show how it ended
    local name=$1 rc
    [ -n "${PIDS[$name]:-}" ] || return 0
    wait "${PIDS[$name]}"
    rc=$?
    unset "PIDS[$name]"
    STATUS+=("$name: exit $rc after $((SECONDS - START_S)) s")
    echo "--- $name finished (exit $rc) at $((SECONDS - START_S)) s; last lines:"
    grep -v "^--- " "$RUNS/$name.log" | tail -n 4 | cut -c1-300
}
# SEQUENTIAL=1: one run at a time (set TRAIN_MINUTES to about a third then, e.g. 2.2).
launch default default
[ "${SEQUENTIAL:-0}" = 1 ] && finish default
launch mixtral mixtral-8x7b-topology
[ "${SEQUENTIAL:-0}" = 1 ] && finish mixtral
launch qwen3 qwen3-30b-a3b-topology --no-save-state
for name in default mixtral qwen3; do
    finish "$name"
done

# Default model: loose files and a tar (both must come back: <= 16 MiB each).
DEFAULT_MODEL="$RUNS/default/model"
if [ -f "$DEFAULT_MODEL/model.safetensors" ]; then
    rm -rf "$OUT/default-model"
    mkdir -p "$OUT/default-model"
    cp "$DEFAULT_MODEL"/{config.json,generation_config.json,model.safetensors,tokenizer.json,tokenizer_config.json} \
        "$OUT/default-model/"
    tar -cf "$OUT/default-model.tar" -C "$OUT" default-model
fi

# Logs, statistics, traces, small model files, report and figures.
STAGE=$(mktemp -d)
for name in default mixtral qwen3; do
    mkdir -p "$STAGE/runs/$name"
    cp "$RUNS/$name.log" "$STAGE/runs/$name/stdout.log" 2>/dev/null
    for f in train_log.json eval.json routing_trace.safetensors train_state.json; do
        cp "$RUNS/$name/$f" "$STAGE/runs/$name/" 2>/dev/null
    done
    for f in config.json generation_config.json tokenizer_config.json tokenizer.json; do
        mkdir -p "$STAGE/runs/$name/model"
        cp "$RUNS/$name/model/$f" "$STAGE/runs/$name/model/" 2>/dev/null
    done
done
cp "$CORPUS/corpus.json" "$STAGE/" 2>/dev/null
"$PY" -m duoserve.training.report "$RUNS/default" "$RUNS/mixtral" "$RUNS/qwen3" \
    --corpus "$CORPUS" --out-md "$STAGE/models.generated.md" --fig-dir "$STAGE/figures" \
    >"$STAGE/report.log" 2>&1 || cat "$STAGE/report.log"
tar -czf "$OUT/training-results.tar.gz" -C "$STAGE" .
rm -rf "$STAGE"

echo
echo "=== summary (wall $((SECONDS - START_S)) s) ==="
printf '%s\n' "${STATUS[@]}"
"$PY" -m duoserve.training.report "$RUNS/default" "$RUNS/mixtral" "$RUNS/qwen3" --summary
for name in default mixtral qwen3; do
    grep -h '^summary ' "$RUNS/$name.log" | cut -c1-400
done
ls -l "$OUT" "$OUT/default-model" 2>/dev/null
[ -f "$OUT/default-model.tar" ] || exit 1
