"""The registry of tasks: one module per task under ``tasks/``, looked up by name.

Each task module (``tasks/<name>.py``) defines the task's hyperparameters, preset, network,
dataset location and training recipe, and gathers them in a module-level ``TASK``
(``tasks.base.Task``). The API, the worker and the checkpoint metadata all read tasks from here::

    from tasks import get_task, list_tasks

    task = get_task("mnist_lenet5")
    task.hyperparameters().epochs  # 10

Importing this package is cheap and does not import torch (the Celery app's main process and
``core.jobs`` rely on that): ``TaskName`` lists the names, and a task's module (which imports
torch) is imported on the first ``get_task`` of it. To add a task, write its module and add its
name to ``TaskName``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    from tasks.base import Task

TaskName = Literal["cifar10_dense", "mnist_lenet5", "hymenoptera_resnet18"]
"""The task names, as pydantic validates them in requests and job records."""


def list_tasks() -> list[str]:
    """Names of every task, in registry order."""
    return list(get_args(TaskName))


def get_task(name: str) -> Task:
    """The task called ``name`` (imports its module, and so torch, on first use).

    Raises:
        ValueError: no task of that name.
    """
    if name not in get_args(TaskName):
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(list_tasks())}")
    return importlib.import_module(f"tasks.{name}").TASK
