#!/usr/bin/env bash
# Installs the project (first run) and runs every test tier: unit, integration (real Redis and
# real Celery worker processes), browser and the real-data end-to-end tests (../shared/datasets,
# or REAL_DATA_DIR). Extra arguments go to pytest, e.g. ./scripts/test.sh -m "not realdata"
# (a later -m replaces the -m "" that selects every tier; plain `pytest` runs the fast tier only).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
install_deps
ensure_redis "${TEST_REDIS_URL:-redis://127.0.0.1:6379/0}"
exec "$PY" -m pytest -m "" "$@"
