"""Ingest an uploaded dataset archive: check it, decode every image, cache the pixels.

``ingest_dataset(dataset_id, settings)`` is what the Celery task ``imgclf.ingest`` calls. It
reads ``DATASETS_DIR/<id>/upload`` (written by the API) through ``worker.archives.SafeArchive``
and writes ``DATASETS_DIR/<id>/images.safetensors``; the record in Redis ends ``ready`` with the
classes, counts, skipped files and duplicates, or ``failed`` with the reason, in which case every
file of the dataset is removed (a full disk included).

Layouts, after ignoring ``__MACOSX/``, dotfiles, ``Thumbs.db`` and ``desktop.ini``, and stripping
one enclosing folder (a single top folder holding folders):

* ``train/<class>/...`` and ``val/<class>/...`` (``train_val``): ImageFolder's rules; every class
  needs images in both;
* ``<class>/...`` (``class_folders``): a seeded, stratified 80/20 train/val split per class.

Every image goes through the same decoding as ``/predict`` (EXIF orientation, modes, alpha, 16-bit,
the pixel limit) and the ResNet18 preset (Resize(256), CenterCrop(224)) into uint8 (3, 224, 224).
Files that are not images (by extension, case-insensitive), nested archives, links, devices and
undecodable images are skipped and listed with the reason.

The cache file is safetensors: ``images`` uint8 (N, 3, 224, 224) in archive order, ``labels``
int64 (N,), and ``train_index`` / ``val_index`` int64, the rows of each split in ImageFolder
order (by class, then path). It is written as it goes (the header space is reserved first and
filled in at the end), so memory stays at a few images whatever the dataset's size.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import struct
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torchvision.datasets.folder import IMG_EXTENSIONS

from core.config import Settings
from core.datasets import (
    SKIPPED_LISTED,
    DatasetRecord,
    DatasetStatus,
    DatasetStore,
    SkippedFile,
    UpdateOutcome,
    ingest_folder,
    same_upload,
    utcnow,
)
from core.images import DecodeLimits, ImageRejected, decode_image, to_mode
from core.jobs import redis_client
from tasks import get_task, upload_task
from tasks.base import Preset
from worker.archives import ArchiveRefused, Limits, Member, MemberTooLarge, SafeArchive
from worker.data import ImageDataset, SplitItems

log = logging.getLogger(__name__)

UPLOAD_FILE = "upload"
CACHE_FILE = "images.safetensors"
HEADER_RESERVED = 4096
MIN_CLASSES, MAX_CLASSES = 2, 1000
VAL_FRACTION = 0.2
SPLIT_SEED = 0
IGNORED_NAMES = {"thumbs.db", "desktop.ini"}
ARCHIVE_EXTENSIONS = (".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar", ".zst")
IMAGE_EXTENSIONS = (
    IMG_EXTENSIONS  # torchvision ImageFolder's: .jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp
)
# a .gif is skipped as torchvision's ImageFolder skips it, so that an upload of a built-in dataset
# trains on the same images as the built-in task (/predict reads GIFs: it is one picture there)
READ_EXTENSIONS = " ".join(IMAGE_EXTENSIONS)
SPLITS = ("train", "val")


def dataset_preset() -> Preset:
    """The preset uploaded datasets are cached with: ResNet18's (Resize 256, CenterCrop 224)."""
    return get_task(upload_task()).preset


class _Deleted(Exception):
    """The dataset was deleted while it was being ingested."""


class IngestFailed(Exception):
    """The dataset cannot be used; the message says why (shown on the record)."""


@dataclasses.dataclass
class _Candidate:
    """An image file to decode: its class and, for train_val, its split."""

    name: str
    cls: str
    split: str | None


@dataclasses.dataclass
class _Plan:
    layout: str
    candidates: dict[str, _Candidate]
    skipped: list[tuple[str, str]]
    ignored: int


# Entry point -----------------------------------------------------------------------------------


def ingest_dataset(dataset_id: str, settings: Settings) -> str:
    """Ingest dataset ``dataset_id`` if its record is ``ingesting``; returns the final status
    (``ready``, ``failed``) or why nothing was done (``missing``, the record's status).

    Works in this upload's own folder (``core.datasets.ingest_folder``) and moves it to
    ``DATASETS_DIR/<id>`` when ready. Never raises for a bad archive or a full disk: that is
    recorded on the dataset.
    """
    store = DatasetStore(redis_client(settings.redis_url, settings.redis_timeout_s), settings.redis_prefix)
    record = store.get(dataset_id)
    if record is None:
        return "missing"
    if record.status != DatasetStatus.ingesting:
        return record.status.value
    folder = ingest_folder(settings.datasets_dir, record)
    started = time.perf_counter()
    progress = _progress_writer(store, record)
    try:
        progress({"stage": "listing"}, force=True)
        result = build_dataset(folder, settings, progress=progress)
    except _Deleted:
        return _deleted(dataset_id, folder)
    except IngestFailed as exc:
        return _fail(store, record, folder, str(exc))
    except OSError as exc:
        if _gone(store, record):  # DELETE removed its files before the next progress write
            return _deleted(dataset_id, folder)
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return _fail(store, record, folder, f"disk full while writing {folder}: {exc.strerror}")
        log.exception("dataset %s: ingestion failed", dataset_id)
        return _fail(store, record, folder, f"could not read or write {folder}: {exc}")
    except Exception as exc:
        log.exception("dataset %s: ingestion failed", dataset_id)
        return _fail(store, record, folder, f"{type(exc).__name__}: {exc}")
    ready = record.model_copy(update={**result, "status": DatasetStatus.ready, "finished_at": utcnow()})
    ready.progress = {}
    (folder / UPLOAD_FILE).unlink(missing_ok=True)  # the decoded cache is the dataset now
    final = Path(settings.datasets_dir) / dataset_id
    if _gone(store, record):
        return _deleted(dataset_id, folder)
    shutil.rmtree(final, ignore_errors=True)  # what an earlier upload of these bytes left
    os.replace(folder, final)
    if store.update(ready) is not UpdateOutcome.ok:  # deleted meanwhile: leave nothing behind
        return _deleted(dataset_id, final)
    log.info("dataset %s ready in %.1f s: %s", dataset_id, time.perf_counter() - started, ready.images)
    return DatasetStatus.ready.value


def _gone(store: DatasetStore, record: DatasetRecord) -> bool:
    """Whether the dataset was deleted (or deleted and uploaded again) since ``record`` was read."""
    try:
        return not same_upload(store.get(record.id), record)
    except Exception:  # Redis down or a damaged record: not known to be deleted
        return False


def _deleted(dataset_id: str, folder: Path) -> str:
    log.info("dataset %s was deleted while ingesting; its files are removed", dataset_id)
    shutil.rmtree(folder, ignore_errors=True)
    return "missing"


def _fail(store: DatasetStore, record: DatasetRecord, folder: Path, error: str) -> str:
    log.warning("dataset %s failed: %s", record.id, error)
    shutil.rmtree(folder, ignore_errors=True)
    failed = record.model_copy(
        update={"status": DatasetStatus.failed, "error": error, "finished_at": utcnow(), "progress": {}}
    )
    store.update(failed)
    return DatasetStatus.failed.value


def _progress_writer(store: DatasetStore, record: DatasetRecord):
    last = [0.0]

    def write(progress: dict, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - last[0] < 0.5:
            return
        last[0] = now
        progress = {**progress, "updated_at": utcnow().isoformat()}
        try:
            outcome = store.update(record.model_copy(update={"progress": progress}))
        except Exception as exc:  # progress is best effort
            log.warning("dataset %s: could not record progress: %s", record.id, exc)
            return
        if outcome is not UpdateOutcome.ok:
            raise _Deleted(record.id)

    return write


# Building --------------------------------------------------------------------------------------


def build_dataset(folder: Path, settings: Settings, progress=lambda p, force=False: None) -> dict:
    """Check, decode and cache ``folder/upload``; returns the record's new fields.

    Raises:
        IngestFailed: the archive is refused, or the dataset is unusable (class counts).
        OSError: the cache cannot be written (ENOSPC when the disk is full).
    """
    limits = Limits(
        max_entries=settings.max_dataset_entries,
        max_total_bytes=settings.max_dataset_uncompressed_bytes,
        max_ratio=settings.max_compression_ratio,
        max_file_bytes=settings.max_upload_bytes,
    )
    preset = dataset_preset()
    tmp = folder / f".tmp-{CACHE_FILE}"
    try:
        archive = SafeArchive(folder / UPLOAD_FILE, limits)
        members = archive.members()
        plan = plan_layout(members, settings.max_compression_ratio, settings.max_upload_bytes)
        _check_classes({c.cls for c in plan.candidates.values()}, "image files")
        decoded = _decode_all(archive, plan, preset, settings, tmp, progress, len(members))
    except ArchiveRefused as exc:
        tmp.unlink(missing_ok=True)
        raise IngestFailed(f"archive refused: {exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, folder / CACHE_FILE)
    return {**decoded, "format": archive.format, "preset": preset.to_dict()}


def plan_layout(members: list[Member], max_ratio: float, max_file_bytes: int) -> _Plan:
    """Decide the layout and which entries are candidate images (see the module docstring)."""
    skipped: list[tuple[str, str]] = []
    ignored = 0
    files: list[Member] = []
    for member in members:
        parts = member.name.split("/")
        junk = any(p == "__MACOSX" or p.startswith(".") for p in parts) or parts[-1].lower() in IGNORED_NAMES
        if member.kind == "dir" or not member.name or junk:
            ignored += 1
        elif member.kind != "file":
            skipped.append((member.name, f"{member.kind} entry: only regular files are read"))
        else:
            files.append(member)
    prefix = _enclosing_folder([m.name for m in files])
    top = {m.name[len(prefix) :].split("/")[0] for m in files if "/" in m.name[len(prefix) :]}
    layout = "train_val" if "train" in top and top <= {"train", "val", "test"} else "class_folders"
    _check_not_mixed(prefix, files, top)
    if "train" in top and "val" not in top and layout == "train_val":
        raise IngestFailed("the archive has train/ but no val/: give both, or only <class>/ folders")
    candidates: dict[str, _Candidate] = {}
    for member in files:
        rel = member.name[len(prefix) :].split("/")
        lower = rel[-1].lower()
        where = rel if layout == "class_folders" else rel[1:]
        if layout == "train_val" and rel[0] not in SPLITS:
            skipped.append((member.name, f"outside train/ and val/ ({rel[0]}/)"))
        elif len(where) < 2:
            skipped.append((member.name, "not inside a class folder"))
        elif lower.endswith(ARCHIVE_EXTENSIONS):
            skipped.append((member.name, "nested archive: not opened"))
        elif not lower.endswith(IMAGE_EXTENSIONS):
            suffix = Path(lower).suffix or "none"
            skipped.append((member.name, f"{suffix} files are not read (ImageFolder's: {READ_EXTENSIONS})"))
        elif member.ratio > max_ratio:
            skipped.append(
                (member.name, f"compression ratio {member.ratio:.0f}:1 over the limit of {max_ratio:g}:1")
            )
        elif member.size > max_file_bytes:
            skipped.append((member.name, f"{member.size} bytes, over MAX_UPLOAD_BYTES={max_file_bytes}"))
        else:
            split = rel[0] if layout == "train_val" else None
            candidates[member.name] = _Candidate(member.name, where[0], split)
    return _Plan(layout, candidates, skipped, ignored)


def _check_not_mixed(prefix: str, files: list[Member], top: set[str]) -> None:
    """Refuse split folders (``train/<class>/...``) beside class folders (``dog/...``): read as
    class folders, 'train' and 'val' would become classes. A class folder that happens to be
    called ``train`` (images right inside it) is fine."""
    nested = {rel[0] for rel in (m.name[len(prefix) :].split("/") for m in files) if len(rel) >= 3}
    splits = nested & {"train", "val", "test"}
    others = sorted(top - {"train", "val", "test"})
    if splits and others:
        shown = ", ".join(f"{name}/" for name in others[:5]) + (", ..." if len(others) > 5 else "")
        raise IngestFailed(
            f"the archive mixes split folders ({', '.join(f'{s}/' for s in sorted(splits))}) with other "
            f"top folders ({shown}): lay it out as train/<class>/ + val/<class>/, or as <class>/ folders only"
        )


def _enclosing_folder(names: list[str]) -> str:
    """``"<top>/"`` if every file lies in one top folder that holds folders, else ``""``."""
    tops = {n.split("/")[0] for n in names}
    if len(tops) != 1 or any("/" not in n for n in names):
        return ""
    (top,) = tops
    if top in SPLITS or not any(n.count("/") >= 2 for n in names):
        return ""
    return f"{top}/"


def _check_classes(classes: set[str], what: str) -> None:
    if len(classes) < MIN_CLASSES:
        found = ", ".join(sorted(classes)) or "none"
        raise IngestFailed(
            f"need at least {MIN_CLASSES} class folders with {what}; found {len(classes)} ({found}). "
            "Lay the archive out as <class>/<images> or train/<class>/ + val/<class>/"
        )
    if len(classes) > MAX_CLASSES:
        raise IngestFailed(f"{len(classes)} classes: more than the limit of {MAX_CLASSES}")


def _decode_all(
    archive: SafeArchive,
    plan: _Plan,
    preset: Preset,
    settings: Settings,
    tmp: Path,
    progress,
    entries_total: int,
) -> dict:
    """Decode the candidates into ``tmp`` and assemble the record's fields."""
    skipped = list(plan.skipped)
    kept: list[tuple[_Candidate, str]] = []  # (candidate, sha256), in file row order
    workers = max(1, min(4, os.cpu_count() or 1))
    pending: deque[tuple[_Candidate, Future]] = deque()
    done = 0
    with (
        _ImageFileWriter(tmp, (preset.channels, *preset.input_size), _classes(plan)) as writer,
        ThreadPoolExecutor(workers) as pool,
    ):

        def drain(limit: int) -> None:
            while len(pending) > limit:
                candidate, future = pending.popleft()
                array, digest, reason = future.result()
                if array is None:
                    skipped.append((candidate.name, reason))
                else:
                    writer.append(array)
                    kept.append((candidate, digest))

        for name, data in archive.read(set(plan.candidates)):
            done += 1
            candidate = plan.candidates[name]
            if isinstance(data, MemberTooLarge):
                skipped.append((name, f"{data}, over MAX_UPLOAD_BYTES={settings.max_upload_bytes}"))
                continue
            pending.append((candidate, pool.submit(_decode_one, data, preset, settings)))
            drain(workers + 1)
            progress(
                {
                    "stage": "decoding",
                    "entries_done": done,
                    "entries_total": len(plan.candidates),
                    "images": len(kept),
                }
            )
        drain(0)
        fields = _assemble(plan, kept, skipped)
        writer.finish(
            {
                "labels": np.asarray(fields.pop("_labels"), dtype=np.int64),
                "train_index": np.asarray(fields.pop("_train"), dtype=np.int64),
                "val_index": np.asarray(fields.pop("_val"), dtype=np.int64),
            }
        )
    return fields


def _decode_one(data: bytes, preset: Preset, settings: Settings) -> tuple[np.ndarray | None, str, str]:
    """(uint8 (C, H, W) or None, sha256 of the bytes, reason when None) — /predict's decoding."""
    digest = hashlib.sha256(data).hexdigest()
    try:
        image, _ = decode_image(data, DecodeLimits.from_settings(settings))
        max_pixels = settings.max_image_pixels
        width, height = preset.resized_size(*image.size)
        if width * height > max_pixels:
            return None, digest, f"resizes to {width}x{height}, over MAX_IMAGE_PIXELS={max_pixels}"
        return preset.to_array(to_mode(image, preset.mode)), digest, ""
    except ImageRejected as exc:
        return None, digest, exc.detail.replace("the uploaded", "the").replace("uploaded ", "")
    except Exception as exc:
        return None, digest, f"cannot decode: {type(exc).__name__}: {exc}"


def _assemble(plan: _Plan, kept: list[tuple[_Candidate, str]], skipped: list[tuple[str, str]]) -> dict:
    """Classes, labels, the split (stratified for class_folders), counts, duplicates.

    Raises ``IngestFailed`` when a class has no usable image in train or val.
    """
    classes = _classes(plan)
    index = {cls: i for i, cls in enumerate(classes)}
    labels = [index[c.cls] for c, _ in kept]
    splits: list[str] = [c.split or "" for c, _ in kept]
    if plan.layout == "class_folders":
        rng = np.random.default_rng(SPLIT_SEED)
        for cls in classes:
            rows = sorted((i for i, (c, _) in enumerate(kept) if c.cls == cls), key=lambda i: kept[i][0].name)
            if len(rows) < 2:
                raise IngestFailed(
                    f"class {cls!r} has {len(rows)} usable image; every class needs at least 2 "
                    "(one for train, one for val)"
                )
            n_val = min(max(1, round(VAL_FRACTION * len(rows))), len(rows) - 1)
            order = rng.permutation(len(rows))
            for rank, position in enumerate(order):
                splits[rows[position]] = "val" if rank < n_val else "train"
    counts = {split: {cls: 0 for cls in classes} for split in SPLITS}
    for (candidate, _), split in zip(kept, splits, strict=True):
        counts[split][candidate.cls] += 1
    for split in SPLITS:
        missing = [cls for cls in classes if counts[split][cls] == 0]
        if missing:
            raise IngestFailed(
                f"class {missing[0]!r} has no usable image in {split}"
                + (f" (nor {', '.join(missing[1:4])})" if len(missing) > 1 else "")
                + "; every class needs at least one train and one val image"
            )
    order = {
        split: sorted(
            (i for i in range(len(kept)) if splits[i] == split), key=lambda i: (labels[i], kept[i][0].name)
        )
        for split in SPLITS
    }
    train_hashes: dict[str, str] = {}
    for i in order["train"]:
        train_hashes.setdefault(kept[i][1], kept[i][0].name)
    leaked = [(train_hashes[kept[i][1]], kept[i][0].name) for i in order["val"] if kept[i][1] in train_hashes]
    within = sum(len(order[s]) - len({kept[i][1] for i in order[s]}) for s in SPLITS)
    skipped_sorted = sorted(skipped)
    return {
        "layout": plan.layout,
        "split": (
            {"method": "stratified", "val_fraction": VAL_FRACTION, "seed": SPLIT_SEED}
            if plan.layout == "class_folders"
            else None
        ),
        "classes": classes,
        "counts": counts,
        "images": {split: len(order[split]) for split in SPLITS},
        "skipped": [SkippedFile(path=p, reason=r) for p, r in skipped_sorted[:SKIPPED_LISTED]],
        "skipped_count": len(skipped_sorted),
        "ignored_count": plan.ignored,
        "duplicates": {"train_val": len(leaked), "within_split": within, "examples": leaked[:10]},
        "_labels": labels,
        "_train": order["train"],
        "_val": order["val"],
    }


def _classes(plan: _Plan) -> list[str]:
    """The dataset's classes: the sorted class folders that hold candidate images."""
    return sorted({c.cls for c in plan.candidates.values()})


class _ImageFileWriter:
    """Writes a safetensors file image by image: header space reserved first, header at the end.

    ``append`` takes uint8 arrays of ``shape``; ``finish`` appends the extra tensors and writes
    the header (padded with spaces, as the format allows), then fsyncs.
    """

    def __init__(self, path: Path, shape: tuple[int, ...], classes: list[str]):
        self.path, self.shape, self.classes = path, tuple(shape), classes
        self.reserved = HEADER_RESERVED + 2 * len(json.dumps(classes).encode())
        self.count = 0
        self.row_bytes = int(np.prod(self.shape))
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "wb")  # noqa: SIM115 - closed in __exit__
        self.file.write(b"\x00" * (8 + self.reserved))

    def __enter__(self) -> _ImageFileWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()

    def append(self, array: np.ndarray) -> None:
        if array.shape != self.shape or array.dtype != np.uint8:
            raise ValueError(f"image of shape {array.shape} {array.dtype}, expected {self.shape} uint8")
        self.file.write(np.ascontiguousarray(array).tobytes())
        self.count += 1

    def finish(self, extra: dict[str, np.ndarray]) -> None:
        offset = self.count * self.row_bytes
        header: dict[str, object] = {
            "__metadata__": {"format": "imgclf-dataset-1", "classes": json.dumps(self.classes)},
            "images": {"dtype": "U8", "shape": [self.count, *self.shape], "data_offsets": [0, offset]},
        }
        for name, array in extra.items():
            data = np.ascontiguousarray(array).tobytes()
            header[name] = {
                "dtype": "I64",
                "shape": list(array.shape),
                "data_offsets": [offset, offset + len(data)],
            }
            self.file.write(data)
            offset += len(data)
        encoded = json.dumps(header).encode()
        if len(encoded) > self.reserved:
            raise ValueError("safetensors header larger than the reserved space")
        self.file.seek(0)
        self.file.write(struct.pack("<Q", self.reserved) + encoded.ljust(self.reserved, b" "))
        self.file.flush()
        os.fsync(self.file.fileno())


# Loading (training) ----------------------------------------------------------------------------


def load_uploaded(datasets_dir: Path, dataset_id: str) -> dict[str, ImageDataset]:
    """The train and val splits of a ready dataset, uint8 (N, 3, 224, 224) in ImageFolder order.

    Raises ``FileNotFoundError`` when the cache is missing, ``ValueError`` when it is unreadable.
    """
    path = Path(datasets_dir) / dataset_id / CACHE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"dataset {dataset_id}: its cache {path} is missing (deleted?)")
    with safe_open(str(path), framework="pt") as f:
        classes = json.loads(f.metadata()["classes"])
        images, labels = f.get_tensor("images"), f.get_tensor("labels")
        splits = {split: f.get_tensor(f"{split}_index") for split in SPLITS}
    out = {}
    for split, rows in splits.items():
        out[split] = ImageDataset(
            images=images[rows].contiguous(),
            labels=labels[rows].to(torch.int64),
            classes=list(classes),
            source=f"dataset {dataset_id} ({split})",
        )
    return out


def read_uploaded_items(
    datasets_dir: Path, dataset_id: str, split: str, pick: Callable[[int], list[int]]
) -> SplitItems:
    """A few images of a split of a ready dataset, reading only their rows of the cache.

    ``pick`` maps the split's size to the indices wanted (index in the split, in ImageFolder
    order, as in an evaluation's ``mistakes``). Raises ``FileNotFoundError`` (no cache),
    ``ValueError`` (unknown split, unreadable cache) or what ``pick`` raises.
    """
    if split not in SPLITS:
        raise ValueError(f"an uploaded dataset has the splits {', '.join(SPLITS)}, not {split!r}")
    path = Path(datasets_dir) / dataset_id / CACHE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"dataset {dataset_id}: its cache {path} is missing (deleted?)")
    with safe_open(str(path), framework="pt") as f:
        classes = json.loads(f.metadata()["classes"])
        rows = f.get_tensor(f"{split}_index")
        indices = pick(len(rows))
        labels = f.get_tensor("labels")
        images = f.get_slice("images")
        chosen = [int(rows[i]) for i in indices]
        pixels = [images[row : row + 1] for row in chosen]
    return SplitItems(
        images=torch.cat(pixels) if pixels else torch.empty((0, 3, 224, 224), dtype=torch.uint8),
        labels=labels[chosen].to(torch.int64) if chosen else torch.empty(0, dtype=torch.int64),
        indices=indices,
        classes=list(classes),
        size=len(rows),
    )


def class_counts(dataset: ImageDataset) -> Counter:
    """Images per class name (for logs and tests)."""
    return Counter(dataset.classes[i] for i in dataset.labels.tolist())
