"""The checkpoint store: what a trained model is on disk and how it is saved, listed and loaded.

Layout under ``MODELS_DIR``::

    <model_id>/model.safetensors   weights (safetensors: tensors only, never unpickled)
    <model_id>/metadata.json       task, classes, preset, architecture, hyperparameters,
                                   metrics, library versions, sha256 and size of the weights

A checkpoint is written into a hidden ``.tmp-*`` directory, fsynced, and renamed into place in
one ``rename(2)``, so a reader sees either nothing or the whole checkpoint. Before weights are
used their sha256 is checked against the metadata; a tampered or truncated checkpoint is listed
as invalid and refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from threading import Lock
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, ValidationError

if TYPE_CHECKING:
    import torch

# JSON-Schema / Rust-regex pattern (pydantic, OpenAPI), where $ is the end of the text. In Python,
# $ also matches before a final newline ("abc\n"), so ids are checked with fullmatch.
MODEL_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,127}$"
_MODEL_ID_RE = re.compile(MODEL_ID_PATTERN)
WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "metadata.json"
FORMAT_VERSION = 1


class _WeightsEntry(BaseModel):
    sha256: str
    bytes: int


class _MetadataShape(BaseModel):
    """The fields of metadata.json that the store and the API read, with their types (others are
    kept as they are)."""

    model_config = ConfigDict(extra="allow", strict=True)

    task: str
    created_at: str
    weights: _WeightsEntry
    classes: list[str] = []
    metrics: dict = {}
    hyperparameters: dict = {}
    job_id: str | None = None
    device: str | None = None
    pretrained: dict | None = None


def _metadata_problem(metadata: dict) -> str | None:
    """None if ``metadata`` has the expected shape, else what is wrong (first three problems)."""
    try:
        _MetadataShape.model_validate(metadata)
    except ValidationError as exc:
        problems = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3]]
        return "; ".join(problems)
    return None


class CheckpointError(Exception):
    """Base class of checkpoint store errors."""


class InvalidModelId(CheckpointError):
    """The id is not of the form ``MODEL_ID_PATTERN``; it never reaches the filesystem."""


class ModelNotFound(CheckpointError):
    """No checkpoint with this id."""


class CheckpointInvalid(CheckpointError):
    """The checkpoint exists but failed verification (bad metadata, size or sha256)."""


@dataclass
class CheckpointInfo:
    """One checkpoint as listed. ``metadata`` is {} when unreadable; ``error`` says why invalid."""

    model_id: str
    path: Path
    metadata: dict = field(default_factory=dict)
    size_bytes: int = 0
    valid: bool = False
    error: str | None = None

    @property
    def task(self) -> str | None:
        return self.metadata.get("task")

    @property
    def created_at(self) -> str:
        return self.metadata.get("created_at", "")


def _file_signature(found: os.stat_result) -> tuple[int, int, int, int]:
    """What changes when a file is replaced or rewritten: size, mtime, inode and ctime (which,
    unlike mtime, ``touch -r`` or ``cp -p`` cannot set back)."""
    return (found.st_size, found.st_mtime_ns, found.st_ino, found.st_ctime_ns)


def validate_model_id(model_id: str) -> str:
    """Return ``model_id`` if it matches ``MODEL_ID_PATTERN``; raise ``InvalidModelId`` otherwise."""
    if not isinstance(model_id, str) or not _MODEL_ID_RE.fullmatch(model_id):
        raise InvalidModelId(
            f"invalid model id {model_id!r}: expected 1-128 characters of a-z, 0-9, '_' and '-', "
            "starting with a letter or digit"
        )
    return model_id


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class CheckpointStore:
    """Checkpoints in one directory; safe to use from several processes.

    Args:
        root: the ``MODELS_DIR``; created on the first save.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self._verified: dict[str, tuple[tuple, str | None]] = {}
        self._metadata: dict[str, tuple[tuple, bytes, str | None]] = {}
        self._lock = Lock()

    def save(self, model_id: str, tensors: dict[str, torch.Tensor], metadata: dict) -> CheckpointInfo:
        """Write a checkpoint atomically.

        Args:
            model_id: new id (``MODEL_ID_PATTERN``).
            tensors: name -> tensor (any dtype/device; copied to contiguous CPU tensors).
            metadata: JSON-serialisable dict; ``model_id``, ``format_version`` and ``weights``
                (file, sha256, bytes) are added.

        Raises:
            InvalidModelId, FileExistsError (id taken), OSError (disk full, unwritable directory).
            Nothing is left behind on failure.
        """
        from safetensors.torch import save as save_safetensors  # torch: only where tensors are

        validate_model_id(model_id)
        cpu_tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        weights = save_safetensors(cpu_tensors)
        full_metadata = {
            **metadata,
            "model_id": model_id,
            "format_version": FORMAT_VERSION,
            "weights": {"file": WEIGHTS_FILE, "sha256": sha256_bytes(weights), "bytes": len(weights)},
        }
        final = self.root / model_id
        if final.exists():
            raise FileExistsError(f"checkpoint {model_id} already exists")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{model_id}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            _write_file(tmp / WEIGHTS_FILE, weights)
            _write_file(tmp / METADATA_FILE, json.dumps(full_metadata, indent=2).encode())
            _fsync_dir(tmp)
            os.rename(tmp, final)
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.get(model_id)

    def check_writable(self) -> None:
        """Create and remove a hidden directory in the store; raises ``OSError`` if it cannot (so
        a job can fail before training instead of after)."""
        self.root.mkdir(parents=True, exist_ok=True)
        probe = self.root / f".tmp-probe-{uuid.uuid4().hex[:8]}"
        probe.mkdir()
        probe.rmdir()

    def list(self) -> list[CheckpointInfo]:
        """All checkpoints, valid or not, newest first. Symbolic links are not followed: a
        checkpoint is a real directory written by ``save``."""
        if not self.root.is_dir():
            return []
        infos = [
            self._inspect(entry.name, Path(entry.path))
            for entry in os.scandir(self.root)
            if entry.is_dir(follow_symlinks=False) and _MODEL_ID_RE.fullmatch(entry.name)
        ]
        return sorted(infos, key=lambda info: (info.created_at, info.model_id), reverse=True)

    def get(self, model_id: str) -> CheckpointInfo:
        """One checkpoint (possibly invalid). Raises ``InvalidModelId``, ``ModelNotFound``."""
        validate_model_id(model_id)
        path = self.root / model_id
        try:
            is_dir = stat.S_ISDIR(os.lstat(path).st_mode)  # a symbolic link is not a directory here
        except OSError:
            is_dir = False
        if not is_dir:
            raise ModelNotFound(f"no model with id {model_id!r}")
        return self._inspect(model_id, path)

    def newest(self, task: str) -> CheckpointInfo | None:
        """The newest valid checkpoint of ``task``, or None."""
        return next((i for i in self.list() if i.valid and i.task == task), None)

    def load(self, model_id: str) -> tuple[dict[str, torch.Tensor], dict]:
        """Read and verify a checkpoint: (CPU tensors, metadata).

        The weights are hashed and parsed from the same bytes, so what is verified is what is
        loaded. Raises ``InvalidModelId``, ``ModelNotFound``, ``CheckpointInvalid``.
        """
        from safetensors.torch import load as load_safetensors  # torch: only where tensors are

        info = self.get(model_id)
        if not info.metadata:
            raise CheckpointInvalid(f"model {model_id}: {info.error}")
        data = self._read_weights(info)
        expected = info.metadata["weights"]
        if len(data) != expected["bytes"] or sha256_bytes(data) != expected["sha256"]:
            raise CheckpointInvalid(
                f"model {model_id}: weights do not match the sha256 in metadata.json "
                "(tampered or truncated); refusing to load"
            )
        try:
            tensors = load_safetensors(data)
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointInvalid(f"model {model_id}: unreadable weights: {exc}") from exc
        return tensors, info.metadata

    def exists(self, model_id: str) -> bool:
        """Whether ``model_id`` has a checkpoint directory in the store (valid or not). Raises
        ``InvalidModelId``."""
        return (self.root / validate_model_id(model_id)).is_dir()

    def delete(self, model_id: str) -> None:
        """Remove a checkpoint: renamed to a hidden name first, so it disappears in one step."""
        path = self.root / validate_model_id(model_id)
        if not path.is_dir():
            return
        doomed = self.root / f".tmp-deleted-{model_id}-{uuid.uuid4().hex[:8]}"
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def remove_stale_temp(self, older_than_s: float = 3600.0) -> int:
        """Delete ``.tmp-*`` directories left by a crashed writer; returns how many were removed."""
        if not self.root.is_dir():
            return 0
        removed = 0
        cutoff = time.time() - older_than_s
        for entry in self.root.glob(".tmp-*"):
            if entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        return removed

    def _read_weights(self, info: CheckpointInfo) -> bytes:
        try:
            return (info.path / WEIGHTS_FILE).read_bytes()
        except OSError as exc:
            raise CheckpointInvalid(f"model {info.model_id}: cannot read weights: {exc}") from exc

    def _inspect(self, model_id: str, path: Path) -> CheckpointInfo:
        info = CheckpointInfo(model_id=model_id, path=path)
        try:
            metadata, problem = self._read_metadata(path / METADATA_FILE)
            weights = (path / WEIGHTS_FILE).stat()
        except (OSError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deep
            info.error = f"unreadable checkpoint: {type(exc).__name__}: {exc}"
            return info
        if problem:  # never handed on: the API would trip over the wrong types
            info.error = problem
            return info
        info.metadata = metadata
        info.size_bytes = weights.st_size
        expected = (metadata["weights"]["sha256"], metadata["weights"]["bytes"])  # shape checked
        signature = (*_file_signature(weights), expected, metadata.get("model_id"))
        info.error = self._verify_cached(info, signature)
        info.valid = info.error is None
        return info

    def _read_metadata(self, path: Path) -> tuple[object, str | None]:
        """(parsed metadata.json, what is wrong with its shape or None), parsed and checked only
        when the file changes (the store is listed on every request)."""
        signature = _file_signature(path.stat())
        key = str(path)
        with self._lock:
            cached = self._metadata.get(key)
        if not cached or cached[0] != signature:
            raw = path.read_bytes()
            metadata = json.loads(raw)
            if isinstance(metadata, dict):
                problem = _metadata_problem(metadata)
                problem = problem and f"invalid metadata.json: {problem}"
            else:
                problem = "unreadable checkpoint: metadata.json is not an object"
            cached = (signature, raw, problem)
            with self._lock:
                self._metadata[key] = cached
            return metadata, problem
        # parsed anew from the bytes read when the file last changed: each caller gets its own
        # copy (a third of the cost of copy.deepcopy)
        return json.loads(cached[1]), cached[2]

    def _verify_cached(self, info: CheckpointInfo, signature: tuple) -> str | None:
        """sha256 check, remembered per weights file (size, mtime, inode, ctime) and expected hash."""
        key = str(info.path)
        with self._lock:
            cached = self._verified.get(key)
        if cached and cached[0] == signature:
            return cached[1]
        error = self._verify(info)
        with self._lock:
            self._verified[key] = (signature, error)
        return error

    def _verify(self, info: CheckpointInfo) -> str | None:
        meta = info.metadata  # its shape is checked: weights has sha256 and bytes
        weights = meta["weights"]
        if meta.get("model_id") != info.model_id:
            return f"metadata.json names model {meta.get('model_id')!r}, not {info.model_id!r}"
        try:
            data = (info.path / WEIGHTS_FILE).read_bytes()
        except OSError as exc:
            return f"cannot read weights: {exc}"
        if len(data) != weights["bytes"]:
            return f"weights are {len(data)} bytes, metadata says {weights['bytes']} (truncated?)"
        if sha256_bytes(data) != weights["sha256"]:
            return "weights sha256 does not match metadata.json (tampered?)"
        return None
