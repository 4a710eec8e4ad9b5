"""custom_resnet18's ``augment: true``: ``worker.augment.BatchAugment`` (RandomResizedCrop and
horizontal flip, seeded per epoch and step) and the recipe's training-batch path that applies it
only when the job asks for it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tasks.hymenoptera_resnet18 as resnet_module
from tasks.custom_resnet18 import PRESET, CustomResNetHyperparameters, CustomResNetRecipe
from worker.augment import BatchAugment
from worker.recipe_common import DeviceSplit
from worker.training import EpochStats, TrainingContext

ROOT = Path(__file__).resolve().parents[2]


def batch(n: int = 4, size: int = 224, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator).to(device)


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ],
    ),
]


@pytest.mark.parametrize("device", DEVICES)
def test_batch_augment_keeps_shape_dtype_device_and_is_seeded_by_seed_epoch_step(device):
    images = batch(device=device)
    original = images.clone()
    augment = BatchAugment(224, seed=3)
    before = torch.random.get_rng_state()
    out = augment(images, epoch=1, step=2)
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG is left as it was
    assert torch.equal(images, original)  # the input is not modified in place
    assert out.shape == images.shape and out.dtype == torch.uint8 and out.device == images.device
    assert not torch.equal(out, images)
    for i in range(len(images)):
        assert not torch.equal(out[i], images[i]), i
    same = augment(images[:1].expand(4, -1, -1, -1), 1, 2)  # every image draws its own crop and flip
    assert all(not torch.equal(same[0], same[i]) for i in range(1, 4))
    assert torch.equal(out, augment(images, 1, 2))
    assert torch.equal(out, BatchAugment(224, seed=3)(images, 1, 2))  # a resumed job: a new instance
    for other in (BatchAugment(224, seed=4)(images, 1, 2), augment(images, 0, 2), augment(images, 1, 3)):
        assert not torch.equal(out, other)


def test_batch_augment_outputs_the_requested_size_from_any_input_size():
    out = BatchAugment(64, seed=0)(batch(n=2, size=100), 0, 0)
    assert out.shape == (2, 3, 64, 64) and out.dtype == torch.uint8


_CHECKSUM = (
    "import torch; from worker.augment import BatchAugment; "
    "g = torch.Generator().manual_seed(0); "
    "x = torch.randint(0, 256, (3, 3, 224, 224), dtype=torch.uint8, generator=g); "
    "print(int(BatchAugment(224, 5)(x, 2, 7).sum()))"
)


def test_batch_augment_draws_are_the_same_in_another_process():
    """A job resumed in another worker process (another PYTHONHASHSEED) sees the same draws."""
    here = int(BatchAugment(224, 5)(batch(n=3, seed=0), 2, 7).sum())
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        run = subprocess.run(
            [sys.executable, "-c", _CHECKSUM], cwd=ROOT, env=env, capture_output=True, text=True, check=True
        )
        assert int(run.stdout.strip()) == here


def make_recipe(augment: bool, n: int = 6) -> CustomResNetRecipe:
    hp = CustomResNetHyperparameters(epochs=1, batch_size=2, mode="finetune", augment=augment, seed=11)
    recipe = CustomResNetRecipe(hp, TrainingContext(show_progress_bar=False))
    recipe.train = DeviceSplit(batch(n=n, seed=1), torch.arange(n) % 2)
    recipe.model, recipe.optimizer = torch.nn.Identity(), None
    return recipe


def run_epoch(recipe: CustomResNetRecipe, epoch: int, batches: list[list[int]], monkeypatch) -> list:
    """``recipe.train_one_epoch`` with ``sgd_epoch`` replaced by one that only fetches batches."""
    seen = []

    def fake_sgd_epoch(model, optimizer, lr, loop, get_batch):
        for idx in batches:
            seen.append(get_batch(torch.tensor(idx)))
        return EpochStats(loss_sum=0.0, correct=0, images=0)

    monkeypatch.setattr(resnet_module, "sgd_epoch", fake_sgd_epoch)
    recipe.train_one_epoch(epoch, 0.1, loop=None)
    return seen


def test_the_recipe_augments_training_batches_only_when_asked(monkeypatch):
    batches = [[0, 1], [2, 3], [4, 5]]
    plain = make_recipe(augment=False)
    assert plain.augment is None
    for idx, (x, y) in zip(batches, run_epoch(plain, 0, batches, monkeypatch), strict=True):
        assert torch.equal(x, PRESET.normalize(plain.train.images[idx]))
        assert torch.equal(y, plain.train.labels[idx])

    augmented = make_recipe(augment=True)
    assert isinstance(augmented.augment, BatchAugment) and augmented.augment.seed == 11
    reference = BatchAugment(PRESET.crop, seed=11)
    for epoch in (0, 4, 0):  # each epoch restarts at step 0: a resumed epoch sees the same draws
        got = run_epoch(augmented, epoch, batches, monkeypatch)
        for step, (idx, (x, y)) in enumerate(zip(batches, got, strict=True)):
            images = augmented.train.images[idx]
            assert x.dtype == torch.float32 and x.shape == (2, 3, 224, 224)
            assert not torch.equal(x, PRESET.normalize(images))
            assert torch.equal(x, PRESET.normalize(reference(images, epoch, step))), (epoch, step)
            assert torch.equal(y, augmented.train.labels[idx])


def test_augment_needs_finetune():
    with pytest.raises(ValueError, match="augment needs mode finetune"):
        CustomResNetHyperparameters(augment=True, mode="feature_extraction")
    assert CustomResNetHyperparameters(mode="feature_extraction").augment is False
