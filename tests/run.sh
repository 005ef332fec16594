#!/usr/bin/env bash
# Set up the environment (as the quick start does) and run the test suite.
#   bash tests/run.sh [pytest args ...]      e.g. bash tests/run.sh -m "not slow"
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup_env.sh" test
cd "$ROOT"
PYTHONWARNINGS=ignore exec "$ROOT/.venv/bin/python" -m pytest -q -p no:cacheprovider "$@" tests
