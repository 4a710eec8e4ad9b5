"""Pieces the tasks' recipes share: a split on the training device and the autograd SGD epoch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from worker.data import ImageDataset
from worker.training import BatchLoop, EpochStats, seeded_subset


@dataclass
class DeviceSplit:
    """A split on the training device: uint8 images (N, C, H, W) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def from_dataset(
        cls,
        dataset: ImageDataset,
        device: torch.device,
        max_samples: int | None = None,
        seed: int = 0,
    ) -> DeviceSplit:
        subset = seeded_subset(len(dataset), max_samples, seed)
        images, labels = dataset.images, dataset.labels
        if subset is not None:
            images, labels = images[subset], labels[subset]
        return cls(images.to(device), labels.to(device))

    def __len__(self) -> int:
        return len(self.labels)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def sgd_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr: float,
    loop: BatchLoop,
    get_batch: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> EpochStats:
    """One epoch of cross-entropy + ``optimizer`` over the batches of ``loop``.

    ``get_batch`` maps an index tensor to (inputs, int64 labels) on the device. Loss and correct
    counts accumulate on the device and are read once at the end.
    """
    set_lr(optimizer, lr)
    model.train()
    device = loop.ctx.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    loop.loss_sum = loss_sum  # the running mean loss in progress reports
    for idx in loop:
        x, y = get_batch(idx)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
    return EpochStats(loss_sum=loss_sum.item(), correct=int(correct.item()), images=loop.images_done)
