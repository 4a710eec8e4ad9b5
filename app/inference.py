"""Serving: resolve a checkpoint, keep loaded models in an LRU cache, run one image through it.

Preprocessing is the checkpoint's own preset (``tasks.base.Preset``, stored in its
metadata): the same ``to_uint8`` and ``normalize`` that built and evaluated its training data.
New checkpoints are seen without a restart, since every request lists the store; a model is
(re)loaded when its weights file changes, and loading verifies its sha256 first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from PIL import Image

from app.serving import Backend, MicroBatcher, build_backend
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

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A checkpoint ready for inference (``model`` in eval mode, on the serving device).

    ``backend`` runs a uint8 batch to probabilities (``app.serving``; PyTorch unless the registry
    chose another); ``batcher``, when set, is the process's micro-batcher that ``infer`` goes
    through for single images.
    """

    model_id: str
    task: str
    model: torch.nn.Module
    preset: Preset
    classes: list[str]
    sha256: str
    backend: Backend | None = None
    batcher: MicroBatcher | None = field(default=None, repr=False)
    infer_ms: float | None = None  # one image's forward pass when loaded (best of 3), ms
    light: bool = False  # runs in the calling thread, without the batcher (see ModelRegistry)

    @property
    def batched(self) -> bool:
        """Whether single images go through the micro-batcher (a backend and a batcher, and not
        light)."""
        return self.batcher is not None and self.backend is not None and not self.light


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
        device: where models run (``INFERENCE_DEVICE``).
        backend: ``torch``, ``onnxruntime`` or ``auto`` (``INFERENCE_BACKEND``, see
            ``app.serving.build_backend``).
        threads: intra-op threads of the ONNX Runtime backend.
        batcher: micro-batcher shared by every model of this registry (None: each request runs
            its own forward pass in its own thread).
        inline_ms: a model whose one-image forward pass takes less than this (ms) is "light": it
            skips the batcher, and ``runs_inline`` says its small uploads can be classified in
            the calling thread (0: never).
        precision: ``fp32`` or ``bf16`` (``INFERENCE_PRECISION``, see ``app.serving.build_backend``).
    """

    INLINE_MAX_UPLOAD_BYTES = 256 * 1024
    INLINE_MAX_PIXELS = 256 * 256

    def __init__(
        self,
        store: CheckpointStore,
        cache_size: int = 4,
        aliases: AliasStore | None = None,
        device: torch.device | str = "cpu",
        backend: str = "torch",
        threads: int = 1,
        batcher: MicroBatcher | None = None,
        inline_ms: float = 0.0,
        precision: str = "fp32",
    ):
        self.store = store
        self.cache_size = cache_size
        self.aliases = aliases
        self.device = torch.device(device)
        self.backend = backend
        self.threads = threads
        self.precision = precision
        self.batcher = batcher
        self.inline_ms = inline_ms
        self._recent_by_task: dict[str, LoadedModel] = {}
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
        if info is None and name and name != task:
            raise ModelNotFound(
                f"no model trained on dataset {name}: GET /datasets/{name} says whether it exists and is "
                f'ready; then train one with POST /jobs {{"task": "custom_resnet18", "dataset": "{name}"}}'
            )
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
                self._recent_by_task[loaded.task] = loaded
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
        backend = build_backend(model, preset, self.device, self.backend, self.threads, self.precision)
        infer_ms = _forward_ms(backend, preset)
        light = infer_ms < self.inline_ms
        log.info(
            "model %s served by %s on %s, %.2f ms per image%s",
            model_id,
            getattr(backend, "name", "?"),
            self.device,
            infer_ms,
            " (light)" if light else "",
        )
        return LoadedModel(
            model_id,
            meta["task"],
            model,
            preset,
            classes,
            meta["weights"]["sha256"],
            backend,
            self.batcher,
            infer_ms,
            light,
        )

    def runs_inline(self, model_id: str | None, task: str | None, size_bytes: int) -> bool:
        """Whether a request may be decoded and classified in the calling thread (the event loop),
        without thread hops: the upload is at most ``INLINE_MAX_UPLOAD_BYTES`` and its model --
        ``model_id``, else the model of ``task`` used last -- is loaded and light. A guess from
        memory, with no I/O: either answer classifies correctly, only the thread differs. The
        caller then reads the header (``open_image``) and checks ``fits_inline``."""
        if self.inline_ms <= 0 or size_bytes > self.INLINE_MAX_UPLOAD_BYTES:
            return False
        with self._lock:
            loaded = self._cache.get(model_id) if model_id else self._recent_by_task.get(task or "")
        return loaded is not None and loaded.light

    def fits_inline(self, info: dict) -> bool:
        """Whether an upload whose header ``open_image`` read (``info``: ``width``, ``height``)
        is small enough to decode in the event loop: at most ``INLINE_MAX_PIXELS``."""
        return info["width"] * info["height"] <= self.INLINE_MAX_PIXELS

    def evict(self, model_id: str) -> None:
        """Forget a loaded model (after it was deleted). Requests already holding it finish with it."""
        with self._lock:
            self._cache.pop(model_id, None)
            self._load_locks.pop(model_id, None)
            for task, loaded in list(self._recent_by_task.items()):
                if loaded.model_id == model_id:
                    del self._recent_by_task[task]


def _forward_ms(backend: Backend, preset: Preset) -> float:
    """Milliseconds of one single-image forward pass of ``backend`` (best of 3, after one warm-up)."""
    height, width = preset.input_size
    zeros = torch.zeros(1, preset.channels, height, width, dtype=torch.uint8)
    backend(zeros)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        backend(zeros)
        best = min(best, time.perf_counter() - start)
    return 1000 * best


def _output_count(model: torch.nn.Module, preset: Preset) -> int:
    """Number of logits the model produces (one forward pass on a zero image of the preset)."""
    height, width = preset.input_size
    zeros = torch.zeros(1, preset.channels, height, width, dtype=torch.uint8)
    with torch.inference_mode():
        return int(model(preset.normalize(zeros)).shape[1])


FRAMED_TASKS = frozenset({"mnist_lenet5"})


def preprocess(
    loaded: LoadedModel, image: Image.Image, invert: InvertChoice, normalize: NormalizeChoice = "auto"
) -> tuple[torch.Tensor, bool | None, dict | None]:
    """Stage 1 of serving: one decoded upload -> the model's uint8 input.

    Args:
        loaded: the model (its preset decides mode, size and crop).
        image: PIL image of any mode (see ``core.images.to_mode``).
        invert: for L-mode presets (MNIST): ``auto``, ``true`` or ``false``; ignored otherwise.
        normalize: ``auto`` frames inputs of ``FRAMED_TASKS`` as MNIST's digits were framed (after
            the polarity step), ``none`` leaves them as sent (the preset resizes them).

    Returns:
        (uint8 tensor (C, H, W) of the preset's input size, whether it was inverted (None for RGB
        presets), how it was framed (None for tasks that are never framed)).
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
    return loaded.preset.to_uint8(image), inverted, framing


def infer(loaded: LoadedModel, pixels: torch.Tensor) -> torch.Tensor:
    """Stage 2 of serving: a batch of preprocessed images -> class probabilities.

    Args:
        loaded: the model.
        pixels: uint8 (N, C, H, W) on the CPU, from ``preprocess`` (stacked).

    Returns:
        float32 (N, classes) softmax probabilities, on the CPU.
    """
    if loaded.backend is not None:
        return loaded.backend(pixels)
    with torch.inference_mode():
        logits = loaded.model(loaded.preset.normalize(pixels))
        return torch.softmax(logits.float(), dim=1).cpu()


def postprocess(
    probabilities: torch.Tensor, top_k: int, inverted: bool | None, framing: dict | None = None
) -> Prediction:
    """Stage 3 of serving: one image's probabilities (float32 (classes,)) -> its top-k, most
    probable first (``top_k`` clamped to the number of classes)."""
    top = torch.topk(probabilities, k=min(top_k, probabilities.numel()))
    return Prediction(top.indices.tolist(), top.values.tolist(), inverted, framing)


def predict(
    loaded: LoadedModel,
    image: Image.Image,
    top_k: int,
    invert: InvertChoice,
    normalize: NormalizeChoice = "auto",
) -> Prediction:
    """Classify one decoded upload: ``preprocess``, ``infer`` (through the micro-batcher unless
    the model is light), ``postprocess``.

    Args:
        loaded: the model.
        image: PIL image of any mode (see ``core.images.to_mode``).
        top_k: classes to return (clamped to the number of classes).
        invert: for L-mode presets (MNIST): ``auto``, ``true`` or ``false``.
        normalize: ``auto`` or ``none``, see ``preprocess``.

    Returns:
        top-k class indices and softmax probabilities (float32 -> float), whether the image was
        inverted and how it was framed (None for tasks that are never framed).
    """
    pixels, inverted, framing = preprocess(loaded, image, invert, normalize)
    if loaded.batched:
        probabilities = loaded.batcher.run(loaded.backend, pixels)
    else:
        probabilities = infer(loaded, pixels.unsqueeze(0))[0]
    return postprocess(probabilities, top_k, inverted, framing)
