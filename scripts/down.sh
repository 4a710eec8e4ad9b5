#!/usr/bin/env bash
# Stops the API and the worker started by scripts/up.sh (Redis is left running).
set -uo pipefail
source "$(dirname "$0")/lib.sh"
for name in api worker; do
  pidfile="$ROOT/var/run/$name.pid"
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    [ "${1:-}" = "--quiet" ] || echo "stopped $name ($pid)"
  fi
  rm -f "$pidfile"
done
