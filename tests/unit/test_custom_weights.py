"""custom_resnet18's ``weights: model:<id>``: the recipe's setup starts from a ResNet18 checkpoint
written by the worker's own save path, keeping its backbone exactly and its fc only when the
checkpoint has the dataset's classes (same names, same order)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch

from core.config import Settings
from core.jobs import EpochMetrics
from models_store.checkpoint import CheckpointStore
from tasks.custom_resnet18 import CustomResNetHyperparameters, CustomResNetRecipe
from tasks.hymenoptera_resnet18 import build_model
from tests.factories_datasets import class_images, zip_bytes
from tests.factories_models import make_model_checkpoint, save_training_result
from worker.ingest import build_dataset
from worker.pretrained import PretrainedWeightsUnavailable
from worker.training import TrainingContext, TrainingResult


def make_dataset(datasets_dir: Path, classes: list[str]) -> str:
    """A ready uploaded-dataset cache with two tiny images per class; returns its id."""
    dataset_id = uuid.uuid4().hex
    folder = datasets_dir / dataset_id
    folder.mkdir(parents=True)
    (folder / "upload").write_bytes(zip_bytes(class_images(dict.fromkeys(classes, 2), size=24)))
    assert build_dataset(folder, Settings(_env_file=None))["classes"] == sorted(classes)
    return dataset_id


def make_source(models_dir: Path, classes: list[str], task: str = "hymenoptera_resnet18") -> str:
    """A ResNet18 checkpoint of ``len(classes)`` classes saved by the worker's save path, with every
    tensor (BatchNorm running statistics and counters included) unlike a fresh model's."""
    generator = torch.Generator().manual_seed(1234)
    model = build_model({"num_classes": len(classes)})
    state = {}
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            noise = torch.rand(tensor.shape, generator=generator) + 0.5  # > 0: a valid running_var
            state[name] = noise if name.endswith("running_var") else noise - 1.0
        else:
            state[name] = torch.full_like(tensor, 7)  # num_batches_tracked
    metrics = [
        EpochMetrics(epoch=1, lr=0.1, train_loss=1.0, train_accuracy=0.5, duration_s=1.0, images_per_s=1.0)
    ]
    result = TrainingResult(state, {"num_classes": len(classes)}, list(classes), metrics, train_size=1)
    return save_training_result(models_dir, task, result)


def setup_recipe(tmp_path: Path, dataset_id: str, weights: str) -> CustomResNetRecipe:
    hp = CustomResNetHyperparameters(epochs=1, batch_size=2, mode="finetune", weights=weights)
    ctx = TrainingContext(
        dataset=dataset_id,
        datasets_dir=tmp_path / "datasets",
        models_dir=tmp_path / "models",
        show_progress_bar=False,
    )
    recipe = CustomResNetRecipe(hp, ctx)
    torch.manual_seed(0)
    recipe.setup()
    return recipe


@pytest.fixture
def source(tmp_path) -> tuple[str, dict[str, torch.Tensor]]:
    model_id = make_source(tmp_path / "models", ["ants", "bees"])
    tensors, meta = CheckpointStore(tmp_path / "models").load(model_id)
    assert meta["classes"] == ["ants", "bees"] and tensors["fc.weight"].shape == (2, 512)
    return model_id, tensors


def assert_backbone_copied(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    backbone = [name for name in state if not name.startswith("fc.")]
    assert sorted(backbone) == sorted(n for n in tensors if not n.startswith("fc."))
    assert len(backbone) == 120  # ResNet18: weights, biases, BN statistics and counters
    for name in backbone:
        assert state[name].dtype == tensors[name].dtype, name
        assert torch.equal(state[name], tensors[name]), name


def test_more_classes_than_the_source_keep_the_backbone_and_reinitialise_fc(tmp_path, source):
    model_id, tensors = source
    dataset_id = make_dataset(tmp_path / "datasets", ["ants", "bees", "wasps"])
    recipe = setup_recipe(tmp_path, dataset_id, f"model:{model_id}")
    assert recipe.classes == ["ants", "bees", "wasps"]
    assert recipe.weights.name == f"model:{model_id}"
    assert_backbone_copied(recipe.model, tensors)
    fc = recipe.model.fc
    assert fc.weight.shape == (3, 512) and fc.bias.shape == (3,)
    assert not torch.equal(fc.weight[:2], tensors["fc.weight"])
    assert not torch.equal(fc.bias[:2], tensors["fc.bias"])
    # a fresh nn.Linear init, not the checkpoint's values (theirs lie in [-0.5, 0.5))
    bound = 1 / 512**0.5
    assert fc.weight.abs().max() <= bound and fc.weight.std() > bound / 4


def test_the_same_classes_keep_fc_bit_identical(tmp_path, source):
    model_id, tensors = source
    dataset_id = make_dataset(tmp_path / "datasets", ["ants", "bees"])
    recipe = setup_recipe(tmp_path, dataset_id, f"model:{model_id}")
    assert_backbone_copied(recipe.model, tensors)
    assert torch.equal(recipe.model.fc.weight, tensors["fc.weight"])
    assert torch.equal(recipe.model.fc.bias, tensors["fc.bias"])


def test_the_same_number_of_other_classes_reinitialises_fc(tmp_path, source):
    model_id, tensors = source
    dataset_id = make_dataset(tmp_path / "datasets", ["cats", "dogs"])
    recipe = setup_recipe(tmp_path, dataset_id, f"model:{model_id}")
    assert_backbone_copied(recipe.model, tensors)
    assert recipe.model.fc.weight.shape == tensors["fc.weight"].shape
    assert not torch.equal(recipe.model.fc.weight, tensors["fc.weight"])


def test_a_custom_resnet18_checkpoint_is_a_source_too_and_other_architectures_are_refused(tmp_path):
    custom = make_source(tmp_path / "models", ["ants", "bees"], task="custom_resnet18")
    tensors, _ = CheckpointStore(tmp_path / "models").load(custom)
    dataset_id = make_dataset(tmp_path / "datasets", ["ants", "bees"])
    recipe = setup_recipe(tmp_path, dataset_id, f"model:{custom}")
    assert torch.equal(recipe.model.fc.weight, tensors["fc.weight"])
    lenet = make_model_checkpoint(tmp_path / "models", "mnist_lenet5")
    with pytest.raises(PretrainedWeightsUnavailable, match="not ResNet18"):
        setup_recipe(tmp_path, dataset_id, f"model:{lenet}")
    with pytest.raises(PretrainedWeightsUnavailable, match="no-such-model"):
        setup_recipe(tmp_path, dataset_id, "model:no-such-model")
