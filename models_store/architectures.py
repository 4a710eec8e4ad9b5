"""Model architectures of the three tasks, shared by the worker (training) and the API (serving).

Every model maps a normalised float32 batch (see ``presets.Preset.normalize``) to logits of shape
(N, num_classes). ``build_model`` rebuilds one from the ``architecture`` dict stored in a
checkpoint's metadata.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet18


class DenseNet(nn.Module):
    """One-hidden-layer dense net of the assignment: x -> sigmoid(x W1 + b1) W2 + b2.

    Its parameters are plain buffers, not ``nn.Parameter``: the training recipe updates them with
    hand-written backpropagation (``worker.recipes.dense``) and autograd never sees them.

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


def resnet18_classifier(num_classes: int = 2) -> nn.Module:
    """torchvision ResNet18 (random init) with ``fc`` replaced by Linear(512, num_classes).

    Input (N, 3, 224, 224) float32, output logits (N, num_classes).
    """
    model = resnet18(weights=None)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def build_model(task: str, architecture: dict) -> nn.Module:
    """Build an uninitialised model of ``task`` from a checkpoint's ``architecture`` dict.

    The convolutional nets come in channels-last memory format, in training and in serving alike
    (same maths; oneDNN's channels-last convolution and pooling kernels are ~1.2x faster for
    LeNet-5 on CPU, and cuDNN's on GPU). Keeping one layout everywhere keeps served
    probabilities bitwise equal to the ones evaluation computed.

    Raises:
        ValueError: unknown task.
        TypeError: ``architecture`` has unexpected keys.
    """
    if task == "cifar10_dense":
        return DenseNet(**architecture)
    if task == "mnist_lenet5":
        return LeNet5(**architecture).to(memory_format=torch.channels_last)
    if task in ("hymenoptera_resnet18", "custom_resnet18"):
        return resnet18_classifier(**architecture).to(memory_format=torch.channels_last)
    raise ValueError(f"unknown task {task!r}")
