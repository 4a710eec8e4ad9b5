"""The registry of tasks: one module per task under ``tasks/``, looked up by name.

Each task module (``tasks/<name>.py``) defines the task's hyperparameters, preset, network,
dataset location and training recipe, and gathers them in a module-level ``TASK``
(``tasks.base.Task``). The API, the worker and the checkpoint metadata all read tasks from here::

    from tasks import get_task, list_tasks

    task = get_task("mnist_lenet5")
    task.hyperparameters().epochs  # 10

Importing this package is cheap and does not import torch (the Celery app's main process,
``core.jobs`` and ``core.datasets`` rely on that): ``CARDS`` holds what must be known of a task
without importing it (its built-in dataset and that dataset's classes, its network family), and
a task's module (which imports torch) is imported on the first ``get_task`` of it. To add a task,
write its module and add its name to ``TaskName`` and its card to ``CARDS``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    from tasks.base import Task

TaskName = Literal["cifar10_dense", "mnist_lenet5", "hymenoptera_resnet18", "custom_resnet18"]
"""The task names, as pydantic validates them in requests and job records."""


@dataclass(frozen=True)
class TaskCard:
    """What is known of a task without importing its module (and torch).

    Attributes:
        dataset: the built-in dataset it trains on (found under DATA_DIR), or None for a task that
            trains on a dataset uploaded with ``POST /datasets`` (named by the job's ``dataset``).
        classes: the built-in dataset's class names, in label order (empty for uploads: each
            upload has its own).
        architecture: the network family; a checkpoint of one family can start another job of
            that family (``weights: model:<id>``).
    """

    dataset: str | None
    classes: tuple[str, ...]
    architecture: str


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

CARDS: dict[str, TaskCard] = {
    "cifar10_dense": TaskCard("cifar10", CIFAR10_CLASSES, "dense"),
    "mnist_lenet5": TaskCard("mnist", tuple(str(digit) for digit in range(10)), "lenet5"),
    "hymenoptera_resnet18": TaskCard("hymenoptera", ("ants", "bees"), "resnet18"),
    "custom_resnet18": TaskCard(None, (), "resnet18"),
}
if list(CARDS) != list(get_args(TaskName)):  # pragma: no cover - a task added to one table only
    raise RuntimeError("tasks.CARDS and tasks.TaskName must name the same tasks in the same order")


def list_tasks() -> list[str]:
    """Names of every task, in registry order."""
    return list(get_args(TaskName))


def get_card(name: str) -> TaskCard:
    """The card of task ``name`` (no import of its module). Raises ``ValueError`` for an unknown
    name."""
    _check_name(name)
    return CARDS[name]


def builtin_datasets() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Built-in dataset name -> (the first task that trains on it, its classes), in registry order:
    ``{"cifar10": ("cifar10_dense", (...)), "mnist": ..., "hymenoptera": ...}``."""
    found: dict[str, tuple[str, tuple[str, ...]]] = {}
    for name, card in CARDS.items():
        if card.dataset is not None:
            found.setdefault(card.dataset, (name, card.classes))
    return found


def builtin_tasks() -> list[str]:
    """Names of the tasks that train on a built-in dataset, in registry order (``/predict``
    chooses their models by task; models of uploads are chosen by dataset)."""
    return [name for name, card in CARDS.items() if card.dataset is not None]


BuiltinTaskName = Literal[tuple(builtin_tasks())]  # type: ignore[valid-type]
"""The built-in tasks' names as a pydantic type (``cifar10_dense``, ``mnist_lenet5``,
``hymenoptera_resnet18``)."""


def upload_task() -> str:
    """The task that trains on uploaded datasets (``custom_resnet18``)."""
    (name,) = [name for name, card in CARDS.items() if card.dataset is None]
    return name


def tasks_of_architecture(architecture: str) -> tuple[str, ...]:
    """Names of the tasks whose network is of ``architecture``, e.g. ``"resnet18"``."""
    return tuple(name for name, card in CARDS.items() if card.architecture == architecture)


def _check_name(name: str) -> None:
    if name not in CARDS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(list_tasks())}")


def get_task(name: str) -> Task:
    """The task called ``name`` (imports its module, and so torch, on first use).

    Raises:
        ValueError: no task of that name.
    """
    _check_name(name)
    return importlib.import_module(f"tasks.{name}").TASK
