#!/usr/bin/env bash
# Launch `python -m pretrain` (or `-m megatron_merge`) with torchrun on one node or many.
#   Single node:  bash launch/torchrun.sh --config configs/tiny-dense.yaml [section.key=value ...]
#   Multi-node:   on every node, with the same MASTER_ADDR/MASTER_PORT:
#                 NNODES=8 NODE_RANK=<0..7> MASTER_ADDR=node0 GPUS_PER_NODE=8 bash launch/torchrun.sh --config ...
#   Merging:      MODULE=megatron_merge NPROC_PER_NODE=8 bash launch/torchrun.sh --last 10 --out merged/ run/
# Environment: NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500),
# GPUS_PER_NODE (the GPUs present, or 2 processes on a CPU-only machine), NPROC_PER_NODE (processes
# per node; default GPUS_PER_NODE), MODULE (pretrain), PYTHON (the project venv).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3

if [ -z "${GPUS_PER_NODE:-}" ]; then
  GPUS_PER_NODE="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')"
fi
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
NPROC_PER_NODE="${NPROC_PER_NODE:-$GPUS_PER_NODE}"
MODULE="${MODULE:-pretrain}"

cd "$ROOT"
exec "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" --node-rank "$NODE_RANK" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  --nproc-per-node "$NPROC_PER_NODE" \
  -m "$MODULE" "$@"
