"""custom_resnet18: the assignment's ResNet18 recipe on an uploaded dataset (see /datasets).

The same recipe, defaults and preset as ``hymenoptera_resnet18`` (fine-tuning or feature
extraction; Resize(256), CenterCrop(224), ImageNet mean/std), on the classes of a dataset
uploaded with ``POST /datasets`` and ingested into ``DATASETS_DIR/<id>/images.safetensors``
(``worker.ingest``). Two additions:

* ``augment: true`` (fine-tuning only): RandomResizedCrop and horizontal flip on every training
  batch, with torchvision.transforms.v2 on the training device (``worker.augment``);
* ``weights: model:<model_id>``: start from a ResNet18 checkpoint in the store (either ResNet18
  task); its ``fc`` is kept when the checkpoint has the same classes, else re-initialised.

The checkpoint's metadata records the dataset id (``dataset``), its classes and the preset, so
``/predict`` answers with the dataset's class names.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import ConfigDict, Field, model_validator

from models_store.checkpoint import CheckpointStore
from models_store.sources import resnet18_source_problem
from tasks.base import Preset, Task
from tasks.hymenoptera_resnet18 import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ResNetHyperparameters,
    ResNetRecipe,
    build_model,
)
from worker.augment import BatchAugment
from worker.data import DatasetNotFound
from worker.pretrained import PretrainedWeights, PretrainedWeightsUnavailable, resolve_weights
from worker.recipe_common import DeviceSplit
from worker.training import BatchLoop, EpochStats, TrainingContext

NAME = "custom_resnet18"
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


PRESET = Preset(
    task=NAME, mode="RGB", resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, eval_split="val"
)


def locate(data_dir: Path, split: str, allow_download: bool):
    """Uploaded datasets are not under DATA_DIR: each job names one (its ``dataset``)."""
    raise DatasetNotFound(f"{NAME} trains on an uploaded dataset: submit the job with a `dataset` id")


class CustomResNetRecipe(ResNetRecipe):
    """hymenoptera_resnet18's recipe on the job's uploaded dataset (``ctx.dataset``), with
    optional augmentation and ``model:<id>`` initial weights."""

    def __init__(self, hp: CustomResNetHyperparameters, ctx: TrainingContext):
        super().__init__(hp, ctx)
        self.preset = PRESET
        self.augment = BatchAugment(self.preset.crop, hp.seed) if hp.augment else None
        self._epoch, self._step = 0, 0

    def setup(self) -> None:
        from worker.ingest import load_uploaded

        if not self.ctx.dataset:
            raise DatasetNotFound(f"{NAME} trains on an uploaded dataset: the job has no `dataset`")
        splits = load_uploaded(self.ctx.datasets_dir, self.ctx.dataset)
        self.classes = splits["train"].classes
        self.weights, source_classes = self._initial_weights()
        self.ctx.on_info({"weights": self.weights.describe()})
        device = self.ctx.device
        self.train = DeviceSplit.from_dataset(
            splits["train"], device, self.hp.max_train_samples, self.hp.seed
        )
        self.val = DeviceSplit.from_dataset(splits["val"], device)
        self.train_size = len(self.train)
        model = build_model({"num_classes": len(self.classes)})
        _load_initial(model, self.weights, keep_fc=source_classes == self.classes)
        self.model = model.to(device)
        if self.hp.mode == "finetune":
            params = self.model.parameters()
        else:
            for p in self.model.parameters():
                p.requires_grad_(False)
            for p in self.model.fc.parameters():
                p.requires_grad_(True)
            params = self.model.fc.parameters()
            self.train_features, self.val_features = self._backbone_features()
        self.optimizer = torch.optim.SGD(
            params, lr=self.hp.lr, momentum=self.hp.momentum, weight_decay=self.hp.weight_decay
        )

    def _initial_weights(self) -> tuple[PretrainedWeights, list[str] | None]:
        """The initial weights and, for ``model:<id>``, that checkpoint's classes."""
        model_id = self.hp.source_model
        if model_id is None:
            weights = resolve_weights(
                self.hp.weights,
                self.ctx.resnet18_weights,
                self.ctx.resnet18_weights_file,
                self.ctx.allow_download,
            )
            return weights, None
        store = CheckpointStore(self.ctx.models_dir)
        problem = resnet18_source_problem(store, model_id)
        if problem:
            raise PretrainedWeightsUnavailable(problem)
        tensors, meta = store.load(model_id)
        weights = PretrainedWeights(
            tensors, f"model:{model_id}", str(store.root / model_id), meta["weights"]["sha256"]
        )
        return weights, list(meta.get("classes") or [])

    def _image_batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = self.train.images[idx]
        if self.augment is not None:
            images = self.augment(images, self._epoch, self._step)
            self._step += 1
        return self.preset.normalize(images), self.train.labels[idx]

    def train_one_epoch(self, epoch: int, lr: float, loop: BatchLoop) -> EpochStats:
        self._epoch, self._step = epoch, 0
        return super().train_one_epoch(epoch, lr, loop)

    def export(self) -> tuple[dict[str, torch.Tensor], dict, dict]:
        tensors, architecture, extra = super().export()
        return tensors, architecture, {**extra, "dataset": self.ctx.dataset, "augment": self.hp.augment}


def _load_initial(model: torch.nn.Module, weights: PretrainedWeights, keep_fc: bool) -> None:
    """Copy the backbone (and ``fc`` when ``keep_fc``) into ``model``, strictly on the backbone.

    Raises ``PretrainedWeightsUnavailable`` if the state dict does not fit ResNet18.
    """
    if weights.state_dict is None:
        return
    state = {k: v for k, v in weights.state_dict.items() if keep_fc or not k.startswith("fc.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise PretrainedWeightsUnavailable(f"{weights.name} does not fit ResNet18: {exc}") from exc
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise PretrainedWeightsUnavailable(
            f"{weights.name} is not a ResNet18 state dict: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


TASK = Task(
    name=NAME,
    title="ResNet18 on an uploaded dataset",
    description=(
        "Fine-tune ResNet18 (or train its new fc on frozen features) on a dataset uploaded with "
        "POST /datasets, named by `dataset`."
    ),
    hyperparameters=CustomResNetHyperparameters,
    preset=PRESET,
    build_model=build_model,
    locate=locate,
    recipe=CustomResNetRecipe,
    example={"mode": "finetune", "augment": True, "weights": "none"},
)
