"""The task registry: every task is found under its name, complete, and cheap to list."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tasks import get_task, list_tasks
from tests.conftest import REPO


@pytest.mark.parametrize("name", list_tasks())
def test_each_task_is_registered_under_its_name_and_builds_its_network(name):
    task = get_task(name)
    assert task.name == task.preset.task == name
    assert task.eval_split in ("test", "val")
    defaults = task.hyperparameters()
    assert defaults.epochs >= 1 and defaults.batch_size >= 1
    architecture = {"num_classes": 3} if name != "cifar10_dense" else {"hidden_size": 4, "num_classes": 3}
    model = task.build_model(architecture)
    height, width = task.preset.input_size
    x = task.preset.normalize(torch.zeros(2, task.preset.channels, height, width, dtype=torch.uint8))
    assert model(x).shape == (2, 3)


def test_unknown_task_is_refused():
    with pytest.raises(ValueError, match="unknown task 'imagenet'"):
        get_task("imagenet")


@pytest.mark.parametrize(
    "module", ["worker.celery_app", "worker.healthcheck", "tasks", "core.jobs", "models_store.checkpoint"]
)
def test_celery_app_and_registry_import_without_torch(module):
    """The worker's main process imports the Celery app and must not import torch (CUDA state
    must be created in the pool child, after fork); listing task names must stay cheap, and so must
    the Docker healthcheck (``worker.healthcheck``, every 30 s)."""
    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_training_loop_does_not_import_the_tasks():
    """worker.training reaches a task's recipe through the registry, at run time: no import loop
    between the loop and the task files that use it."""
    code = (
        "import sys, worker.training, worker.data; "
        "loaded = [m for m in sys.modules if m.startswith('tasks.') and m != 'tasks.base']; "
        "assert not loaded, loaded"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
