"""What every peer server runs per request: the service's own decoding, preset and model code.

The peers (TorchServe, LitServe) call exactly the functions ``/predict`` calls -- ``decode_image``
(decode, EXIF, size checks), ``app.inference.preprocess`` / ``infer`` / ``postprocess`` -- on the
same checkpoint, so the side-by-side compares serving stacks, not preprocessing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from app.inference import LoadedModel, ModelRegistry, infer, postprocess, preprocess
from core.images import DecodeLimits, decode_image
from models_store.checkpoint import CheckpointStore

TOP_K = 5


def load_model(models_dir: str | Path, model_id: str, threads: int = 1) -> LoadedModel:
    """The checkpoint ``model_id`` of ``models_dir``, verified and in eval mode; sets torch's
    intra-op threads to ``threads``. Raises the ``CheckpointStore`` errors."""
    torch.set_num_threads(threads)
    registry = ModelRegistry(CheckpointStore(Path(models_dir)), cache_size=1)
    return registry.get(registry.resolve(model_id, None))


def decode(loaded: LoadedModel, data: bytes) -> tuple[torch.Tensor, bool | None, dict | None]:
    """Upload bytes -> (uint8 (C, H, W), inverted, framing) as ``/predict`` prepares them with its
    default limits, ``invert=auto`` and ``normalize=auto``. Raises ``core.images.ImageRejected``."""
    image, _ = decode_image(data, DecodeLimits())
    return preprocess(loaded, image, "auto", "auto")


def classify_batch(
    loaded: LoadedModel, items: list[tuple[torch.Tensor, bool | None, dict | None]]
) -> list[dict]:
    """Decoded images -> one ``{"predictions": [{index, label, probability}]}`` per image, the
    top-5 as ``/predict`` answers them."""
    probabilities = infer(loaded, torch.stack([pixels for pixels, _, _ in items]))
    out = []
    for row, (_, inverted, framing) in zip(probabilities, items, strict=True):
        result = postprocess(row, TOP_K, inverted, framing)
        out.append(
            {
                "predictions": [
                    {"index": i, "label": loaded.classes[i], "probability": p}
                    for i, p in zip(result.indices, result.probabilities, strict=True)
                ]
            }
        )
    return out
