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
These are the exact gradients of N·mean CE + (reg/2)(|W1|² + |W2|²) (tests/test_dense.py checks
them against autograd). Update: W ← W − lr·dW (with momentum m > 0: v ← m v + dW, W ← W − lr v).

No autograd anywhere: the parameters are buffers of ``models_store.architectures.DenseNet``.
"""

from __future__ import annotations

import torch

from core.hyperparams import DenseHyperparameters
from models_store.architectures import DenseNet
from models_store.presets import PRESETS
from worker.recipes.common import DeviceSplit
from worker.training import BatchLoop, EpochStats, TrainingContext, evaluate_accuracy

TASK = "cifar10_dense"
PARAMS = ("W1", "b1", "W2", "b2")


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
        self.preset = PRESETS[TASK]

    def setup(self) -> None:
        train = self.ctx.load(TASK, "train")
        test = self.ctx.load(TASK, "test")
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
