"""Per-epoch resume state of a job, so a job whose worker was killed continues where it was.

One safetensors file per job (``CACHE_DIR/jobs/<job id>/resume.safetensors``): the recipe's
tensors (model and optimizer state), the shuffling generator's state, and, in the file's
metadata, the next epoch, the metrics so far and the JSON skeleton of the recipe's state.
Written to a temporary file and renamed over the old one, so it is always a whole epoch.
Nothing is pickled: nested dicts/lists are stored as JSON with tensor placeholders.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from core.jobs import EpochMetrics

log = logging.getLogger(__name__)

_GENERATOR_KEY = "__generator__"


def pack_state(obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (dicts, lists, tensors, JSON scalars) into tensors and a JSON skeleton.

    Dict keys that are ints (torch optimizer state) are kept as ints.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = value.detach().to("cpu").contiguous().clone()
            return {"__tensor__": key}
        if isinstance(value, dict):
            return {"__dict__": [[k, walk(v)] for k, v in value.items()]}
        if isinstance(value, (list, tuple)):
            return [walk(v) for v in value]
        return value

    return tensors, walk(obj)


def unpack_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``pack_state``."""
    if isinstance(skeleton, dict) and "__tensor__" in skeleton:
        return tensors[skeleton["__tensor__"]]
    if isinstance(skeleton, dict) and "__dict__" in skeleton:
        return {k: unpack_state(v, tensors) for k, v in skeleton["__dict__"]}
    if isinstance(skeleton, list):
        return [unpack_state(v, tensors) for v in skeleton]
    return skeleton


@dataclass
class ResumeState:
    """State after ``epoch`` finished epochs."""

    epoch: int
    tensors_and_state: dict[str, Any]
    generator_state: torch.Tensor
    metrics: list[EpochMetrics]

    @classmethod
    def capture(
        cls, epoch: int, state: dict[str, Any], generator: torch.Generator, metrics: list[EpochMetrics]
    ) -> ResumeState:
        return cls(epoch, state, generator.get_state(), list(metrics))


class ResumeStore:
    """Resume state of one job in ``directory``.

    ``save`` failures (disk full) are logged, not raised: resume state is an optimisation, and
    the final checkpoint write reports a full disk as the job's error.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.path = self.directory / "resume.safetensors"

    def save(self, state: ResumeState) -> bool:
        tmp = None
        try:
            tensors, skeleton = pack_state(state.tensors_and_state)
            tensors[_GENERATOR_KEY] = state.generator_state.clone()
            meta = {
                "epoch": str(state.epoch),
                "skeleton": json.dumps(skeleton),
                "metrics": json.dumps([m.model_dump() for m in state.metrics]),
            }
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".safetensors")
            os.close(fd)
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, self.path)
            return True
        except (OSError, RuntimeError, ValueError, SafetensorError) as exc:
            log.warning("could not save resume state to %s: %s", self.path, exc)
            if tmp:
                Path(tmp).unlink(missing_ok=True)
            return False

    def load(self) -> ResumeState | None:
        """The saved state, or None if there is none or it is unreadable."""
        if not self.path.is_file():
            return None
        try:
            tensors = {}
            with safe_open(str(self.path), framework="pt") as f:
                meta = f.metadata()
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    tensors[key] = f.get_tensor(key)
            generator_state = tensors.pop(_GENERATOR_KEY)
            state = unpack_state(json.loads(meta["skeleton"]), tensors)
            metrics = [EpochMetrics.model_validate(m) for m in json.loads(meta["metrics"])]
            return ResumeState(int(meta["epoch"]), state, generator_state, metrics)
        except Exception as exc:  # damaged state: start over rather than crash the job
            log.warning("ignoring unreadable resume state %s: %s", self.path, exc)
            return None

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
