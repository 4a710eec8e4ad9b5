"""/healthz and /readyz: unauthenticated probes."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.api.deps import JobStoreDep
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
