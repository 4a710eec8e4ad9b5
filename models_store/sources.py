"""Checkpoints used as the starting point of another job (``weights: model:<id>``)."""

from __future__ import annotations

from models_store.checkpoint import CheckpointError, CheckpointStore
from tasks import tasks_of_architecture

RESNET18_TASKS = tasks_of_architecture("resnet18")


def resnet18_source_problem(checkpoints: CheckpointStore, model_id: str) -> str | None:
    """None if ``model_id`` is a valid ResNet18 checkpoint in ``checkpoints``, else why not (a
    sentence for a 422 or a failed job): unknown or malformed id, failed verification, another
    architecture."""
    try:
        info = checkpoints.get(model_id)
    except CheckpointError as exc:
        return f"weights model:{model_id}: {exc}"
    if not info.valid:
        return f"weights model:{model_id}: the checkpoint failed verification: {info.error}"
    if info.task not in RESNET18_TASKS:
        return f"weights model:{model_id} is a {info.task} model, not ResNet18 ({', '.join(RESNET18_TASKS)})"
    return None
