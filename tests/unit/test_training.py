"""The recipes on small synthetic data in the real formats: they learn, resume exactly, and are
deterministic for a seed."""

from __future__ import annotations

import pytest
import torch

from worker.data import clear_memory_cache
from worker.resume import ResumeState, ResumeStore, pack_state, unpack_state
from worker.training import StopTraining, TrainingContext, run_training

QUICK = {
    "mnist_lenet5": {"epochs": 3},
    "cifar10_dense": {"epochs": 3, "lr": 0.01, "init_std": 0.01},
    "hymenoptera_resnet18": {"epochs": 2, "batch_size": 8},
}


def context(tmp_path, data_dir, **kwargs) -> TrainingContext:
    return TrainingContext(
        data_dir=data_dir,
        cache_dir=tmp_path / "cache",
        resnet18_weights="none",
        show_progress_bar=False,
        **kwargs,
    )


@pytest.mark.parametrize("task", ["mnist_lenet5", "cifar10_dense"])
def test_recipe_learns(tmp_path, synthetic_data_dir, task):
    result = run_training(task, QUICK[task], context(tmp_path, synthetic_data_dir))
    first, last = result.metrics[0], result.metrics[-1]
    assert len(result.metrics) == 3
    assert last.train_loss < first.train_loss
    assert last.test_accuracy > 0.5, result.metrics
    assert result.classes and result.tensors


@pytest.mark.parametrize("mode", ["finetune", "feature_extraction"])
def test_resnet_recipe_runs_both_modes(tmp_path, synthetic_data_dir, mode):
    result = run_training(
        "hymenoptera_resnet18",
        {**QUICK["hymenoptera_resnet18"], "mode": mode},
        context(tmp_path, synthetic_data_dir),
    )
    assert result.classes == ["ants", "bees"]
    assert result.metrics[-1].val_accuracy is not None and result.metrics[-1].test_accuracy is None
    assert result.extra_metadata["pretrained"]["name"] == "none"
    assert result.tensors["fc.weight"].shape == (2, 512)


def test_feature_extraction_trains_only_fc_and_recalibrates_batchnorm(tmp_path, synthetic_data_dir):
    from tasks.hymenoptera_resnet18 import resnet18_classifier

    torch.manual_seed(0)
    initial_model = resnet18_classifier(2)
    initial = initial_model.state_dict()
    weights = {name for name, _ in initial_model.named_parameters()}
    hp = {"epochs": 2, "batch_size": 8, "mode": "feature_extraction", "seed": 0}
    result = run_training("hymenoptera_resnet18", hp, context(tmp_path, synthetic_data_dir))
    for name, tensor in result.tensors.items():
        if name.startswith("fc."):
            assert not torch.equal(tensor, initial[name])
        elif name in weights:
            assert torch.equal(tensor, initial[name]), name  # frozen
        elif name.endswith("running_mean"):
            assert not torch.equal(tensor, initial[name]), name  # re-estimated on the train images
    assert list((tmp_path / "cache" / "features").glob("resnet18-*.safetensors"))
    clear_memory_cache()
    again = run_training("hymenoptera_resnet18", hp, context(tmp_path, synthetic_data_dir))  # from the cache
    for name, tensor in result.tensors.items():
        assert torch.equal(again.tensors[name], tensor), name


@pytest.mark.parametrize("task", ["mnist_lenet5", "cifar10_dense"])
def test_same_seed_same_metrics(tmp_path, synthetic_data_dir, task):
    runs = [
        run_training(task, {**QUICK[task], "seed": 7}, context(tmp_path, synthetic_data_dir))
        for _ in range(2)
    ]
    assert [m.model_dump(exclude={"duration_s", "images_per_s"}) for m in runs[0].metrics] == [
        m.model_dump(exclude={"duration_s", "images_per_s"}) for m in runs[1].metrics
    ]
    other = run_training(task, {**QUICK[task], "seed": 8}, context(tmp_path, synthetic_data_dir))
    assert other.metrics[-1].train_loss != runs[0].metrics[-1].train_loss


@pytest.mark.parametrize("task", ["mnist_lenet5", "cifar10_dense"])
def test_resume_continues_exactly(tmp_path, synthetic_data_dir, task):
    """Stopped after epoch 1 and resumed from the saved state == trained straight through."""
    hp = {**QUICK[task], "momentum": 0.9}
    straight = run_training(task, hp, context(tmp_path, synthetic_data_dir))
    resume = ResumeStore(tmp_path / "resume")
    epochs_seen = []

    def stop_after_first_epoch(metrics):
        epochs_seen.append(len(metrics))

    stopping = context(tmp_path, synthetic_data_dir, resume=resume, on_epoch=stop_after_first_epoch)
    stopping.should_stop = lambda: "cancelled" if epochs_seen and resume.path.exists() else None
    stopping.stop_check_interval_s = 0
    with pytest.raises(StopTraining):
        run_training(task, hp, stopping)
    assert resume.load().epoch == 1
    clear_memory_cache()
    resumed = run_training(
        task, hp, context(tmp_path, synthetic_data_dir, resume=ResumeStore(tmp_path / "resume"))
    )
    strip = {"duration_s", "images_per_s"}
    assert [m.model_dump(exclude=strip) for m in resumed.metrics] == [
        m.model_dump(exclude=strip) for m in straight.metrics
    ]
    for name, tensor in straight.tensors.items():
        torch.testing.assert_close(resumed.tensors[name], tensor)


def test_divergence_fails_instead_of_saving_nan_weights(tmp_path, synthetic_data_dir):
    from worker.training import TrainingDiverged

    with pytest.raises(TrainingDiverged, match="diverged"):
        run_training(
            "mnist_lenet5",
            {"epochs": 3, "lr": 10.0, "momentum": 0.99},
            context(tmp_path, synthetic_data_dir),
        )


def test_max_train_samples_is_a_fixed_subset(tmp_path, synthetic_data_dir):
    from worker.training import seeded_subset

    progress = []
    ctx = context(tmp_path, synthetic_data_dir, on_progress=progress.append)
    run_training("mnist_lenet5", {"epochs": 1, "max_train_samples": 128}, ctx)
    assert max(p.batches_total for p in progress) == 2  # 128 images / batch 64
    subset = seeded_subset(2000, 128, seed=0)
    assert len(subset) == 128 and len(set(subset.tolist())) == 128
    assert torch.equal(subset, seeded_subset(2000, 128, seed=0))
    assert not torch.equal(subset, seeded_subset(2000, 128, seed=1))
    assert seeded_subset(100, 500, seed=0) is None


def test_pack_state_round_trip_keeps_int_keys():
    state = {
        "optimizer": {
            "state": {0: {"momentum_buffer": torch.ones(2)}},
            "param_groups": [{"lr": 0.1, "params": [0]}],
        }
    }
    tensors, skeleton = pack_state(state)
    import json

    back = unpack_state(json.loads(json.dumps(skeleton)), tensors)
    assert list(back["optimizer"]["state"]) == [0]
    assert torch.equal(back["optimizer"]["state"][0]["momentum_buffer"], torch.ones(2))


def test_resume_store_ignores_damaged_state(tmp_path):
    store = ResumeStore(tmp_path)
    store.save(ResumeState(1, {"w": torch.ones(1)}, torch.Generator().get_state(), []))
    assert store.load().epoch == 1
    store.path.write_bytes(b"junk")
    assert store.load() is None
