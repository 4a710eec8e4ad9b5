"""The CLI's argument parsing and error wording (no server needed)."""

from __future__ import annotations

import pytest
import typer

from cli.client import format_detail
from cli.main import parse_set


def test_set_values_are_json_when_they_can_be():
    assert parse_set(["epochs=1", "lr=0.01", "mode=finetune", "max_train_samples=null", "name=a=b"]) == {
        "epochs": 1,
        "lr": 0.01,
        "mode": "finetune",
        "max_train_samples": None,
        "name": "a=b",
    }
    assert parse_set(['weights="none"', "x="]) == {"weights": "none", "x": ""}


@pytest.mark.parametrize("item", ["epochs", "=1", " =1"])
def test_set_without_a_key_is_refused(item):
    with pytest.raises(typer.BadParameter):
        parse_set([item])


def test_validation_errors_read_as_one_line():
    detail = [
        {"loc": ["body", "mnist_lenet5", "hyperparameters", "epochs"], "msg": "Input should be >= 1"},
        {"loc": ["body"], "msg": "bad"},
    ]
    assert format_detail(detail) == "mnist_lenet5.hyperparameters.epochs: Input should be >= 1; bad"
    assert format_detail("no job with id x") == "no job with id x"
