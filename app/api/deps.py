"""Reusable dependencies as ``Annotated`` aliases; the objects live on ``app.state`` (see lifespan)."""

from __future__ import annotations

from typing import Annotated

from celery import Celery
from fastapi import Depends, Request

from app.inference import ModelRegistry
from app.schemas import error_responses
from app.security import require_api_key
from core.config import Settings
from core.datasets import DatasetStore
from core.jobs import JobStore
from models_store.aliases import AliasStore
from models_store.checkpoint import CheckpointStore
from models_store.export import ExportCache

# The route settings of everything behind the API key: the protected router (app/api/main.py) and
# /metrics, which sits with the open probes.
API_KEY_REQUIRED = {
    "dependencies": [Depends(require_api_key)],
    "responses": error_responses(_401="Missing or wrong API key (when the server has API_KEYS)."),
}


async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


async def get_jobs(request: Request) -> JobStore:
    return request.app.state.jobs


async def get_checkpoints(request: Request) -> CheckpointStore:
    return request.app.state.checkpoints


async def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


async def get_celery(request: Request) -> Celery:
    return request.app.state.celery


async def get_datasets(request: Request) -> DatasetStore:
    return request.app.state.datasets


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
JobStoreDep = Annotated[JobStore, Depends(get_jobs)]
CheckpointsDep = Annotated[CheckpointStore, Depends(get_checkpoints)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
CeleryDep = Annotated[Celery, Depends(get_celery)]
DatasetStoreDep = Annotated[DatasetStore, Depends(get_datasets)]


async def get_aliases(request: Request) -> AliasStore:
    return request.app.state.aliases


async def get_exports(request: Request) -> ExportCache:
    return request.app.state.exports


AliasesDep = Annotated[AliasStore, Depends(get_aliases)]
ExportsDep = Annotated[ExportCache, Depends(get_exports)]
