"""All routers: probes open, everything else behind the API key."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from app.api.routes import datasets, health, jobs, models, predict, ui
from app.job_metrics import metrics_payload
from app.schemas import error_responses
from app.security import require_api_key

protected = APIRouter(
    dependencies=[Depends(require_api_key)],
    responses=error_responses(_401="Missing or wrong API key (when the server has API_KEYS)."),
)
# FastAPI tries routes in the order they were added, twice per request (its router and then the
# included one), at a few microseconds per route: /predict, the hot path, is tried first. The
# documentation's order is set by TAGS (app/openapi.py), not by this one.
protected.include_router(predict.router)
protected.include_router(jobs.router)
protected.include_router(models.router)
protected.include_router(datasets.router)


@protected.get("/metrics", tags=["health"], summary="Prometheus metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """HTTP requests, latency and inference time (of every API process with
    PROMETHEUS_MULTIPROC_DIR), and the jobs read from Redis: by status, queue depth, live
    workers, throughput, job and epoch durations."""
    body, media_type = metrics_payload(request.app.state.jobs_registry)
    return Response(body, media_type=media_type)


api_router = APIRouter()
api_router.include_router(protected)
api_router.include_router(health.router)
api_router.include_router(ui.router)  # the console's pages load without a key
