#!/usr/bin/env bash
# Issue 6 items 2, 3, 5 on the GPU machine, in ONE call of < 10 minutes: train the two
# topology models (issue 4 presets), trace them, train the `ours` and `paper` predictors,
# score every predictor, and export what the repo ships.
#
# Run from the repo root on the GPU machine, with .carry/corpus carried:
#     PYTHONPATH=. bash scripts/gpu_predictor.sh
# Per model (mixtral = mixtral-8x7b-topology, qwen3 = qwen3-30b-a3b-topology), in parallel:
#   1. train:  duoserve.training.train for TRAIN_MINUTES (export + eval.json +
#              routing_trace.safetensors as in scripts/gpu_train.sh)
#   2. trace:  duoserve trace --device cuda on training prompts (every TRAIN_EVERY-th
#              1200-char passage of train.jsonl.gz), held-out prompts (every 2nd passage of
#              heldout.jsonl.gz) and a second domain (this python's stdlib *.py as JSONL),
#              lookahead d = 1..D (mixtral 4, qwen3 2), width 2K; three processes at once
#   3. predictors: duoserve train-predictor --device cuda, features ours and paper
#              (hidden 64, W 4, <= 10 epochs, --max-minutes from the time left)
#   4. eval:   duoserve eval-predictor, every baseline, held-out and stdlib sets (JSON + PNG)
#   5. export: a replay trace (replay_file.py format, <= 12 MiB) and the `ours` predictor
#              (fp16, distances dropped until <= 12 MiB: qwen3 keeps d = 1)
# Every stage has a timeout taken from what is left of DEADLINE_S; a stage whose inputs
# are missing is skipped (and says so), so the call ends on time with what worked.
#
# Written under $OUT (default out/gpu-predictor), 5 files:
#   mixtral-8x7b-topology.heldout.safetensors   -> duoserve/assets/traces/
#   qwen3-30b-a3b-topology.heldout.safetensors  -> duoserve/assets/traces/
#   mixtral-8x7b-topology.predictor.safetensors -> duoserve/assets/predictors/<topology>.safetensors
#   qwen3-30b-a3b-topology.predictor.safetensors
#   predictor-results.tar.gz: eval JSONs/PNGs, predictor-tables.md (python -m
#       duoserve.predictor.report), models.generated.md + figures (duoserve.training.report),
#       per model train_log.json, eval.json, routing_trace.safetensors, logs, trace meta.json,
#       timing.log
# Env: TRAIN_MINUTES (3.5), DEADLINE_S (555: seconds from start the last stage must end by),
#      EVAL_ALLOW_S (90: seconds for the trained model's export and eval.json),
#      DEVICE (cuda), PYTHON (python3), CORPUS_DIR (.carry/corpus), WORK_DIR
#      (out/predictor-run), TRAIN_EVERY (20), QWEN_TRAIN_EVERY (20; 10 when MODELS=qwen3: the
#      GPU is not shared, so twice the training passages), MODELS ("mixtral qwen3"; one model
#      alone: MODELS=qwen3 redoes only the Qwen3-30B-A3B topology, ~7 min),
#      SMOKE=1 (3-layer tiny versions, a few prompts: a CPU check with DEVICE=cpu).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-out/gpu-predictor}
WORK=${WORK_DIR:-out/predictor-run}
CORPUS=${CORPUS_DIR:-.carry/corpus}
TRAIN_MINUTES=${TRAIN_MINUTES:-3.5}
DEADLINE_S_SET=${DEADLINE_S:-}
DEADLINE_S=${DEADLINE_S:-555}
EVAL_ALLOW_S=${EVAL_ALLOW_S:-90}  # training's export + eval.json after its loop
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
MODELS=${MODELS:-mixtral qwen3}
export PYTHONPATH=${PYTHONPATH:-.}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
declare -A PRESET=([mixtral]=mixtral-8x7b-topology [qwen3]=qwen3-30b-a3b-topology)
declare -A DIST=([mixtral]=4 [qwen3]=2)        # traced lookahead distances 1..D
declare -A WIDTH=([mixtral]=4 [qwen3]=16)      # traced lookahead width (2K)
declare -A REPLAY_D=([mixtral]=1,2 [qwen3]=1)  # distances kept in the shipped replay trace
QWEN_EVERY_DEFAULT=20
[[ "${MODELS// /}" == qwen3 ]] && QWEN_EVERY_DEFAULT=10  # alone on the GPU: more passages
declare -A EVERY=([mixtral]=${TRAIN_EVERY:-20} [qwen3]=${QWEN_TRAIN_EVERY:-$QWEN_EVERY_DEFAULT})
TRAIN_EXTRA=()
TRACE_ARGS=(--max-tokens 32 --max-prompt-tokens 192 --max-model-len 256 --max-num-seqs 64
    --max-num-batched-tokens 8192)
PRED_EPOCHS=10
MAX_PROMPTS=100000
STDLIB_PROMPTS=200
if [ "${SMOKE:-0}" = 1 ]; then
    TRAIN_EXTRA=(--num-layers 3 --hidden-size 64 --num-heads 2 --head-dim 32
        --expert-intermediate-size 32 --batch-size 2 --seq-len 64 --eval-every-steps 5
        --log-every-steps 5 --heldout-eval-seqs 2)
    TRACE_ARGS=(--max-tokens 4 --max-prompt-tokens 32 --max-model-len 64 --max-num-seqs 8)
    PRED_EPOCHS=2
    MAX_PROMPTS=6
    STDLIB_PROMPTS=6
    DIST=([mixtral]=2 [qwen3]=2)
    [ -z "${DEADLINE_S_SET:-}" ] && DEADLINE_S=${SMOKE_DEADLINE_S:-1200}  # slow 2-core CPUs
    EVAL_ALLOW_S=300
fi

START_S=$SECONDS
TRAIN_S=$("$PY" -c "print(round(float('$TRAIN_MINUTES') * 60))")
TIMING="$WORK/timing.log"
source scripts/deadline.sh  # left, budget
stage() {  # stage NAME STAGE LIMIT_S CMD...: run with a timeout, log rc and time
    local name=$1 what=$2 limit=$3 t0=$SECONDS rc
    shift 3
    timeout -s TERM -k 20 "$limit" "$@" >"$WORK/$name/$what.log" 2>&1
    rc=$?
    echo "$name $what rc=$rc ${SECONDS}s-from-start $((SECONDS - t0))s limit=${limit}s" \
        | tee -a "$TIMING"
    return $rc
}
skip() { echo "$1 $2 SKIPPED: $3" | tee -a "$TIMING"; }

if [ ! -f "$CORPUS/train.tokens.npy" ] || [ ! -f "$CORPUS/heldout.jsonl.gz" ]; then
    echo "missing $CORPUS: run scripts/build_corpus.sh and carry .carry/corpus"
    exit 1
fi
rm -rf "$WORK" "$OUT"
mkdir -p "$OUT" "$WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
# Second domain: this python's standard library sources, one JSONL record per file.
"$PY" - "$WORK/stdlib.jsonl" <<'EOF'
import json, sys, sysconfig
from pathlib import Path
files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
with open(sys.argv[1], "w") as f:
    for p in files:
        f.write(json.dumps({"text": p.read_text(errors="replace"), "file": p.name}) + "\n")
print(f"stdlib prompts: {len(files)} files from {files[0].parent if files else '?'}")
EOF

trace_set() {  # trace_set NAME SET LIMIT PROMPTS EVERY MAX: one trace folder of a model
    local name=$1 set=$2 limit=$3 prompts=$4 every=$5 max=$6 stop=$(($3 - 30))
    [ "$stop" -lt 5 ] && stop=5
    stage "$name" "trace-$set" "$limit" "$PY" -m duoserve.cli trace \
        --model "$WORK/$name/run/model" --prompts "$prompts" --passage-chars 1200 \
        --every "$every" --max-prompts "$max" --out "$WORK/$name/trace-$set" \
        --device "$DEVICE" --lookahead "${DIST[$name]}" --lookahead-width "${WIDTH[$name]}" \
        --max-seconds "$stop" "${TRACE_ARGS[@]}"
}

pipeline() {  # pipeline NAME: the five stages of one model (header comment)
    local name=$1 run="$WORK/$1/run" d=${DIST[$1]} t
    mkdir -p "$WORK/$name"
    stage "$name" train "$(budget $((TRAIN_S + EVAL_ALLOW_S)) 200)" \
        "$PY" -m duoserve.training.train --preset "${PRESET[$name]}" --corpus "$CORPUS" \
        --out "$run" --device "$DEVICE" --max-minutes "$TRAIN_MINUTES" --no-save-state \
        "${TRAIN_EXTRA[@]}"
    [ -f "$run/model/config.json" ] || { skip "$name" rest "no trained model"; return 1; }

    t=$(budget 120 150)
    trace_set "$name" train "$t" "$CORPUS/train.jsonl.gz" "${EVERY[$name]}" "$MAX_PROMPTS" &
    trace_set "$name" heldout "$t" "$CORPUS/heldout.jsonl.gz" 2 "$MAX_PROMPTS" &
    trace_set "$name" stdlib "$t" "$WORK/stdlib.jsonl" 27 "$STDLIB_PROMPTS" &
    wait
    [ -f "$WORK/$name/trace-train/meta.json" ] || { skip "$name" rest "no training trace"; return 1; }

    t=$(budget 120 75)
    local minutes
    minutes=$("$PY" -c "print(round(max(0.05, ($t - 40) / 60), 2))")
    for features in ours paper; do
        stage "$name" "predictor-$features" "$t" "$PY" -m duoserve.cli train-predictor \
            "$WORK/$name/trace-train" --out "$WORK/$name/$features.safetensors" \
            --features "$features" --lookahead "$d" --lookahead-width "${WIDTH[$name]}" \
            --hidden 64 --path-layers 4 --epochs "$PRED_EPOCHS" --max-minutes "$minutes" \
            --device "$DEVICE" &
    done
    wait

    local loads=() names=popularity,affinity,prev-token,trace-match,gate-lookahead
    for features in paper ours; do
        if [ -f "$WORK/$name/$features.safetensors" ]; then
            loads+=(--load "$features=$WORK/$name/$features.safetensors")
            names="$names,$features"
        fi
    done
    t=$(budget 90 20)
    for set in heldout stdlib; do
        [ -f "$WORK/$name/trace-$set/meta.json" ] || { skip "$name" "eval-$set" "no trace"; continue; }
        stage "$name" "eval-$set" "$t" "$PY" -m duoserve.cli eval-predictor \
            --train "$WORK/$name/trace-train" --test "$WORK/$name/trace-$set" \
            --predictors "$names" "${loads[@]}" --lookahead "$d" --device "$DEVICE" \
            --json "$WORK/$name/eval-$set.json" --plot "$WORK/$name/eval-$set.png" \
            --title "${PRESET[$name]}, $([ $set = heldout ] && echo held-out docs || echo stdlib code)" &
    done
    wait

    if [ -f "$WORK/$name/trace-heldout/meta.json" ]; then
        stage "$name" export-replay 60 "$PY" -m duoserve.predictor.export replay \
            "$WORK/$name/trace-heldout" --out "$OUT/${PRESET[$name]}.heldout.safetensors" \
            --max-bytes $((12 << 20)) --distances "${REPLAY_D[$name]}"
    else
        skip "$name" export-replay "no held-out trace"
    fi
    if [ -f "$WORK/$name/ours.safetensors" ]; then
        stage "$name" export-predictor 60 "$PY" -m duoserve.predictor.export predictor \
            "$WORK/$name/ours.safetensors" --out "$OUT/${PRESET[$name]}.predictor.safetensors" \
            --max-bytes $((12 << 20))
    else
        skip "$name" export-predictor "no ours predictor"
    fi
}

for name in $MODELS; do
    pipeline "$name" &
done
wait

# Results tarball: everything small enough to bring back (<= 15 MiB compressed).
STAGE=$(mktemp -d)
runs=()
for name in $MODELS; do
    mkdir -p "$STAGE/$name"
    cp "$WORK/$name"/*.log "$WORK/$name"/eval-*.json "$WORK/$name"/eval-*.png "$STAGE/$name/" 2>/dev/null
    for f in train_log.json eval.json routing_trace.safetensors; do
        cp "$WORK/$name/run/$f" "$STAGE/$name/" 2>/dev/null
    done
    for set in train heldout stdlib; do
        cp "$WORK/$name/trace-$set/meta.json" "$STAGE/$name/trace-$set.meta.json" 2>/dev/null
    done
    [ -f "$WORK/$name/run/eval.json" ] && runs+=("$WORK/$name/run")
done
cp "$CORPUS/corpus.json" "$STAGE/" 2>/dev/null
if [ ${#runs[@]} -gt 0 ]; then
    "$PY" -m duoserve.training.report "${runs[@]}" --corpus "$CORPUS" \
        --out-md "$STAGE/models.generated.md" --fig-dir "$STAGE/figures" \
        >"$STAGE/models-report.log" 2>&1 || tail -n 5 "$STAGE/models-report.log"
fi
evals=$(ls "$WORK"/*/eval-heldout.json "$WORK"/*/eval-stdlib.json 2>/dev/null)
if [ -n "$evals" ]; then
    # shellcheck disable=SC2086
    "$PY" -m duoserve.predictor.report $evals --out "$STAGE/predictor-tables.md" \
        >"$STAGE/predictor-report.log" 2>&1 || tail -n 5 "$STAGE/predictor-report.log"
fi
cp "$TIMING" "$STAGE/" 2>/dev/null
tar -czf "$OUT/predictor-results.tar.gz" -C "$STAGE" .
if [ "$(stat -c %s "$OUT/predictor-results.tar.gz")" -gt $((15 << 20)) ]; then
    rm -f "$STAGE"/*/routing_trace.safetensors  # the big part; the rest is text and PNGs
    tar -czf "$OUT/predictor-results.tar.gz" -C "$STAGE" .
fi
rm -rf "$STAGE"

echo
echo "=== summary (wall $((SECONDS - START_S)) s, deadline ${DEADLINE_S} s) ==="
cat "$TIMING"
"$PY" - "$WORK" "$OUT" $MODELS <<'EOF'
import json, sys
from pathlib import Path
work, out, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
def load(p):
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None
print("| model | ppl | trace tokens train/heldout/stdlib | set | predictor | exact | half | recall@K | recall@2K |")
print("|---|---:|---|---|---|---:|---:|---:|---:|")
for name in names:
    ev = load(work / name / "run" / "eval.json")
    ppl = f"{ev['heldout_perplexity']:.1f}" if ev else "-"
    toks = "/".join(str((load(work / name / f"trace-{s}" / "meta.json") or {}).get("num_tokens", "-"))
                    for s in ("train", "heldout", "stdlib"))
    for s in ("heldout", "stdlib"):
        rec = load(work / name / f"eval-{s}.json")
        for r in (rec or {}).get("rows", []):
            if r.get("d") == 1 and r["predictor"] in ("gate-lookahead", "paper", "ours", "affinity"):
                m = [f"{100 * r[k]:.1f}" for k in ("exact", "half", "recall_k", "recall_b")]
                print(f"| {name} | {ppl} | {toks} | {s} | {r['predictor']} | " + " | ".join(m) + " |")
        if rec is None:
            print(f"| {name} | {ppl} | {toks} | {s} | (no eval) | | | | |")
total = 0
for f in sorted(out.iterdir()):
    total += f.stat().st_size
    print(f"{f.name}: {f.stat().st_size / 2**20:.2f} MiB")
print(f"total {total / 2**20:.2f} MiB in {len(list(out.iterdir()))} files")
EOF
