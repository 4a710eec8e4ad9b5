"""Serving: resolve a checkpoint, keep loaded models in an LRU cache, run one image through it.

Preprocessing is the checkpoint's own preset (``tasks.base.Preset``, stored in its
metadata): the same ``to_uint8`` and ``normalize`` that built and evaluated its training data.
New checkpoints are seen without a restart, since every request lists the store; a model is
(re)loaded when its weights file changes, and loading verifies its sha256 first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from PIL import Image

from core.images import InvertChoice, NormalizeChoice, frame_digit, should_invert, to_mode
from models_store.aliases import DEFAULT_ALIAS, AliasStore, model_name
from models_store.checkpoint import (
    CheckpointError,
    CheckpointInfo,
    CheckpointInvalid,
    CheckpointStore,
    ModelNotFound,
)
from tasks import get_task
from tasks.base import Preset


@dataclass
class LoadedModel:
    """A checkpoint ready for inference (``model`` in eval mode, on the CPU)."""

    model_id: str
    task: str
    model: torch.nn.Module
    preset: Preset
    classes: list[str]
    sha256: str


@dataclass
class Prediction:
    """Probabilities of the top-k classes, most probable first."""

    indices: list[int]
    probabilities: list[float]
    inverted: bool | None
    framing: dict | None = None


class AliasDangling(CheckpointError):
    """An alias points at a model that no longer exists (deleted outside the API)."""


class ModelRegistry:
    """Resolves and caches models of one ``CheckpointStore``; safe to use from many threads.

    Args:
        store: the checkpoint store.
        cache_size: models kept loaded (least recently used evicted).
        aliases: the alias store; without one, aliases are not looked up.
    """

    def __init__(self, store: CheckpointStore, cache_size: int = 4, aliases: AliasStore | None = None):
        self.store = store
        self.cache_size = cache_size
        self.aliases = aliases
        self._cache: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._load_locks: dict[str, threading.Lock] = {}

    def resolve(self, model_id: str | None, task: str | None) -> CheckpointInfo:
        """The checkpoint ``resolve_with_alias(model_id, task)`` picks."""
        return self.resolve_with_alias(model_id, task)[0]

    def resolve_with_alias(
        self, model_id: str | None, task: str | None, alias: str | None = None, name: str | None = None
    ) -> tuple[CheckpointInfo, str | None]:
        """The checkpoint to use and the alias that chose it (None if none did).

        ``model_id`` if given; else ``alias`` of the model name (``name``, e.g. an uploaded
        dataset, or else ``task``); else the ``production`` alias of that name when set; else the
        newest valid model of ``task``.

        Raises ``InvalidModelId``, ``ModelNotFound`` (also: no such alias), ``CheckpointInvalid``,
        ``AliasDangling``, ``InvalidAlias``, ``AliasStoreUnavailable``, ``ValueError`` (model_id
        of another task, model_id and alias together, or nothing to choose by).
        """
        if model_id and alias:
            raise ValueError("give alias or model_id, not both")
        name = name or task
        if alias and not name:
            raise ValueError("give the task (or dataset) the alias belongs to")
        if alias and self.aliases is None:
            raise ValueError("this registry has no alias store")
        if not model_id and self.aliases is not None and name:
            pinned = self.aliases.get(name, alias or DEFAULT_ALIAS)
            if pinned is None and alias:
                raise ModelNotFound(
                    f"no model of {name} has the alias {alias!r}: "
                    f"set it with PUT /models/{{id}}/aliases/{alias}"
                )
            if pinned is not None:
                alias = alias or DEFAULT_ALIAS
                try:
                    info = self.store.get(pinned)
                except ModelNotFound:
                    raise AliasDangling(
                        f"alias {alias!r} of {name} points at model {pinned}, which no longer exists "
                        f"(deleted outside the API): move the alias with PUT /models/{{id}}/aliases/{alias}"
                    ) from None
                if not info.valid:
                    raise CheckpointInvalid(
                        f"alias {alias!r} of {name} points at model {pinned}, which failed verification: "
                        f"{info.error}"
                    )
                if task and info.task != task:
                    raise ValueError(f"alias {alias!r} of {name} is a {info.task} model, not {task}")
                return info, alias
        return self._resolve_plain(model_id, task, name), None

    def _resolve_plain(self, model_id: str | None, task: str | None, name: str | None) -> CheckpointInfo:
        if model_id:
            info = self.store.get(model_id)
            if not info.valid:
                raise CheckpointInvalid(f"model {model_id} failed verification: {info.error}")
            if task and info.task != task:
                raise ValueError(f"model {model_id} is a {info.task} model, not {task}")
            return info
        if not task and not name:
            raise ValueError("give either task or model_id")
        if name and name != task:
            infos = (i for i in self.store.list() if i.valid and model_name(i.metadata) == name)
            info = next((i for i in infos if not task or i.task == task), None)
        else:
            info = self.store.newest(task)
        if info is None:
            raise ModelNotFound(f"no trained {name or task} model yet: submit a job with POST /jobs first")
        return info

    def get(self, info: CheckpointInfo) -> LoadedModel:
        """The loaded model of ``info``; loads (verifying sha256) if not cached or changed."""
        sha = info.metadata["weights"]["sha256"]
        with self._lock:
            cached = self._cache.get(info.model_id)
            if cached is not None and cached.sha256 == sha:
                self._cache.move_to_end(info.model_id)
                return cached
            load_lock = self._load_locks.setdefault(info.model_id, threading.Lock())
        with load_lock:
            with self._lock:
                cached = self._cache.get(info.model_id)
                if cached is not None and cached.sha256 == sha:
                    return cached
            loaded = self._load(info.model_id)
            with self._lock:
                self._cache[info.model_id] = loaded
                self._cache.move_to_end(info.model_id)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            return loaded

    def _load(self, model_id: str) -> LoadedModel:
        tensors, meta = self.store.load(model_id)
        try:
            model = get_task(meta["task"]).build_model(meta["architecture"])
            model.load_state_dict(tensors, strict=True)
            preset = Preset.from_dict(meta["preset"])
            classes = list(meta["classes"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointInvalid(f"model {model_id}: metadata does not match its weights: {exc}") from exc
        model.eval()
        outputs = _output_count(model, preset)
        if outputs != len(classes):
            raise CheckpointInvalid(
                f"model {model_id}: metadata lists {len(classes)} classes, the weights have {outputs} outputs"
            )
        return LoadedModel(model_id, meta["task"], model, preset, classes, meta["weights"]["sha256"])

    def evict(self, model_id: str) -> None:
        """Forget a loaded model (after it was deleted). Requests already holding it finish with it."""
        with self._lock:
            self._cache.pop(model_id, None)
            self._load_locks.pop(model_id, None)

    def cached_ids(self) -> list[str]:
        with self._lock:
            return list(self._cache)


def _output_count(model: torch.nn.Module, preset: Preset) -> int:
    """Number of logits the model produces (one forward pass on a zero image of the preset)."""
    height, width = preset.input_size
    zeros = torch.zeros(1, preset.channels, height, width, dtype=torch.uint8)
    with torch.inference_mode():
        return int(model(preset.normalize(zeros)).shape[1])


# Tasks whose inputs ``normalize=auto`` frames as MNIST framed its digits (core.images.frame_digit).
FRAMED_TASKS = frozenset({"mnist_lenet5"})


def predict(
    loaded: LoadedModel,
    image: Image.Image,
    top_k: int,
    invert: InvertChoice,
    normalize: NormalizeChoice = "auto",
) -> Prediction:
    """Classify one decoded upload.

    Args:
        loaded: the model.
        image: PIL image of any mode (see ``core.images.to_mode``).
        top_k: classes to return (clamped to the number of classes).
        invert: for L-mode presets (MNIST): ``auto``, ``true`` or ``false``.
        normalize: ``auto`` frames inputs of ``FRAMED_TASKS`` as MNIST's digits were framed (after
            the polarity step), ``none`` leaves them as sent (the preset resizes them).

    Returns:
        top-k class indices and softmax probabilities (float32 -> float), whether the image was
        inverted and how it was framed (None for tasks that are never framed).
    """
    image = to_mode(image, loaded.preset.mode)
    inverted = None
    framing = None
    if loaded.preset.mode == "L":
        inverted = should_invert(image, invert)
        if inverted:
            image = Image.eval(image, lambda v: 255 - v)
    if loaded.task in FRAMED_TASKS:
        if normalize == "auto":
            width = loaded.preset.input_size[1]
            image, framing = frame_digit(image, size=width, box=round(width * 20 / 28))
        else:
            framing = {"applied": False, "reason": "normalize=none"}
    pixels = loaded.preset.to_uint8(image).unsqueeze(0)
    with torch.inference_mode():
        logits = loaded.model(loaded.preset.normalize(pixels))
        probabilities = torch.softmax(logits.float(), dim=1)[0]
        top = torch.topk(probabilities, k=min(top_k, probabilities.numel()))
    return Prediction(top.indices.tolist(), top.values.tolist(), inverted, framing)
