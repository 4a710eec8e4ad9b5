"""/healthz and /readyz: unauthenticated probes; /metrics: Prometheus metrics (behind the API key)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from app.api.deps import API_KEY_REQUIRED, JobStoreDep
from app.job_metrics import metrics_payload
from app.schemas import HealthPublic, ReadyPublic

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthPublic, summary="Liveness: the API process is up")
def healthz() -> HealthPublic:
    return HealthPublic()


@router.get(
    "/readyz",
    response_model=ReadyPublic,
    summary="Readiness: Redis is reachable",
    responses={503: {"model": ReadyPublic, "description": "Redis is unreachable."}},
)
def readyz(jobs: JobStoreDep) -> ReadyPublic | JSONResponse:
    """200 when Redis answers (with the live workers), 503 with the error otherwise."""
    try:
        jobs.ping()
        workers = jobs.workers()
    except Exception as exc:
        body = ReadyPublic(status="unavailable", redis=f"{type(exc).__name__}: {exc}")
        return JSONResponse(body.model_dump(), status_code=503)
    return ReadyPublic(status="ready", redis="ok", workers=workers)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response, **API_KEY_REQUIRED)
def metrics(request: Request) -> Response:
    """HTTP requests, latency and inference time (of every API process with
    PROMETHEUS_MULTIPROC_DIR), and the jobs read from Redis: by status, queue depth, live
    workers, throughput, job and epoch durations."""
    body, media_type = metrics_payload(request.app.state.jobs_registry)
    return Response(body, media_type=media_type)
