#!/usr/bin/env bash
# Issue 7 item 4 on the GPU machine, in ONE call of ~6 minutes (at most ~8.8): train the two
# topology models (issue 4 presets, side by side as scripts/gpu_predictor.sh does), then
# measure each one's held-out perplexity with bf16 and with int4 experts.
#
# Run from the repo root on the GPU machine, with .carry/corpus carried:
#     PYTHONPATH=. bash scripts/gpu_quality.sh
# Per model (mixtral = mixtral-8x7b-topology, qwen3 = qwen3-30b-a3b-topology), in parallel:
#   1. train: duoserve.training.train for TRAIN_MINUTES (export, then eval.json as usual)
#   2. perplexity: as soon as the checkpoint is exported (train_log.json appears; the
#      training's own evaluation still runs), one `python -m duoserve.quant.perplexity`
#      process per variant, all at once: bf16, int4 round-to-nearest, int4 clip search;
#      --device DEVICE --dtype DTYPE (bf16 on cuda), every test window of the held-out split
#      (the training's test part, the tokens eval.json's heldout_perplexity is measured on).
# Every stage runs under `timeout`, its limit taken from what is left of DEADLINE_S (the
# summary gets 30 s more, kills come 15 s after TERM), so the call ends by ~DEADLINE_S + 60 s.
#
# Written under $OUT (default out/gpu-quality), 3 files:
#   quality.json: one row per (model, variant) (quant/perplexity.py's result + % vs bf16),
#       training summaries and eval.json perplexities, commit, date, GPU
#   quality.md: the table (also printed at the end)
#   quality-results.tar.gz: train/perplexity logs, train_log.json, eval.json, timing.log
# Env: TRAIN_MINUTES (3.5), DEADLINE_S (480: seconds from start the last stage must end by),
#      EVAL_ALLOW_S (90: training's export + evaluation after its loop), DEVICE (cuda),
#      DTYPE (auto: bfloat16 on cuda, float32 on cpu), PYTHON (python3), CORPUS_DIR
#      (.carry/corpus), WORK_DIR (out/quality-run), MODELS ("mixtral qwen3"), VARIANTS
#      ("bf16 int4:rtn int4:clip"), MAX_WINDOWS (0: all), DUOSERVE_COMMIT (else git's),
#      SMOKE=1 (3-layer tiny versions, 16 windows of 64 tokens: a CPU check; DEVICE cpu).
set -uo pipefail
cd "$(dirname "$0")/.."

SMOKE=${SMOKE:-0}
OUT=${OUT:-out/gpu-quality}
WORK=${WORK_DIR:-out/quality-run}
CORPUS=${CORPUS_DIR:-.carry/corpus}
DEVICE=${DEVICE:-$([ "$SMOKE" = 1 ] && echo cpu || echo cuda)}
DTYPE=${DTYPE:-auto}
PY=${PYTHON:-python3}
MODELS=${MODELS:-mixtral qwen3}
VARIANTS=${VARIANTS:-bf16 int4:rtn int4:clip}
MAX_WINDOWS=${MAX_WINDOWS:-0}
EVAL_ALLOW_S=${EVAL_ALLOW_S:-90}
export PYTHONPATH=${PYTHONPATH:-.}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
declare -A PRESET=([mixtral]=mixtral-8x7b-topology [qwen3]=qwen3-30b-a3b-topology)
SEQ_LEN=512  # the presets' training seq_len: eval.json's windows
TRAIN_EXTRA=()
if [ "$SMOKE" = 1 ]; then
    TRAIN_EXTRA=(--num-layers 3 --hidden-size 64 --num-heads 2 --head-dim 32
        --expert-intermediate-size 32 --batch-size 2 --seq-len 64 --eval-every-steps 5
        --log-every-steps 5 --heldout-eval-seqs 2)
    SEQ_LEN=64
    MAX_WINDOWS=${SMOKE_MAX_WINDOWS:-16}
    TRAIN_MINUTES=${TRAIN_MINUTES:-0.25}
    DEADLINE_S=${DEADLINE_S:-900}  # slow 2-core CPUs
    EVAL_ALLOW_S=600
fi
TRAIN_MINUTES=${TRAIN_MINUTES:-3.5}
DEADLINE_S=${DEADLINE_S:-480}

START_S=$SECONDS
TRAIN_S=$("$PY" -c "print(round(float('$TRAIN_MINUTES') * 60))")
TIMING="$WORK/timing.log"
source scripts/deadline.sh  # left, budget
note() { echo "$*" | tee -a "$TIMING"; }

if [ ! -f "$CORPUS/train.tokens.npy" ] || [ ! -f "$CORPUS/heldout.tokens.npy" ]; then
    echo "missing $CORPUS/{train,heldout}.tokens.npy: run scripts/build_corpus.sh and carry .carry/corpus"
    exit 1
fi
rm -rf "$WORK" "$OUT"
mkdir -p "$OUT" "$WORK"
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
COMMIT=${DUOSERVE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
if [ -z "${DUOSERVE_COMMIT:-}" ] && [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    COMMIT="$COMMIT+dirty"
fi
echo "gpu: ${GPU_NAME:-none}; commit $COMMIT; device $DEVICE; train $TRAIN_MINUTES min"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

perplexity() {  # perplexity NAME VARIANT: one variant's held-out perplexity of a trained model
    local name=$1 variant=$2 dtype=${2%%:*} method=rtn limit t0=$SECONDS rc
    [[ "$variant" == *:* ]] && method=${variant#*:}
    limit=$(budget 100000)
    timeout -s TERM -k 15 "$limit" "$PY" -m duoserve.quant.perplexity \
        --model "$WORK/$name/run/model" --tokens "$CORPUS/heldout.tokens.npy" \
        --expert-dtype "$dtype" --method "$method" --device "$DEVICE" --dtype "$DTYPE" \
        --seq-len "$SEQ_LEN" --max-windows "$MAX_WINDOWS" \
        --json "$WORK/$name/ppl-${dtype}-${method}.json" >"$WORK/$name/ppl-${dtype}-${method}.log" 2>&1
    rc=$?
    note "$name perplexity-$variant rc=$rc $((SECONDS - START_S))s-from-start $((SECONDS - t0))s limit=${limit}s"
}

pipeline() {  # pipeline NAME: train one model, then its perplexity variants (header comment)
    local name=$1 run="$WORK/$1/run" limit t0=$SECONDS train_pid rc variant
    mkdir -p "$WORK/$name"
    limit=$(budget $((TRAIN_S + EVAL_ALLOW_S)))
    timeout -s TERM -k 15 "$limit" "$PY" -m duoserve.training.train --preset "${PRESET[$name]}" \
        --corpus "$CORPUS" --out "$run" --device "$DEVICE" --max-minutes "$TRAIN_MINUTES" \
        --no-save-state "${TRAIN_EXTRA[@]}" >"$WORK/$name/train.log" 2>&1 &
    train_pid=$!
    # train_log.json is written right after the checkpoint export, before the evaluation
    while [ ! -f "$run/train_log.json" ] && kill -0 "$train_pid" 2>/dev/null && [ "$(left)" -gt 0 ]; do
        sleep 2
    done
    if [ -f "$run/train_log.json" ] && [ -f "$run/model/config.json" ]; then
        note "$name exported at $((SECONDS - START_S))s-from-start"
        for variant in $VARIANTS; do
            perplexity "$name" "$variant" &
        done
    else
        note "$name perplexity SKIPPED: no exported model"
    fi
    wait "$train_pid"
    rc=$?
    note "$name train rc=$rc $((SECONDS - START_S))s-from-start $((SECONDS - t0))s limit=${limit}s"
    wait
}

for name in $MODELS; do
    pipeline "$name" &
done
wait

# Results tarball: logs and small JSON (the checkpoints stay behind).
STAGE=$(mktemp -d)
for name in $MODELS; do
    mkdir -p "$STAGE/$name"
    cp "$WORK/$name"/*.log "$WORK/$name"/ppl-*.json "$STAGE/$name/" 2>/dev/null
    cp "$WORK/$name/run/train_log.json" "$WORK/$name/run/eval.json" "$STAGE/$name/" 2>/dev/null
done
cp "$TIMING" "$CORPUS/corpus.json" "$STAGE/" 2>/dev/null
tar -czf "$OUT/quality-results.tar.gz" -C "$STAGE" .
rm -rf "$STAGE"

echo
echo "=== summary (wall $((SECONDS - START_S)) s, deadline ${DEADLINE_S} s) ==="
cat "$TIMING"
timeout -k 5 30 "$PY" - "$WORK" "$OUT" "$COMMIT" "${GPU_NAME:-}" "$TRAIN_MINUTES" $MODELS <<'EOF'
import datetime, json, sys
from pathlib import Path

work, out, commit, gpu, train_minutes, names = (
    Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6:])
def load(p):
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None
rows, models = [], {}
for name in names:
    results = [r for p in sorted((work / name).glob("ppl-*.json")) if (r := load(p))]
    bf16 = next((r for r in results if r["expert_dtype"] == "bf16"), None)
    order = {None: 0, "rtn": 1, "clip": 2}
    for r in sorted(results, key=lambda r: order.get(r["method"], 3)):
        delta = 100 * (r["ppl"] / bf16["ppl"] - 1) if bf16 and r is not bf16 else None
        rows.append({"name": name, **r, "ppl_vs_bf16_percent": delta})
    log = load(work / name / "run" / "train_log.json") or {}
    ev = load(work / name / "run" / "eval.json") or {}
    models[name] = {"train_summary": log.get("summary"), "model_config": log.get("model_config"),
                    "eval_heldout_perplexity": ev.get("heldout_perplexity"),
                    "eval_heldout_tokens": ev.get("heldout_tokens")}
gpu = gpu or next((r["device_name"] for r in rows), "")
meta = {"commit": commit, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
    timespec="seconds"), "gpu": gpu, "train_minutes": float(train_minutes)}
(out / "quality.json").write_text(json.dumps({**meta, "rows": rows, "models": models}, indent=1) + "\n")
fmt = lambda v, f: "-" if v is None else format(v, f)
lines = [f"Held-out perplexity, bf16 vs int4 experts; commit {commit}, {meta['date']}, {gpu}, "
         f"{train_minutes} min of training per model.", "",
         "| model | experts | method | group | dtype | tokens | NLL | perplexity | vs bf16 | "
         "load s | eval s |", "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
for r in rows:
    pct = "-" if r["ppl_vs_bf16_percent"] is None else f"{r['ppl_vs_bf16_percent']:+.2f}%"
    lines.append(f"| {r['name']} | {r['expert_dtype']} | {r['method'] or '-'} | "
                 f"{r['group_size'] or '-'} | {r['dtype']} | {r['tokens']} | {r['nll']:.5f} | "
                 f"{r['ppl']:.3f} | {pct} | {r['load_seconds']} | {r['seconds']} |")
lines += ["", "| model | the training's eval.json perplexity (autocast, fp32 weights) | tokens | "
          "steps | epochs |", "|---|---:|---:|---:|---:|"]
for name, m in models.items():
    s = m["train_summary"] or {}
    lines.append(f"| {name} | {fmt(m['eval_heldout_perplexity'], '.3f')} | "
                 f"{fmt(m['eval_heldout_tokens'], 'd')} | {fmt(s.get('steps'), 'd')} | "
                 f"{fmt(s.get('epochs'), '.2f')} |")
(out / "quality.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
missing = [f"{n}:{v}" for n in names for v in ("bf16", "int4")
           if not any(r["name"] == n and r["expert_dtype"] == v for r in rows)]
print("missing: " + (", ".join(missing) or "none"))
EOF
ls -l "$OUT"
[ -f "$OUT/quality.json" ] && ! grep -q '"rows": \[\]' "$OUT/quality.json"
