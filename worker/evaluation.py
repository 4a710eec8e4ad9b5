"""The evaluation stored with a checkpoint: confusion matrix, per-class scores, confident mistakes.

Run once when training ends, on the task's evaluation split (test or val) with the final model,
through the same predict function and batches as the per-epoch accuracy, so its ``accuracy`` is
the job's final test (val) accuracy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

MISTAKES_KEPT = 25


class _Normalizer(Protocol):
    def normalize(self, batch: torch.Tensor) -> torch.Tensor: ...


def predict_probabilities(
    predict: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    preset: _Normalizer,
    batch_size: int,
) -> torch.Tensor:
    """Softmax probabilities (N, K) float32 on the CPU of ``inputs`` (uint8 images (N, C, H, W), or
    features) in batches of ``batch_size``; ``predict`` maps a normalised batch to logits (N, K)."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(inputs), batch_size):
            logits = predict(preset.normalize(inputs[start : start + batch_size]))
            out.append(torch.softmax(logits.float(), dim=1).cpu())
    return torch.cat(out)


def evaluation_report(
    probabilities: torch.Tensor, labels: torch.Tensor, classes: list[str], split: str, dataset: str
) -> dict:
    """The ``evaluation`` of a checkpoint from the eval split's predictions.

    Args:
        probabilities: float (N, K) softmax outputs, row n for dataset index n of the split.
        labels: int64 (N,) true classes.
        classes: K class names.
        split: ``test`` or ``val``.
        dataset: dataset name (``mnist``, ``cifar10``, ``hymenoptera`` or an uploaded dataset id).

    Returns:
        {"split", "dataset", "classes", "accuracy", "confusion_matrix" (K x K counts, rows = true,
        columns = predicted), "per_class": [{"class", "precision", "recall", "f1", "support"}],
        "mistakes": the ``MISTAKES_KEPT`` most confident wrong predictions, most confident first
        (ties: lower index first), each {"split", "index", "true", "predicted", "probability"}}.
        Precision of a class never predicted is 0, as is F1 when precision + recall is 0.
    """
    k = len(classes)
    labels = labels.cpu().long()
    confidence, predicted = probabilities.max(dim=1)
    matrix = torch.bincount(labels * k + predicted, minlength=k * k).reshape(k, k)
    true_positive = matrix.diagonal()
    support = matrix.sum(1)
    predicted_count = matrix.sum(0)
    per_class = []
    for c, name in enumerate(classes):
        tp = int(true_positive[c])
        precision = tp / int(predicted_count[c]) if predicted_count[c] else 0.0
        recall = tp / int(support[c]) if support[c] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class.append(
            {
                "class": name,
                "precision": round(precision, 6),
                "recall": round(recall, 6),
                "f1": round(f1, 6),
                "support": int(support[c]),
            }
        )
    wrong = (predicted != labels).nonzero().flatten()
    # most confident first; a stable sort on index order keeps ties in dataset order
    order = torch.sort(confidence[wrong], descending=True, stable=True).indices[:MISTAKES_KEPT]
    mistakes = [
        {
            "split": split,
            "index": int(i),
            "true": classes[int(labels[i])],
            "predicted": classes[int(predicted[i])],
            "probability": round(float(confidence[i]), 6),
        }
        for i in wrong[order]
    ]
    return {
        "split": split,
        "dataset": dataset,
        "classes": list(classes),
        "accuracy": round(int(true_positive.sum()) / max(len(labels), 1), 6),
        "confusion_matrix": matrix.tolist(),
        "per_class": per_class,
        "mistakes": mistakes,
    }
