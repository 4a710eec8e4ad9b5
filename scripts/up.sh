#!/usr/bin/env bash
# Installs the project (first run) and starts the whole stack in the background:
# Redis (if none answers), the API on port 8000 and one Celery worker. Stop it with scripts/down.sh.
# Without API_KEYS in the environment it runs in development mode (no authentication).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
install_deps
mkdir -p var/log var/run
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"
if [ -z "${DATA_DIR:-}" ]; then
  if [ -d "$ROOT/../shared/datasets" ]; then DATA_DIR="$(cd "$ROOT/../shared/datasets" && pwd)"; else DATA_DIR="$ROOT/data"; fi
fi
export DATA_DIR
if [ ! -e "$DATA_DIR/MNIST" ] && [ ! -e "$DATA_DIR/cifar10-jpg.zip" ] && [ ! -e "$DATA_DIR/hymenoptera_data.zip" ]; then
  echo "warning: no datasets in DATA_DIR=$DATA_DIR; jobs will fail until you set DATA_DIR (or ALLOW_DOWNLOAD=true)" >&2
fi
export MODELS_DIR="${MODELS_DIR:-$ROOT/var/models}" CACHE_DIR="${CACHE_DIR:-$ROOT/var/cache}"
if [ -z "${API_KEYS:-}" ]; then export ENVIRONMENT="${ENVIRONMENT:-development}"; fi
PORT="${PORT:-8000}"
ensure_redis "$REDIS_URL"
"$ROOT/scripts/down.sh" --quiet || true
nohup "$VENV/bin/celery" -A worker.celery_app worker --loglevel=INFO -n "worker1@%h" \
  >>var/log/worker.log 2>&1 &
echo $! > var/run/worker.pid
nohup "$VENV/bin/uvicorn" app.main:create_app --factory --host 0.0.0.0 --port "$PORT" \
  >>var/log/api.log 2>&1 &
echo $! > var/run/api.pid
for _ in $(seq 300); do
  if curl -fs "http://127.0.0.1:$PORT/readyz" | grep -q '"workers":\[{'; then
    echo "stack up: API http://127.0.0.1:$PORT (Swagger UI: /docs), one worker, Redis $REDIS_URL"
    echo "data: $DATA_DIR  models: $MODELS_DIR  logs: var/log/  stop: scripts/down.sh"
    exit 0
  fi
  sleep 0.2
done
echo "the stack did not become ready in 60 s; see var/log/api.log and var/log/worker.log" >&2
exit 1
