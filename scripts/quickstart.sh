#!/usr/bin/env bash
# Set up (idempotent) and run the main job: generate text with the built-in default model.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec "$VENV/bin/duoserve" generate --chat --prompt "${1:-What does a list comprehension do?}" --max-tokens 80
