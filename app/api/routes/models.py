"""/models: the checkpoints in the store."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Annotated, BinaryIO

from fastapi import APIRouter, HTTPException, Path, Query, Response, status
from fastapi.responses import StreamingResponse

from app.api.deps import AliasesDep, CheckpointsDep, ExportsDep, JobStoreDep, RegistryDep
from app.figures import PNG, confusion_png, run_bounded
from app.schemas import AliasPublic, ModelPublic, ModelsPublic, error_responses
from core.jobs import JobStore
from models_store.aliases import ALIAS_PATTERN, model_name, validate_alias
from models_store.checkpoint import (
    MODEL_ID_PATTERN,
    CheckpointError,
    CheckpointInfo,
    CheckpointInvalid,
    ModelNotFound,
    validate_model_id,
)
from models_store.export import ExportFormat, export_onnx, safetensors_zip
from tasks import TaskName

router = APIRouter(prefix="/models", tags=["models"])

ModelId = Annotated[
    str, Path(max_length=128, pattern=MODEL_ID_PATTERN, description="Model id, as listed by GET /models.")
]
AliasName = Annotated[
    str,
    Path(
        max_length=64,
        pattern=ALIAS_PATTERN,
        description="Alias: 1-64 characters of a-z, 0-9, '_' and '-', starting with a letter.",
        examples=["production"],
    ),
]


def model_public(info: CheckpointInfo, aliases: list[str]) -> ModelPublic:
    """The checkpoint (``ModelPublic`` validates from it) with its aliases, which live in Redis."""
    return ModelPublic.model_validate(info).model_copy(update={"aliases": aliases})


@router.get("", response_model=ModelsPublic, summary="List checkpoints, newest first")
def list_models(
    checkpoints: CheckpointsDep,
    alias_store: AliasesDep,
    task: Annotated[TaskName | None, Query(description="Only models of this task.")] = None,
    valid: Annotated[bool | None, Query(description="Only valid (true) or invalid (false) ones.")] = None,
    offset: Annotated[int, Query(ge=0, le=1_000_000, description="Models to skip.")] = 0,
    limit: Annotated[int, Query(ge=1, le=200, description="Page size.")] = 50,
) -> dict:
    """Every checkpoint, including ones that fail verification (`valid: false` with the reason)."""
    infos = [
        i
        for i in checkpoints.list()
        if (task is None or i.task == task) and (valid is None or i.valid == valid)
    ]
    page = infos[offset : offset + limit]
    aliases = alias_store.aliases_of_many([i.model_id for i in page])
    return {"data": [model_public(i, aliases[i.model_id]) for i in page], "count": len(infos)}


@router.get(
    "/{model_id}",
    response_model=ModelPublic,
    summary="Read one checkpoint",
    responses=error_responses(
        _404=("No such model.", "no model with id 'mnist_lenet5-20261129-161500-5f2c1e0b'")
    ),
)
def get_model(model_id: ModelId, checkpoints: CheckpointsDep, alias_store: AliasesDep) -> ModelPublic:
    info = checkpoints.get(model_id)
    return model_public(info, alias_store.aliases_of_many([model_id])[model_id])


@router.put(
    "/{model_id}/aliases/{alias}",
    response_model=AliasPublic,
    summary="Point an alias of the model's name at this model",
    responses=error_responses(
        _404="No such model.",
        _409="The model failed verification, or has no task.",
    ),
)
def set_alias(
    model_id: ModelId, alias: AliasName, checkpoints: CheckpointsDep, alias_store: AliasesDep
) -> AliasPublic:
    """Sets `alias` (e.g. `production`) on this model, moving it from any other model of the same
    name (the task, or the dataset of a custom model). `/predict` with `task` and `alias` then
    answers with this model; with `task` alone it uses `production` when set."""
    validate_alias(alias)
    info = checkpoints.get(model_id)
    if not info.valid:
        raise CheckpointInvalid(
            f"model {model_id} failed verification, so it cannot carry an alias: {info.error}"
        )
    name = model_name(info.metadata)
    if name is None:
        raise CheckpointInvalid(f"model {model_id} has no task in its metadata")
    previous = alias_store.set(name, alias, model_id)
    return AliasPublic(name=name, alias=alias, model_id=model_id, previous_model_id=previous)


@router.delete(
    "/{model_id}/aliases/{alias}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Remove an alias from the model",
    responses=error_responses(_404="The model does not carry this alias."),
)
def delete_alias(model_id: ModelId, alias: AliasName, alias_store: AliasesDep) -> Response:
    """Works also for a model deleted outside the API (its alias would otherwise dangle)."""
    validate_model_id(model_id)
    if alias_store.delete(model_id, alias) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"model {model_id} does not carry the alias {alias!r}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.delete(
    "/{model_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Delete a checkpoint",
    responses=error_responses(
        _404="No such model.",
        _409="The model carries aliases, or queued or running jobs start from its weights "
        "(pass force=true to delete it anyway).",
    ),
)
def delete_model(
    model_id: ModelId,
    checkpoints: CheckpointsDep,
    registry: RegistryDep,
    alias_store: AliasesDep,
    exports: ExportsDep,
    jobs: JobStoreDep,
    force: Annotated[
        bool,
        Query(
            description="Delete even if it carries aliases (they go too) or jobs start from it (they fail)."
        ),
    ] = False,
) -> Response:
    """Removes the weights, metadata.json and cached exports. Predictions already running with the
    model finish with it; later ones cannot find it."""
    validate_model_id(model_id)
    users = [] if force else jobs_starting_from(jobs, model_id)
    if users:
        ids = ", ".join(users)
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"queued or running job(s) {ids} start from model {model_id} (weights model:{model_id}): "
            "cancel them or wait until they end, or delete with force=true (they then fail)",
        )
    aliases = alias_store.aliases_of(model_id)
    try:
        checkpoints.get(model_id)
    except ModelNotFound:
        if not aliases:  # a model deleted outside the API may still carry aliases: clean them up
            raise
    if aliases and not force:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"model {model_id} carries the alias(es) {', '.join(aliases)}: move or remove them first, "
            "or delete with force=true to remove them too",
        )
    if aliases:
        alias_store.remove_model(model_id)
    checkpoints.delete(model_id)
    registry.evict(model_id)
    exports.remove(model_id)
    alias_store.remove_model(model_id)  # an alias set while it was being deleted
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def jobs_starting_from(jobs: JobStore, model_id: str) -> list[str]:
    """Ids of the queued or running jobs whose initial weights are this model (``weights:
    model:<id>``), oldest first."""
    weights = f"model:{model_id}"
    every, _ = jobs.list(limit=1_000_000)  # one pass over the index, newest first
    active = [job for job in every if job.status in ("queued", "running")]
    return [job.id for job in reversed(active) if job.hyperparameters.get("weights") == weights]


MEDIA_TYPES = {"onnx": "application/octet-stream", "safetensors": "application/zip"}


@router.get(
    "/{model_id}/export",
    response_class=StreamingResponse,
    summary="Download the model as ONNX, or as a zip of its safetensors weights and metadata.json",
    responses={
        200: {"content": {"application/octet-stream": {}, "application/zip": {}}, "description": "The file."}
    }
    | error_responses(
        _404="No such model.",
        _409="The checkpoint failed verification.",
    ),
)
def export_model(
    model_id: ModelId,
    checkpoints: CheckpointsDep,
    registry: RegistryDep,
    exports: ExportsDep,
    format: Annotated[ExportFormat, Query(description="`onnx` or `safetensors` (a zip).")] = "onnx",
) -> StreamingResponse:
    """ONNX: input `input` float32 (N, C, H, W), the normalised image batch (N dynamic); output
    `logits` (N, K). Its `metadata_props` hold the preprocessing (mode, resize, crop, input_size,
    mean, std) and the class names. Built on the first request (seconds for ResNet18), then cached."""
    info = checkpoints.get(model_id)
    if not info.valid:
        raise CheckpointInvalid(f"model {model_id} failed verification: {info.error}")
    meta = info.metadata
    sha256 = meta["weights"]["sha256"]

    def build(path) -> None:
        if format == "safetensors":
            safetensors_zip(info.path, meta, path)
            return
        loaded = registry.get(info)
        proto = export_onnx(loaded.model, loaded.preset, loaded.classes, meta)
        path.write_bytes(proto.SerializeToString())

    try:
        path = exports.get_or_build(model_id, sha256, format, build)
        file = path.open("rb")  # held open: a DELETE from now on no longer affects this download
    except (OSError, CheckpointError):
        if not checkpoints.exists(model_id):
            raise ModelNotFound(f"model {model_id} was deleted while it was being exported") from None
        raise
    if not checkpoints.exists(model_id):  # deleted while its (cached) export was being built
        file.close()
        exports.remove(model_id)
        raise ModelNotFound(f"model {model_id} was deleted while it was being exported")
    suffix = "onnx" if format == "onnx" else "zip"
    return StreamingResponse(
        iter_and_close(file),
        media_type=MEDIA_TYPES[format],
        headers={
            "Content-Length": str(os.fstat(file.fileno()).st_size),
            "Content-Disposition": f'attachment; filename="{model_id}.{suffix}"',
        },
    )


def iter_and_close(file: BinaryIO, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    """The file's bytes in chunks of ``chunk_bytes``; closes it at the end (or when the client
    goes away)."""
    with file:
        while chunk := file.read(chunk_bytes):
            yield chunk


@router.get(
    "/{model_id}/confusion.png",
    response_class=Response,
    summary="Confusion matrix of a checkpoint on its evaluation split (PNG)",
    responses=PNG
    | error_responses(_404="No such model, or it has no stored evaluation.")
    | {422: {"description": "Not a valid model id."}},
)
async def model_confusion(model_id: ModelId, checkpoints: CheckpointsDep) -> Response:
    """Rows = true class, columns = predicted, counts in the cells; 800 x 700 pixels."""
    evaluation = ModelPublic.model_validate(await run_bounded(checkpoints.get, model_id)).evaluation
    if evaluation is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"model {model_id} has no stored evaluation")
    title = f"{model_id}: {evaluation.split} accuracy {evaluation.accuracy:.2%}"
    data = await run_bounded(confusion_png, evaluation.confusion_matrix, evaluation.classes, title)
    return Response(data, media_type="image/png", headers={"Cache-Control": "max-age=60"})
