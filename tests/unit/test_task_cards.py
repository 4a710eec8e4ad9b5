"""The task cards (``tasks.CARDS``): what the API, the dataset store and the model store know of a
task without importing it, and that it agrees with the task's module."""

from __future__ import annotations

import subprocess
import sys

import pytest
from torchvision.models import ResNet

from tasks import CARDS, builtin_datasets, get_card, get_task, list_tasks, tasks_of_architecture, upload_task


def test_every_task_has_a_card_and_the_module_reads_its_dataset_from_it():
    assert list(CARDS) == list_tasks()
    for name in list_tasks():
        task = get_task(name)
        card = get_card(name)
        assert task.dataset == (card.dataset or "uploaded")
        assert task.uploaded_dataset == (card.dataset is None)
        assert bool(card.classes) != task.uploaded_dataset  # built-ins name their classes, uploads not


@pytest.mark.parametrize("name", list_tasks())
def test_architecture_on_the_card_is_the_network_the_module_builds(name):
    model = get_task(name).build_model({})
    assert isinstance(model, ResNet) == (get_card(name).architecture == "resnet18")


def test_builtin_datasets_uploads_and_families_come_from_the_cards():
    assert builtin_datasets() == {
        "cifar10": ("cifar10_dense", CARDS["cifar10_dense"].classes),
        "mnist": ("mnist_lenet5", tuple("0123456789")),
        "hymenoptera": ("hymenoptera_resnet18", ("ants", "bees")),
    }
    assert upload_task() == "custom_resnet18"
    assert tasks_of_architecture("resnet18") == ("hymenoptera_resnet18", "custom_resnet18")
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_card("nope")


def test_the_cards_are_read_without_importing_torch():
    code = (
        "import sys, core.datasets, models_store.sources, tasks; tasks.get_card('custom_resnet18'); "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
