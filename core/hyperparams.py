"""Hyperparameters of the three reference tasks.

Defaults are the assignment's settings (see README, "The three tasks"); every field can be
overridden per job. Each model forbids unknown fields and non-finite numbers, so a bad request
is refused with a 422 that names the field before anything is enqueued.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

TaskName = Literal["cifar10_dense", "mnist_lenet5", "hymenoptera_resnet18", "custom_resnet18"]
TASK_NAMES: tuple[str, ...] = ("cifar10_dense", "mnist_lenet5", "hymenoptera_resnet18", "custom_resnet18")

Seed = Annotated[int, Field(ge=0, le=2**31 - 1, description="Seeds weight init and shuffling.", examples=[0])]
MaxTrainSamples = Annotated[
    int | None,
    Field(
        ge=1,
        le=10_000_000,
        description="Train on only the first N training images (a fixed, seeded subset); null = all.",
        examples=[None],
    ),
]


class _Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True, strict=True)

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    lr_decay: float
    lr_step_size: int = Field(1, ge=1, le=1000, description="Multiply lr by lr_decay every this many epochs.")
    seed: Seed = 0
    max_train_samples: MaxTrainSamples = None

    @model_validator(mode="after")
    def _batch_fits_cap(self) -> _Hyperparameters:
        if self.max_train_samples is not None and self.batch_size > self.max_train_samples:
            raise ValueError(
                f"batch_size ({self.batch_size}) is larger than max_train_samples ({self.max_train_samples})"
            )
        return self

    def lr_at_epoch(self, epoch: int) -> float:
        """Learning rate used during 0-based ``epoch``: lr * lr_decay ** (epoch // lr_step_size)."""
        return self.lr * self.lr_decay ** (epoch // self.lr_step_size)


class DenseHyperparameters(_Hyperparameters):
    """Hand-written one-hidden-layer net on CIFAR-10 (sigmoid hidden layer, softmax output)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"epochs": 10, "batch_size": 50, "lr": 0.001, "lr_decay": 0.9, "reg": 0.0, "hidden_size": 100}
            ]
        }
    )

    epochs: int = Field(10, ge=1, le=1000, description="Passes over the training set.")
    batch_size: int = Field(50, ge=1, le=4096, description="Images per SGD step.")
    lr: float = Field(1e-3, gt=0, le=10, description="Initial learning rate.")
    momentum: float = Field(
        0.0, ge=0, lt=1, description="SGD momentum (v = m*v + g; w -= lr*v); the assignment uses 0."
    )
    lr_decay: float = Field(0.9, gt=0, le=1, description="lr multiplier applied every lr_step_size epochs.")
    reg: float = Field(
        0.0, ge=0, le=10, description="L2 strength: loss += reg*(|W1|^2+|W2|^2), gradient += reg*W."
    )
    hidden_size: int = Field(100, ge=1, le=4096, description="Hidden units H.")
    init_std: float = Field(1e-5, gt=0, le=10, description="Std of the normal init of W1 and W2.")


class LeNetHyperparameters(_Hyperparameters):
    """LeNet-5 on MNIST."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"epochs": 10, "batch_size": 64, "lr": 0.01, "momentum": 0.9, "seed": 0}]
        }
    )

    epochs: int = Field(10, ge=1, le=1000, description="Passes over the training set.")
    batch_size: int = Field(64, ge=1, le=4096, description="Images per SGD step.")
    lr: float = Field(0.01, gt=0, le=10, description="Initial learning rate.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="SGD weight decay (L2).")
    lr_decay: float = Field(1.0, gt=0, le=1, description="lr multiplier applied every lr_step_size epochs.")


class ResNetHyperparameters(_Hyperparameters):
    """ResNet18 transfer learning on hymenoptera (ants/bees)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "epochs": 10,
                    "batch_size": 16,
                    "lr": 0.001,
                    "mode": "feature_extraction",
                    "weights": "default",
                }
            ]
        }
    )

    epochs: int = Field(10, ge=1, le=200, description="Passes over the training set.")
    batch_size: int = Field(16, ge=1, le=256, description="Images per SGD step.")
    lr: float = Field(1e-3, gt=0, le=10, description="Initial learning rate.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="SGD weight decay (L2).")
    lr_decay: float = Field(
        1.0,
        gt=0,
        le=1,
        description="lr multiplier every lr_step_size epochs (PyTorch's tutorial: 0.1 every 7).",
    )
    mode: Literal["finetune", "feature_extraction"] = Field(
        "finetune",
        description=(
            "`finetune`: all weights train. `feature_extraction`: the backbone is frozen (eval mode), "
            "its features are computed once per image and only the new fc layer trains."
        ),
    )
    weights: Literal["default", "IMAGENET1K_V1", "local", "none"] = Field(
        "default",
        description=(
            "Initial backbone weights: `default` = the server's RESNET18_WEIGHTS setting, "
            "`IMAGENET1K_V1` = torchvision's ImageNet weights, `local` = RESNET18_WEIGHTS_FILE, "
            "`none` = random init."
        ),
    )


WEIGHTS_PATTERN = r"^(default|IMAGENET1K_V1|local|none|model:[a-z0-9][a-z0-9_-]{0,127})$"


class CustomResNetHyperparameters(ResNetHyperparameters):
    """ResNet18 transfer learning on an uploaded dataset: hymenoptera_resnet18's fields and
    defaults, plus ``augment`` and ``weights: model:<model_id>``."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"epochs": 10, "mode": "finetune", "augment": True, "weights": "IMAGENET1K_V1"}]
        }
    )

    weights: str = Field(
        "default",
        pattern=WEIGHTS_PATTERN,
        description=(
            "Initial backbone weights: `default` = the server's RESNET18_WEIGHTS setting, "
            "`IMAGENET1K_V1`, `local` = RESNET18_WEIGHTS_FILE, `none` = random init, or "
            "`model:<model_id>` = the backbone of a ResNet18 checkpoint in the store (its fc is "
            "re-initialised unless the checkpoint has the same classes)."
        ),
        examples=["IMAGENET1K_V1"],
    )
    augment: bool = Field(
        False,
        description=(
            "Fine-tuning only: RandomResizedCrop(224) and a horizontal flip of every training image "
            "(torchvision.transforms.v2, on the training device)."
        ),
    )

    @model_validator(mode="after")
    def _augment_needs_finetune(self) -> CustomResNetHyperparameters:
        if self.augment and self.mode != "finetune":
            raise ValueError("augment needs mode finetune (feature_extraction computes each feature once)")
        return self

    @property
    def source_model(self) -> str | None:
        """The model id of ``weights: model:<id>``, else None."""
        return self.weights[6:] if self.weights.startswith("model:") else None


HYPERPARAMETERS: dict[str, type[_Hyperparameters]] = {
    "cifar10_dense": DenseHyperparameters,
    "mnist_lenet5": LeNetHyperparameters,
    "hymenoptera_resnet18": ResNetHyperparameters,
    "custom_resnet18": CustomResNetHyperparameters,
}

Hyperparameters = DenseHyperparameters | LeNetHyperparameters | ResNetHyperparameters


def parse_hyperparameters(task: str, values: dict) -> Hyperparameters:
    """Validate ``values`` for ``task``; raises ``KeyError`` (unknown task) or ``ValidationError``."""
    return HYPERPARAMETERS[task].model_validate(values)
