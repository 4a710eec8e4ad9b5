"""Datasets: find them under DATA_DIR in their standard layouts, decode once, cache as uint8.

Layouts looked for (first match wins):

* ``mnist_lenet5``: torchvision's ``MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (or
  ``.gz``); downloaded with ``torchvision.datasets.MNIST`` when ALLOW_DOWNLOAD is set.
* ``cifar10_dense``: torchvision's python batches ``cifar-10-batches-py/``, or an ImageFolder tree
  ``cifar10-jpg/{train,test}/<class>/*`` or ``cifar10/...``, or a ``.zip`` of such a tree;
  downloaded with ``torchvision.datasets.CIFAR10``.
* ``hymenoptera_resnet18``: ``hymenoptera_data/{train,val}/<class>/*`` or ``hymenoptera_data.zip``;
  downloaded from PyTorch's tutorial archive URL.

Each split is decoded once through the task's preset (``Preset.to_uint8``) into a uint8 tensor of
shape (N, C, H, W) and cached as safetensors under ``CACHE_DIR/datasets``, keyed by the source
files' names, sizes and mtimes and by the preset, so the next job (and the next worker process)
loads it in well under a second. A worker process also keeps the last few splits in memory.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import pickle
import shutil
import tempfile
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.datasets.mnist import read_image_file, read_label_file

from models_store.presets import PRESETS, Preset

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
HYMENOPTERA_URL = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
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


@dataclass(frozen=True)
class _FolderSource:
    """An ImageFolder tree, on disk (``zip_path`` None) or inside a zip under ``root``."""

    root: str
    zip_path: str | None = None


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
        task: a task name of ``models_store.presets.PRESETS``.
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
    preset = PRESETS[task]
    data_dir = Path(data_dir)
    locate = {
        "mnist_lenet5": _locate_mnist,
        "cifar10_dense": _locate_cifar10,
        "hymenoptera_resnet18": _locate_hymenoptera,
    }[task]
    kind, source = locate(data_dir, split, allow_download)
    key = _fingerprint(task, split, kind, source, preset)
    if key in _memory_cache:
        _memory_cache.move_to_end(key)
        dataset = _memory_cache[key]
        on_images(len(dataset), len(dataset))
        return dataset
    cache_file = Path(cache_dir) / "datasets" / task / f"{split}-{key}.safetensors"
    dataset = _read_cache(cache_file)
    if dataset is None:
        log.info("decoding %s %s from %s (cached afterwards in %s)", task, split, source, cache_file)
        dataset = _decode(kind, source, split, preset, check_stop, on_images)
        _write_cache(cache_file, dataset)
    on_images(len(dataset), len(dataset))
    _memory_cache[key] = dataset
    while len(_memory_cache) > _MEMORY_CACHE_SIZE:
        _memory_cache.popitem(last=False)
    return dataset


def clear_memory_cache() -> None:
    """Forget splits held in this process (the on-disk cache stays)."""
    _memory_cache.clear()


# Locating -----------------------------------------------------------------------------------


def _download(what: str, source: str, data_dir: Path, fetch: Callable[[], object]) -> None:
    """Run ``fetch``; any failure becomes a ``DatasetNotFound`` that says what was downloaded
    from where to where."""
    try:
        fetch()
    except Exception as exc:
        raise DatasetNotFound(
            f"{what} is not in DATA_DIR={data_dir} and downloading it from {source} failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def _locate_mnist(data_dir: Path, split: str, allow_download: bool) -> tuple[str, object]:
    raw = data_dir / "MNIST" / "raw"
    names = MNIST_FILES[split]
    found = [_plain_or_gz(raw / name) for name in names]
    if all(found):
        return "mnist", tuple(str(p) for p in found)
    if allow_download:
        from torchvision.datasets import MNIST

        _download(
            "MNIST", "torchvision's MNIST mirrors", data_dir, lambda: MNIST(str(data_dir), download=True)
        )
        return _locate_mnist(data_dir, split, allow_download=False)
    looked = ", ".join(str(raw / n) + "[.gz]" for n in names)
    raise DatasetNotFound(
        f"MNIST {split} split not found: looked for {looked}. Put torchvision's MNIST/raw files under "
        "DATA_DIR or set ALLOW_DOWNLOAD=true"
    )


def _locate_cifar10(data_dir: Path, split: str, allow_download: bool) -> tuple[str, object]:
    batches = data_dir / "cifar-10-batches-py"
    if all((batches / name).is_file() for name in CIFAR_BATCHES[split]):
        return "cifar_batches", str(batches)
    looked = [str(batches)]
    for name in ("cifar10-jpg", "cifar10"):
        folder = _find_folder_source(data_dir, name, split)
        looked += [str(data_dir / name), str(data_dir / f"{name}.zip")]
        if folder is not None:
            return "folder", folder
    if allow_download:
        from torchvision.datasets import CIFAR10

        _download("CIFAR-10", CIFAR10.url, data_dir, lambda: CIFAR10(str(data_dir), download=True))
        return _locate_cifar10(data_dir, split, allow_download=False)
    raise DatasetNotFound(
        f"CIFAR-10 {split} split not found: looked for torchvision batches in {looked[0]} and for "
        f"an ImageFolder tree ({split}/<class>/*.jpg) in {', '.join(looked[1:])}. "
        "Put one there or set ALLOW_DOWNLOAD=true"
    )


def _locate_hymenoptera(data_dir: Path, split: str, allow_download: bool) -> tuple[str, object]:
    folder = _find_folder_source(data_dir, "hymenoptera_data", split)
    if folder is not None:
        return "folder", folder
    if allow_download:
        from torchvision.datasets.utils import download_and_extract_archive

        _download(
            "hymenoptera",
            HYMENOPTERA_URL,
            data_dir,
            lambda: download_and_extract_archive(HYMENOPTERA_URL, download_root=str(data_dir)),
        )
        return _locate_hymenoptera(data_dir, split, allow_download=False)
    raise DatasetNotFound(
        f"hymenoptera {split} split not found: looked for {data_dir / 'hymenoptera_data'}/{split}/"
        f"<class>/*.jpg and {data_dir / 'hymenoptera_data.zip'}. Put the official archive there "
        "or set ALLOW_DOWNLOAD=true"
    )


def _plain_or_gz(path: Path) -> Path | None:
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _find_folder_source(data_dir: Path, name: str, split: str) -> _FolderSource | None:
    """``<name>/<split>/`` as a directory, else ``<name>.zip`` holding ``[<top>/]<split>/``."""
    if (data_dir / name / split).is_dir():
        return _FolderSource(root=str(data_dir / name))
    zip_path = data_dir / f"{name}.zip"
    if zip_path.is_file():
        try:
            names = _open_zip(str(zip_path)).namelist()
        except zipfile.BadZipFile as exc:
            raise DatasetCorrupt(f"{zip_path} is not a valid zip file: {exc}") from exc
        for root in (f"{name}/", ""):
            if any(n.startswith(f"{root}{split}/") for n in names):
                return _FolderSource(root=root, zip_path=str(zip_path))
    return None


def _folder_members(source: _FolderSource, split: str) -> tuple[list[str], list[tuple[str, int]]]:
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


def _describe(source: _FolderSource) -> str:
    return f"{source.zip_path}:{source.root or '/'}" if source.zip_path else source.root


# Fingerprint and cache ----------------------------------------------------------------------


def _fingerprint(task: str, split: str, kind: str, source: object, preset: Preset) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([CACHE_FORMAT, task, split, kind, preset.to_dict()]).encode())
    for path in _source_files(kind, source, split):
        stat = path.stat()
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    if kind == "folder" and source.zip_path is None:  # class folders count, even empty ones
        split_dir = Path(source.root) / split
        digest.update(json.dumps(sorted(p.name for p in split_dir.iterdir() if p.is_dir())).encode())
    return digest.hexdigest()[:16]


def _source_files(kind: str, source: object, split: str) -> list[Path]:
    if kind == "mnist":
        return [Path(p) for p in source]
    if kind == "cifar_batches":
        return [Path(source) / name for name in [*CIFAR_BATCHES[split], "batches.meta"]]
    if source.zip_path is not None:
        return [Path(source.zip_path)]
    return sorted(p for p in (Path(source.root) / split).rglob("*") if p.is_file())


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


def _decode(
    kind: str,
    source: object,
    split: str,
    preset: Preset,
    check_stop: Callable[[], None],
    on_images: Callable[[int, int], None] = lambda done, total: None,
) -> ImageDataset:
    if kind == "mnist":
        return _decode_mnist(source)
    if kind == "cifar_batches":
        return _decode_cifar_batches(Path(source), split)
    return _decode_folder(source, split, preset, check_stop, on_images)


def _decode_mnist(paths: tuple[str, str]) -> ImageDataset:
    images_path, labels_path = paths
    try:
        with tempfile.TemporaryDirectory() as tmp:
            images = read_image_file(_ungzipped(images_path, tmp))
            labels = read_label_file(_ungzipped(labels_path, tmp))
    except (AssertionError, ValueError, TypeError, RuntimeError, OSError) as exc:
        raise DatasetCorrupt(f"unreadable MNIST IDX file {images_path} / {labels_path}: {exc}") from exc
    if len(images) != len(labels):
        raise DatasetCorrupt(f"{images_path} has {len(images)} images but {labels_path} {len(labels)} labels")
    return ImageDataset(
        images=images.unsqueeze(1).contiguous(),
        labels=labels.long(),
        classes=[str(d) for d in range(10)],
        source=images_path,
    )


def _ungzipped(path: str, tmp_dir: str) -> str:
    if not path.endswith(".gz"):
        return path
    out = os.path.join(tmp_dir, os.path.basename(path)[:-3])
    with gzip.open(path, "rb") as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return out


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10 python batches without executing arbitrary code: only the numpy
    array reconstruction that the official files contain is allowed."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module.replace("numpy.core.", "numpy._core."), name)
        raise pickle.UnpicklingError(f"CIFAR batch refers to {module}.{name}, which is not allowed")


def _load_cifar_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _BatchUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError) as exc:
        raise DatasetCorrupt(f"unreadable CIFAR-10 batch {path}: {exc}") from exc


def _decode_cifar_batches(folder: Path, split: str) -> ImageDataset:
    images, labels = [], []
    for name in CIFAR_BATCHES[split]:
        batch = _load_cifar_batch(folder / name)
        data = np.asarray(batch["data"], dtype=np.uint8)
        images.append(data.reshape(-1, 3, 32, 32))
        labels.extend(batch["labels"] if "labels" in batch else batch["fine_labels"])
    meta = _load_cifar_batch(folder / "batches.meta") if (folder / "batches.meta").is_file() else {}
    classes = list(meta.get("label_names", [str(i) for i in range(10)]))
    return ImageDataset(
        images=torch.from_numpy(np.concatenate(images)).contiguous(),
        labels=torch.tensor(labels, dtype=torch.int64),
        classes=classes,
        source=str(folder),
    )


def _decode_folder(
    source: _FolderSource,
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


def _decode_chunk(source: _FolderSource, names: list[str], preset_dict: dict) -> np.ndarray:
    """Decode images with Pillow and the preset: uint8 array (len(names), C, H, W)."""
    preset = Preset.from_dict(preset_dict)
    height, width = preset.input_size
    out = np.empty((len(names), preset.channels, height, width), dtype=np.uint8)
    zf = _open_zip(source.zip_path) if source.zip_path else None
    for i, name in enumerate(names):
        try:
            data = zf.read(name) if zf else Path(name).read_bytes()
            with Image.open(io.BytesIO(data)) as image:
                out[i] = preset.to_array(image)
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
    preset = PRESETS[task]
    kind, source = _LOCATORS[task](Path(data_dir), split, False)
    key = _fingerprint(task, split, kind, source, preset)
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
    if kind != "folder":
        dataset = _decode(kind, source, split, preset, lambda: None)
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


_LOCATORS = {
    "mnist_lenet5": _locate_mnist,
    "cifar10_dense": _locate_cifar10,
    "hymenoptera_resnet18": _locate_hymenoptera,
}
