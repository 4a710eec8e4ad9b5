"""/jobs: submit, list, read and cancel training jobs."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Header, HTTPException, Path, Query, Request, Response, status
from sse_starlette import EventSourceResponse

from app.api.deps import CeleryDep, CheckpointsDep, DatasetStoreDep, JobStoreDep
from app.events import job_events
from app.figures import PNG, curves_png, run_bounded
from app.schemas import JOB_CREATE_EXAMPLES, JobCreate, JobPublic, JobsPublic, error_responses
from app.security import key_owner
from core.datasets import AttachOutcome, DatasetStatus
from core.jobs import JOB_ID_PATTERN, CancelOutcome, IdempotencyConflict, JobRecord, JobStatus, request_hash
from core.queue import enqueue_training
from models_store.sources import resnet18_source_problem
from tasks import TaskName, get_task

log = logging.getLogger(__name__)

router = APIRouter(prefix="/jobs", tags=["jobs"])


async def require_json(request: Request) -> None:
    """415 unless the body is declared JSON (FastAPI would otherwise treat it as raw bytes)."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            f"send the job as JSON with Content-Type: application/json (got {media_type or 'none'!r})",
        )


JobId = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="Job id (32 hex digits).")]


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobPublic,
    summary="Submit a training job",
    dependencies=[Depends(require_json)],
    responses={
        202: {
            "description": "Queued (or, with a repeated Idempotency-Key, the job already created).",
            "headers": {
                "Location": {
                    "description": "Where to poll the job: `/jobs/{id}`.",
                    "schema": {"type": "string", "examples": ["/jobs/5f2c1e0b9a7d4c3e8f1a2b3c4d5e6f70"]},
                },
                "Idempotent-Replayed": {
                    "description": "`true` when a repeated Idempotency-Key returned the job it created "
                    "before (absent otherwise).",
                    "schema": {"type": "string", "enum": ["true"]},
                },
            },
        },
        **error_responses(
            _400=(
                "The body is not decodable as JSON (invalid UTF-8, nesting too deep, huge integer).",
                "the request body is not valid JSON (UnicodeDecodeError: 'utf-8' codec can't decode "
                "byte 0xff)",
            ),
            _409=(
                "Idempotency-Key reused with a different body.",
                "this Idempotency-Key was already used with a different request body",
            ),
            _413="Body over 1 MiB.",
            _415="Body is not application/json.",
            _503="Redis (the queue) is unreachable; nothing was enqueued.",
            _422=(
                "Unknown task, unknown field, or a value out of bounds (FastAPI's list, naming the "
                "field); or a reference that does not resolve (a sentence): an unknown or unready "
                "dataset, `model:` weights that are not a valid ResNet18 checkpoint.",
                "dataset 3b0c9f1e5d2a4c6b8e7f9a1b2c3d4e5f is ingesting, not ready: wait for "
                "GET /datasets/3b0c9f1e5d2a4c6b8e7f9a1b2c3d4e5f to say ready",
            ),
        ),
    },
)
def create_job(
    job: Annotated[JobCreate, Body(openapi_examples=JOB_CREATE_EXAMPLES)],
    jobs: JobStoreDep,
    celery: CeleryDep,
    datasets: DatasetStoreDep,
    checkpoints: CheckpointsDep,
    request: Request,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(
            max_length=255,
            description="Optional: repeating a request with the same key and body returns the same job "
            "(keys are scoped to the API key: clients never see each other's jobs through them).",
        ),
    ] = None,
) -> JobRecord:
    """Validate and enqueue a job; a worker picks it up. Poll `GET /jobs/{id}` for progress."""
    payload = job.model_dump(mode="json")
    dataset = getattr(job, "dataset", None)
    _check_references(job, dataset, datasets, checkpoints)
    owner = key_owner(request.headers.get("authorization")) if request.app.state.settings.api_keys else ""
    try:
        record, created = jobs.create(
            job.task, payload["hyperparameters"], idempotency_key, request_hash(payload), owner, dataset
        )
    except IdempotencyConflict as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    if created and dataset:  # atomically: the dataset is still there and ready, and now in use
        attached = datasets.attach_job(dataset, record.id)
        if attached.outcome != AttachOutcome.ok:
            jobs.delete(record.id, idempotency_key, owner)
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT, _dataset_unusable(dataset, attached.status)
            )
    if created:
        try:
            enqueue_training(celery, record.id)
        except Exception:
            jobs.delete(record.id, idempotency_key, owner)
            raise
    else:
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/jobs/{record.id}"
    return record


def _check_references(job, dataset: str | None, datasets, checkpoints) -> None:
    """422 before anything is stored: an unknown or unready dataset, or a ``model:<id>`` initial
    weights that is not a valid ResNet18 checkpoint."""
    if dataset is not None:
        record = datasets.get(dataset)
        if record is None or record.status != DatasetStatus.ready:
            current = None if record is None else record.status
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, _dataset_unusable(dataset, current))
    source = getattr(job.hyperparameters, "source_model", None)
    if source is not None:
        problem = resnet18_source_problem(checkpoints, source)
        if problem:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, problem)


def _dataset_unusable(dataset: str, dataset_status: DatasetStatus | None) -> str:
    """The 422 message for a dataset that is missing (``dataset_status`` None) or not ready."""
    if dataset_status is None:
        return f"no dataset with id {dataset}: upload it with POST /datasets"
    if dataset_status == DatasetStatus.failed:
        return (
            f"dataset {dataset} is failed, not ready: GET /datasets/{dataset} says why; upload a fixed "
            "archive with POST /datasets"
        )
    return f"dataset {dataset} is {dataset_status}, not ready: wait for GET /datasets/{dataset} to say ready"


@router.get(
    "",
    response_model=JobsPublic,
    summary="List jobs, newest first",
    responses=error_responses(_503="Redis is unreachable."),
)
def list_jobs(
    jobs: JobStoreDep,
    offset: Annotated[int, Query(ge=0, le=1_000_000, description="Jobs to skip.")] = 0,
    limit: Annotated[int, Query(ge=1, le=200, description="Page size.")] = 20,
    status_filter: Annotated[JobStatus | None, Query(alias="status", description="Only this status.")] = None,
    task: Annotated[TaskName | None, Query(description="Only this task.")] = None,
) -> dict:
    records, total = jobs.list(offset, limit, status_filter, task)
    return {"data": records, "count": total}


@router.get(
    "/{job_id}",
    response_model=JobPublic,
    summary="Read a job: status, progress, metrics",
    responses=error_responses(
        _404="No such job.", _500="The job's stored record is unreadable.", _503="Redis is unreachable."
    ),
)
def get_job(job_id: JobId, jobs: JobStoreDep) -> JobRecord:
    record = jobs.get(job_id)
    if record is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job with id {job_id}")
    return record


@router.post(
    "/{job_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobPublic,
    summary="Cancel a job",
    responses=error_responses(
        _404="No such job.",
        _409="The job already ended.",
        _500=(
            "The job's stored record is unreadable.",
            "Redis at redis://127.0.0.1:6379/0 refused a command (WRONGTYPE Operation against a key "
            "holding the wrong kind of value); the job data may be damaged",
        ),
        _503="Redis is unreachable.",
    ),
)
def cancel_job(job_id: JobId, jobs: JobStoreDep) -> JobRecord:
    """A queued job is cancelled at once and never starts; a running one stops at its next
    batch boundary and ends `cancelled` (`cancel_requested` is true meanwhile)."""
    result = jobs.request_cancel(job_id)
    if result.outcome == CancelOutcome.missing:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job with id {job_id}")
    if result.outcome == CancelOutcome.ended:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} already ended: {result.status}")
    return jobs.get(job_id)


EVENTS_PING_S = 15
EVENTS_SEND_TIMEOUT_S = 30


@router.get(
    "/{job_id}/events",
    summary="Live events of a job (Server-Sent Events)",
    response_class=EventSourceResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": (
                "`text/event-stream`. Events: `progress` (the job's progress object, at most ~4/s), "
                "`epoch` (one per-epoch metrics object, as in the job's `metrics`), `status` "
                '(`{"status", "error", "model_id"}` on every status change). Each carries an `id`; '
                "the stream ends after the final status. Keep-alive comment every 15 s."
            ),
        },
        **error_responses(_404="No such job.", _503="Redis is unreachable."),
        422: {"description": "Malformed Last-Event-ID."},
    },
)
async def job_events_stream(
    job_id: JobId,
    request: Request,
    last_event_id: Annotated[
        str | None,
        Header(
            max_length=64,
            # <ms>-<seq>, each part an unsigned 64-bit number for Redis: 19 digits always fit
            # (20 may not, and Redis would refuse the id); $ is the end of the text in pydantic-core
            pattern=r"^\s*\d{1,19}-\d{1,19}\s*$",
            description="Resume: only the events after this id (as sent by EventSource on reconnect), "
            "e.g. 1764464000123-0.",
        ),
    ] = None,
) -> EventSourceResponse:
    """The job's history from the start (or after `Last-Event-ID`), then its live events.

    A finished job replays its whole history and the stream closes; a reconnecting client gets
    exactly the events after the last one it saw.
    """
    store = request.app.state.jobs
    client = request.app.state.redis_async
    if not await client.exists(store.job_key(job_id)):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job with id {job_id}")
    events = job_events(
        client,
        request.app.state.event_hub,
        store.job_key(job_id),
        store.events_key(job_id),
        last_event_id and last_event_id.strip(),
    )
    return EventSourceResponse(
        events,
        ping=EVENTS_PING_S,
        send_timeout=EVENTS_SEND_TIMEOUT_S,
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


@router.get(
    "/{job_id}/curves.png",
    response_class=Response,
    summary="Training curves of a job (PNG)",
    responses=PNG | error_responses(_404="No such job.", _503="Redis is unreachable."),
)
async def job_curves(job_id: JobId, jobs: JobStoreDep) -> Response:
    """Two panels, 1200 x 450 pixels: training loss per epoch, and train and test (val for
    hymenoptera) accuracy per epoch. Drawn from the job's metrics, so it works while the job runs
    (epochs finished so far)."""
    record = await run_bounded(jobs.get, job_id)
    if record is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job with id {job_id}")
    metrics = [m.model_dump() for m in record.metrics]
    title = f"{record.task} job {job_id[:8]} ({record.status})"
    data = await run_bounded(curves_png, metrics, get_task(record.task).eval_split, title)
    return Response(data, media_type="image/png", headers={"Cache-Control": "no-store"})
