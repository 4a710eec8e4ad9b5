"""/datasets: uploaded datasets as a resource (upload an archive of images in class folders,
follow its ingestion, list, delete), and every dataset's images as the models see them.

The upload is streamed to a temporary file under DATASETS_DIR (python-multipart's push parser,
chunk by chunk, never held in memory) while its sha256 is computed; the dataset id is that hash,
so the same bytes give the same dataset. Checking and decoding run on a worker
(``imgclf.ingest``, see ``worker.ingest``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path as FilePath
from typing import Annotated
from urllib.parse import quote

import anyio
from fastapi import APIRouter, HTTPException, Path, Query, Request, Response, status
from python_multipart.multipart import MultipartParser, parse_options_header

from app.api.deps import CeleryDep, SettingsDep
from app.figures import PNG, image_png, run_bounded, samples_png
from app.schemas import error_responses
from core.datasets import (
    BUILTIN_DATASETS,
    DatasetRecord,
    DatasetRecordCorrupt,
    DatasetsPublic,
    DatasetStatus,
    DatasetStore,
    DeleteOutcome,
    builtin_record,
    ingest_folder,
    ingestion_stalled,
    sniff_archive,
    utcnow,
)
from core.queue import enqueue_ingest
from tasks import get_task, upload_task
from worker.data import DatasetCorrupt, DatasetNotFound, SplitItems, read_items
from worker.ingest import read_uploaded_items

log = logging.getLogger(__name__)

router = APIRouter(prefix="/datasets", tags=["datasets"])


DatasetName = Annotated[
    str, Path(max_length=64, description="Dataset: mnist, cifar10, hymenoptera, or an uploaded dataset id.")
]


def task_of(name: str, split: str | None = None) -> str:
    """The task whose preset and loader serve dataset ``name``; 404 for an unknown dataset or split."""
    if name not in BUILTIN_DATASETS:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"no dataset {name!r}; known: {', '.join(sorted(BUILTIN_DATASETS))}"
        )
    task, _ = BUILTIN_DATASETS[name]
    splits = ("train", get_task(task).eval_split)
    if split is not None and split not in splits:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"dataset {name} has no split {split!r}; it has {', '.join(splits)}"
        )
    return task


def _task_or_uploaded(request: Request, name: str, split: str) -> str | None:
    """The task serving built-in dataset ``name``, or None for a ready uploaded dataset (by its
    id); 404 otherwise."""
    if _UPLOADED_ID.fullmatch(name):
        record = request.app.state.datasets.get(name)
        if record is None or record.status != "ready":
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no ready uploaded dataset {name}")
        if split not in UPLOADED_SPLITS:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND, f"dataset {name} has no split {split!r}; it has train, val"
            )
        return None
    return task_of(name, split)


_UPLOADED_ID = re.compile(r"[0-9a-f]{32}")
UPLOADED_SPLITS = ("train", "val")


def _read(settings, name: str, task: str | None, split: str, pick) -> SplitItems:
    """Images of a built-in dataset (``task`` serves it), or of an uploaded one (``task`` None)."""
    if task is None:
        try:
            return read_uploaded_items(settings.datasets_dir, name, split, pick)
        except (FileNotFoundError, ValueError) as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, f"dataset {name} cannot be read: {exc}") from None
    try:
        return read_items(task, split, settings.data_dir, settings.cache_dir, pick)
    except DatasetNotFound as exc:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"dataset {name} is not available on this server: {exc}"
        ) from None
    except DatasetCorrupt as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, f"dataset {name} cannot be read: {exc}") from None


@router.get(
    "/{name}/samples.png",
    response_class=Response,
    summary="A grid of sample images with their class names",
    responses=PNG
    | error_responses(_404="Unknown dataset or split.", _409="The dataset's files are missing."),
)
async def samples(
    name: DatasetName,
    request: Request,
    settings: SettingsDep,
    split: Annotated[
        str, Query(max_length=16, description="train, or test (val for hymenoptera).")
    ] = "train",
    n: Annotated[int, Query(ge=1, le=100, description="Images in the grid.")] = 25,
    seed: Annotated[int, Query(ge=0, le=2**32 - 1, description="Which images: a seeded random choice.")] = 0,
) -> Response:
    """`n` images chosen at random (seeded) from the split, after the task's preprocessing (for
    hymenoptera and uploaded datasets the 224 x 224 centre crop), each titled with its class name.
    The grid is ceil(sqrt(n)) columns wide; each tile is 120 x 144 pixels."""
    task = _task_or_uploaded(request, name, split)

    def pick(size: int) -> list[int]:
        return random.Random(seed).sample(range(size), min(n, size))

    def draw() -> bytes:
        items = _read(settings, name, task, split, pick)
        if not len(items.indices):
            raise HTTPException(status.HTTP_409_CONFLICT, f"the {split} split of {name} is empty")
        return samples_png(items.images, [items.classes[int(label)] for label in items.labels])

    return Response(await run_bounded(draw), media_type="image/png", headers={"Cache-Control": "max-age=60"})


@router.get(
    "/{name}/images/{split}/{index}",
    response_class=Response,
    summary="One dataset image as PNG",
    responses=PNG
    | error_responses(_404="Unknown dataset, split or index.", _409="The dataset's files are missing."),
)
async def image(
    name: DatasetName,
    split: Annotated[str, Path(max_length=16, description="train, or test (val for hymenoptera).")],
    index: Annotated[int, Path(ge=0, description="Index in the split, in the dataset loader's order.")],
    request: Request,
    settings: SettingsDep,
) -> Response:
    """The image as the model saw it: the uint8 tensor after the task's resize and crop (28 x 28
    grey for MNIST, 32 x 32 RGB for CIFAR-10, 224 x 224 RGB for hymenoptera). The index is the one
    in an evaluation's `mistakes`; the class name is in the `X-Class` header (percent-encoded)."""
    task = _task_or_uploaded(request, name, split)

    def pick(size: int) -> list[int]:
        if index >= size:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND, f"the {split} split of {name} has {size} images; no index {index}"
            )
        return [index]

    def read() -> tuple[bytes, str]:
        items = _read(settings, name, task, split, pick)
        return image_png(items.images[0]), items.classes[int(items.labels[0])]

    data, label = await run_bounded(read)
    return Response(
        data, media_type="image/png", headers={"X-Class": quote(label), "Cache-Control": "max-age=60"}
    )


UPLOAD_FIELDS = ("file", "name")
MAX_NAME_CHARS = 200
NAME_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]*$"  # no control characters
_NAME_RE = re.compile(NAME_PATTERN)
INCOMING = ".incoming"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
DatasetId = Annotated[
    str,
    Path(
        pattern=rf"^([0-9a-f]{{32}}|{'|'.join(BUILTIN_DATASETS)})$",
        description="Dataset id (32 hex digits) or a built-in name (mnist, cifar10, hymenoptera).",
    ),
]


def get_dataset_store(request: Request) -> DatasetStore:
    return request.app.state.datasets


class _UploadRejected(Exception):
    def __init__(self, status_code: int, detail: str):
        super().__init__(detail)
        self.status_code, self.detail = status_code, detail


class _MultipartSink:
    """Receives python-multipart's callbacks: the ``file`` part goes to a temporary file (hashed
    as it is written), the ``name`` part to a small buffer; anything else is refused."""

    def __init__(self, directory: FilePath, limit: int):
        directory.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(dir=directory, prefix=".upload-", suffix=".part")
        self.file = os.fdopen(fd, "wb")
        self.path = FilePath(path)
        self.limit = limit
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.head = b""
        self.filename: str | None = None
        self.name = bytearray()
        self.seen: set[str] = set()
        self.pending: list[bytes] = []
        self._part: str | None = None
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, bytes] = {}

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._header_field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._header_value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
        }

    def _part_begin(self) -> None:
        self._part, self._headers = None, {}

    def _header_end(self) -> None:
        self._headers[self._header_field.decode("latin-1").lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get("content-disposition", b""))
        field = options.get(b"name", b"").decode("utf-8", "replace")
        if field not in UPLOAD_FIELDS:
            raise _UploadRejected(422, f"unknown form field {field!r}; expected {', '.join(UPLOAD_FIELDS)}")
        if field in self.seen:
            raise _UploadRejected(422, f"form field {field} given twice")
        self.seen.add(field)
        self._part = field
        if field == "file":
            self.filename = options.get(b"filename", b"").decode("utf-8", "replace") or None

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._part == "name":
            self.name.extend(chunk)
            if len(self.name) > 4 * MAX_NAME_CHARS:  # UTF-8: at most 4 bytes a character
                raise _UploadRejected(422, f"name is longer than {MAX_NAME_CHARS} characters")
            return
        self.size += len(chunk)
        if self.size > self.limit:
            raise _UploadRejected(
                413, f"the archive is larger than the limit of {self.limit} bytes (MAX_DATASET_BYTES)"
            )
        if len(self.head) < 512:
            self.head += chunk[: 512 - len(self.head)]
        self.pending.append(bytes(chunk))

    def flush(self) -> None:
        """Write and hash what the parser produced so far (run in a worker thread)."""
        for chunk in self.pending:
            self.file.write(chunk)
            self.sha256.update(chunk)
        self.pending.clear()

    def close(self) -> None:
        self.file.close()

    def discard(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


async def _receive_upload(request: Request, directory: FilePath, limit: int) -> _MultipartSink:
    """Stream the multipart body into a ``_MultipartSink``; raises ``_UploadRejected``."""
    media_type, options = parse_options_header(request.headers.get("content-type"))
    if media_type != b"multipart/form-data" or not options.get(b"boundary"):
        raise _UploadRejected(
            415, "send the archive as multipart/form-data with a `file` field (curl -F file=@photos.zip)"
        )
    await anyio.to_thread.run_sync(_remove_stale_uploads, directory)
    sink = await anyio.to_thread.run_sync(_MultipartSink, directory, limit)
    try:
        parser = MultipartParser(options[b"boundary"], sink.callbacks())
        async for chunk in request.stream():
            parser.write(chunk)
            if sink.pending:
                await anyio.to_thread.run_sync(sink.flush)
        parser.finalize()
        await anyio.to_thread.run_sync(sink.flush)
        sink.close()
    except (_UploadRejected, HTTPException):  # HTTPException: the body size limit (413)
        sink.discard()
        raise
    except OSError as exc:
        sink.discard()
        raise _UploadRejected(
            507, f"could not store the upload under {directory}: {exc.strerror or exc}"
        ) from None
    except Exception as exc:  # a malformed multipart body
        sink.discard()
        raise _UploadRejected(400, f"the multipart body is malformed: {type(exc).__name__}: {exc}") from None
    return sink


def _remove_stale_uploads(directory: FilePath, older_than_s: float = 24 * 3600) -> None:
    """Temporary uploads left by an API process that died mid-upload."""
    cutoff = time.time() - older_than_s
    for path in directory.glob(".upload-*.part") if directory.is_dir() else []:
        with contextlib.suppress(OSError):
            if path.stat().st_mtime < cutoff:
                path.unlink()


def _dataset_name(sink: _MultipartSink, dataset_id: str) -> str:
    try:
        given = sink.name.decode("utf-8")
    except UnicodeDecodeError:
        raise _UploadRejected(422, "name is not valid UTF-8") from None
    if len(given) > MAX_NAME_CHARS:
        raise _UploadRejected(422, f"name is longer than {MAX_NAME_CHARS} characters")
    if not _NAME_RE.fullmatch(given):  # not .match: its $ also matches before a final newline
        raise _UploadRejected(422, "name must not contain control characters")
    name = given.strip()
    if not name and sink.filename:
        name = FilePath(sink.filename.replace("\\", "/")).name
        for suffix in ARCHIVE_SUFFIXES:
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
                break
    name = "".join(c for c in name if c.isprintable())[:MAX_NAME_CHARS]
    return name or dataset_id[:12]


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=DatasetRecord,
    summary="Upload a dataset archive",
    responses={
        200: {"model": DatasetRecord, "description": "The same bytes were uploaded before: that dataset."},
        202: {"description": "Stored; ingestion runs on a worker (poll GET /datasets/{id})."},
        **error_responses(
            _400=("Empty file or malformed multipart body.", "the uploaded file is empty"),
            _413=(
                "Archive over MAX_DATASET_BYTES.",
                "the archive is larger than the limit of 1073741824 bytes (MAX_DATASET_BYTES)",
            ),
            _415=(
                "Not multipart, or the file is not a zip, tar or tar.gz archive.",
                "the file is not a .zip, .tar, .tar.gz or .tgz archive",
            ),
            _422=(
                "No file field, an unknown or repeated field, or a bad name.",
                "no `file` field: send the archive as -F file=@photos.zip",
            ),
            _503="Redis (the queue) is unreachable; nothing was stored.",
            _507=(
                "The upload could not be written (disk full).",
                "could not store the upload under var/datasets/.incoming: No space left on device",
            ),
        ),
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "additionalProperties": False,
                        "properties": {
                            "file": {
                                "type": "string",
                                "format": "binary",
                                "description": ".zip, .tar, .tar.gz or .tgz of <class>/<images> or "
                                "train/<class>/ + val/<class>/",
                            },
                            "name": {
                                "type": "string",
                                "maxLength": MAX_NAME_CHARS,
                                "pattern": NAME_PATTERN,
                                "description": "Name to list it by (default: the file's name).",
                            },
                        },
                    }
                }
            },
        }
    },
)
async def upload_dataset(
    request: Request, response: Response, settings: SettingsDep, celery: CeleryDep
) -> DatasetRecord:
    """Store the archive and queue its ingestion. The id is the archive's sha256 (32 hex digits):
    the same bytes uploaded again answer 200 with the existing dataset (a failed one is retried,
    and an ingestion no worker has touched for 10 minutes is queued again, both with 202)."""
    store = get_dataset_store(request)
    root = FilePath(settings.datasets_dir)
    try:
        sink = await _receive_upload(request, root / INCOMING, settings.max_dataset_bytes)
        try:
            if "file" not in sink.seen:
                raise _UploadRejected(422, "no `file` field: send the archive as -F file=@photos.zip")
            if sink.size == 0:
                raise _UploadRejected(400, "the uploaded file is empty")
            archive_format = sniff_archive(sink.head)
            if archive_format is None:
                raise _UploadRejected(415, "the file is not a .zip, .tar, .tar.gz or .tgz archive")
            digest = sink.sha256.hexdigest()
            dataset_id = digest[:32]
            record = DatasetRecord(
                id=dataset_id,
                name=_dataset_name(sink, dataset_id),
                status=DatasetStatus.ingesting,
                task=upload_task(),
                created_at=utcnow(),
                sha256=digest,
                size_bytes=sink.size,
                format=archive_format,
            )
        except _UploadRejected:
            sink.discard()
            raise
    except _UploadRejected as exc:
        raise HTTPException(exc.status_code, exc.detail) from None
    try:
        stored, created = store.create(record)
    except Exception:
        sink.discard()
        raise
    response.headers["Location"] = f"/datasets/{dataset_id}"
    folder = ingest_folder(root, stored)
    if not created and ingestion_stalled(stored, utcnow()):
        if not (folder / "upload").is_file():
            await anyio.to_thread.run_sync(_place_upload, sink.path, folder)
        sink.discard()
        enqueue_ingest(celery, dataset_id)
        log.warning("dataset %s: ingestion stalled; queued again", dataset_id)
        return stored
    if not created:
        sink.discard()
        response.status_code = status.HTTP_200_OK
        return stored
    try:
        await anyio.to_thread.run_sync(_place_upload, sink.path, folder)
        enqueue_ingest(celery, dataset_id)
    except BaseException:
        store.redis.delete(store.key(dataset_id))
        store.redis.zrem(store.index_key, dataset_id)
        sink.discard()
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return stored


def _place_upload(temporary: FilePath, folder: FilePath) -> None:
    shutil.rmtree(folder, ignore_errors=True)  # leftovers of an earlier failed ingestion
    folder.mkdir(parents=True)
    os.replace(temporary, folder / "upload")


@router.get(
    "", response_model=DatasetsPublic, summary="List datasets: built-in, then uploaded (newest first)"
)
def list_datasets(
    request: Request,
    offset: Annotated[int, Query(ge=0, le=1_000_000, description="Datasets to skip.")] = 0,
    limit: Annotated[int, Query(ge=1, le=200, description="Page size.")] = 50,
) -> dict:
    """One page of the built-in datasets followed by the uploaded ones, newest first; ``count``
    is how many there are in all."""
    builtins = [builtin_record(name) for name in BUILTIN_DATASETS][offset : offset + limit]
    skip = max(offset - len(BUILTIN_DATASETS), 0)
    uploaded, total = get_dataset_store(request).list(skip, limit - len(builtins))
    return {"data": builtins + uploaded, "count": len(BUILTIN_DATASETS) + total}


@router.get(
    "/{dataset_id}",
    response_model=DatasetRecord,
    summary="Read a dataset: status, classes, counts, skipped files",
    responses=error_responses(
        _404=("No such dataset.", "no dataset with id 3b0c9f1e5d2a4c6b8e7f9a1b2c3d4e5f"),
    ),
)
def get_dataset(dataset_id: DatasetId, request: Request) -> DatasetRecord:
    if dataset_id in BUILTIN_DATASETS:
        return builtin_record(dataset_id)
    record = get_dataset_store(request).get(dataset_id)
    if record is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no dataset with id {dataset_id}")
    return record


@router.delete(
    "/{dataset_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete an uploaded dataset",
    responses=error_responses(
        _404=("No such dataset.", "no dataset with id 3b0c9f1e5d2a4c6b8e7f9a1b2c3d4e5f"),
        _409=(
            "Built in, or a queued or running job uses it.",
            "job 5f2c1e0b9a7d4c3e8f1a2b3c4d5e6f70 is queued or running on dataset "
            "3b0c9f1e5d2a4c6b8e7f9a1b2c3d4e5f",
        ),
    ),
)
def delete_dataset(dataset_id: DatasetId, request: Request, settings: SettingsDep) -> Response:
    """Removes the record and the cached images (an ingestion in progress stops and removes its
    files). Models trained on it are kept."""
    if dataset_id in BUILTIN_DATASETS:
        raise HTTPException(status.HTTP_409_CONFLICT, f"{dataset_id} is built in and cannot be deleted")
    store = get_dataset_store(request)
    try:
        record = store.get(dataset_id)
    except DatasetRecordCorrupt:  # deleted all the same
        record = None
    result = store.delete(dataset_id, f"{store.prefix}:job:")
    if result.outcome == DeleteOutcome.missing:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no dataset with id {dataset_id}")
    if result.outcome == DeleteOutcome.in_use:
        ids = result.job_ids
        jobs = f"job {ids[0]} is" if len(ids) == 1 else f"jobs {', '.join(ids)} are"
        raise HTTPException(status.HTTP_409_CONFLICT, f"{jobs} queued or running on dataset {dataset_id}")
    shutil.rmtree(FilePath(settings.datasets_dir) / dataset_id, ignore_errors=True)
    if record is not None:  # an ingestion in progress then finds its files gone and stops
        shutil.rmtree(ingest_folder(settings.datasets_dir, record), ignore_errors=True)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
