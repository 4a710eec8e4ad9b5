"""Training-batch augmentation on the training device: RandomResizedCrop and horizontal flip.

torchvision.transforms.v2 applied image by image to the uint8 batch (N, C, H, W) already on the
device (the cached 224x224 crops), so every image draws its own crop and flip. The draws come
from a CPU generator seeded by (seed, epoch, step) inside ``torch.random.fork_rng``: a job resumed
from its last finished epoch sees the same augmentations as an uninterrupted one, and the global
RNG is left as it was.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2


class BatchAugment:
    """``augment(images, epoch, step)`` -> augmented uint8 batch of the same shape and device.

    Args:
        size: output side (the preset's crop, 224).
        seed: the job's seed.
        scale, ratio: RandomResizedCrop's area fraction and aspect-ratio ranges (torchvision's
            defaults: (0.08, 1.0) and (3/4, 4/3)).
    """

    def __init__(self, size: int, seed: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        self.seed = seed
        self.transform = v2.Compose(
            [v2.RandomResizedCrop(size, scale=scale, ratio=ratio, antialias=True), v2.RandomHorizontalFlip()]
        )

    def __call__(self, images: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        """images: uint8 (N, C, H, W) on any device -> uint8 (N, C, size, size), same device."""
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(hash((self.seed, epoch, step)) & 0x7FFF_FFFF_FFFF_FFFF)
            return torch.stack([self.transform(image) for image in images])
