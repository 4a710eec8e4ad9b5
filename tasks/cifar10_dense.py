"""cifar10_dense: the assignment's one-hidden-layer net with hand-written backprop and SGD.

Forward (X: (N, 3072) float32, normalised with mean 0.5 / std 0.5 and flattened C, H, W):
    h = sigmoid(X W1 + b1)           (N, H)
    ŷ = softmax(h W2 + b2)           (N, K)
    loss = mean_n CE(ŷ_n, y_n) + reg * (|W1|² + |W2|²)

Backward, exactly as the assignment writes it (its published accuracies depend on it):
    dZ2 = ŷ − y                      summed over the batch below, NOT divided by N
    dW2 = hᵀ dZ2 + reg W2,  db2 = Σ_n dZ2
    dH  = dZ2 W2ᵀ ⊙ h (1 − h)
    dW1 = Xᵀ dH + reg W1,   db1 = Σ_n dH
These are the exact gradients of N·mean CE + (reg/2)(|W1|² + |W2|²) (tests/unit/test_dense.py
checks them against autograd). Update: W ← W − lr·dW (with momentum m > 0: v ← m v + dW, W ← W − lr v).

No autograd anywhere: the parameters are buffers of ``DenseNet``.

The whole task is here: hyperparameters, preset, network, dataset location and the reader of
CIFAR-10's python batches, recipe.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from pydantic import ConfigDict, Field
from torch import nn

from tasks.base import Hyperparameters, JobExample, Preset, Task
from worker.data import (
    DatasetCorrupt,
    DatasetNotFound,
    ImageDataset,
    ImageFolderSource,
    download,
    file_fingerprint,
    find_image_folder,
)
from worker.recipe_common import DeviceSplit
from worker.training import BatchLoop, EpochStats, TrainingContext, evaluate_accuracy

NAME = "cifar10_dense"
PARAMS = ("W1", "b1", "W2", "b2")


class DenseHyperparameters(Hyperparameters):
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


PRESET = Preset(
    task=NAME,
    mode="RGB",
    resize=(32, 32),
    crop=None,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    eval_split="test",
)


# Network -------------------------------------------------------------------------------------


class DenseNet(nn.Module):
    """One-hidden-layer dense net of the assignment: x -> sigmoid(x W1 + b1) W2 + b2.

    Its parameters are plain buffers, not ``nn.Parameter``: the training recipe updates them with
    hand-written backpropagation (``DenseRecipe`` below) and autograd never sees them.

    Args:
        input_size: D, flattened input features (3 * 32 * 32 = 3072 for CIFAR-10).
        hidden_size: H hidden units.
        num_classes: K outputs.
    """

    def __init__(self, input_size: int = 3072, hidden_size: int = 100, num_classes: int = 10):
        super().__init__()
        self.register_buffer("W1", torch.zeros(input_size, hidden_size))
        self.register_buffer("b1", torch.zeros(hidden_size))
        self.register_buffer("W2", torch.zeros(hidden_size, num_classes))
        self.register_buffer("b2", torch.zeros(num_classes))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) or (N, C, H, W) float32 -> hidden activations h, (N, H) float32 in (0, 1)."""
        return torch.sigmoid(torch.addmm(self.b1, x.flatten(1), self.W1))

    def logits_from_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """(N, H) hidden activations -> logits Z2, (N, K) float32."""
        return torch.addmm(self.b2, h, self.W2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) or (N, D) float32 -> logits (N, K) float32; softmax gives the assignment's ŷ."""
        return self.logits_from_hidden(self.hidden(x))


def build_model(architecture: dict) -> nn.Module:
    """DenseNet(**architecture); raises ``TypeError`` for unexpected keys."""
    return DenseNet(**architecture)


# Dataset -------------------------------------------------------------------------------------

CIFAR_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


@dataclass(frozen=True)
class CifarBatchesSource:
    """torchvision's ``cifar-10-batches-py/`` folder of python batches."""

    folder: str
    kind = "cifar_batches"

    def __str__(self) -> str:
        return self.folder

    def fingerprint(self, split: str) -> str:
        return file_fingerprint(
            [Path(self.folder) / name for name in [*CIFAR_BATCHES[split], "batches.meta"]]
        )

    def read(self, split: str, preset: Preset, check_stop: Callable[[], None]) -> ImageDataset:
        """uint8 images (N, 3, 32, 32) as stored (32x32 is the preset's size); class names from
        ``batches.meta``. Raises ``DatasetCorrupt``."""
        folder = Path(self.folder)
        images, labels = [], []
        for name in CIFAR_BATCHES[split]:
            batch = _load_cifar_batch(folder / name)
            data = np.asarray(batch["data"], dtype=np.uint8)
            images.append(data.reshape(-1, 3, 32, 32))
            labels.extend(batch["labels"] if "labels" in batch else batch["fine_labels"])
        meta = _load_cifar_batch(folder / "batches.meta") if (folder / "batches.meta").is_file() else {}
        classes = list(meta.get("label_names", [str(i) for i in range(10)]))
        return ImageDataset(
            images=torch.from_numpy(np.concatenate(images)).contiguous(),
            labels=torch.tensor(labels, dtype=torch.int64),
            classes=classes,
            source=str(folder),
        )


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10 python batches without executing arbitrary code: only the numpy
    array reconstruction that the official files contain is allowed."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module.replace("numpy.core.", "numpy._core."), name)
        raise pickle.UnpicklingError(f"CIFAR batch refers to {module}.{name}, which is not allowed")


def _load_cifar_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _BatchUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError) as exc:
        raise DatasetCorrupt(f"unreadable CIFAR-10 batch {path}: {exc}") from exc


def locate(data_dir: Path, split: str, allow_download: bool) -> CifarBatchesSource | ImageFolderSource:
    """torchvision's python batches ``cifar-10-batches-py/``, or an ImageFolder tree
    ``cifar10-jpg/{train,test}/<class>/*`` or ``cifar10/...``, or a ``.zip`` of such a tree (first
    match wins); downloaded with ``torchvision.datasets.CIFAR10`` when allowed. Raises
    ``DatasetNotFound``."""
    batches = data_dir / "cifar-10-batches-py"
    if all((batches / name).is_file() for name in CIFAR_BATCHES[split]):
        return CifarBatchesSource(str(batches))
    looked = [str(batches)]
    for name in ("cifar10-jpg", "cifar10"):
        folder = find_image_folder(data_dir, name, split)
        looked += [str(data_dir / name), str(data_dir / f"{name}.zip")]
        if folder is not None:
            return folder
    if allow_download:
        from torchvision.datasets import CIFAR10

        download("CIFAR-10", CIFAR10.url, data_dir, lambda: CIFAR10(str(data_dir), download=True))
        return locate(data_dir, split, allow_download=False)
    raise DatasetNotFound(
        f"CIFAR-10 {split} split not found: looked for torchvision batches in {looked[0]} and for "
        f"an ImageFolder tree ({split}/<class>/*.jpg) in {', '.join(looked[1:])}. "
        "Put one there or set ALLOW_DOWNLOAD=true"
    )


# Recipe --------------------------------------------------------------------------------------


def init_dense(
    input_size: int, hidden_size: int, num_classes: int, std: float, generator: torch.Generator
) -> DenseNet:
    """W1 (D, H), W2 (H, K) ~ N(0, std²) drawn from ``generator`` on the CPU; biases zero."""
    net = DenseNet(input_size, hidden_size, num_classes)
    net.W1.copy_(torch.randn(input_size, hidden_size, generator=generator) * std)
    net.W2.copy_(torch.randn(hidden_size, num_classes, generator=generator) * std)
    return net


def dense_forward_backward(
    net: DenseNet, x: torch.Tensor, y: torch.Tensor, reg: float
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Loss, correct count and hand-written gradients for one batch.

    Args:
        net: the parameters.
        x: float32 (N, D) normalised inputs.
        y: int64 (N,) labels.
        reg: L2 strength.

    Returns:
        (loss: 0-d float32 tensor, mean CE + reg term; correct: 0-d int64 tensor;
        grads: {"W1": (D, H), "b1": (H,), "W2": (H, K), "b2": (K,)} float32).
    """
    h = net.hidden(x)
    z2 = net.logits_from_hidden(h)
    log_probs = torch.log_softmax(z2, dim=1)
    loss = -log_probs.gather(1, y.unsqueeze(1)).mean()
    if reg:
        loss = loss + reg * (net.W1.square().sum() + net.W2.square().sum())
    dz2 = log_probs.exp_()  # ŷ, then ŷ − y in place
    dz2.scatter_add_(1, y.unsqueeze(1), torch.full((len(y), 1), -1.0, device=dz2.device))
    dh = (dz2 @ net.W2.T).mul_(h).mul_(1 - h)
    grads = {
        "W2": h.T @ dz2,
        "b2": dz2.sum(0),
        "W1": x.T @ dh,
        "b1": dh.sum(0),
    }
    if reg:
        grads["W1"].add_(net.W1, alpha=reg)
        grads["W2"].add_(net.W2, alpha=reg)
    correct = (z2.argmax(1) == y).sum()
    return loss.detach(), correct, grads


def sgd_update(
    net: DenseNet,
    grads: dict[str, torch.Tensor],
    lr: float,
    momentum: float,
    velocity: dict[str, torch.Tensor],
) -> None:
    """In place: W ← W − lr·dW, or with momentum v ← m v + dW, W ← W − lr v (PyTorch's SGD form)."""
    for name in PARAMS:
        step = grads[name]
        if momentum:
            step = velocity[name].mul_(momentum).add_(step)
        getattr(net, name).add_(step, alpha=-lr)


class DenseRecipe:
    """Recipe of cifar10_dense (see module docstring)."""

    def __init__(self, hp: DenseHyperparameters, ctx: TrainingContext):
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
        input_size = int(train.images[0].numel())
        generator = torch.Generator().manual_seed(self.hp.seed)
        net = init_dense(input_size, self.hp.hidden_size, len(self.classes), self.hp.init_std, generator)
        self.net = net.to(device)
        self.velocity = {name: torch.zeros_like(getattr(self.net, name)) for name in PARAMS}

    def train_one_epoch(self, epoch: int, lr: float, loop: BatchLoop) -> EpochStats:
        device = self.ctx.device
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        loop.loss_sum = loss_sum  # the running mean loss in progress reports
        for idx in loop:
            x = self.preset.normalize(self.train.images[idx]).flatten(1)
            y = self.train.labels[idx]
            loss, batch_correct, grads = dense_forward_backward(self.net, x, y, self.hp.reg)
            sgd_update(self.net, grads, lr, self.hp.momentum, self.velocity)
            loss_sum += loss * len(y)
            correct += batch_correct
        return EpochStats(loss_sum=loss_sum.item(), correct=int(correct.item()), images=loop.images_done)

    def eval_inputs(self) -> tuple:
        return self.net, self.test.images, self.test.labels, self.preset, 10_000

    def evaluate(self) -> float:
        return evaluate_accuracy(*self.eval_inputs())

    def state(self) -> dict:
        return {"model": self.net.state_dict(), "velocity": self.velocity}

    def load_state(self, state: dict) -> None:
        self.net.load_state_dict(state["model"])
        for name, value in state["velocity"].items():
            self.velocity[name].copy_(value)

    def export(self) -> tuple[dict[str, torch.Tensor], dict, dict]:
        architecture = {
            "input_size": self.net.W1.shape[0],
            "hidden_size": self.net.W1.shape[1],
            "num_classes": self.net.W2.shape[1],
        }
        return dict(self.net.state_dict()), architecture, {}


TASK = Task(
    name=NAME,
    title="Dense net on CIFAR-10",
    description="Train the hand-written dense net on CIFAR-10.",
    hyperparameters=DenseHyperparameters,
    preset=PRESET,
    build_model=build_model,
    locate=locate,
    recipe=DenseRecipe,
    example={"epochs": 2},
    job_example=JobExample(
        "dense", "Dense net on CIFAR-10, quick run", {"epochs": 2, "max_train_samples": 10000}
    ),
)
