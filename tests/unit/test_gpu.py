"""CUDA path of the recipes (skipped without a GPU): data on the GPU as uint8, same results shape."""

from __future__ import annotations

import math

import pytest
import torch

from worker.training import TrainingContext, run_training

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize(
    ("task", "hp"),
    [
        ("mnist_lenet5", {"epochs": 2}),
        ("cifar10_dense", {"epochs": 2, "lr": 0.01, "init_std": 0.01}),
        ("hymenoptera_resnet18", {"epochs": 1, "batch_size": 8}),
    ],
)
def test_recipes_train_on_cuda(tmp_path, synthetic_data_dir, task, hp):
    ctx = TrainingContext(
        device=torch.device("cuda"),
        data_dir=synthetic_data_dir,
        cache_dir=tmp_path / "cache",
        resnet18_weights="none",
        show_progress_bar=False,
    )
    result = run_training(task, hp, ctx)
    assert all(t.device.type == "cuda" for t in result.tensors.values())
    assert math.isfinite(result.metrics[-1].train_loss)
    if task != "hymenoptera_resnet18":
        assert (result.metrics[-1].test_accuracy or 0) > 0.5
