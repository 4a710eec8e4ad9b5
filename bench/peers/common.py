"""What every peer server runs per request: the service's own decoding, preset and model code.

The peers (TorchServe, LitServe) call exactly the functions ``/predict`` calls -- ``open_upload``
(decode, EXIF, size checks), ``app.inference.preprocess`` / ``infer`` / ``postprocess`` -- on the
same checkpoint, so the side-by-side compares serving stacks, not preprocessing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from app.images import open_upload
from app.inference import LoadedModel, ModelRegistry, infer, postprocess, preprocess
from models_store.checkpoint import CheckpointStore

MAX_IMAGE_PIXELS = 40_000_000  # the API's default MAX_IMAGE_PIXELS
TOP_K = 5


def load_model(models_dir: str | Path, model_id: str, threads: int = 1) -> LoadedModel:
    """The checkpoint ``model_id`` of ``models_dir``, verified and in eval mode; sets torch's
    intra-op threads to ``threads``. Raises the ``CheckpointStore`` errors."""
    torch.set_num_threads(threads)
    registry = ModelRegistry(CheckpointStore(Path(models_dir)), cache_size=1)
    return registry.get(registry.resolve(model_id, None))


def decode(loaded: LoadedModel, data: bytes) -> tuple[torch.Tensor, bool | None]:
    """Upload bytes -> (uint8 (C, H, W), inverted) as ``/predict`` prepares them (``invert=auto``).
    Raises ``app.images.ImageRejected``."""
    image, _ = open_upload(data, MAX_IMAGE_PIXELS)
    return preprocess(loaded, image, "auto")


def classify_batch(loaded: LoadedModel, items: list[tuple[torch.Tensor, bool | None]]) -> list[dict]:
    """Decoded images -> one ``{"predictions": [{index, label, probability}]}`` per image, the
    top-5 as ``/predict`` answers them."""
    probabilities = infer(loaded, torch.stack([pixels for pixels, _ in items]))
    out = []
    for row, (_, inverted) in zip(probabilities, items, strict=True):
        result = postprocess(row, TOP_K, inverted)
        out.append(
            {
                "predictions": [
                    {"index": i, "label": loaded.classes[i], "probability": p}
                    for i, p in zip(result.indices, result.probabilities, strict=True)
                ]
            }
        )
    return out
