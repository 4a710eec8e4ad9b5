"""mnist_lenet5: LeNet-5 on MNIST, cross-entropy and SGD with momentum (the assignment's settings).

The whole task: hyperparameters, preset, network, dataset location and IDX reader, recipe.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ConfigDict, Field
from torch import nn
from torchvision.datasets.mnist import read_image_file, read_label_file

from tasks.base import Hyperparameters, JobExample, Preset, Task
from worker.data import DatasetCorrupt, DatasetNotFound, ImageDataset, download, file_fingerprint, plain_or_gz
from worker.recipe_common import DeviceSplit, sgd_epoch
from worker.training import BatchLoop, EpochStats, TrainingContext, evaluate_accuracy

NAME = "mnist_lenet5"


class LeNetHyperparameters(Hyperparameters):
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


PRESET = Preset(task=NAME, mode="L", resize=(28, 28), crop=None, mean=(0.5,), std=(0.5,), eval_split="test")


# Network -------------------------------------------------------------------------------------


class LeNet5(nn.Module):
    """LeNet-5 for 1x28x28 inputs, as in the assignment.

    conv 1->6 (5x5, padding 2), ReLU, max-pool 2 -> conv 6->16 (5x5), ReLU, max-pool 2
    -> flatten 16*5*5 -> fc 120, ReLU -> fc 84, ReLU -> fc num_classes (logits).
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, kernel_size=5, stride=1, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2, 2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 28, 28) float32 -> logits (N, num_classes)."""
        return self.classifier(self.features(x))


def build_model(architecture: dict) -> nn.Module:
    """LeNet5(**architecture) in channels-last memory format, in training and serving alike (same
    maths; oneDNN's channels-last convolution and pooling kernels are ~1.2x faster on CPU, and
    cuDNN's on GPU; one layout everywhere keeps served probabilities bitwise equal to the ones
    evaluation computed). Raises ``TypeError`` for unexpected keys."""
    return LeNet5(**architecture).to(memory_format=torch.channels_last)


# Dataset -------------------------------------------------------------------------------------

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class MnistIdxSource:
    """One split of MNIST as torchvision's IDX files (plain or gzipped): images and labels."""

    images: str
    labels: str
    kind = "mnist"

    def __str__(self) -> str:
        return f"{self.images}, {self.labels}"

    def fingerprint(self, split: str) -> str:
        return file_fingerprint([Path(self.images), Path(self.labels)])

    def read(self, split: str, preset: Preset, check_stop: Callable[[], None]) -> ImageDataset:
        """uint8 images (N, 1, 28, 28) as stored (28x28 is the preset's size), labels 0-9."""
        try:
            with tempfile.TemporaryDirectory() as tmp:
                images = read_image_file(_ungzipped(self.images, tmp))
                labels = read_label_file(_ungzipped(self.labels, tmp))
        except (AssertionError, ValueError, TypeError, RuntimeError, OSError) as exc:
            raise DatasetCorrupt(f"unreadable MNIST IDX file {self.images} / {self.labels}: {exc}") from exc
        if len(images) != len(labels):
            raise DatasetCorrupt(
                f"{self.images} has {len(images)} images but {self.labels} {len(labels)} labels"
            )
        return ImageDataset(
            images=images.unsqueeze(1).contiguous(),
            labels=labels.long(),
            classes=[str(d) for d in range(10)],
            source=self.images,
        )


def _ungzipped(path: str, tmp_dir: str) -> str:
    if not path.endswith(".gz"):
        return path
    out = os.path.join(tmp_dir, os.path.basename(path)[:-3])
    with gzip.open(path, "rb") as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return out


def locate(data_dir: Path, split: str, allow_download: bool) -> MnistIdxSource:
    """torchvision's ``MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``, downloaded
    with ``torchvision.datasets.MNIST`` when allowed. Raises ``DatasetNotFound``."""
    raw = data_dir / "MNIST" / "raw"
    names = MNIST_FILES[split]
    found = [plain_or_gz(raw / name) for name in names]
    if all(found):
        return MnistIdxSource(images=str(found[0]), labels=str(found[1]))
    if allow_download:
        from torchvision.datasets import MNIST

        download(
            "MNIST", "torchvision's MNIST mirrors", data_dir, lambda: MNIST(str(data_dir), download=True)
        )
        return locate(data_dir, split, allow_download=False)
    looked = ", ".join(str(raw / n) + "[.gz]" for n in names)
    raise DatasetNotFound(
        f"MNIST {split} split not found: looked for {looked}. Put torchvision's MNIST/raw files under "
        "DATA_DIR or set ALLOW_DOWNLOAD=true"
    )


# Recipe --------------------------------------------------------------------------------------


class LeNetRecipe:
    """Recipe of mnist_lenet5: batches normalised with mean 0.5 / std 0.5, logits from LeNet5."""

    def __init__(self, hp: LeNetHyperparameters, ctx: TrainingContext):
        self.hp = hp
        self.ctx = ctx
        self.preset = PRESET

    def setup(self) -> None:
        train = self.ctx.load(NAME, "train")
        test = self.ctx.load(NAME, "test")
        device = self.ctx.device
        self.classes = train.classes
        self.train = DeviceSplit.from_dataset(train, device, self.hp.max_train_samples, self.hp.seed)
        self.test = DeviceSplit.from_dataset(test, device)
        self.train_size = len(self.train)
        self.model = build_model({"num_classes": len(self.classes)}).to(device)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=self.hp.lr,
            momentum=self.hp.momentum,
            weight_decay=self.hp.weight_decay,
        )

    def _batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.preset.normalize(self.train.images[idx]), self.train.labels[idx]

    def train_one_epoch(self, epoch: int, lr: float, loop: BatchLoop) -> EpochStats:
        return sgd_epoch(self.model, self.optimizer, lr, loop, self._batch)

    def eval_inputs(self) -> tuple:
        self.model.eval()
        return self.model, self.test.images, self.test.labels, self.preset, 2048

    def evaluate(self) -> float:
        return evaluate_accuracy(*self.eval_inputs())

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def export(self) -> tuple[dict[str, torch.Tensor], dict, dict]:
        return dict(self.model.state_dict()), {"num_classes": len(self.classes)}, {}


TASK = Task(
    name=NAME,
    title="LeNet-5 on MNIST",
    description="Train LeNet-5 on MNIST.",
    hyperparameters=LeNetHyperparameters,
    preset=PRESET,
    build_model=build_model,
    locate=locate,
    recipe=LeNetRecipe,
    example={"epochs": 10},
    job_example=JobExample("lenet", "LeNet-5 on MNIST, the assignment's settings", {"epochs": 10}),
)
