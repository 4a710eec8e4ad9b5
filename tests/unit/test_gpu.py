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
        ("hymenoptera_resnet18", {"epochs": 1, "batch_size": 8, "mode": "feature_extraction"}),
    ],
)
def test_recipes_train_on_cuda(tmp_path, synthetic_data_dir, task, hp):
    ctx = TrainingContext(
        device=torch.device("cuda"),
        data_dir=synthetic_data_dir,
        cache_dir=tmp_path / "cache",
        resnet18_weights="none",
        show_progress_bar=False,
        progress_interval_s=0.0,
    )
    reports = []
    ctx.on_progress = reports.append
    result = run_training(task, hp, ctx)
    # the running loss is read from the GPU a few times a second; the evaluation runs there too
    assert any(p.loss is not None and math.isfinite(p.loss) for p in reports if p.stage == "training")
    split = "val" if task == "hymenoptera_resnet18" else "test"
    assert result.evaluation["accuracy"] == getattr(result.metrics[-1], f"{split}_accuracy")
    assert (
        sum(map(sum, result.evaluation["confusion_matrix"]))
        == {"test": 300 if task == "mnist_lenet5" else 200, "val": 16}[split]
    )
    assert all(t.device.type == "cuda" for t in result.tensors.values())
    assert math.isfinite(result.metrics[-1].train_loss)
    if task != "hymenoptera_resnet18":
        assert (result.metrics[-1].test_accuracy or 0) > 0.5
