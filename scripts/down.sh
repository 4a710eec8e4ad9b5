#!/usr/bin/env bash
# Stops the API and the worker started by scripts/up.sh (Redis is left running).
#   scripts/down.sh [--quiet] [api|worker]
# The worker gets a warm shutdown (SIGTERM); a job still training after 20 s is interrupted
# (SIGKILL) and resumes from its last finished epoch once a worker runs again.
set -uo pipefail
source "$(dirname "$0")/lib.sh"
QUIET=""
if [ "${1:-}" = "--quiet" ]; then QUIET=1; shift; fi
case "${1:-all}" in all) NAMES="api worker";; api|worker) NAMES="$1";; *) echo "usage: $0 [--quiet] [api|worker]" >&2; exit 2;; esac
for name in $NAMES; do
  pidfile="$ROOT/var/run/$name.pid"
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  # only a process of this checkout's venv: after a reboot the pid may belong to anything
  if kill -0 "$pid" 2>/dev/null && tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF "$VENV/bin/"; then
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    [ -n "$QUIET" ] || echo "stopped $name ($pid)"
  fi
  rm -f "$pidfile"
  if [ "$name" = api ]; then
    # the HTTP metrics of its processes (PROMETHEUS_MULTIPROC_DIR): nothing reads them any more
    metrics=$(cat "$ROOT/var/run/api.metrics" 2>/dev/null || echo "$ROOT/var/prometheus")
    if [ -n "$metrics" ] && [ -d "$metrics" ]; then rm -f "$metrics"/*.db; fi
    rm -f "$ROOT/var/run/api.port" "$ROOT/var/run/api.metrics"
  fi
done
