"""The Celery application's configuration, shared by the producer (API) and the worker.

The API only sends messages (``enqueue_training``) and never imports the worker's task code or
torch; the worker (``worker.celery_app``) adds its tasks and signal handlers to the same config.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from core.config import Settings

TRAIN_TASK = "imgclf.train"
INGEST_TASK = "imgclf.ingest"


def make_celery(settings: Settings) -> Celery:
    """A Celery app on the Redis broker, configured for long GPU jobs.

    acks_late + reject_on_worker_lost: a message is acknowledged only when its job ended, and is
    given back if the process running it dies. prefetch 1 and concurrency 1: a worker holds at
    most one job. A dedicated queue, and no automatic creation of queues (a typo fails loudly).
    """
    app = Celery("imgclf", broker=settings.redis_url, set_as_current=False)
    timeout = settings.redis_timeout_s
    app.conf.update(
        task_queues=[Queue(settings.celery_queue)],
        task_default_queue=settings.celery_queue,
        task_create_missing_queues=False,
        task_routes={
            TRAIN_TASK: {"queue": settings.celery_queue},
            INGEST_TASK: {"queue": settings.celery_queue},
        },
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        task_publish_retry=False,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts_level="INFO",
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=timeout,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "socket_connect_timeout": timeout,
            "socket_timeout": max(timeout, 5.0),
            "global_keyprefix": f"{settings.redis_prefix}:celery:",
            **settings.celery_transport_options,
        },
    )
    return app


def enqueue_training(app: Celery, job_id: str) -> None:
    """Send the training message of ``job_id``; raises ``kombu.exceptions.OperationalError``
    (or another ``Exception``) at once when the broker is unreachable."""
    app.send_task(TRAIN_TASK, args=[job_id], retry=False)


def enqueue_ingest(app: Celery, dataset_id: str) -> None:
    """Send the ingestion message of an uploaded dataset (same queue as training); raises like
    ``enqueue_training`` when the broker is unreachable."""
    app.send_task(INGEST_TASK, args=[dataset_id], retry=False)
