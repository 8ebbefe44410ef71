# Sourced by the GPU scripts that run stages against one wall-clock deadline
# (gpu_predictor.sh, gpu_quality.sh). Needs DEADLINE_S (seconds from START_S the last stage
# must end by) and START_S (bash's $SECONDS at the start).
left() { echo $((DEADLINE_S - (SECONDS - START_S))); }
budget() {  # budget WANT [RESERVE]: seconds for a stage (>= 5), leaving RESERVE for later ones
    local b=$(($(left) - ${2:-0}))
    [ "$b" -gt "$1" ] && b=$1
    [ "$b" -lt 5 ] && b=5
    echo "$b"
}
