#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install the project into it.
# Idempotent: re-installs only when pyproject.toml or the constraints change.
#   bash launch/setup_env.sh [extras]     e.g. "test" (default) or "test,tensorboard"
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PRETRAIN_VENV:-$ROOT/.venv}"
EXTRAS="${1:-test}"
CONSTRAINTS="${PRETRAIN_CONSTRAINTS-$ROOT/launch/constraints.txt}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp_src="$(cat "$ROOT/pyproject.toml" ${CONSTRAINTS:+"$CONSTRAINTS"}; echo "$EXTRAS")"
stamp="$VENV/.pretrain-installed-$(printf '%s' "$stamp_src" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing torch, megatron-core and the project (extras: $EXTRAS; a few minutes the first time)"
  # pip's own progress lines, not --quiet: minutes of silence read as a hang.
  pip_args=(--disable-pip-version-check --progress-bar on)
  [ -n "$CONSTRAINTS" ] && pip_args+=(-c "$CONSTRAINTS")
  # torch first and alone, so it resolves to the pinned wheel and not a newer CUDA build.
  "$VENV/bin/python" -m pip install "${pip_args[@]}" torch
  "$VENV/bin/python" -m pip install "${pip_args[@]}" -e "$ROOT[$EXTRAS]"
  rm -f "$VENV"/.pretrain-installed-*
  touch "$stamp"
fi
echo "[setup] environment ready: $VENV"
