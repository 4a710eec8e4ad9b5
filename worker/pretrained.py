"""Initial ResNet18 weights: torchvision's IMAGENET1K_V1, a local file, or none.

IMAGENET1K_V1 goes through torchvision's own path (``ResNet18_Weights.IMAGENET1K_V1.get_state_dict``,
i.e. ``torch.hub.load_state_dict_from_url``), which reads the torch hub cache
(``$TORCH_HOME/hub/checkpoints/resnet18-f37072fd.pth``) and downloads there when the file is
missing. Here it is only allowed to download when ALLOW_DOWNLOAD is set; otherwise a missing file
fails the job with the path it looked for. Every file is read with ``weights_only=True`` or
safetensors: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torchvision.models import ResNet18_Weights


class PretrainedWeightsUnavailable(RuntimeError):
    """The requested initial weights cannot be had; the message says where they were looked for."""


@dataclass
class PretrainedWeights:
    """A backbone state dict (None for random init) and a description for the job's metadata."""

    state_dict: dict[str, torch.Tensor] | None
    name: str
    file: str | None = None
    sha256: str | None = None

    def describe(self) -> str:
        if self.state_dict is None:
            return "none"
        return f"{self.name} ({self.file}, sha256 {self.sha256[:12]})"

    def to_metadata(self) -> dict:
        return {"name": self.name, "file": self.file, "sha256": self.sha256}


def hub_cache_file() -> Path:
    """Where torch hub keeps IMAGENET1K_V1: ``torch.hub.get_dir()/checkpoints/<file of the URL>``."""
    url = ResNet18_Weights.IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def resolve_weights(
    choice: str, server_choice: str, local_file: Path | None, allow_download: bool
) -> PretrainedWeights:
    """Load the initial weights a job asked for.

    Args:
        choice: the job's ``weights`` hyperparameter (``default`` defers to ``server_choice``).
        server_choice: RESNET18_WEIGHTS (``IMAGENET1K_V1``, ``local`` or ``none``).
        local_file: RESNET18_WEIGHTS_FILE.
        allow_download: ALLOW_DOWNLOAD.

    Raises:
        PretrainedWeightsUnavailable: missing cache file without download, missing local file,
            unreadable file.
    """
    name = server_choice if choice == "default" else choice
    if name == "none":
        return PretrainedWeights(None, "none")
    if name == "local":
        if local_file is None:
            raise PretrainedWeightsUnavailable("weights=local but RESNET18_WEIGHTS_FILE is not set")
        return PretrainedWeights(
            _read_state_file(Path(local_file)), "local", str(local_file), _sha256(local_file)
        )
    cached = hub_cache_file()
    if not cached.is_file() and not allow_download:
        raise PretrainedWeightsUnavailable(
            f"IMAGENET1K_V1 weights not found at {cached} (torch hub cache, TORCH_HOME) and "
            "ALLOW_DOWNLOAD is off; download them there, set RESNET18_WEIGHTS=local with "
            "RESNET18_WEIGHTS_FILE, or train with weights=none"
        )
    try:
        state = ResNet18_Weights.IMAGENET1K_V1.get_state_dict(
            progress=False, check_hash=True, weights_only=True
        )
    except Exception as exc:
        raise PretrainedWeightsUnavailable(f"could not load IMAGENET1K_V1 weights: {exc}") from exc
    return PretrainedWeights(state, "IMAGENET1K_V1", str(cached), _sha256(cached))


def load_backbone(model: torch.nn.Module, weights: PretrainedWeights) -> None:
    """Copy every weight except ``fc`` into ``model`` (strict on the backbone).

    Raises ``PretrainedWeightsUnavailable`` if the state dict does not fit ResNet18.
    """
    if weights.state_dict is None:
        return
    backbone = {k: v for k, v in weights.state_dict.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = model.load_state_dict(backbone, strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise PretrainedWeightsUnavailable(f"{weights.file} does not fit ResNet18: {exc}") from exc
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise PretrainedWeightsUnavailable(
            f"{weights.file} is not a ResNet18 state dict: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def _read_state_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise PretrainedWeightsUnavailable(f"RESNET18_WEIGHTS_FILE {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PretrainedWeightsUnavailable(f"cannot read weights file {path}: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedWeightsUnavailable(f"{path} does not hold a state dict of tensors")
    return state


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
