# Shared by scripts/*.sh: the virtual environment and Redis.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

install_deps() {
  # Creates .venv and installs the project (torch and torchvision come from the local wheel
  # cache through pip; do not use uv or poetry here). Re-runs only when pyproject.toml changes.
  local stamp="$VENV/.installed-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
  if [ -f "$stamp" ]; then return; fi
  if [ ! -x "$PY" ]; then
    "${PYTHON:-python3}" -m venv "$VENV"
  fi
  echo "installing into $VENV (first run: a few minutes)..."
  "$PY" -m pip install --quiet --disable-pip-version-check -e "$ROOT[dev]" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
  "$PY" -c "import torch, torchvision, celery, fastapi" || { echo "install failed" >&2; exit 1; }
  rm -f "$VENV"/.installed-*
  touch "$stamp"
}

redis_answers() {
  "$PY" -c "import redis, sys; sys.exit(0 if redis.Redis.from_url(sys.argv[1], socket_connect_timeout=1).ping() else 1)" "$1" 2>/dev/null
}

ensure_redis() {
  # Uses the Redis at $1 if it answers; otherwise starts redis-server on 127.0.0.1:6379.
  local url="$1"
  if redis_answers "$url"; then echo "Redis: $url answers"; return; fi
  if [ "$url" != "redis://127.0.0.1:6379/0" ]; then echo "Redis at $url does not answer" >&2; exit 1; fi
  command -v redis-server >/dev/null || { echo "no Redis at $url and no redis-server installed (apt install redis-server)" >&2; exit 1; }
  mkdir -p "$ROOT/var/redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --dir "$ROOT/var/redis" \
    --appendonly yes --logfile "$ROOT/var/redis/redis.log"
  for _ in $(seq 50); do redis_answers "$url" && { echo "Redis: started redis-server on 127.0.0.1:6379"; return; }; sleep 0.1; done
  echo "redis-server did not start; see $ROOT/var/redis/redis.log" >&2; exit 1
}
