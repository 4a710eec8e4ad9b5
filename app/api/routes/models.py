"""/models: the checkpoints in the store."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from app.api.deps import CheckpointsDep
from app.schemas import ModelPublic, ModelsPublic, error_responses
from models_store.checkpoint import MODEL_ID_PATTERN, CheckpointInfo
from tasks import TaskName

router = APIRouter(prefix="/models", tags=["models"])

ModelId = Annotated[
    str, Path(max_length=128, pattern=MODEL_ID_PATTERN, description="Model id, as listed by GET /models.")
]


def model_public(info: CheckpointInfo) -> ModelPublic:
    meta = info.metadata
    return ModelPublic(
        id=info.model_id,
        task=meta.get("task"),
        valid=info.valid,
        error=info.error,
        created_at=meta.get("created_at"),
        size_bytes=info.size_bytes,
        classes=meta.get("classes") or [],
        metrics=meta.get("metrics") or {},
        hyperparameters=meta.get("hyperparameters") or {},
        job_id=meta.get("job_id"),
        device=meta.get("device"),
        pretrained=meta.get("pretrained"),
        sha256=(meta.get("weights") or {}).get("sha256"),
    )


@router.get("", response_model=ModelsPublic, summary="List checkpoints, newest first")
def list_models(
    checkpoints: CheckpointsDep,
    task: Annotated[TaskName | None, Query(description="Only models of this task.")] = None,
    valid: Annotated[bool | None, Query(description="Only valid (true) or invalid (false) ones.")] = None,
    offset: Annotated[int, Query(ge=0, le=1_000_000, description="Models to skip.")] = 0,
    limit: Annotated[int, Query(ge=1, le=200, description="Page size.")] = 50,
) -> ModelsPublic:
    """Every checkpoint, including ones that fail verification (`valid: false` with the reason)."""
    infos = [
        i
        for i in checkpoints.list()
        if (task is None or i.task == task) and (valid is None or i.valid == valid)
    ]
    return ModelsPublic(data=[model_public(i) for i in infos[offset : offset + limit]], count=len(infos))


@router.get(
    "/{model_id}",
    response_model=ModelPublic,
    summary="Read one checkpoint",
    responses=error_responses(
        _404=("No such model.", "no model with id 'mnist_lenet5-20261129-161500-5f2c1e0b'")
    ),
)
def get_model(model_id: ModelId, checkpoints: CheckpointsDep) -> ModelPublic:
    return model_public(checkpoints.get(model_id))
