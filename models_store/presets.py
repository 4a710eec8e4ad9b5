"""Preprocessing presets: the single definition used by dataset caching, training, evaluation and serving.

A preset turns a PIL image into a uint8 tensor of the model's input size (``to_uint8``: colour
conversion, resize, crop) and a batch of such tensors into the normalised float input
(``normalize``). Datasets are cached after ``to_uint8``; training, evaluation and ``/predict``
all call the same ``normalize``, so serving can never drift from evaluation.

``normalize`` computes ``(x / 255 - mean) / std`` in that order, the same float32 operations as
torchvision's ``ToTensor()`` followed by ``Normalize(mean, std)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import CenterCrop, Resize

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision ResNet18_Weights.IMAGENET1K_V1 transforms
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preset:
    """How images are prepared for one task.

    Attributes:
        task: task name, e.g. ``"mnist_lenet5"``.
        mode: PIL mode fed to the model, ``"RGB"`` (3 channels) or ``"L"`` (1 channel).
        resize: ``Resize`` argument: an int resizes the shorter side, a pair forces (height, width).
        crop: side of the centre crop after resizing, or None.
        mean, std: per-channel normalisation applied to values scaled to [0, 1].
        eval_split: name of the split accuracy is reported on (``"test"`` or ``"val"``).
    """

    task: str
    mode: str
    resize: int | tuple[int, int]
    crop: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    eval_split: str

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the model input."""
        if self.crop is not None:
            return (self.crop, self.crop)
        if isinstance(self.resize, int):
            raise ValueError(f"preset {self.task} has no fixed input size")
        return tuple(self.resize)

    def to_array(self, image: Image.Image) -> np.ndarray:
        """Convert, resize and crop one image (Pillow and numpy only, no torch ops).

        Args:
            image: a PIL image already in ``self.mode`` (see ``app.images`` for arbitrary uploads);
                other modes are converted with ``Image.convert``.

        Returns:
            uint8 array of shape (C, H, W) = (channels, *input_size), the values of
            torchvision's ``PILToTensor`` after ``Resize``/``CenterCrop``.
        """
        if image.mode != self.mode:
            image = image.convert(self.mode)
        if self._needs_resize(image):
            image = Resize(self._resize_arg())(image)
        if self.crop is not None and image.size != (self.crop, self.crop):
            image = CenterCrop(self.crop)(image)
        pixels = np.array(image, dtype=np.uint8)
        return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)

    def to_uint8(self, image: Image.Image) -> torch.Tensor:
        """``to_array`` as a contiguous uint8 tensor (C, H, W)."""
        return torch.from_numpy(np.ascontiguousarray(self.to_array(image)))

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) on any device -> float32 (N, C, H, W), ``(x/255 - mean)/std``."""
        mean = torch.tensor(self.mean, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
        return batch.float().div(255).sub(mean).div(std)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["resize"] = list(self.resize) if isinstance(self.resize, tuple) else self.resize
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Preset:
        """Rebuild a preset stored in checkpoint metadata; raises ``TypeError``/``ValueError``."""
        values = dict(data)
        if isinstance(values.get("resize"), list):
            values["resize"] = tuple(values["resize"])
        values["mean"] = tuple(values["mean"])
        values["std"] = tuple(values["std"])
        return cls(**values)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of a ``width`` x ``height`` image after the preset's ``Resize``, before
        the crop. An int ``resize`` scales the shorter side to it and the longer one in
        proportion (truncated, as torchvision's ``Resize`` does)."""
        if not isinstance(self.resize, int):
            return self.resize[1], self.resize[0]
        short, long = sorted((width, height))
        scaled_long = int(self.resize * long / short)
        return (self.resize, scaled_long) if width <= height else (scaled_long, self.resize)

    def _resize_arg(self) -> int | list[int]:
        return list(self.resize) if isinstance(self.resize, tuple) else self.resize

    def _needs_resize(self, image: Image.Image) -> bool:
        if isinstance(self.resize, int):
            return min(image.size) != self.resize
        height, width = self.resize
        return image.size != (width, height)


PRESETS: dict[str, Preset] = {
    "cifar10_dense": Preset(
        task="cifar10_dense",
        mode="RGB",
        resize=(32, 32),
        crop=None,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        eval_split="test",
    ),
    "mnist_lenet5": Preset(
        task="mnist_lenet5",
        mode="L",
        resize=(28, 28),
        crop=None,
        mean=(0.5,),
        std=(0.5,),
        eval_split="test",
    ),
    "hymenoptera_resnet18": Preset(
        task="hymenoptera_resnet18",
        mode="RGB",
        resize=256,
        crop=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        eval_split="val",
    ),
    "custom_resnet18": Preset(
        task="custom_resnet18",
        mode="RGB",
        resize=256,
        crop=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        eval_split="val",
    ),
}
