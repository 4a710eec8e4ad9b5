"""The assignment's own training loops, kept as the benchmark's baseline.

Each loop is the method the assignment used: a torchvision dataset whose ``__getitem__`` decodes
one image and applies ``ToTensor``/``Normalize`` (and ``Resize``/``CenterCrop``), batched by a
``DataLoader`` with the assignment's batch size and workers, moved to the device batch by batch.
The models, optimizers and hyperparameters are the product's (same ``DenseNet`` maths, same
``LeNet5``, same ResNet18), so the comparison isolates the data path and the loop. For ResNet18
feature extraction the backbone is frozen by ``requires_grad=False`` and recomputed every epoch
with the model in train mode, as in PyTorch's transfer-learning tutorial.

Every function returns a dict: per-epoch metrics, training time and images, total wall time.
"""

from __future__ import annotations

import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms

from tasks import get_task
from tasks.cifar10_dense import PARAMS, dense_forward_backward, init_dense, sgd_update
from tasks.hymenoptera_resnet18 import resnet18_classifier
from tasks.mnist_lenet5 import LeNet5
from worker.training import seeded_subset

LOADER_SETTINGS = {  # (batch size from the hyperparameters, DataLoader workers) per the assignment
    "cifar10_dense": 2,
    "mnist_lenet5": 0,
    "hymenoptera_resnet18": 4,
}


def extract_once(archive: Path, target: Path) -> Path:
    """Extract ``archive`` into ``target`` unless done before (not timed: the assignment starts
    from an extracted dataset)."""
    marker = target / ".extracted"
    if not marker.exists():
        target.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(target)
        marker.touch()
    return target


def _transform(task: str) -> transforms.Compose:
    preset = get_task(task).preset
    steps = [transforms.Resize(preset.resize), transforms.CenterCrop(preset.crop)] if preset.crop else []
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(preset.mean, preset.std)])


def _datasets(task: str, data_dir: Path, work_dir: Path) -> tuple[Dataset, Dataset]:
    transform = _transform(task)
    if task == "mnist_lenet5":
        return (
            datasets.MNIST(str(data_dir), train=True, transform=transform),
            datasets.MNIST(str(data_dir), train=False, transform=transform),
        )
    if task == "cifar10_dense":
        root = extract_once(data_dir / "cifar10-jpg.zip", work_dir / "cifar10") / "cifar10-jpg"
        return datasets.ImageFolder(root / "train", transform), datasets.ImageFolder(root / "test", transform)
    root = extract_once(data_dir / "hymenoptera_data.zip", work_dir / "hymenoptera") / "hymenoptera_data"
    return datasets.ImageFolder(root / "train", transform), datasets.ImageFolder(root / "val", transform)


def run_reference(
    task: str,
    hyperparameters: dict,
    data_dir: Path,
    work_dir: Path,
    device: torch.device,
    on_epoch: Callable[[dict], None] = lambda m: None,
) -> dict:
    """Train ``task`` the assignment's way; returns {"metrics", "train_s", "train_images", "wall_s"}."""
    hp = get_task(task).parse_hyperparameters(hyperparameters)
    started = time.perf_counter()
    torch.manual_seed(hp.seed)
    train_set, eval_set = _datasets(task, data_dir, work_dir)
    subset = seeded_subset(len(train_set), hp.max_train_samples, hp.seed)
    if subset is not None:
        train_set = Subset(train_set, subset.tolist())
    workers = LOADER_SETTINGS[task]
    generator = torch.Generator().manual_seed(hp.seed)
    loader = DataLoader(train_set, hp.batch_size, shuffle=True, num_workers=workers, generator=generator)
    eval_loader = DataLoader(eval_set, hp.batch_size, shuffle=False, num_workers=workers)
    step, evaluate = _model(task, hp, device)
    metrics, train_s, train_images = [], 0.0, 0
    for epoch in range(hp.epochs):
        lr = hp.lr_at_epoch(epoch)
        epoch_start = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss, batch_correct = step(x, y, lr)
            loss_sum += loss * len(y)
            correct += batch_correct
            seen += len(y)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_train_s = time.perf_counter() - epoch_start
        train_s += epoch_train_s
        train_images += seen
        accuracy = evaluate(eval_loader)
        metrics.append(
            {
                "epoch": epoch + 1,
                "train_loss": loss_sum / seen,
                "train_accuracy": correct / seen,
                "eval_accuracy": accuracy,
                "images_per_s": seen / epoch_train_s,
                "duration_s": time.perf_counter() - epoch_start,
            }
        )
        on_epoch(metrics[-1])
    return {
        "metrics": metrics,
        "train_s": train_s,
        "train_images": train_images,
        "wall_s": time.perf_counter() - started,
    }


def _model(task: str, hp, device: torch.device):
    """(step(x, y, lr) -> (loss, correct), evaluate(loader) -> accuracy) of the task's model."""
    if task == "cifar10_dense":
        net = init_dense(3072, hp.hidden_size, 10, hp.init_std, torch.Generator().manual_seed(hp.seed)).to(
            device
        )
        velocity = {name: torch.zeros_like(getattr(net, name)) for name in PARAMS}

        def dense_step(x, y, lr):
            loss, correct, grads = dense_forward_backward(net, x.view(len(x), -1), y, hp.reg)
            sgd_update(net, grads, lr, hp.momentum, velocity)
            return loss.item(), correct.item()

        return dense_step, lambda loader: _accuracy(lambda x: net(x.view(len(x), -1)), loader, device)

    if task == "mnist_lenet5":
        model = LeNet5().to(device)
        params = model.parameters()
        train_mode = model
    else:
        model = resnet18_classifier(2).to(device)
        params = model.parameters()
        train_mode = model
        if hp.mode == "feature_extraction":
            for p in model.parameters():
                p.requires_grad_(False)
            for p in model.fc.parameters():
                p.requires_grad_(True)
            params = model.fc.parameters()
    optimizer = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)

    def step(x, y, lr):
        for group in optimizer.param_groups:
            group["lr"] = lr
        train_mode.train()
        outputs = model(x)
        loss = F.cross_entropy(outputs, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item(), (outputs.argmax(1) == y).sum().item()

    return step, lambda loader: _accuracy(model, loader, device)


def _accuracy(model: nn.Module | Callable, loader: DataLoader, device: torch.device) -> float:
    if isinstance(model, nn.Module):
        model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    return correct / total
