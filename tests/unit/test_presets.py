"""Presets: the same numbers as torchvision's transforms, and stable through checkpoint metadata."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from tasks import get_task, list_tasks
from tasks.base import Preset


@pytest.mark.parametrize("task", list_tasks())
def test_normalize_matches_to_tensor_then_normalize(task):
    """The assignment's per-sample pipeline on a PIL image == our uint8 cache + batch normalize."""
    preset = get_task(task).preset
    rng = np.random.default_rng(0)
    h, w = (300, 400) if preset.crop else preset.input_size
    shape = (h, w) if preset.mode == "L" else (h, w, 3)
    image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
    steps = [transforms.Resize(256), transforms.CenterCrop(224)] if preset.crop else []
    steps += [transforms.ToTensor(), transforms.Normalize(preset.mean, preset.std)]
    reference = transforms.Compose(steps)(image)
    ours = preset.normalize(preset.to_uint8(image).unsqueeze(0))[0]
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)


def test_resnet_preset_is_resize_256_center_crop_224():
    preset = get_task("hymenoptera_resnet18").preset
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8))
    reference = transforms.Compose(
        [transforms.Resize(256), transforms.CenterCrop(224), transforms.PILToTensor()]
    )(image)
    ours = preset.to_uint8(image)
    assert ours.shape == (3, 224, 224) and ours.dtype == torch.uint8
    assert torch.equal(ours, reference)


def test_small_presets_resize_other_sizes_and_convert_mode():
    rgb = Image.new("RGB", (64, 40), (200, 10, 10))
    assert get_task("mnist_lenet5").preset.to_uint8(rgb).shape == (1, 28, 28)
    assert get_task("cifar10_dense").preset.to_uint8(rgb).shape == (3, 32, 32)


@pytest.mark.parametrize("task", list_tasks())
def test_round_trip_through_metadata(task):
    preset = get_task(task).preset
    assert Preset.from_dict(preset.to_dict()) == preset
