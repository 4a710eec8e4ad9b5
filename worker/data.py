"""Datasets: decode a split once, cache it as uint8; ImageFolder trees (on disk or in a zip).

Where a task's dataset is under DATA_DIR, and how its own formats are read (MNIST's IDX files,
CIFAR-10's python batches), is the task's part (``Task.locate`` in ``tasks/<name>.py``): it
returns a ``DatasetSource``. ImageFolder trees, which several tasks use, are read here
(``find_image_folder``, ``ImageFolderSource``).

Each split is decoded once through the task's preset (``Preset.to_uint8``) into a uint8 tensor of
shape (N, C, H, W) and cached as safetensors under ``CACHE_DIR/datasets``, keyed by the source
files' names, sizes and mtimes and by the preset, so the next job (and the next worker process)
loads it in well under a second. A worker process also keeps the last few splits in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import tempfile
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torchvision.datasets.folder import IMG_EXTENSIONS

from core.config import get_settings
from core.images import DecodeLimits, ImageRejected, decode_image, to_mode
from tasks import get_task
from tasks.base import Preset

if TYPE_CHECKING:
    from tasks.base import Task

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: images decoded by core.images (zero alpha, ICC to sRGB, transparency on white)
_MEMORY_CACHE_SIZE = 4
_memory_cache: OrderedDict[str, ImageDataset] = OrderedDict()
_open_zips: dict[tuple, zipfile.ZipFile] = {}


class DatasetNotFound(FileNotFoundError):
    """No dataset in any known layout; the message lists every path looked at."""


class DatasetCorrupt(ValueError):
    """A dataset file exists but cannot be read (the message names it)."""


@dataclass
class ImageDataset:
    """One split held in memory.

    Attributes:
        images: uint8 tensor (N, C, H, W), already resized/cropped by the task's preset.
        labels: int64 tensor (N,), indices into ``classes``.
        classes: class names, index order.
        source: where it came from (for logs and checkpoint metadata).
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.labels)


class DatasetSource(Protocol):
    """Where one dataset is, and how to read a split of it (a task's ``locate`` returns one).

    Attributes:
        kind: short name of the format (e.g. ``"folder"``, ``"mnist"``); part of the cache key.
    """

    kind: str

    def fingerprint(self, split: str) -> str:
        """What identifies the split's content: its files' paths, sizes and mtimes (see
        ``file_fingerprint``), and anything else whose change must rebuild the cache."""
        ...

    def read(self, split: str, preset: Preset, check_stop: Callable[[], None]) -> ImageDataset:
        """Decode the split: uint8 images (N, C, H, W) through ``preset`` (``Preset.to_uint8``).

        ``check_stop`` is called between chunks and may raise. Raises ``DatasetCorrupt``.
        """
        ...


@dataclass(frozen=True)
class ImageFolderSource:
    """An ImageFolder tree ``<root>/<split>/<class>/<image>``, on disk (``zip_path`` None) or
    inside the zip ``zip_path`` under the prefix ``root`` (``""`` or ``"<name>/"``)."""

    root: str
    zip_path: str | None = None
    kind = "folder"

    def __str__(self) -> str:
        return _describe(self)

    def fingerprint(self, split: str) -> str:
        if self.zip_path is not None:
            return file_fingerprint([Path(self.zip_path)])
        split_dir = Path(self.root) / split
        files = sorted(p for p in split_dir.rglob("*") if p.is_file())
        classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())  # empty folders count too
        return file_fingerprint(files) + json.dumps(classes)

    def read(self, split: str, preset: Preset, check_stop: Callable[[], None]) -> ImageDataset:
        return _decode_folder(self, split, preset, check_stop)


def load_split(
    task: str,
    split: str,
    data_dir: Path,
    cache_dir: Path,
    allow_download: bool = False,
    check_stop: Callable[[], None] = lambda: None,
    on_images: Callable[[int, int], None] = lambda done, total: None,
) -> ImageDataset:
    """Load one split of ``task``'s dataset as uint8 tensors, from cache when possible.

    Args:
        task: a task name (``tasks.list_tasks()``).
        split: ``train`` or the preset's eval split (``test`` or ``val``).
        data_dir: DATA_DIR.
        cache_dir: CACHE_DIR; decoded splits go to ``cache_dir / "datasets"``.
        allow_download: download with torchvision / the official URL when nothing is found.
        check_stop: called between chunks of image decoding; may raise to abandon it (a cancel).
        on_images: called with (images decoded, images in the split) as decoding goes on (after
            each chunk of at most 1,000 images), and once the split is loaded.

    Raises:
        DatasetNotFound: nothing in any known layout (and download not allowed or failed).
        DatasetCorrupt: a file could not be decoded.
    """
    spec = get_task(task)
    source = spec.locate(Path(data_dir), split, allow_download)
    key = _fingerprint(spec, split, source)
    if key in _memory_cache:
        _memory_cache.move_to_end(key)
        dataset = _memory_cache[key]
        on_images(len(dataset), len(dataset))
        return dataset
    cache_file = Path(cache_dir) / "datasets" / task / f"{split}-{key}.safetensors"
    dataset = _read_cache(cache_file)
    if dataset is None:
        log.info("decoding %s %s from %s (cached afterwards in %s)", task, split, source, cache_file)
        if isinstance(source, ImageFolderSource):  # decoded chunk by chunk: progress as it goes
            dataset = _decode_folder(source, split, spec.preset, check_stop, on_images)
        else:  # the tasks' own formats (MNIST IDX, CIFAR-10 batches) are read whole, quickly
            dataset = source.read(split, spec.preset, check_stop)
        _write_cache(cache_file, dataset)
    on_images(len(dataset), len(dataset))
    _memory_cache[key] = dataset
    while len(_memory_cache) > _MEMORY_CACHE_SIZE:
        _memory_cache.popitem(last=False)
    return dataset


def clear_memory_cache() -> None:
    """Forget splits held in this process (the on-disk cache stays)."""
    _memory_cache.clear()


# Locating (helpers for the tasks' ``locate``) -------------------------------------------------


def download(what: str, source: str, data_dir: Path, fetch: Callable[[], object]) -> None:
    """Run ``fetch``; any failure becomes a ``DatasetNotFound`` that says what was downloaded
    from where to where."""
    try:
        fetch()
    except Exception as exc:
        raise DatasetNotFound(
            f"{what} is not in DATA_DIR={data_dir} and downloading it from {source} failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def plain_or_gz(path: Path) -> Path | None:
    """``path`` if it is a file, else ``path.gz`` if that is one, else None."""
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def file_fingerprint(paths: list[Path]) -> str:
    """One line per file: path, size in bytes and mtime in ns. Raises ``OSError``."""
    lines = []
    for path in paths:
        stat = path.stat()
        lines.append(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n")
    return "".join(lines)


def find_image_folder(data_dir: Path, name: str, split: str) -> ImageFolderSource | None:
    """``<name>/<split>/`` as a directory, else ``<name>.zip`` holding ``[<name>/]<split>/``;
    None if neither. Raises ``DatasetCorrupt`` for a zip that cannot be opened."""
    if (data_dir / name / split).is_dir():
        return ImageFolderSource(root=str(data_dir / name))
    zip_path = data_dir / f"{name}.zip"
    if zip_path.is_file():
        try:
            names = _open_zip(str(zip_path)).namelist()
        except zipfile.BadZipFile as exc:
            raise DatasetCorrupt(f"{zip_path} is not a valid zip file: {exc}") from exc
        for root in (f"{name}/", ""):
            if any(n.startswith(f"{root}{split}/") for n in names):
                return ImageFolderSource(root=root, zip_path=str(zip_path))
    return None


def _folder_members(source: ImageFolderSource, split: str) -> tuple[list[str], list[tuple[str, int]]]:
    """ImageFolder's rules: classes = sorted subfolders, files with IMG_EXTENSIONS, sorted."""
    by_class: dict[str, list[str]] = {}
    if source.zip_path is None:
        split_dir = Path(source.root) / split
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            by_class[class_dir.name] = sorted(
                str(p) for p in class_dir.rglob("*") if p.is_file() and _is_image_name(p.name)
            )
    else:
        prefix = f"{source.root}{split}/"
        for name in _open_zip(source.zip_path).namelist():
            rest = name[len(prefix) :] if name.startswith(prefix) else None
            if not rest or "/" not in rest:
                continue
            cls, filename = rest.split("/", 1)
            by_class.setdefault(cls, [])
            if filename and not filename.endswith("/") and _is_image_name(filename):
                by_class[cls].append(name)
        by_class = {cls: sorted(by_class[cls]) for cls in sorted(by_class)}
    classes = sorted(by_class)
    if not classes:
        raise DatasetCorrupt(f"no class folders in split {split!r} of {_describe(source)}")
    empty = [cls for cls in classes if not by_class[cls]]
    if empty:  # as torchvision's ImageFolder: an empty folder would become a class never seen
        raise DatasetCorrupt(
            f"class folder(s) {', '.join(empty)} in split {split!r} of {_describe(source)} hold no images"
        )
    members = [(m, i) for i, cls in enumerate(classes) for m in by_class[cls]]
    return classes, members


def _open_zip(path: str) -> zipfile.ZipFile:
    """A ZipFile per (path, process), kept open: reading the central directory of a 60,000-member
    archive takes most of a second, and a forked child must not share its parent's file offset."""
    stat = os.stat(path)
    key = (path, os.getpid(), stat.st_size, stat.st_mtime_ns)
    if key not in _open_zips:
        _open_zips[key] = zipfile.ZipFile(path)
    return _open_zips[key]


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _describe(source: ImageFolderSource) -> str:
    return f"{source.zip_path}:{source.root or '/'}" if source.zip_path else source.root


# Fingerprint and cache ----------------------------------------------------------------------


def _fingerprint(task: Task, split: str, source: DatasetSource) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([CACHE_FORMAT, task.name, split, source.kind, task.preset.to_dict()]).encode())
    digest.update(source.fingerprint(split).encode())
    return digest.hexdigest()[:16]


def _read_cache(cache_file: Path) -> ImageDataset | None:
    if not cache_file.is_file():
        return None
    try:
        with safe_open(str(cache_file), framework="pt") as f:
            meta = f.metadata()
        tensors = load_file(str(cache_file))
        return ImageDataset(
            images=tensors["images"],
            labels=tensors["labels"],
            classes=json.loads(meta["classes"]),
            source=meta["source"],
        )
    except Exception as exc:  # a damaged cache is rebuilt, never trusted
        log.warning("ignoring unreadable dataset cache %s: %s", cache_file, exc)
        return None


def _write_cache(cache_file: Path, dataset: ImageDataset) -> None:
    tmp = None
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        meta = {"classes": json.dumps(dataset.classes), "source": dataset.source}
        save_file({"images": dataset.images, "labels": dataset.labels}, tmp, metadata=meta)
        os.replace(tmp, cache_file)
    except (OSError, SafetensorError) as exc:  # a full disk only costs the cache
        log.warning("could not write dataset cache %s: %s", cache_file, exc)
        if tmp:
            Path(tmp).unlink(missing_ok=True)


# Decoding -----------------------------------------------------------------------------------


def _decode_folder(
    source: ImageFolderSource,
    split: str,
    preset: Preset,
    check_stop: Callable[[], None],
    on_images: Callable[[int, int], None] = lambda done, total: None,
) -> ImageDataset:
    classes, members = _folder_members(source, split)
    if not members:
        raise DatasetCorrupt(f"no images in split {split!r} of {_describe(source)}")
    names = [m for m, _ in members]
    chunk_size = max(64, min(1000, len(names) // ((os.cpu_count() or 1) * 4) + 1))
    chunks = [names[i : i + chunk_size] for i in range(0, len(names), chunk_size)]
    args = [(source, chunk, preset.to_dict()) for chunk in chunks]
    height, width = preset.input_size
    images = np.empty((len(names), preset.channels, height, width), dtype=np.uint8)
    on_images(0, len(names))
    workers = min(len(chunks), os.cpu_count() or 1)
    with ExitStack() as stack:
        if workers > 1:
            stack.enter_context(_child_processes_allowed())
            pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")))
            # on leaving early (a cancel, an error), chunks not yet started are dropped
            stack.callback(pool.shutdown, wait=True, cancel_futures=True)
            arrays = pool.map(_decode_chunk, *zip(*args, strict=True))
        else:
            arrays = (_decode_chunk(*a) for a in args)
        start = 0
        for array in arrays:  # copied into place chunk by chunk: peak memory ~ one copy of the split
            images[start : start + len(array)] = array
            start += len(array)
            on_images(start, len(names))
            check_stop()
    return ImageDataset(
        images=torch.from_numpy(images),
        labels=torch.tensor([label for _, label in members], dtype=torch.int64),
        classes=classes,
        source=f"{_describe(source)}/{split}",
    )


@contextmanager
def _child_processes_allowed() -> Iterator[None]:
    """Let a Celery prefork child (a daemonic process) start the decoding pool.

    multiprocessing refuses children to daemonic processes because they could be orphaned; the
    pool is joined before this context exits, so that cannot happen here.
    """
    config = mp.current_process()._config
    was_daemon = config.get("daemon")
    config["daemon"] = False
    try:
        yield
    finally:
        if was_daemon is not None:
            config["daemon"] = was_daemon


def _decode_chunk(source: ImageFolderSource, names: list[str], preset_dict: dict) -> np.ndarray:
    """Decode images as /predict does (``core.images``: formats, limits, alpha, ICC, modes), then
    the preset: uint8 array (len(names), C, H, W)."""
    preset = Preset.from_dict(preset_dict)
    limits = DecodeLimits.from_settings(get_settings())
    height, width = preset.input_size
    out = np.empty((len(names), preset.channels, height, width), dtype=np.uint8)
    zf = _open_zip(source.zip_path) if source.zip_path else None
    for i, name in enumerate(names):
        try:
            data = zf.read(name) if zf else Path(name).read_bytes()
            image, _ = decode_image(data, limits)
            out[i] = preset.to_array(to_mode(image, preset.mode))
        except ImageRejected as exc:
            raise DatasetCorrupt(f"cannot decode {name} in {_describe(source)}: {exc.detail}") from exc
        except Exception as exc:
            raise DatasetCorrupt(f"cannot decode {name} in {_describe(source)}: {exc}") from exc
    return out


# Reading a few images (for the API's figures) ---------------------------------------------------


@dataclass
class SplitItems:
    """Some images of one split, as the model sees them.

    Attributes:
        images: uint8 (n, C, H, W), after the task preset's resize/crop.
        labels: int64 (n,).
        indices: the dataset indices of the images (index in the split, in loader order).
        classes: class names of the split.
        size: number of images in the split.
    """

    images: torch.Tensor
    labels: torch.Tensor
    indices: list[int]
    classes: list[str]
    size: int


def read_items(
    task: str, split: str, data_dir: Path, cache_dir: Path, pick: Callable[[int], list[int]]
) -> SplitItems:
    """A few images of a split without decoding the whole split when possible.

    Read from the dataset cache written by the workers (only the rows asked for, memory-mapped);
    without a cache, only the chosen images are decoded from an ImageFolder tree or zip (MNIST IDX
    files and CIFAR python batches are small enough to read whole). Never downloads.

    Args:
        task, split, data_dir, cache_dir: as ``load_split``.
        pick: maps the split's size to the dataset indices wanted; may raise ``IndexError``.

    Raises:
        DatasetNotFound, DatasetCorrupt, IndexError (from ``pick``).
    """
    spec = get_task(task)
    preset = spec.preset
    source = spec.locate(Path(data_dir), split, False)
    key = _fingerprint(spec, split, source)
    cache_file = Path(cache_dir) / "datasets" / task / f"{split}-{key}.safetensors"
    if cache_file.is_file():
        try:
            with safe_open(str(cache_file), framework="pt") as f:
                classes = json.loads(f.metadata()["classes"])
                labels = f.get_tensor("labels")
                indices = pick(len(labels))
                rows = f.get_slice("images")
                images = [rows[i : i + 1] for i in indices]
            shape = (0, preset.channels, *preset.input_size)
            return SplitItems(
                images=torch.cat(images) if images else torch.empty(shape, dtype=torch.uint8),
                labels=labels[indices],
                indices=indices,
                classes=classes,
                size=len(labels),
            )
        except (SafetensorError, OSError, KeyError, ValueError) as exc:
            log.warning("ignoring unreadable dataset cache %s: %s", cache_file, exc)
    if not isinstance(source, ImageFolderSource):  # MNIST IDX, CIFAR-10 batches: small, read whole
        dataset = source.read(split, preset, lambda: None)
        indices = pick(len(dataset))
        return SplitItems(
            dataset.images[indices], dataset.labels[indices], indices, dataset.classes, len(dataset)
        )
    classes, members = _folder_members(source, split)
    indices = pick(len(members))
    names = [members[i][0] for i in indices]
    images = torch.from_numpy(_decode_chunk(source, names, preset.to_dict()))
    labels = torch.tensor([members[i][1] for i in indices], dtype=torch.int64)
    return SplitItems(images, labels, indices, classes, len(members))
