#!/usr/bin/env bash
# The test suite, set-up included: bash scripts/test.sh [PYTEST_ARGS...]
#   bash scripts/test.sh                       # everything, the slow multi-process tests included
#   bash scripts/test.sh -m "not slow" -x      # any pytest arguments
# Sets up the environment first (scripts/setup.sh: the active one, or .venv, plus Chromium for the
# browser test where it can), then runs `python -m pytest "$@"` in it; pytest's exit code is the script's.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup.sh
source scripts/setup.sh tests
exec python -m pytest "$@"
