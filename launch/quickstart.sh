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
# Check the config (and the overrides) before the previous run is deleted.
export GPUS_PER_NODE="${GPUS_PER_NODE:-$("$PY" -c 'import torch; print(torch.cuda.device_count() or 2)')}"
echo "[quickstart] checking configs/tiny-dense.yaml $* for $GPUS_PER_NODE processes"
PYTHONWARNINGS=ignore "$PY" -m pretrain --validate-only --world-size "$GPUS_PER_NODE" \
  --config "$ROOT/configs/tiny-dense.yaml" checkpoint.save="$RUN_DIR" "$@"
if [ -d "$RUN_DIR" ]; then
  echo "[quickstart] removing the previous quick-start run $RUN_DIR"
  rm -rf "$RUN_DIR"
fi
echo "[quickstart] training configs/tiny-dense.yaml -> $RUN_DIR"
PYTHONWARNINGS=ignore PYTHON="$PY" bash "$ROOT/launch/torchrun.sh" \
  --config "$ROOT/configs/tiny-dense.yaml" checkpoint.save="$RUN_DIR" "$@"
echo "[quickstart] done. For the other commands (torchrun, megatron-merge, pretrain-preprocess): source $ROOT/.venv/bin/activate"
