"""The checkpoint's evaluation report from known predictions."""

from __future__ import annotations

import pytest
import torch

from worker.evaluation import MISTAKES_KEPT, evaluation_report


def test_report_counts_scores_and_most_confident_mistakes():
    # 3 classes; rows: true 0,0,1,1,2,2 ; predicted 0,1,1,1,0,2
    probabilities = torch.tensor(
        [
            [0.9, 0.05, 0.05],
            [0.2, 0.7, 0.1],  # mistake, p 0.7
            [0.1, 0.8, 0.1],
            [0.3, 0.6, 0.1],
            [0.95, 0.0, 0.05],  # mistake, p 0.95
            [0.1, 0.1, 0.8],
        ]
    )
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    report = evaluation_report(probabilities, labels, ["a", "b", "c"], "test", "toy")
    assert report["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert report["accuracy"] == pytest.approx(4 / 6, abs=1e-6)
    a, b, c = report["per_class"]
    assert (a["precision"], a["recall"], a["support"]) == (0.5, 0.5, 2)
    assert b["precision"] == pytest.approx(2 / 3, abs=1e-6) and b["recall"] == 1.0
    assert b["f1"] == pytest.approx(0.8, abs=1e-6)
    assert (c["precision"], c["recall"]) == (1.0, 0.5)
    assert [(m["index"], m["true"], m["predicted"]) for m in report["mistakes"]] == [
        (4, "c", "a"),
        (1, "a", "b"),
    ]
    assert report["mistakes"][0]["probability"] == pytest.approx(0.95)


def test_class_never_predicted_scores_zero_and_mistakes_are_capped():
    n = 100
    probabilities = torch.zeros(n, 2)
    probabilities[:, 0] = torch.linspace(0.6, 0.99, n)
    probabilities[:, 1] = 1 - probabilities[:, 0]
    labels = torch.ones(n, dtype=torch.int64)  # every image is class 1, always predicted 0
    report = evaluation_report(probabilities, labels, ["x", "y"], "val", "toy")
    assert report["per_class"][1] == {"class": "y", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": n}
    assert report["per_class"][0]["precision"] == 0.0 and report["per_class"][0]["support"] == 0
    mistakes = report["mistakes"]
    assert len(mistakes) == MISTAKES_KEPT and mistakes[0]["index"] == n - 1
    assert [m["index"] for m in mistakes] == list(range(n - 1, n - 1 - MISTAKES_KEPT, -1))
