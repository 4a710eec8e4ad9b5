"""mnist_lenet5: LeNet-5 with cross-entropy and SGD with momentum (the assignment's settings)."""

from __future__ import annotations

import torch

from core.hyperparams import LeNetHyperparameters
from models_store.architectures import build_model
from models_store.presets import PRESETS
from worker.recipes.common import DeviceSplit, sgd_epoch
from worker.training import BatchLoop, EpochStats, TrainingContext, evaluate_accuracy

TASK = "mnist_lenet5"


class LeNetRecipe:
    """Recipe of mnist_lenet5: batches normalised with mean 0.5 / std 0.5, logits from LeNet5."""

    def __init__(self, hp: LeNetHyperparameters, ctx: TrainingContext):
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
        self.model = build_model(TASK, {"num_classes": len(self.classes)}).to(device)
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
