#!/usr/bin/env bash
# Set up (idempotent) and run the CPU test suite: ruff, then pytest. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh test
"$VENV/bin/ruff" format --check duoserve tests
"$VENV/bin/ruff" check duoserve tests
exec "$VENV/bin/python" -m pytest "$@"
