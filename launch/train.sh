#!/usr/bin/env bash
# torchrun wrapper: launch/train.sh CONFIG [--section.field value ...]
# Environment: NPROC_PER_NODE (default 2), NNODES (1), NODE_RANK (0), MASTER_ADDR, MASTER_PORT,
# MAX_RESTARTS (3). Single-node runs use --standalone (a free port, so parallel runs never collide).
# Multi-node: the same command on every node with NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT set.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: launch/train.sh CONFIG [--section.field value ...]" >&2; exit 2; }
CONFIG=$1; shift
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.build/torch_extensions}
NPROC_PER_NODE=${NPROC_PER_NODE:-2}
NNODES=${NNODES:-1}
MAX_RESTARTS=${MAX_RESTARTS:-3}
# Each rank gets an equal share of the cores (torchrun would otherwise leave every rank at 1 thread).
if [ -z "${OMP_NUM_THREADS:-}" ]; then
  cores=$(nproc)
  export OMP_NUM_THREADS=$(( cores / NPROC_PER_NODE > 0 ? cores / NPROC_PER_NODE : 1 ))
fi
if [ "$NNODES" = 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
  rdzv=(--standalone)
else
  rdzv=(--nnodes "$NNODES" --node_rank "${NODE_RANK:-0}" --rdzv_backend c10d
        --rdzv_endpoint "${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}" --rdzv_id "${RDZV_ID:-rankmixer}")
fi
# Fail fast, once: config and data errors are deterministic, so they are checked here in one process
# (footers only) instead of on every rank and again on every elastic restart.
WORLD_SIZE=$((NNODES * NPROC_PER_NODE)) "$PY" -m launch.preflight --config "$CONFIG" "$@" || exit $?
exec "$PY" -m torch.distributed.run "${rdzv[@]}" --nproc_per_node "$NPROC_PER_NODE" \
  --max_restarts "$MAX_RESTARTS" -m launch.train --config "$CONFIG" "$@"
