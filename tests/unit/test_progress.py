"""Progress tells the truth: images decoded while loading, features while extracting, running loss."""

from __future__ import annotations

import math

from core.jobs import JobProgress
from worker.data import clear_memory_cache
from worker.training import TrainingContext, run_training


def collect(tmp_path, data_dir, task: str, hp: dict, results: list | None = None) -> list[JobProgress]:
    reports: list[JobProgress] = []
    clear_memory_cache()
    ctx = TrainingContext(
        data_dir=data_dir,
        cache_dir=tmp_path / "cache",
        resnet18_weights="none",
        show_progress_bar=False,
        progress_interval_s=0.0,
        on_progress=reports.append,
    )
    result = run_training(task, hp, ctx)
    if results is not None:
        results.append(result)
    return reports


def test_loading_reports_images_decoded_and_training_reports_running_loss(tmp_path, synthetic_data_dir):
    reports = collect(
        tmp_path, synthetic_data_dir, "cifar10_dense", {"epochs": 2, "lr": 0.01, "init_std": 0.01}
    )
    loading = [p for p in reports if p.stage == "loading_data"]
    done = [p.images_done for p in loading]
    assert done == sorted(done) and done[-1] == 1200 and loading[-1].images_total == 1200  # train + test
    assert any(0 < p.images_done < p.images_total for p in loading), "no report while decoding"
    assert all(p.images_done <= p.images_total for p in loading)
    training = [p for p in reports if p.stage == "training"]
    assert training and all(p.loss is not None and math.isfinite(p.loss) and p.loss > 0 for p in training)
    assert all(p.batches_total == 20 and p.images_done == 0 for p in training)  # 1000 images / 50

    # A second job reads the dataset cache: loading reports at once that every image is there.
    again = collect(tmp_path, synthetic_data_dir, "cifar10_dense", {"epochs": 1})
    loading = [p for p in again if p.stage == "loading_data"]
    assert loading[-1].images_done == loading[-1].images_total == 1200


def test_feature_extraction_reports_in_its_own_fields(tmp_path, synthetic_data_dir):
    hp = {"epochs": 1, "batch_size": 8, "mode": "feature_extraction"}
    results: list = []
    reports = collect(tmp_path, synthetic_data_dir, "hymenoptera_resnet18", hp, results)
    features = [p for p in reports if p.stage == "extracting_features"]
    # BatchNorm calibration over train (24), then the train (24) and val (16) features
    assert features and all(p.features_total == 64 and p.batches_total == 0 for p in features)
    assert [p.features_done for p in features] == sorted(p.features_done for p in features)
    assert features[-1].features_done == 64
    assert all(p.features_done == 0 for p in reports if p.stage == "training")

    # its evaluation goes through the same features path as the per-epoch val accuracy
    evaluation = results[0].evaluation
    assert evaluation["split"] == "val" and evaluation["dataset"] == "hymenoptera"
    assert evaluation["accuracy"] == results[0].metrics[-1].val_accuracy
    assert sum(map(sum, evaluation["confusion_matrix"])) == 16
