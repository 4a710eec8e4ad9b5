"""Run one job end to end: take its lease, train, save the checkpoint, record the outcome.

``run_job`` is what the Celery task calls; it is a plain function of a job id and settings.
"""

from __future__ import annotations

import logging
import platform
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import torch
import torchvision

from core.config import Settings
from core.jobs import (
    TERMINAL_STATUSES,
    FinishOutcome,
    JobRecord,
    JobStatus,
    JobStore,
    StartOutcome,
    redis_client,
)
from models_store.checkpoint import CheckpointStore
from tasks import get_task
from worker.resume import ResumeStore
from worker.training import StopTraining, TrainingContext, TrainingResult, run_training

log = logging.getLogger(__name__)

CANCELLED = "cancelled"
PROGRESS_EVENT_INTERVAL_S = 0.2  # progress is reported every 0.25 s; events at most 5/s, about 4/s
LEASE_LOST = "lease lost"


def select_device(choice: str) -> torch.device:
    """``auto``: CUDA when available, else CPU. Raises ``RuntimeError`` for ``cuda`` without one."""
    if choice == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if choice == "cuda":
        raise RuntimeError("DEVICE=cuda but torch sees no CUDA device")
    return torch.device("cpu")


class JobLease:
    """This worker's hold on one running job: every write it makes to the record is fenced by the
    lease token (``JobStore`` refuses writes from a worker that lost the lease).

    Args:
        store: the job store.
        job_id: the job.
        token: the lease token this worker took with ``JobStore.start``.
        ttl_s: lease time to live, seconds (JOB_LEASE_TTL_S).
    """

    def __init__(self, store: JobStore, job_id: str, token: str, ttl_s: float):
        self.store, self.job_id, self.token, self.ttl_s = store, job_id, token, ttl_s

    def renew(self) -> bool:
        """Extend the lease; False once this worker no longer holds it."""
        return self.store.renew_lease(self.job_id, self.token, self.ttl_s)

    def update(self, progress_event: bool = False, **fields: object) -> bool:
        """Write fields of the running job; False (nothing written) without the lease."""
        return self.store.update(self.job_id, self.token, progress_event=progress_event, **fields)

    def cancel_requested(self) -> bool:
        return self.store.is_cancel_requested(self.job_id)

    def finish(self, status: JobStatus, unless_cancelled: bool = False, **fields: object) -> FinishOutcome:
        """Record the final status (see ``JobStore.finish``), retrying for up to a minute while
        Redis is unreachable; returns the store's outcome, or ``unrecorded``."""
        deadline = time.monotonic() + 60
        while True:
            try:
                return self.store.finish(
                    self.job_id, self.token, status, unless_cancel_requested=unless_cancelled, **fields
                )
            except Exception as exc:
                if time.monotonic() > deadline:
                    log.error("job %s: could not record final status %s: %s", self.job_id, status, exc)
                    return FinishOutcome.unrecorded
                log.warning("job %s: Redis unreachable, retrying final status: %s", self.job_id, exc)
                time.sleep(2)


class LeaseHeartbeat:
    """Renews a job's lease every third of its TTL from a daemon thread; ``lost`` once it fails."""

    def __init__(self, lease: JobLease):
        self.lease = lease
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{lease.job_id[:8]}", daemon=True)

    def __enter__(self) -> LeaseHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        job_id = self.lease.job_id
        while not self._stop.wait(self.lease.ttl_s / 3):
            try:
                if not self.lease.renew():
                    if not self._stop.is_set():  # not just released by finishing the job
                        log.error("job %s: lease lost; stopping at the next batch", job_id)
                        self.lost = True
                    return
            except Exception as exc:  # Redis briefly unreachable: keep trying until the TTL runs out
                log.warning("job %s: could not renew lease: %s", job_id, exc)


def run_job(job_id: str, settings: Settings, worker_name: str) -> str:
    """Run job ``job_id`` if it is queued (or orphaned) and not held by another worker.

    Returns the outcome: ``succeeded``, ``failed``, ``cancelled``, or why it did not run
    (``missing``, ``leased``, a final status). Never raises for a training error: it is recorded
    on the job.
    """
    store = JobStore(redis_client(settings.redis_url, settings.redis_timeout_s), settings.redis_prefix)
    token = uuid.uuid4().hex
    try:
        device = select_device(settings.device)
    except RuntimeError as exc:
        device, device_error = torch.device("cpu"), str(exc)
    else:
        device_error = None
    start = store.start(
        job_id, token, settings.job_lease_ttl_s, worker_name, str(device), settings.max_attempts
    )
    if start.outcome != StartOutcome.started:
        log.info("job %s not run: %s", job_id, start.outcome)
        if start.outcome in TERMINAL_STATUSES:  # e.g. failed after MAX_ATTEMPTS: it will never resume
            ResumeStore(settings.resume_dir(job_id)).clear()
        return start.outcome.value
    record = store.get(job_id)
    log.info("job %s (%s) started on %s, attempt %d", job_id, record.task, device, start.attempts)
    lease = JobLease(store, job_id, token, settings.job_lease_ttl_s)
    if device_error:
        lease.finish(JobStatus.failed, error=device_error)
        return JobStatus.failed.value
    resume = ResumeStore(settings.resume_dir(job_id))
    checkpoints = CheckpointStore(settings.models_dir)
    with LeaseHeartbeat(lease) as heartbeat:
        ctx, latest = _context(settings, lease, device, resume, heartbeat)
        ctx.dataset = record.dataset
        started = time.perf_counter()
        try:
            _check_models_dir(checkpoints)
            result = run_training(record.task, record.hyperparameters, ctx)
            ctx.check_stop(force=True)
            checkpoint_start = time.perf_counter()
            model_id = save_checkpoint(checkpoints, record, result, device, ctx)
            ctx.add_time("checkpoint_s", time.perf_counter() - checkpoint_start)
        except StopTraining as stop:
            if stop.reason == LEASE_LOST:  # another worker owns the job now, and its resume state
                return StartOutcome.leased.value
            outcome = _end(lease, JobStatus.cancelled, ctx, started, latest)
        except Exception as exc:
            log.exception("job %s failed", job_id)
            error = _describe_error(exc)
            outcome = _end(lease, JobStatus.failed, ctx, started, latest, error=error)
        else:
            outcome = _end(lease, JobStatus.succeeded, ctx, started, latest, model_id=model_id)
            if outcome != JobStatus.succeeded:  # cancelled while the checkpoint was being written
                checkpoints.delete(model_id)
        resume.clear()
        _release_device_memory(device)
    log.info("job %s ended %s", job_id, outcome)
    return outcome


def _end(
    lease: JobLease,
    status: JobStatus,
    ctx: TrainingContext,
    started: float,
    latest: dict[str, object],
    **fields: object,
) -> str:
    """Record the job's final status; a success becomes ``cancelled`` if a cancel arrived first.

    The final write repeats the latest progress and metrics (``latest``), so that a record whose
    per-epoch writes were lost while Redis was unreachable still ends complete.
    """
    ctx.add_time("total_s", time.perf_counter() - started)
    fields = {**latest, **fields, "timings": ctx.timings}
    if status == JobStatus.succeeded:
        if lease.finish(status, unless_cancelled=True, **fields) != FinishOutcome.cancel_requested:
            return status.value
        fields.pop("model_id")
        status = JobStatus.cancelled
    lease.finish(status, **fields)
    return status.value


def model_id_for(record: JobRecord) -> str:
    """Deterministic per job, so a job re-run after a crash finds its own checkpoint."""
    return f"{record.task}-{record.created_at:%Y%m%d-%H%M%S}-{record.id[:8]}"


def save_checkpoint(
    checkpoints: CheckpointStore,
    record: JobRecord,
    result: TrainingResult,
    device: torch.device,
    ctx: TrainingContext,
) -> str:
    """Write the job's checkpoint (atomically) and return its model id.

    If a previous attempt of the same job already wrote it, that checkpoint is kept.
    Raises ``OSError`` when the store cannot be written (nothing is left half-written).
    """
    model_id = model_id_for(record)
    try:
        existing = checkpoints.get(model_id)
    except Exception:
        existing = None
    if existing is not None and existing.valid and existing.metadata.get("job_id") == record.id:
        return model_id
    final = result.metrics[-1] if result.metrics else None
    metadata = {
        "task": record.task,
        "job_id": record.id,
        "created_at": datetime.now(UTC).isoformat(),
        "classes": result.classes,
        "preset": get_task(record.task).preset.to_dict(),
        "architecture": result.architecture,
        "hyperparameters": record.hyperparameters,
        "metrics": {
            "final": final.model_dump() if final else {},
            "epochs": [m.model_dump() for m in result.metrics],
        },
        "device": str(device),
        "timings": ctx.timings,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
        },
        **result.extra_metadata,
    }
    if result.evaluation is not None:
        metadata["evaluation"] = result.evaluation
    try:
        checkpoints.save(model_id, result.tensors, metadata)
    except OSError as exc:
        raise _unwritable(checkpoints, exc) from exc
    return model_id


def _check_models_dir(checkpoints: CheckpointStore) -> None:
    """Fail the job before training if MODELS_DIR cannot be written. Raises ``OSError``."""
    try:
        checkpoints.check_writable()
    except OSError as exc:
        raise _unwritable(checkpoints, exc) from exc


def _unwritable(checkpoints: CheckpointStore, exc: OSError) -> OSError:
    return OSError(exc.errno, f"could not write checkpoint to {checkpoints.root}: {exc.strerror or exc}")


def _context(
    settings: Settings,
    lease: JobLease,
    device: torch.device,
    resume: ResumeStore,
    heartbeat: LeaseHeartbeat,
) -> tuple[TrainingContext, dict[str, object]]:
    """The job's training context, and the dict of the latest fields it wrote to the record."""

    def should_stop() -> str | None:
        if heartbeat.lost:
            return LEASE_LOST
        try:
            return CANCELLED if lease.cancel_requested() else None
        except Exception as exc:
            log.warning("job %s: cannot check for cancel: %s", lease.job_id, exc)
            return None

    ctx = TrainingContext(
        device=device,
        data_dir=settings.data_dir,
        cache_dir=settings.cache_dir,
        allow_download=settings.allow_download,
        resnet18_weights=settings.resnet18_weights,
        resnet18_weights_file=settings.resnet18_weights_file,
        datasets_dir=settings.datasets_dir,
        models_dir=settings.models_dir,
        should_stop=should_stop,
        resume=resume,
    )
    latest: dict[str, object] = {}
    ctx.on_progress = _safe(
        lease,
        latest,
        lambda p: {"progress": p, "timings": ctx.timings},
        event_interval_s=PROGRESS_EVENT_INTERVAL_S,
    )
    ctx.on_epoch = _safe(lease, latest, lambda m: {"metrics": [e.model_dump() for e in m]})
    ctx.on_info = _safe(lease, latest, lambda info: info)
    return ctx, latest


def _safe(
    lease: JobLease,
    latest: dict[str, object],
    fields: Callable[[object], dict],
    event_interval_s: float | None = None,
) -> Callable:
    """A job-record writer that never stops training: Redis errors are logged. What it writes
    is also kept in ``latest``, for the final write. With ``event_interval_s``, a progress event
    goes to the job's stream with the write, at most once per that many seconds, and always when
    the progress's ``stage`` changed (a throttled stage change would leave the stream behind
    ``GET /jobs`` for the whole stage: the evaluation after each epoch, for one)."""
    last_event = [-float("inf")]
    last_stage: list[object] = [None]

    def write(value: object) -> None:
        values = fields(value)
        latest.update(values)
        now = time.monotonic()
        stage = _stage(values.get("progress"))
        due = now - last_event[0] >= (event_interval_s or 0) or stage != last_stage[0]
        event = event_interval_s is not None and due
        try:
            if lease.update(progress_event=event, **values) and event:
                last_event[0], last_stage[0] = now, stage
        except Exception as exc:
            log.warning("job %s: could not record progress: %s", lease.job_id, exc)

    return write


def _stage(progress: object) -> object:
    """The ``stage`` of a progress report (a dict or a model), else None."""
    if isinstance(progress, dict):
        return progress.get("stage")
    return getattr(progress, "stage", None)


def _describe_error(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in text:
        return f"out of memory on the training device ({type(exc).__name__}): {text}"
    return f"{type(exc).__name__}: {text}"


def _release_device_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
