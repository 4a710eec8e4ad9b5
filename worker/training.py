"""The training loop shared by every task's recipe, the Celery task and the benchmark.

``run_training(task, hyperparameters, ctx)`` is a plain function: it looks the task up in the
registry (``tasks.get_task``; each task's recipe lives in its ``tasks/<name>.py``), builds the
recipe, which loads the data, resumes from the job's last finished epoch when resume state
exists, trains epoch by epoch (reporting progress and checking for a stop request at batch
boundaries) and returns the tensors and metadata of the checkpoint to save. The Celery task
(``worker.tasks``) and the benchmark (``bench/benchmark.py``) both call it, so the benchmark
measures the code the worker runs.

Hot-loop rules (CPU and GPU): the dataset lives on the training device as uint8; batches are drawn
by index from a seeded permutation and normalised on the batch; loss and accuracy accumulate on
the device and are read once per epoch, so no batch forces a GPU sync.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from core.jobs import EpochMetrics, JobProgress
from tasks import get_task
from tasks.base import Hyperparameters, Preset, Task
from worker.data import DatasetCorrupt, ImageDataset, load_split
from worker.evaluation import evaluation_report, predict_probabilities
from worker.resume import ResumeState, ResumeStore

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite: the job fails instead of saving them."""


class StopTraining(Exception):
    """Raised at a batch boundary when the job must stop (cancelled, or its lease was lost)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class TrainingContext:
    """Everything a recipe needs from its surroundings.

    Attributes:
        device: training device.
        data_dir, cache_dir, allow_download: see ``core.config.Settings``.
        resnet18_weights, resnet18_weights_file: server-side choice of ResNet18 initial weights.
        dataset, datasets_dir: the uploaded dataset a job trains on (custom_resnet18) and DATASETS_DIR.
        models_dir: MODELS_DIR, for initial weights taken from a checkpoint (``model:<id>``).
        on_progress: called with a ``JobProgress`` at most every ``progress_interval_s`` seconds
            and at every stage change.
        on_epoch: called with all ``EpochMetrics`` so far after each epoch.
        on_info: called with facts for the job record, e.g. {"weights": "none"}.
        should_stop: returns a reason to stop (cancel, lease lost) or None; checked at batch
            boundaries at most every ``stop_check_interval_s`` seconds, and always after data
            loading and after every epoch (``check_stop``).
        resume: where per-epoch resume state is kept (None: no resume state).
        show_progress_bar: tqdm bar per epoch on stderr.
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    data_dir: Path = Path("data")
    cache_dir: Path = Path("var/cache")
    allow_download: bool = False
    resnet18_weights: str = "IMAGENET1K_V1"
    resnet18_weights_file: Path | None = None
    dataset: str | None = None
    datasets_dir: Path = Path("var/datasets")
    models_dir: Path = Path("var/models")
    on_progress: Callable[[JobProgress], None] = lambda progress: None
    on_epoch: Callable[[list[EpochMetrics]], None] = lambda metrics: None
    on_info: Callable[[dict], None] = lambda info: None
    should_stop: Callable[[], str | None] = lambda: None
    resume: ResumeStore | None = None
    show_progress_bar: bool = True
    progress_interval_s: float = 0.25
    stop_check_interval_s: float = 0.25
    timings: dict[str, float] = field(default_factory=dict)
    epochs: int = 0
    _images_loaded: int = field(default=0, repr=False)
    _last_stop_check: float = field(default=0.0, repr=False)
    _classes: dict[str, tuple[str, list[str]]] = field(default_factory=dict, repr=False)

    def check_stop(self, force: bool = False) -> None:
        """Raise ``StopTraining`` if ``should_stop`` names a reason.

        Asked at most every ``stop_check_interval_s`` seconds (over the whole job, not per epoch),
        or always with ``force`` (between epochs, before the checkpoint is written).
        """
        now = time.perf_counter()
        if not force and now - self._last_stop_check < self.stop_check_interval_s:
            return
        self._last_stop_check = now
        reason = self.should_stop()
        if reason:
            raise StopTraining(reason)

    def add_time(self, name: str, seconds: float) -> None:
        self.timings[name] = round(self.timings.get(name, 0.0) + seconds, 4)

    def load(self, task: str, split: str) -> ImageDataset:
        start = time.perf_counter()
        loaded_before = self._images_loaded
        last_report = [0.0]

        def on_images(done: int, total: int) -> None:  # counts add up over the splits of the job
            now = time.perf_counter()
            if done < total and now - last_report[0] < self.progress_interval_s:
                return
            last_report[0] = now
            self.on_progress(
                JobProgress(
                    epochs=self.epochs,
                    images_done=loaded_before + done,
                    images_total=loaded_before + total,
                    stage="loading_data",
                )
            )

        dataset = load_split(
            task,
            split,
            self.data_dir,
            self.cache_dir,
            self.allow_download,
            check_stop=self.check_stop,
            on_images=on_images,
        )
        self._images_loaded = loaded_before + len(dataset)
        self.add_time("data_s", time.perf_counter() - start)
        self._check_same_classes(task, split, dataset)
        return dataset

    def _check_same_classes(self, task: str, split: str, dataset: ImageDataset) -> None:
        """Every split of a task must have the same classes, or labels would silently mean
        different things in training and evaluation. Raises ``DatasetCorrupt``."""
        first = self._classes.setdefault(task, (split, dataset.classes))
        if first[1] != dataset.classes:
            raise DatasetCorrupt(
                f"the {first[0]} and {split} splits of {task} have different classes: "
                f"{first[0]} {first[1]}, {split} {dataset.classes} ({dataset.source})"
            )


@dataclass
class EpochStats:
    """What ``Recipe.train_one_epoch`` returns; sums are over the epoch's batches."""

    loss_sum: float
    correct: int
    images: int

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(self.images, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.images, 1)


@dataclass
class TrainingResult:
    """A finished training: the checkpoint's tensors and metadata, the metrics, and the number of
    training images per epoch."""

    tensors: dict[str, torch.Tensor]
    architecture: dict
    classes: list[str]
    metrics: list[EpochMetrics]
    train_size: int = 0
    extra_metadata: dict = field(default_factory=dict)
    evaluation: dict | None = None


class Recipe(Protocol):
    """One task's training steps: ``Task.recipe``, e.g. ``LeNetRecipe`` in ``tasks/mnist_lenet5.py``."""

    classes: list[str]
    train_size: int

    def setup(self) -> None: ...
    def train_one_epoch(self, epoch: int, lr: float, loop: BatchLoop) -> EpochStats: ...
    def evaluate(self) -> float: ...
    def eval_inputs(self) -> tuple[Callable, torch.Tensor, torch.Tensor, Any, int]: ...
    def state(self) -> dict[str, Any]: ...
    def load_state(self, state: dict[str, Any]) -> None: ...
    def export(self) -> tuple[dict[str, torch.Tensor], dict, dict]: ...


class BatchLoop:
    """Shuffled index batches of one epoch, with progress reports and stop checks.

    Args:
        ctx: the training context: index tensors go to ``ctx.device``; progress goes to
            ``ctx.on_progress`` and stop checks to ``ctx.check_stop``.
        n: images in the training set.
        batch_size: images per batch; the last batch may be smaller (DataLoader's default).
        generator: seeded CPU generator; its state is part of the resume state.
        epoch: 0-based index of this epoch; epochs: the number of epochs (for progress).
    """

    def __init__(
        self,
        ctx: TrainingContext,
        n: int,
        batch_size: int,
        generator: torch.Generator,
        epoch: int,
        epochs: int,
    ):
        self.ctx = ctx
        self.n = n
        self.batch_size = batch_size
        self.generator = generator
        self.epoch = epoch
        self.epochs = epochs
        self.batches_total = (n + batch_size - 1) // batch_size
        self.images_done = 0
        self.started = time.perf_counter()
        self.loss_sum: torch.Tensor | None = None  # the recipe's running sum of loss x batch size

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Yields int64 index tensors of shape (batch,) on the training device."""
        perm = torch.randperm(self.n, generator=self.generator).to(self.ctx.device)
        bar = tqdm(
            total=self.n,
            unit="img",
            unit_scale=True,
            desc=f"epoch {self.epoch + 1}/{self.epochs}",
            disable=not self.ctx.show_progress_bar,
            file=sys.stderr,
            mininterval=1.0,
            leave=True,
        )
        last_report = time.perf_counter()
        with bar:
            for batch_index, start in enumerate(range(0, self.n, self.batch_size)):
                idx = perm[start : start + self.batch_size]
                yield idx
                self.images_done += len(idx)
                bar.update(len(idx))
                self.ctx.check_stop()
                now = time.perf_counter()
                if now - last_report >= self.ctx.progress_interval_s:
                    last_report = now
                    self.ctx.on_progress(self.progress(batch_index + 1))

    @property
    def images_per_s(self) -> float:
        return self.images_done / max(time.perf_counter() - self.started, 1e-9)

    def progress(self, batches_done: int, stage: str = "training") -> JobProgress:
        """Progress of the epoch; ``loss`` is the running mean of the epoch's training loss (read
        from the device here, a few times a second, never per batch)."""
        loss = None
        if self.loss_sum is not None and self.images_done:
            loss = round(float(self.loss_sum) / self.images_done, 6)
        return JobProgress(
            epoch=self.epoch + 1,
            epochs=self.epochs,
            batches_done=batches_done,
            batches_total=self.batches_total,
            images_per_s=round(self.images_per_s, 1),
            loss=loss if loss is None or math.isfinite(loss) else None,
            stage=stage,
        )


def seeded_subset(n: int, max_samples: int | None, seed: int) -> torch.Tensor | None:
    """Indices of a fixed random subset of size ``max_samples`` (sorted), or None for all."""
    if max_samples is None or max_samples >= n:
        return None
    generator = torch.Generator().manual_seed(seed + 1_000_003)
    return torch.randperm(n, generator=generator)[:max_samples].sort().values


def evaluate_accuracy(
    predict: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    preset: Preset,
    batch_size: int,
) -> float:
    """Fraction of ``images`` (uint8 (N, C, H, W) on the device) whose argmax logit is the label.

    ``predict`` maps a normalised float batch to logits (N, K); runs under inference_mode.
    """
    correct = torch.zeros((), dtype=torch.int64, device=labels.device)
    with torch.inference_mode():
        for start in range(0, len(labels), batch_size):
            x = preset.normalize(images[start : start + batch_size])
            correct += (predict(x).argmax(1) == labels[start : start + batch_size]).sum()
    return correct.item() / max(len(labels), 1)


def run_training(task: str, hyperparameters: dict | Hyperparameters, ctx: TrainingContext) -> TrainingResult:
    """Train ``task`` to completion (or until stopped) and return what to checkpoint.

    Args:
        task: a task name (``tasks.list_tasks()``).
        hyperparameters: dict (validated here) or the task's parsed hyperparameters model.
        ctx: the surroundings (device, data, callbacks, resume store).

    Raises:
        ValueError: unknown task; pydantic.ValidationError: invalid hyperparameters.
        StopTraining: the job was cancelled or lost its lease (resume state is kept).
        worker.data.DatasetNotFound, DatasetCorrupt, OSError, RuntimeError (e.g. CUDA OOM).
    """
    spec = get_task(task)
    hp = (
        hyperparameters
        if not isinstance(hyperparameters, dict)
        else spec.parse_hyperparameters(hyperparameters)
    )
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
    torch.manual_seed(hp.seed)
    ctx.epochs = hp.epochs
    ctx.on_progress(JobProgress(epochs=hp.epochs, stage="loading_data"))
    recipe: Recipe = spec.recipe(hp, ctx)
    recipe.setup()
    ctx.check_stop(force=True)
    generator = torch.Generator().manual_seed(hp.seed)
    metrics: list[EpochMetrics] = []
    start_epoch = 0
    resumed = ctx.resume.load() if ctx.resume else None
    if resumed is not None:
        recipe.load_state(resumed.tensors_and_state)
        generator.set_state(resumed.generator_state)
        metrics = resumed.metrics
        start_epoch = resumed.epoch
        log.info("resuming %s at epoch %d/%d", task, start_epoch + 1, hp.epochs)
    loop = None
    for epoch in range(start_epoch, hp.epochs):
        loop = BatchLoop(ctx, recipe.train_size, hp.batch_size, generator, epoch, hp.epochs)
        metrics.append(_run_epoch(recipe, hp, ctx, spec.eval_split, loop, epoch))
        _check_finite(metrics[-1])
        ctx.on_epoch(metrics)
        if ctx.resume and epoch + 1 < hp.epochs:
            ctx.resume.save(ResumeState.capture(epoch + 1, recipe.state(), generator, metrics))
        ctx.check_stop(force=True)
    evaluation = None
    if loop is not None:
        ctx.on_progress(loop.progress(loop.batches_total, stage="evaluating"))
        start = time.perf_counter()
        evaluation = final_evaluation(spec, recipe, ctx.dataset)
        ctx.add_time("eval_s", time.perf_counter() - start)
        ctx.on_progress(loop.progress(loop.batches_total, stage="saving_checkpoint"))
    tensors, architecture, extra = recipe.export()
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise TrainingDiverged(f"training diverged: non-finite values in {bad[:5]}; try a smaller lr")
    return TrainingResult(
        tensors=tensors,
        architecture=architecture,
        classes=recipe.classes,
        metrics=metrics,
        train_size=recipe.train_size,
        extra_metadata=extra,
        evaluation=evaluation,
    )


def final_evaluation(spec: Task, recipe: Recipe, dataset: str | None = None) -> dict:
    """The checkpoint's ``evaluation`` (see ``worker.evaluation.evaluation_report``) of the final
    model on the task's eval split, through the recipe's own eval path (ResNet18 feature
    extraction: the fc on the frozen-backbone features). ``dataset``: the uploaded dataset's id
    (custom tasks), so that its images can be found again; else the task's dataset name."""
    predict, inputs, labels, normalizer, batch_size = recipe.eval_inputs()
    probabilities = predict_probabilities(predict, inputs, normalizer, batch_size)
    return evaluation_report(probabilities, labels, recipe.classes, spec.eval_split, dataset or spec.dataset)


def _check_finite(epoch: EpochMetrics) -> None:
    if not math.isfinite(epoch.train_loss):
        raise TrainingDiverged(
            f"training diverged: the loss became {epoch.train_loss} in epoch {epoch.epoch} "
            f"(lr {epoch.lr:g}); try a smaller lr"
        )


def _run_epoch(
    recipe: Recipe,
    hp: Hyperparameters,
    ctx: TrainingContext,
    eval_split: str,
    loop: BatchLoop,
    epoch: int,
) -> EpochMetrics:
    lr = hp.lr_at_epoch(epoch)
    start = time.perf_counter()
    stats = recipe.train_one_epoch(epoch, lr, loop)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    train_s = time.perf_counter() - start
    ctx.add_time("train_s", train_s)
    ctx.on_progress(loop.progress(loop.batches_total, stage="evaluating"))
    eval_start = time.perf_counter()
    accuracy = recipe.evaluate()
    ctx.add_time("eval_s", time.perf_counter() - eval_start)
    result = EpochMetrics(
        epoch=epoch + 1,
        lr=lr,
        train_loss=round(stats.mean_loss, 6),
        train_accuracy=round(stats.accuracy, 6),
        duration_s=round(time.perf_counter() - start, 3),
        images_per_s=round(stats.images / max(train_s, 1e-9), 1),
        **{f"{eval_split}_accuracy": round(accuracy, 6)},
    )
    log.info(
        "epoch %d/%d: loss %.4f train acc %.4f %s acc %.4f, %.0f img/s",
        epoch + 1,
        hp.epochs,
        result.train_loss,
        result.train_accuracy,
        eval_split,
        accuracy,
        result.images_per_s,
    )
    return result
