"""All routers: probes open, everything else behind the API key."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import API_KEY_REQUIRED
from app.api.routes import datasets, health, jobs, models, predict, ui

protected = APIRouter(**API_KEY_REQUIRED)
# FastAPI tries routes in the order they were added, twice per request (its router and then the
# included one), at a few microseconds per route: /predict, the hot path, is tried first. The
# documentation's order is set by TAGS (app/openapi.py), not by this one.
protected.include_router(predict.router)
protected.include_router(jobs.router)
protected.include_router(models.router)
protected.include_router(datasets.router)


api_router = APIRouter()
api_router.include_router(protected)
api_router.include_router(health.router)
api_router.include_router(ui.router)  # the console's pages load without a key
