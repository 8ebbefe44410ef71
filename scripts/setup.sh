# Sourced by quickstart.sh and test.sh: make .venv with duoserve installed.
# $1 = "test" also installs the test tools. On a machine without an NVIDIA GPU, torch is
# installed first as the CPU build (pip install torch==2.13.0 takes it), so no CUDA
# wheels are downloaded. pip's failures stop the caller (set -e, pipefail).
VENV=${VENV:-.venv}
_pip() {  # pip, without the local mirror's "Location ... is ignored" chatter
    "$VENV/bin/pip" "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        _pip install -q torch
    else
        _pip install -q torch==2.13.0
    fi
fi
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
_pip install -q -e ".${extra}"
