"""The worker's Celery application: tasks, and the threads of the worker's main process.

Start a worker with::

    celery -A worker.celery_app worker --loglevel=INFO

The main process registers the worker in Redis (``GET /readyz`` lists live workers) and runs the
*reaper*: every REAPER_INTERVAL_S it re-queues running jobs whose lease expired because their
worker was killed. Training itself runs in the pool's child process, where torch and CUDA are
first imported and initialised (never in the parent, never at import time).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
from datetime import UTC, datetime

from celery import signals

from core.config import get_settings
from core.jobs import JobStore, RequeueOutcome, redis_client
from core.queue import enqueue_training, make_celery
from models_store.checkpoint import CheckpointStore

log = logging.getLogger(__name__)

settings = get_settings()
app = make_celery(settings)
app.conf.include = ["worker.tasks"]

_stop = threading.Event()


def reap_once(store: JobStore) -> list[str]:
    """Re-queue orphaned jobs (lease expired while running); returns the re-queued ids."""
    requeued = []
    for job_id, outcome in store.requeue_orphans():
        log.warning("job %s: its worker was lost; %s", job_id, outcome)
        if outcome is RequeueOutcome.cancelled:  # a cancel was pending: the job will never resume
            shutil.rmtree(settings.resume_dir(job_id), ignore_errors=True)
        if outcome is RequeueOutcome.requeued:
            enqueue_training(app, job_id)
            requeued.append(job_id)
    return requeued


def _background(store: JobStore, name: str) -> None:
    info = {
        "name": name,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "queue": settings.celery_queue,
        "device": settings.device,
        "started_at": datetime.now(UTC).isoformat(),
    }
    interval = settings.reaper_interval_s
    while True:
        try:
            store.register_worker(name, info, ttl_s=max(3 * interval, 15))
            reap_once(store)
        except Exception as exc:  # Redis down: try again next round
            log.warning("worker housekeeping failed: %s", exc)
        if _stop.wait(interval):
            return


@signals.worker_ready.connect
def _on_worker_ready(sender=None, **kwargs) -> None:
    store = JobStore(redis_client(settings.redis_url, settings.redis_timeout_s), settings.redis_prefix)
    name = getattr(sender, "hostname", None) or f"worker@{socket.gethostname()}"
    removed = CheckpointStore(settings.models_dir).remove_stale_temp()
    if removed:
        log.info("removed %d stale temporary checkpoint directories", removed)
    threading.Thread(target=_background, args=(store, name), name="reaper", daemon=True).start()


@signals.worker_shutdown.connect
def _on_worker_shutdown(sender=None, **kwargs) -> None:
    _stop.set()
    try:
        store = JobStore(redis_client(settings.redis_url, settings.redis_timeout_s), settings.redis_prefix)
        store.unregister_worker(getattr(sender, "hostname", ""))
    except Exception:
        pass


@signals.worker_process_init.connect
def _on_process_init(**kwargs) -> None:
    """In each pool child, after fork: torch threads (torch itself is imported lazily)."""
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
