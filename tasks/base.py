"""What every task is made of: the ``Task`` spec, the hyperparameter base class and ``Preset``.

A task (one file under ``tasks/``) defines its hyperparameters (a subclass of
``Hyperparameters``), its preset, its network, where its dataset is, and its training recipe, and
puts them together in one ``Task``; ``tasks.get_task(name)`` returns it.

Presets are the single definition of preprocessing used by dataset caching, training, evaluation
and serving. A preset turns a PIL image into a uint8 tensor of the model's input size (``to_uint8``: colour
conversion, resize, crop) and a batch of such tensors into the normalised float input
(``normalize``). Datasets are cached after ``to_uint8``; training, evaluation and ``/predict``
all call the same ``normalize``, so serving can never drift from evaluation.

``normalize`` computes ``(x / 255 - mean) / std`` in that order, the same float32 operations as
torchvision's ``ToTensor()`` followed by ``Normalize(mean, std)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torchvision.transforms import CenterCrop, Resize

from tasks import get_card

if TYPE_CHECKING:
    from worker.data import DatasetSource
    from worker.training import Recipe


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
            image: a PIL image already in ``self.mode`` (see ``core.images`` for arbitrary uploads);
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


# Hyperparameters ----------------------------------------------------------------------------

Seed = Annotated[int, Field(ge=0, le=2**31 - 1, description="Seeds weight init and shuffling.", examples=[0])]
MaxTrainSamples = Annotated[
    int | None,
    Field(
        ge=1,
        le=10_000_000,
        description="Train on only the first N training images (a fixed, seeded subset); null = all. "
        "At least batch_size.",
        examples=[None],
    ),
]


class Hyperparameters(BaseModel):
    """Fields every task has; a task subclasses it with its own bounds, defaults and extra fields.

    Each model forbids unknown fields and non-finite numbers and is strictly typed, so a bad
    request is refused with a 422 that names the field before anything is enqueued.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True, strict=True)

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    lr_decay: float
    lr_step_size: int = Field(1, ge=1, le=1000, description="Multiply lr by lr_decay every this many epochs.")
    seed: Seed = 0
    max_train_samples: MaxTrainSamples = None

    @model_validator(mode="before")
    @classmethod
    def _whole_numbers_are_ints(cls, data: Any) -> Any:
        """JSON has one number type: ``10.0`` is the integer 10 (JSON Schema agrees), so an int
        field takes it; ``2.5``, ``"10"`` and ``true`` are still refused (strict)."""
        if not isinstance(data, dict):
            return data
        ints = {name for name, field in cls.model_fields.items() if field.annotation in (int, int | None)}
        return {
            key: int(value)
            if key in ints and type(value) is float and value.is_integer() and abs(value) < 2**63
            else value
            for key, value in data.items()
        }

    @model_validator(mode="after")
    def _batch_fits_cap(self) -> Hyperparameters:
        if self.max_train_samples is not None and self.batch_size > self.max_train_samples:
            raise ValueError(
                f"batch_size ({self.batch_size}) is larger than max_train_samples ({self.max_train_samples})"
            )
        return self

    def lr_at_epoch(self, epoch: int) -> float:
        """Learning rate used during 0-based ``epoch``: lr * lr_decay ** (epoch // lr_step_size)."""
        return self.lr * self.lr_decay ** (epoch // self.lr_step_size)


# The task spec -------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobExample:
    """A named example request of the task in the OpenAPI document (``POST /jobs``)."""

    key: str
    summary: str
    hyperparameters: dict[str, Any]


@dataclass(frozen=True)
class Task:
    """Everything that makes one task, in one place (see ``tasks.get_task``).

    Attributes:
        name: the task's name in requests, job records and checkpoints, e.g. ``"mnist_lenet5"``;
            also the name of its module under ``tasks/``.
        title: a few words for people, e.g. ``"LeNet-5 on MNIST"``.
        description: one sentence; the description of its ``POST /jobs`` request schema.
        hyperparameters: the pydantic model of its hyperparameters (defaults: the assignment's).
        preset: its preprocessing, shared by dataset caching, training, evaluation and serving.
        build_model: ``architecture`` dict (as stored in a checkpoint) -> an uninitialised
            ``nn.Module`` mapping the preset's normalised float32 batch (N, C, H, W) to logits
            (N, num_classes); raises ``TypeError`` for unexpected keys.
        locate: ``(data_dir, split, allow_download) -> DatasetSource``: where a split of its
            dataset is under DATA_DIR (downloading it first when allowed); raises
            ``worker.data.DatasetNotFound`` listing every path looked at.
        recipe: its training recipe class, ``recipe(hyperparameters, ctx)`` (``worker.training.Recipe``).
        example: the hyperparameters of the request example in its request schema.
        job_example: a named example of ``POST /jobs``.

    Its built-in dataset, that dataset's classes and its network family are on its card
    (``tasks.CARDS``), which is read without importing the module: ``dataset`` and
    ``uploaded_dataset`` come from there.
    """

    name: str
    title: str
    description: str
    hyperparameters: type[Hyperparameters]
    preset: Preset
    build_model: Callable[[dict], nn.Module]
    locate: Callable[[Path, str, bool], DatasetSource]
    recipe: type[Recipe]
    example: dict[str, Any] = field(default_factory=dict)
    job_example: JobExample | None = None

    @property
    def dataset(self) -> str:
        """Name of its built-in dataset (``"mnist"``, ``"cifar10"``, ``"hymenoptera"``), or
        ``"uploaded"``."""
        return get_card(self.name).dataset or "uploaded"

    @property
    def uploaded_dataset(self) -> bool:
        """Whether it trains on a dataset uploaded with ``POST /datasets``, named by the job's
        ``dataset`` (its ``locate`` is then unused)."""
        return get_card(self.name).dataset is None

    @property
    def eval_split(self) -> str:
        """The split accuracy is reported on: ``"test"`` or ``"val"``."""
        return self.preset.eval_split

    def parse_hyperparameters(self, values: dict) -> Hyperparameters:
        """Validate ``values`` (overrides of the defaults); raises ``pydantic.ValidationError``."""
        return self.hyperparameters.model_validate(values)
