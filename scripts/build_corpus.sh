#!/usr/bin/env bash
# Build the training corpus for duoserve's small MoE models (issue 4).
#
# Source: Debian's python3.11-doc (the reST sources of the Python 3.11 documentation,
# PSF License). Output, in the git-ignored folder .carry/corpus/ (carried to the GPU
# machine): train.jsonl.gz, heldout.jsonl.gz, corpus.json (name, version, sha256, sizes,
# license), COPYRIGHT, tokenizer/ (BPE, vocab 8192) and {train,heldout}.tokens.npy.
#
# Usage: bash scripts/build_corpus.sh            (needs apt-get; run as root)
#        DEB_FILE=path/to/python3.11-doc_*.deb bash scripts/build_corpus.sh
# Env:   CORPUS_DIR (default .carry/corpus), PYDOC_VERSION (pin a package version),
#        VOCAB_SIZE (default 8192), PYTHON (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGE=python3.11-doc
OUT_DIR=${CORPUS_DIR:-.carry/corpus}
VOCAB_SIZE=${VOCAB_SIZE:-8192}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
WORK_DIR=$(mktemp -d)
trap 'rm -rf "$WORK_DIR"' EXIT

if [ -n "${DEB_FILE:-}" ]; then
    cp "$DEB_FILE" "$WORK_DIR/"
else
    apt-get update -qq
    # apt-get download writes into the current folder; the _apt sandbox warning is harmless.
    (cd "$WORK_DIR" && apt-get download "$PACKAGE${PYDOC_VERSION:+=$PYDOC_VERSION}" 2>&1 |
        grep -v "unsandboxed" || true)
fi
DEB=$(ls "$WORK_DIR"/${PACKAGE}_*.deb)
VERSION=$(dpkg-deb -f "$DEB" Version)
SHA256=$(sha256sum "$DEB" | cut -d' ' -f1)
echo "source: $(basename "$DEB") sha256=$SHA256"
dpkg-deb -x "$DEB" "$WORK_DIR/root"

rm -rf "$OUT_DIR"
mkdir -p "$OUT_DIR"
PYTHONPATH=. "$PY" -m duoserve.training.corpus \
    --sources "$WORK_DIR/root/usr/share/doc/python3.11/html/_sources" --out "$OUT_DIR" \
    --package "$PACKAGE" --version "$VERSION" --sha256 "$SHA256"
cp "$WORK_DIR/root/usr/share/doc/$PACKAGE/copyright" "$OUT_DIR/COPYRIGHT"
PYTHONPATH=. "$PY" -m duoserve.training.tokenizer --corpus "$OUT_DIR" --vocab-size "$VOCAB_SIZE"
du -sh "$OUT_DIR"
ls -l "$OUT_DIR"
