"""Uploaded datasets as a resource: their records in Redis, shared by the API and the worker.

A dataset is uploaded as an archive (``POST /datasets``); its id is the first 32 hex digits of
the archive's sha256, so the same bytes uploaded twice are the same dataset. The API stores the
record (``ingesting``) and enqueues ``imgclf.ingest``; the worker checks, decodes and caches the
images (``worker.ingest``) and moves the record to ``ready`` or ``failed``.

Keys (``p`` = ``REDIS_PREFIX``)::

    p:dataset:<id>        JSON of the record
    p:datasets            sorted set of ids by upload time, for listing newest first
    p:dataset:<id>:jobs   ids of the jobs submitted on it (``DELETE`` refuses while one is queued
                          or running)

Every transition is a Lua script, atomic with respect to the other side.

Files: an upload is ingested in a folder of its own, ``DATASETS_DIR/.ingest/<id>-<upload time>``
(``ingest_folder``), and the worker moves it to ``DATASETS_DIR/<id>`` when it is ready. The
upload time (``created_at``) tells the uploads of the same bytes apart: after a DELETE and a new
upload of them, the first ingestion's writes (``DatasetStore.update``) and files can no longer
touch the second's.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks import builtin_datasets

DATASET_ID_PATTERN = r"^[0-9a-f]{32}$"
SKIPPED_LISTED = 1000  # skipped files listed on the record (all are counted)

# name -> (task that trains on it, classes); these are found under DATA_DIR, not uploaded
BUILTIN_DATASETS: dict[str, tuple[str, tuple[str, ...]]] = builtin_datasets()


def sniff_archive(head: bytes) -> str | None:
    """``zip``, ``tar`` or ``tar.gz`` from an archive's first 512 bytes; None for anything else."""
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:2] == b"\x1f\x8b":
        return "tar.gz"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if len(head) >= 512 and _is_v7_tar_header(head[:512]):
        return "tar"
    return None


def _is_v7_tar_header(block: bytes) -> bool:
    """A pre-POSIX tar header: its checksum field matches the block (the field counted as spaces)."""
    try:
        checksum = int(block[148:156].split(b"\x00")[0].strip() or b"-1", 8)
    except ValueError:
        return False
    return checksum == sum(block[:148]) + 8 * 32 + sum(block[156:])


class DatasetStatus(StrEnum):
    """ingesting -> ready | failed."""

    ingesting = "ingesting"
    ready = "ready"
    failed = "failed"


SKIPPED_TXT = ".txt files are not read (ImageFolder's: .jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp)"


class SkippedFile(BaseModel):
    """An archive entry that did not become a training image, and why."""

    path: str = Field(description="Path inside the archive.", examples=["ants/notes.txt"])
    reason: str = Field(description="Why it was skipped.", examples=[SKIPPED_TXT])


_EXAMPLE = {
    "id": "3b0c9f1e5d2a4c6b8e7f9a1b2c3d4e5f",
    "name": "pets",
    "status": "ready",
    "error": None,
    "builtin": False,
    "task": "custom_resnet18",
    "created_at": "2026-11-30T01:00:00+00:00",
    "finished_at": "2026-11-30T01:00:07+00:00",
    "sha256": "3b0c9f1e5d2a4c6b8e7f9a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f",
    "size_bytes": 48000000,
    "format": "zip",
    "layout": "class_folders",
    "split": {"method": "stratified", "val_fraction": 0.2, "seed": 0},
    "classes": ["cats", "dogs"],
    "counts": {"train": {"cats": 80, "dogs": 80}, "val": {"cats": 20, "dogs": 20}},
    "images": {"train": 160, "val": 40},
    "skipped": [{"path": "cats/notes.txt", "reason": SKIPPED_TXT}],
    "skipped_count": 1,
    "ignored_count": 3,
    "duplicates": {"train_val": 0, "within_split": 0, "examples": []},
    "preset": {"task": "custom_resnet18", "mode": "RGB", "resize": 256, "crop": 224},
    "progress": {},
}


class DatasetRecord(BaseModel):
    """An uploaded (or built-in) dataset."""

    model_config = ConfigDict(json_schema_extra={"examples": [_EXAMPLE]})

    id: str = Field(
        description="sha256 of the archive (first 32 hex digits), or the built-in's name.",
        examples=["3b0c9f1e5d2a4c6b8e7f9a1b2c3d4e5f"],
    )
    name: str = Field(description="Name given at upload (default: the file's name).", examples=["pets"])
    status: DatasetStatus = Field(description="ingesting, ready or failed.", examples=["ready"])
    error: str | None = Field(None, description="Why ingestion failed.", examples=[None])
    builtin: bool = Field(False, description="A built-in dataset found under DATA_DIR.", examples=[False])
    task: str | None = Field(None, description="Task that trains on it.", examples=["custom_resnet18"])
    created_at: datetime | None = Field(None, description="Upload time (UTC).")
    finished_at: datetime | None = Field(None, description="When ingestion ended (UTC).")
    sha256: str | None = Field(None, description="sha256 of the archive.")
    size_bytes: int | None = Field(None, description="Size of the archive, bytes.", examples=[48_000_000])
    format: str | None = Field(None, description="zip, tar or tar.gz.", examples=["zip"])
    layout: str | None = Field(
        None,
        description="`class_folders` (<class>/<images>, split here) or `train_val` (train/ and val/).",
        examples=["class_folders"],
    )
    split: dict[str, Any] | None = Field(
        None,
        description="How train/val were made for class_folders: stratified, val_fraction, seed.",
        examples=[{"method": "stratified", "val_fraction": 0.2, "seed": 0}],
    )
    classes: list[str] = Field(default_factory=list, description="Class names, index order.")
    counts: dict[str, dict[str, int]] = Field(
        default_factory=dict,
        description="Usable images per split and class.",
        examples=[{"train": {"cats": 80, "dogs": 80}, "val": {"cats": 20, "dogs": 20}}],
    )
    images: dict[str, int] = Field(
        default_factory=dict, description="Usable images per split.", examples=[{"train": 160, "val": 40}]
    )
    skipped: list[SkippedFile] = Field(
        default_factory=list, description=f"Skipped entries with the reason (first {SKIPPED_LISTED})."
    )
    skipped_count: int = Field(0, description="Skipped entries in all.")
    ignored_count: int = Field(
        0, description="Entries ignored silently: __MACOSX/, dotfiles, Thumbs.db, desktop.ini, folders."
    )
    duplicates: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Exact duplicate images (same bytes): `train_val` = val images also in train (leakage), "
            "`within_split`, and up to 10 `examples` [train path, val path]."
        ),
    )
    preset: dict[str, Any] | None = Field(
        None, description="Preprocessing the images were cached with (ResNet18: Resize 256, crop 224)."
    )
    progress: dict[str, Any] = Field(
        default_factory=dict,
        description="While ingesting: stage, entries_done, entries_total, images, updated_at.",
        examples=[{"stage": "decoding", "entries_done": 120, "entries_total": 400, "images": 118}],
    )


class DatasetsPublic(BaseModel):
    """Uploaded datasets (newest first) after the built-in ones."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"data": [_EXAMPLE], "count": 1}]})

    data: list[DatasetRecord] = Field(description="The datasets.")
    count: int = Field(description="How many.")


def builtin_record(name: str) -> DatasetRecord:
    """The record of a built-in dataset; raises ``KeyError`` for an unknown name."""
    task, classes = BUILTIN_DATASETS[name]
    return DatasetRecord(
        id=name, name=name, status=DatasetStatus.ready, builtin=True, task=task, classes=list(classes)
    )


class DatasetRecordCorrupt(Exception):
    """A dataset record in Redis cannot be read."""


# KEYS: record, index. ARGV: json, score, id. A failed dataset is replaced (a re-upload retries).
_CREATE = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, decoded = pcall(cjson.decode, current)
  if ok and decoded['status'] ~= 'failed' then return {'existing', current} end
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
return {'created', ARGV[1]}
"""

# KEYS: record. ARGV: json, only_if_status, created_at (another upload of the same bytes: missing)
_UPDATE = """
local current = redis.call('GET', KEYS[1])
if not current then return 'missing' end
local decoded = cjson.decode(current)
if ARGV[3] ~= '' and decoded['created_at'] ~= ARGV[3] then return 'missing' end
if decoded['status'] ~= ARGV[2] then return 'status_changed' end
redis.call('SET', KEYS[1], ARGV[1])
return 'ok'
"""

# KEYS: record, index, users. ARGV: job key prefix, id
_DELETE = """
local current = redis.call('GET', KEYS[1])
if not current then return {'missing', ''} end
local busy = {}
for _, job_id in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  local status = redis.call('HGET', ARGV[1] .. job_id, 'status')
  if status == 'queued' or status == 'running' then table.insert(busy, job_id) end
end
if #busy > 0 then return {'in_use', table.concat(busy, ',')} end
redis.call('DEL', KEYS[1], KEYS[3])
redis.call('ZREM', KEYS[2], ARGV[2])
return {'deleted', ''}
"""

# KEYS: record, users. ARGV: job id
_ATTACH = """
local current = redis.call('GET', KEYS[1])
if not current then return 'missing' end
local status = cjson.decode(current)['status']
if status ~= 'ready' then return status end
redis.call('SADD', KEYS[2], ARGV[1])
return 'ok'
"""


class UpdateOutcome(StrEnum):
    """What ``DatasetStore.update`` did."""

    ok = "ok"  # the record was replaced
    missing = "missing"  # deleted meanwhile
    status_changed = "status_changed"  # its stored status is no longer the expected one: unchanged


class DeleteOutcome(StrEnum):
    """What ``DatasetStore.delete`` did."""

    deleted = "deleted"
    missing = "missing"  # no such dataset
    in_use = "in_use"  # queued or running jobs train on it (``DeleteResult.job_ids``): unchanged


class DeleteResult(BaseModel):
    """Outcome of ``DatasetStore.delete``, with the jobs that use the dataset when ``in_use``
    (sorted)."""

    outcome: DeleteOutcome
    job_ids: list[str] = []


class AttachOutcome(StrEnum):
    """What ``DatasetStore.attach_job`` did."""

    ok = "ok"  # the job is recorded as training on it
    missing = "missing"  # no such dataset
    not_ready = "not_ready"  # it is ingesting or failed (``AttachResult.status``): nothing recorded


class AttachResult(BaseModel):
    """Outcome of ``DatasetStore.attach_job``, with the dataset's status when ``not_ready``."""

    outcome: AttachOutcome
    status: DatasetStatus | None = None


class DatasetStore:
    """Dataset records in Redis (see the module docstring for the keys).

    Args:
        client: a ``redis.Redis`` with ``decode_responses=True``.
        prefix: key prefix (``REDIS_PREFIX``).

    Every method may raise ``redis.exceptions.RedisError`` when Redis is unreachable.
    """

    def __init__(self, client: redis.Redis, prefix: str):
        self.redis = client
        self.prefix = prefix
        self._create = client.register_script(_CREATE)
        self._update = client.register_script(_UPDATE)
        self._delete = client.register_script(_DELETE)
        self._attach = client.register_script(_ATTACH)

    def key(self, dataset_id: str) -> str:
        return f"{self.prefix}:dataset:{dataset_id}"

    @property
    def index_key(self) -> str:
        return f"{self.prefix}:datasets"

    def create(self, record: DatasetRecord) -> tuple[DatasetRecord, bool]:
        """Store a new ``ingesting`` record; returns (record, created).

        If a dataset with this id exists and has not failed, it is returned with ``created=False``
        (same bytes, same dataset); a failed one is replaced, so a re-upload retries ingestion.
        """
        outcome, value = self._create(
            keys=[self.key(record.id), self.index_key],
            args=[record.model_dump_json(), time.time(), record.id],
        )
        return _parse(record.id, value), outcome == "created"

    def get(self, dataset_id: str) -> DatasetRecord | None:
        """The record, or None. Raises ``DatasetRecordCorrupt`` for an unreadable one."""
        raw = self.redis.get(self.key(dataset_id))
        return _parse(dataset_id, raw) if raw else None

    def list(self, offset: int = 0, limit: int | None = None) -> tuple[list[DatasetRecord], int]:
        """Uploaded datasets, newest first: ``limit`` of them (all if None) after skipping
        ``offset``, and how many there are in all. Unreadable records are left out of the page
        (still counted)."""
        stop = -1 if limit is None else offset + limit - 1
        ids = self.redis.zrevrange(self.index_key, offset, stop) if limit != 0 else []
        values = self.redis.mget([self.key(i) for i in ids]) if ids else []
        records = []
        for dataset_id, raw in zip(ids, values, strict=True):
            try:
                if raw:
                    records.append(_parse(dataset_id, raw))
            except DatasetRecordCorrupt:
                continue
        return records, self.redis.zcard(self.index_key)

    def update(
        self, record: DatasetRecord, only_if: DatasetStatus = DatasetStatus.ingesting
    ) -> UpdateOutcome:
        """Replace the record if its stored status is still ``only_if`` and it is the same upload
        (``created_at``): ``ok``, ``missing`` (deleted meanwhile, or since uploaded again) or
        ``status_changed``."""
        payload = record.model_dump(mode="json")
        outcome = self._update(
            keys=[self.key(record.id)], args=[json.dumps(payload), only_if.value, payload["created_at"] or ""]
        )
        return UpdateOutcome(outcome)

    def delete(self, dataset_id: str, job_key_prefix: str) -> DeleteResult:
        """Delete the record unless in use: ``deleted``, ``missing`` or ``in_use`` with the ids of
        the queued or running jobs that train on it. An ingestion in progress notices at its next
        progress write and removes its files."""
        keys = [self.key(dataset_id), self.index_key, f"{self.key(dataset_id)}:jobs"]
        outcome, job_ids = self._delete(keys=keys, args=[job_key_prefix, dataset_id])
        return DeleteResult(outcome=DeleteOutcome(outcome), job_ids=sorted(filter(None, job_ids.split(","))))

    def attach_job(self, dataset_id: str, job_id: str) -> AttachResult:
        """Record that ``job_id`` trains on the dataset, if it is ready: ``ok``, ``missing`` or
        ``not_ready`` with the dataset's status."""
        outcome = self._attach(keys=[self.key(dataset_id), f"{self.key(dataset_id)}:jobs"], args=[job_id])
        if outcome in (AttachOutcome.ok, AttachOutcome.missing):
            return AttachResult(outcome=AttachOutcome(outcome))
        return AttachResult(outcome=AttachOutcome.not_ready, status=DatasetStatus(outcome))


def _parse(dataset_id: str, raw: str) -> DatasetRecord:
    try:
        return DatasetRecord.model_validate(json.loads(raw))
    except (ValueError, ValidationError) as exc:
        raise DatasetRecordCorrupt(
            f"the stored record of dataset {dataset_id} is unreadable: {exc}"
        ) from None


STALE_INGESTION_S = 600
INGEST_DIR = ".ingest"


def ingest_folder(datasets_dir: Path, record: DatasetRecord) -> Path:
    """Where this upload of the dataset is ingested: ``DATASETS_DIR/.ingest/<id>-<upload time>``
    (one folder per upload, see the module docstring)."""
    stamp = record.created_at.strftime("%Y%m%dT%H%M%S%f") if record.created_at else "0"
    return Path(datasets_dir) / INGEST_DIR / f"{record.id}-{stamp}"


def same_upload(stored: DatasetRecord | None, record: DatasetRecord) -> bool:
    """Whether ``stored`` (the record now in Redis) is still the upload ``record`` was read from."""
    return stored is not None and stored.created_at == record.created_at


def ingestion_stalled(record: DatasetRecord, now: datetime) -> bool:
    """An ``ingesting`` record that no worker has touched for ``STALE_INGESTION_S`` (its worker
    was lost, or its message is still waiting behind long jobs): a re-upload queues it again."""
    if record.status != DatasetStatus.ingesting:
        return False
    updated = record.progress.get("updated_at")
    try:
        last = datetime.fromisoformat(updated) if isinstance(updated, str) else record.created_at
    except ValueError:
        last = record.created_at
    return last is None or (now - last).total_seconds() > STALE_INGESTION_S


def utcnow() -> datetime:
    return datetime.now(UTC)
