"""All routers: probes open, everything else behind the API key."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.routes import datasets, health, jobs, models, predict
from app.schemas import error_responses
from app.security import require_api_key

api_router = APIRouter()
api_router.include_router(health.router)

protected = APIRouter(
    dependencies=[Depends(require_api_key)],
    responses=error_responses(_401="Missing or wrong API key (when the server has API_KEYS)."),
)
protected.include_router(jobs.router)
protected.include_router(models.router)
protected.include_router(predict.router)
protected.include_router(datasets.router)


@protected.get("/metrics", tags=["health"], summary="Prometheus metrics", response_class=Response)
def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


api_router.include_router(protected)
