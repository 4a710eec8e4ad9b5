"""Celery tasks: thin wrappers that pass a job id to a plain function."""

from __future__ import annotations

from core.queue import INGEST_TASK, TRAIN_TASK
from worker.celery_app import app, settings


@app.task(name=TRAIN_TASK, bind=True)
def train(self, job_id: str) -> str:
    """Train job ``job_id`` (see ``worker.runner.run_job``); returns its outcome."""
    from worker.runner import run_job  # imports torch in the pool child, after fork

    return run_job(job_id, settings, worker_name=self.request.hostname or "worker")


@app.task(name=INGEST_TASK)
def ingest(dataset_id: str) -> str:
    """Check, decode and cache uploaded dataset ``dataset_id`` (see ``worker.ingest``)."""
    from worker.ingest import ingest_dataset  # imports torch in the pool child, after fork

    return ingest_dataset(dataset_id, settings)
