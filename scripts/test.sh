#!/usr/bin/env bash
# Set up a virtual environment with the test extra and run the test suite (no GPU needed).
# Extra arguments go to pytest, e.g.: bash scripts/test.sh -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
ensure_venv ".[train,test]"
.venv/bin/python -m pytest -q "$@"
