#!/usr/bin/env bash
# Installs the project (first run) and starts the whole stack in the background:
# Redis (if none answers), the API on port 8000 and one Celery worker. Stop it with scripts/down.sh.
#   scripts/up.sh [all|api|worker]   (re)start everything (default), only the API, or only the worker
# Without API_KEYS in the environment it runs in development mode (no authentication) and the
# API listens on 127.0.0.1 only; with keys on HOST (default 0.0.0.0).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
install_deps
mkdir -p var/log var/run
if [ -f .env ]; then
  # .env as the service reads it (python-dotenv, names case-insensitive, the environment wins);
  # only settings and this script's PORT/HOST/WORKER_NAME, never its own variables
  eval "$("$PY" -c 'import os, shlex
from dotenv import dotenv_values
from core.config import Settings
allowed = {name.upper() for name in Settings.model_fields} | {"PORT", "HOST", "WORKER_NAME", "TORCH_HOME"}
present = {name.upper() for name in os.environ}
for name, value in dotenv_values(".env").items():
    if value is not None and name.upper() in allowed and name.upper() not in present:
        print(f"export {name.upper()}={shlex.quote(value)}")')"
fi
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"
if [ -z "${DATA_DIR:-}" ]; then
  if [ -d "$ROOT/../shared/datasets" ]; then DATA_DIR="$(cd "$ROOT/../shared/datasets" && pwd)"; else DATA_DIR="$ROOT/data"; fi
fi
export DATA_DIR
found=""
for layout in MNIST/raw/train-images-idx3-ubyte MNIST/raw/train-images-idx3-ubyte.gz cifar-10-batches-py \
  cifar10-jpg cifar10-jpg.zip cifar10 cifar10.zip hymenoptera_data hymenoptera_data.zip; do
  [ -e "$DATA_DIR/$layout" ] && found=1
done
if [ -z "$found" ]; then
  echo "warning: no datasets in DATA_DIR=$DATA_DIR; jobs will fail until you set DATA_DIR (or ALLOW_DOWNLOAD=true)" >&2
fi
truthy() {  # as pydantic reads a bool setting (ALLOW_DOWNLOAD): 1, true, yes, on, y, t in any case
  case "${1,,}" in 1|true|yes|on|y|t) return 0;; *) return 1;; esac
}
weights="${RESNET18_WEIGHTS:-IMAGENET1K_V1}"
hub_file="${TORCH_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/torch}/hub/checkpoints/resnet18-f37072fd.pth"
if [ "${weights,,}" = imagenet1k_v1 ] && [ ! -f "$hub_file" ] && ! truthy "${ALLOW_DOWNLOAD:-}"; then
  echo "warning: RESNET18_WEIGHTS=IMAGENET1K_V1 needs $hub_file, which is missing, and ALLOW_DOWNLOAD is off:" \
    "hymenoptera_resnet18 jobs with weights=default will fail; pass \"weights\": \"none\", or set" \
    "RESNET18_WEIGHTS=none (or local with RESNET18_WEIGHTS_FILE), or ALLOW_DOWNLOAD=true with internet" >&2
elif [ "${weights,,}" = local ] && [ ! -f "${RESNET18_WEIGHTS_FILE:-}" ]; then
  echo "warning: RESNET18_WEIGHTS=local but RESNET18_WEIGHTS_FILE=${RESNET18_WEIGHTS_FILE:-} is not a file" >&2
fi
export MODELS_DIR="${MODELS_DIR:-$ROOT/var/models}" CACHE_DIR="${CACHE_DIR:-$ROOT/var/cache}"
WHAT="${1:-all}"
case "$WHAT" in all|api|worker) ;; *) echo "usage: $0 [all|api|worker]" >&2; exit 2;; esac
if [ -z "${API_KEYS:-}" ]; then
  export ENVIRONMENT="${ENVIRONMENT:-development}"
  HOST="${HOST:-127.0.0.1}"  # no authentication: not reachable from other machines
else
  HOST="${HOST:-0.0.0.0}"
fi
PORT="${PORT:-8000}"
WORKER_NAME="${WORKER_NAME:-worker-$$}"
ensure_redis "$REDIS_URL"

alive() { kill -0 "$(cat "var/run/$1.pid")" 2>/dev/null; }

start_worker() {
  "$ROOT/scripts/down.sh" --quiet worker || true
  # a node name of its own, so that workers of several checkouts on one host stay apart in /readyz
  nohup "$VENV/bin/celery" -A worker.celery_app worker --loglevel=INFO -n "$WORKER_NAME@%h" \
    >>var/log/worker.log 2>&1 &
  echo $! > var/run/worker.pid
}

port_free() {  # as uvicorn binds: SO_REUSEADDR, so connections in TIME_WAIT do not count
  "$PY" -c "import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))" "$HOST" "$PORT" 2>/dev/null
}

refuse_port() {
  echo "port $PORT on $HOST is already in use (another API?); stop it or choose another PORT" >&2
  exit 1
}

start_api() {
  # checked before and after stopping this checkout's API: a refused start leaves the stack as it was
  if ! port_free && ! { [ -f var/run/api.pid ] && alive api && [ "$(cat var/run/api.port 2>/dev/null)" = "$PORT" ]; }; then
    refuse_port
  fi
  "$ROOT/scripts/down.sh" --quiet api || true
  port_free || refuse_port
  # WEB_CONCURRENCY processes (default: the CPU count, at most 8), each with its own loaded models
  # and its own SO_REUSEPORT socket, so that connections spread evenly (app/serve.py)
  # several processes: each keeps its HTTP metrics here, so /metrics sums them (app.serve creates
  # and empties it at start; down.sh deletes the files)
  export PROMETHEUS_MULTIPROC_DIR="${PROMETHEUS_MULTIPROC_DIR:-$ROOT/var/prometheus}"
  nohup "$PY" -m app.serve --host "$HOST" --port "$PORT" >>var/log/api.log 2>&1 &
  echo $! > var/run/api.pid
  echo "$PORT" > var/run/api.port
  echo "$PROMETHEUS_MULTIPROC_DIR" > var/run/api.metrics
}

STARTED=""
touch var/log/worker.log var/log/api.log
WORKER_LOG_START=$(($(wc -l < var/log/worker.log) + 1))
if [ "$WHAT" != worker ]; then start_api; STARTED="$STARTED api"; fi
if [ "$WHAT" != api ]; then start_worker; STARTED="$STARTED worker"; fi
PROBE="http://$([ "$HOST" = 0.0.0.0 ] && echo 127.0.0.1 || echo "$HOST"):$PORT"

ready() {
  case "$WHAT" in
    worker) tail -n +"$WORKER_LOG_START" var/log/worker.log | grep -q "$WORKER_NAME@.* ready" ;;
    api) curl -fs "$PROBE/readyz" >/dev/null ;;
    all) curl -fs "$PROBE/readyz" | grep -q '"workers":\[{' ;;
  esac
}

for _ in $(seq 300); do
  for name in $STARTED; do
    if ! alive "$name"; then
      echo "the $name exited at start; the end of var/log/$name.log:" >&2
      tail -5 "var/log/$name.log" >&2
      exit 1
    fi
  done
  if ready; then
    case "$WHAT" in
      worker) echo "worker up (Redis $REDIS_URL); log: var/log/worker.log" ;;
      api) echo "API up: $PROBE (Swagger UI: /docs), listening on $HOST:$PORT; Redis $REDIS_URL" ;;&
      all) echo "stack up: API $PROBE (Swagger UI: /docs), listening on $HOST:$PORT; Redis $REDIS_URL" ;;&
      *)
         echo "data: $DATA_DIR  models: $MODELS_DIR  logs: var/log/  stop: scripts/down.sh" ;;
    esac
    exit 0
  fi
  sleep 0.2
done
echo "not ready in 60 s; see var/log/api.log and var/log/worker.log" >&2
exit 1
