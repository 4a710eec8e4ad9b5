"""hymenoptera_resnet18: ResNet18 transfer learning, fine-tuning or feature extraction.

* ``finetune``: every weight trains (SGD with momentum over all parameters, BatchNorm in train
  mode), as in the assignment.
* ``feature_extraction``: the backbone's weights are frozen and only the new ``fc`` trains. The
  assignment's loop recomputes the frozen backbone every epoch with the model in train mode, so
  its BatchNorm layers re-estimate their statistics on the training images. Here those
  statistics are estimated once (``_calibrate_batchnorm``), after which the backbone is a fixed
  function: its 512-d output is computed once per image (and cached on disk) and the fc trains
  on those features for all epochs. See bench/README.md for how the two compare.

Inputs use the task preset: Resize(256), CenterCrop(224), ImageNet mean/std, for train and val.
The model is channels-last on every device (``build_model``), in training and serving alike.

The whole task is here: hyperparameters, preset, network, dataset location, recipe.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import ConfigDict, Field
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.models import resnet18

from core.jobs import JobProgress
from tasks.base import Hyperparameters, JobExample, Preset, Task
from worker.data import DatasetNotFound, ImageFolderSource, download, find_image_folder
from worker.pretrained import load_backbone, resolve_weights
from worker.recipe_common import DeviceSplit, sgd_epoch
from worker.training import BatchLoop, EpochStats, TrainingContext, evaluate_accuracy

log = logging.getLogger(__name__)

NAME = "hymenoptera_resnet18"
EVAL_BATCH = 64
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision ResNet18_Weights.IMAGENET1K_V1 transforms
IMAGENET_STD = (0.229, 0.224, 0.225)
HYMENOPTERA_URL = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"


class ResNetHyperparameters(Hyperparameters):
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


PRESET = Preset(
    task=NAME, mode="RGB", resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, eval_split="val"
)


# Network -------------------------------------------------------------------------------------


def resnet18_classifier(num_classes: int = 2) -> nn.Module:
    """torchvision ResNet18 (random init) with ``fc`` replaced by Linear(512, num_classes).

    Input (N, 3, 224, 224) float32, output logits (N, num_classes).
    """
    model = resnet18(weights=None)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def build_model(architecture: dict) -> nn.Module:
    """resnet18_classifier(**architecture) in channels-last memory format, in training and serving
    alike (cuDNN's and oneDNN's channels-last kernels are faster; one layout everywhere keeps
    served probabilities bitwise equal to the ones evaluation computed). Raises ``TypeError``
    for unexpected keys."""
    return resnet18_classifier(**architecture).to(memory_format=torch.channels_last)


# Dataset -------------------------------------------------------------------------------------


def locate(data_dir: Path, split: str, allow_download: bool) -> ImageFolderSource:
    """``hymenoptera_data/{train,val}/<class>/*`` or ``hymenoptera_data.zip``; downloaded from
    PyTorch's tutorial archive URL when allowed. Raises ``DatasetNotFound``."""
    folder = find_image_folder(data_dir, "hymenoptera_data", split)
    if folder is not None:
        return folder
    if allow_download:
        from torchvision.datasets.utils import download_and_extract_archive

        download(
            "hymenoptera",
            HYMENOPTERA_URL,
            data_dir,
            lambda: download_and_extract_archive(HYMENOPTERA_URL, download_root=str(data_dir)),
        )
        return locate(data_dir, split, allow_download=False)
    raise DatasetNotFound(
        f"hymenoptera {split} split not found: looked for {data_dir / 'hymenoptera_data'}/{split}/"
        f"<class>/*.jpg and {data_dir / 'hymenoptera_data.zip'}. Put the official archive there "
        "or set ALLOW_DOWNLOAD=true"
    )


# Recipe --------------------------------------------------------------------------------------


class ResNetRecipe:
    """Recipe of hymenoptera_resnet18 (see module docstring)."""

    def __init__(self, hp: ResNetHyperparameters, ctx: TrainingContext):
        self.hp = hp
        self.ctx = ctx
        self.preset = PRESET

    def setup(self) -> None:
        weights = resolve_weights(
            self.hp.weights,
            self.ctx.resnet18_weights,
            self.ctx.resnet18_weights_file,
            self.ctx.allow_download,
        )
        self.weights = weights
        self.ctx.on_info({"weights": weights.describe()})
        train = self.ctx.load(NAME, "train")
        val = self.ctx.load(NAME, "val")
        device = self.ctx.device
        self.classes = train.classes
        self.train = DeviceSplit.from_dataset(train, device, self.hp.max_train_samples, self.hp.seed)
        self.val = DeviceSplit.from_dataset(val, device)
        self.train_size = len(self.train)
        model = build_model({"num_classes": len(self.classes)})
        load_backbone(model, weights)
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

    # fine-tuning ------------------------------------------------------------------------------

    def _image_batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.preset.normalize(self.train.images[idx]), self.train.labels[idx]

    # feature extraction -----------------------------------------------------------------------

    def _feature_batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.train_features[idx], self.train.labels[idx]

    def _backbone_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen-backbone features (N, 512) float32 of the train and val images.

        First the BatchNorm statistics are re-estimated on the training images (see
        ``_calibrate_batchnorm``), then every image goes once through the backbone in eval mode.
        Features and calibrated statistics are cached on disk, keyed by the backbone's initial
        weights, the images, the calibration batches and the device type.
        """
        backbone_state = {k: v for k, v in self.model.state_dict().items() if not k.startswith("fc.")}
        key = _digest(
            backbone_state,
            self.train.images,
            self.val.images,
            self.ctx.device.type,
            f"bn-calibration-v1 batch={self.hp.batch_size} seed={self.hp.seed}",
        )
        cache_file = Path(self.ctx.cache_dir) / "features" / f"resnet18-{key}.safetensors"
        cached = _read_feature_cache(cache_file)
        if cached is not None:
            self.model.load_state_dict(_prefixed(cached, "bn."), strict=False)
            return cached["train"].to(self.ctx.device), cached["val"].to(self.ctx.device)
        start = time.perf_counter()
        self._features_done, self._features_total = 0, 2 * len(self.train) + len(self.val)
        self._calibrate_batchnorm()
        train_features = self._features_of(self.train.images)
        val_features = self._features_of(self.val.images)
        self.ctx.add_time("features_s", time.perf_counter() - start)
        statistics = {
            f"bn.{k}": v for k, v in self.model.state_dict().items() if k.startswith(_bn_names(self.model))
        }
        _write_feature_cache(cache_file, {"train": train_features, "val": val_features, **statistics})
        return train_features, val_features

    def _feature_progress(self, images: int) -> None:
        """Report feature extraction (images through the backbone) and honour a cancel."""
        self._features_done += images
        self.ctx.on_progress(
            JobProgress(
                epochs=self.hp.epochs,
                features_done=self._features_done,
                features_total=self._features_total,
                stage="extracting_features",
            )
        )
        self.ctx.check_stop()

    def _calibrate_batchnorm(self) -> None:
        """Re-estimate every BatchNorm's running mean and variance on the training images.

        The assignment's feature-extraction loop freezes the backbone's weights but trains with the
        model in train mode, so its BatchNorm layers re-estimate their statistics on hymenoptera
        (an exponential average over the last batches) and evaluation uses those. Here the same
        statistics are computed once: one pass over the training images in batches of
        ``batch_size``, in train mode, with a cumulative average (``momentum=None``). The learnable
        weights never change.
        """
        norms = [m for m in self.model.modules() if isinstance(m, nn.BatchNorm2d)]
        momenta = [m.momentum for m in norms]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
        order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(self.hp.seed))
        order = order.to(self.ctx.device)
        self.model.train()
        try:
            with torch.no_grad():
                for start in range(0, len(order), self.hp.batch_size):
                    idx = order[start : start + self.hp.batch_size]
                    self.model(self.preset.normalize(self.train.images[idx]))
                    self._feature_progress(len(idx))
        finally:
            for norm, momentum in zip(norms, momenta, strict=True):
                norm.momentum = momentum
            self.model.eval()

    def _features_of(self, images: torch.Tensor) -> torch.Tensor:
        fc = self.model.fc
        self.model.fc = nn.Identity()
        self.model.eval()
        out = []
        try:
            with torch.inference_mode():
                for start in range(0, len(images), EVAL_BATCH):
                    x = self.preset.normalize(images[start : start + EVAL_BATCH])
                    out.append(self.model(x))
                    self._feature_progress(len(x))
        finally:
            self.model.fc = fc
        return torch.cat(out).clone()

    # recipe steps -----------------------------------------------------------------------------

    def train_one_epoch(self, epoch: int, lr: float, loop: BatchLoop) -> EpochStats:
        if self.hp.mode == "finetune":
            return sgd_epoch(self.model, self.optimizer, lr, loop, self._image_batch)
        stats = sgd_epoch(self.model.fc, self.optimizer, lr, loop, self._feature_batch)
        self.model.eval()
        return stats

    def eval_inputs(self) -> tuple:
        self.model.eval()
        if self.hp.mode == "feature_extraction":  # the fc on the cached frozen-backbone features
            return self.model.fc, self.val_features, self.val.labels, _IdentityPreset(), len(self.val)
        return self.model, self.val.images, self.val.labels, self.preset, EVAL_BATCH

    def evaluate(self) -> float:
        return evaluate_accuracy(*self.eval_inputs())

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def export(self) -> tuple[dict[str, torch.Tensor], dict, dict]:
        tensors = {k: v.contiguous() for k, v in self.model.state_dict().items()}
        extra = {"pretrained": self.weights.to_metadata(), "mode": self.hp.mode}
        return tensors, {"num_classes": len(self.classes)}, extra


def _bn_names(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of the BatchNorm layers."""
    return tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d))


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _read_feature_cache(path: Path) -> dict[str, torch.Tensor] | None:
    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except Exception as exc:  # a damaged cache is recomputed, never trusted
        log.warning("ignoring unreadable feature cache %s: %s", path, exc)
        return None


def _write_feature_cache(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        tmp.replace(path)
    except (OSError, SafetensorError) as exc:
        log.warning("could not write feature cache %s: %s", path, exc)


class _IdentityPreset:
    """Features are already model inputs: no normalisation."""

    @staticmethod
    def normalize(batch: torch.Tensor) -> torch.Tensor:
        return batch


def _digest(state: dict[str, torch.Tensor], *parts: object) -> str:
    digest = hashlib.sha256()
    for name, tensor in state.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for part in parts:
        if isinstance(part, torch.Tensor):
            digest.update(part.cpu().contiguous().numpy().tobytes())
        else:
            digest.update(str(part).encode())
    return digest.hexdigest()[:20]


TASK = Task(
    name=NAME,
    title="ResNet18 on hymenoptera",
    description="Fine-tune ResNet18 (or train its new fc on frozen features) on hymenoptera.",
    hyperparameters=ResNetHyperparameters,
    preset=PRESET,
    build_model=build_model,
    locate=locate,
    recipe=ResNetRecipe,
    example={"mode": "finetune", "weights": "none"},
    job_example=JobExample(
        "resnet", "ResNet18 feature extraction on hymenoptera", {"mode": "feature_extraction"}
    ),
)
