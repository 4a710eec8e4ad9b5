"""A real, loadable checkpoint without training (random init), written by the worker's own code."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

import torch

from core.jobs import EpochMetrics, JobRecord, JobStatus
from models_store.checkpoint import CheckpointStore
from tasks import get_task
from worker.runner import save_checkpoint
from worker.training import TrainingContext, TrainingResult

ARCHITECTURES = {
    "mnist_lenet5": ({"num_classes": 10}, [str(d) for d in range(10)]),
    "cifar10_dense": (
        {"input_size": 3072, "hidden_size": 8, "num_classes": 10},
        [f"c{i}" for i in range(10)],
    ),
    "hymenoptera_resnet18": ({"num_classes": 2}, ["ants", "bees"]),
}


def make_model_checkpoint(models_dir: Path, task: str = "mnist_lenet5", seed: int = 0) -> str:
    """Save a randomly initialised model of ``task`` as the worker would; returns its model id."""
    architecture, classes = ARCHITECTURES[task]
    torch.manual_seed(seed)
    model = get_task(task).build_model(architecture)
    if task == "cifar10_dense":
        for name in ("W1", "W2"):
            getattr(model, name).normal_(0, 0.1)
    record = JobRecord(
        id=uuid.uuid4().hex,
        task=task,
        status=JobStatus.running,
        hyperparameters={"epochs": 1},
        created_at=datetime.now(UTC),
    )
    metrics = [
        EpochMetrics(epoch=1, lr=0.1, train_loss=1.0, train_accuracy=0.5, duration_s=1.0, images_per_s=1.0)
    ]
    result = TrainingResult(dict(model.state_dict()), architecture, classes, metrics, train_size=1)
    return save_checkpoint(
        CheckpointStore(models_dir), record, result, torch.device("cpu"), TrainingContext()
    )


def save_training_result(models_dir: Path, task: str, result: TrainingResult) -> str:
    """Save a real ``run_training`` result as the worker would; returns its model id."""
    record = JobRecord(
        id=uuid.uuid4().hex,
        task=task,
        status=JobStatus.running,
        hyperparameters={"epochs": len(result.metrics)},
        created_at=datetime.now(UTC),
    )
    return save_checkpoint(
        CheckpointStore(models_dir), record, result, torch.device("cpu"), TrainingContext()
    )
