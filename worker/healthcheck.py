"""Worker healthcheck for Docker: is this worker registered in Redis? (No torch, no Celery broadcast.)

Usage::

    python -m worker.healthcheck gpu-worker@$HOSTNAME

A live worker's main process refreshes ``<REDIS_PREFIX>:worker:<name>`` every REAPER_INTERVAL_S with
a TTL of three intervals (``worker.celery_app``), so the key exists exactly while the worker is
alive and can reach Redis. Exit status 0 when it does, 1 otherwise (with the reason on stderr).
"""

from __future__ import annotations

import sys

from core.config import get_settings
from core.jobs import redis_client


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: python -m worker.healthcheck <worker name, e.g. gpu-worker@HOSTNAME>" + "\n")
        return 2
    settings = get_settings()
    key = f"{settings.redis_prefix}:worker:{argv[0]}"
    try:
        alive = bool(redis_client(settings.redis_url, settings.redis_timeout_s).exists(key))
    except Exception as exc:
        sys.stderr.write(f"Redis unreachable: {exc}" + "\n")
        return 1
    if not alive:
        sys.stderr.write(f"worker {argv[0]} is not registered ({key} missing)" + "\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
