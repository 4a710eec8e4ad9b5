"""Exports of a checkpoint for use outside the service: ONNX, or a zip of its safetensors weights
and metadata.json. Built on the first request and cached on disk.

ONNX: the network alone, input ``input`` float32 (N, C, H, W) — the *normalised* image batch,
N dynamic — and output ``logits`` float32 (N, K); softmax over K gives ``/predict``'s
probabilities. The preprocessing contract travels in the model's ``metadata_props``
(``onnx.ModelProto.metadata_props``; onnxruntime: ``session.get_modelmeta().custom_metadata_map``):

    mode        PIL mode the image is converted to: "RGB" or "L"
    resize      JSON: an int (shorter side, aspect kept, bilinear) or [height, width]
    crop        JSON: side of the centre crop after resizing, or null
    input_size  JSON: [height, width] of the network input
    mean, std   JSON: per channel; input = (pixel / 255 - mean) / std, in float32
    classes     JSON: class names in output order
    model_id, task, name, weights_sha256, output ("logits")

Cache layout: ``<root>/<model_id>/<weights sha256[:16]>-v<EXPORT_VERSION>.<onnx|zip>``; a file is
written under a temporary name and renamed into place, and a checkpoint whose weights change gets
a new file. One export at a time per model (a file lock, across processes) and one ONNX export at
a time per process (the exporter traces with process-global state, and it is CPU-heavy).
"""

from __future__ import annotations

import copy
import fcntl
import io
import json
import logging
import shutil
import threading
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import onnx
import torch

from models_store.checkpoint import (
    METADATA_FILE,
    WEIGHTS_FILE,
    CheckpointInvalid,
    sha256_bytes,
    validate_model_id,
)
from tasks.base import Preset

log = logging.getLogger(__name__)

ExportFormat = Literal["onnx", "safetensors"]
EXPORT_VERSION = 1
OPSET_VERSION = 18
SUFFIXES: dict[str, str] = {"onnx": "onnx", "safetensors": "zip"}
_ONNX_EXPORT_LOCK = threading.Lock()


def onnx_metadata(preset: Preset, classes: list[str], metadata: dict) -> dict[str, str]:
    """The ``metadata_props`` of an exported model: the preprocessing contract and provenance."""
    return {
        "mode": preset.mode,
        "resize": json.dumps(list(preset.resize) if isinstance(preset.resize, tuple) else preset.resize),
        "crop": json.dumps(preset.crop),
        "input_size": json.dumps(list(preset.input_size)),
        "mean": json.dumps(list(preset.mean)),
        "std": json.dumps(list(preset.std)),
        "classes": json.dumps(list(classes)),
        "model_id": str(metadata.get("model_id", "")),
        "task": str(metadata.get("task", "")),
        "name": str(metadata.get("dataset") or metadata.get("task", "")),
        "weights_sha256": str((metadata.get("weights") or {}).get("sha256", "")),
        "output": "logits",
    }


def export_onnx(
    model: torch.nn.Module, preset: Preset, classes: list[str], metadata: dict
) -> onnx.ModelProto:
    """The ONNX model of ``model`` with a dynamic batch axis and the preprocessing metadata.

    Tries the dynamo exporter (``torch.onnx.export(dynamo=True)``) first and falls back to the
    TorchScript one if it fails. ``model`` is copied, never changed (it may be serving requests).

    Args:
        model: maps float32 (N, C, H, W) normalised images to logits (N, K).
        preset: the checkpoint's preset (channels, input size, normalisation).
        classes: K class names.
        metadata: the checkpoint's metadata.json (model_id, task, weights sha256).

    Raises:
        RuntimeError: both exporters failed (with both reasons).
    """
    model = copy.deepcopy(model).eval()
    height, width = preset.input_size
    example = (torch.zeros(2, preset.channels, height, width),)
    names = {"input_names": ["input"], "output_names": ["logits"], "opset_version": OPSET_VERSION}
    with _ONNX_EXPORT_LOCK:
        try:
            program = torch.onnx.export(
                model,
                example,
                dynamo=True,
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},),
                verbose=False,
                **names,
            )
            proto = program.model_proto
        except Exception as dynamo_error:  # the exporter raises many error types
            reason = (str(dynamo_error).strip().splitlines() or [type(dynamo_error).__name__])[0][:300]
            log.warning("dynamo ONNX export failed (%s); using the TorchScript exporter", reason)
            buffer = io.BytesIO()
            try:
                torch.onnx.export(
                    model,
                    example,
                    buffer,
                    dynamo=False,
                    dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                    **names,
                )
            except Exception as exc:
                raise RuntimeError(f"ONNX export failed: dynamo: {dynamo_error}; torchscript: {exc}") from exc
            proto = onnx.load_from_string(buffer.getvalue())
    del proto.metadata_props[:]
    for key, value in onnx_metadata(preset, classes, metadata).items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = (
        "imgclf export: input = normalised image batch (see metadata_props), output = logits; "
        "softmax gives the service's probabilities"
    )
    return proto


def safetensors_zip(checkpoint_dir: Path, metadata: dict, destination: Path) -> None:
    """Write a zip of the checkpoint's ``model.safetensors`` and ``metadata.json``, after checking
    the weights against the sha256 in the metadata (raises ``CheckpointInvalid`` if they differ)."""
    weights = (checkpoint_dir / WEIGHTS_FILE).read_bytes()
    expected = metadata["weights"]
    if len(weights) != expected["bytes"] or sha256_bytes(weights) != expected["sha256"]:
        raise CheckpointInvalid(f"model {metadata.get('model_id')}: weights do not match metadata.json")
    with zipfile.ZipFile(destination, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(WEIGHTS_FILE, weights)  # float tensors barely compress
        archive.writestr(METADATA_FILE, json.dumps(metadata, indent=2))


class ExportCache:
    """Exports on disk under ``root`` (``CACHE_DIR/exports``).

    Args:
        root: the cache directory; created on first use.
    """

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, model_id: str, weights_sha256: str, fmt: ExportFormat) -> Path:
        """Where the export of these weights in ``fmt`` is (or will be) cached."""
        name = f"{weights_sha256[:16]}-v{EXPORT_VERSION}.{SUFFIXES[fmt]}"
        return self.root / validate_model_id(model_id) / name

    def get_or_build(
        self, model_id: str, weights_sha256: str, fmt: ExportFormat, build: Callable[[Path], None]
    ) -> Path:
        """The cached export; built with ``build(temporary_path)`` if missing, one build at a time
        per model (a second request for the same export waits and then reads the cached file).

        Raises what ``build`` raises (nothing is left behind), or ``OSError``.
        """
        target = self.path(model_id, weights_sha256, fmt)
        if target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if target.is_file():
                    return target
                temporary = target.parent / f".tmp-{uuid.uuid4().hex[:8]}-{target.name}"
                try:
                    build(temporary)
                    temporary.rename(target)
                finally:
                    temporary.unlink(missing_ok=True)
                for stale in target.parent.glob(f"*.{SUFFIXES[fmt]}"):
                    if stale != target:  # exports of weights this model no longer has
                        stale.unlink(missing_ok=True)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return target

    def remove(self, model_id: str) -> None:
        """Delete every cached export of ``model_id`` (after the model was deleted). Waits for an
        export of it being built to finish first, so that the build does not fail half-way."""
        directory = self.root / validate_model_id(model_id)
        if not directory.is_dir():
            return
        with open(directory / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            shutil.rmtree(directory, ignore_errors=True)
