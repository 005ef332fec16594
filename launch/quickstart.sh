#!/usr/bin/env bash
# The main job on a built-in default: set up the environment, prepare the embedded corpus, and
# train the tiny dense GPT on 2 CPU processes (or on the GPUs present), then print a summary.
#   bash launch/quickstart.sh [section.key=value ...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup_env.sh" test
PY="$ROOT/.venv/bin/python"

echo "[quickstart] preparing the default corpus"
"$PY" -c "from pretrain.data.corpus import ensure_default_corpus; print('[quickstart] corpus:', ensure_default_corpus())"

RUN_DIR="${RUN_DIR:-$ROOT/runs/quickstart}"
if [ -d "$RUN_DIR" ]; then
  echo "[quickstart] removing the previous quick-start run $RUN_DIR"
  rm -rf "$RUN_DIR"
fi
echo "[quickstart] training configs/tiny-dense.yaml -> $RUN_DIR"
PYTHONWARNINGS=ignore PYTHON="$PY" bash "$ROOT/launch/torchrun.sh" \
  --config "$ROOT/configs/tiny-dense.yaml" checkpoint.save="$RUN_DIR" "$@"
