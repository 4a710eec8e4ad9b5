"""The CLI's argument parsing and error wording (no server needed)."""

from __future__ import annotations

import pytest
import typer

from cli.client import format_detail
from cli.main import parse_set, uploaded_dataset


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


def test_predict_top_k_default_is_the_apis():
    """`imgclf predict` without --top-k asks for as many classes as POST /predict without top_k."""
    import inspect

    from app.main import create_app
    from cli.main import DEFAULT_TOP_K, predict
    from core.config import Settings

    schema = create_app(Settings(_env_file=None, environment="development")).openapi()
    ref = schema["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    form = schema["components"]["schemas"][ref["$ref"].rsplit("/", 1)[-1]]
    assert form["properties"]["top_k"]["default"] == DEFAULT_TOP_K
    assert inspect.signature(predict).parameters["top_k"].default == DEFAULT_TOP_K


def test_split_counts_and_in_use_hint():
    from cli.client import ApiError
    from cli.main import _in_use_hint, split_counts

    assert split_counts({"train": 1200, "val": 5}) == "1,200 train / 5 val"
    assert split_counts({}) == split_counts(None) == "—"
    job = "a" * 32
    in_use = ApiError(409, "Conflict", f"job {job} is queued or running on dataset {'b' * 32}")
    assert f"imgclf jobs cancel {job}" in _in_use_hint(in_use)
    other = "c" * 32
    both = ApiError(409, "Conflict", f"jobs {job}, {other} are queued or running on dataset {'b' * 32}")
    assert _in_use_hint(both) == (
        f"cancel them (imgclf jobs cancel {job}; imgclf jobs cancel {other}) or wait until they end, "
        "then remove the dataset"
    )
    assert _in_use_hint(ApiError(409, "Conflict", "mnist is built in and cannot be deleted")) is None
    assert _in_use_hint(ApiError(404, "Not Found", f"job {job} is queued or running")) is None


def test_models_of_uploaded_datasets_name_their_dataset():
    assert uploaded_dataset({"task": "custom_resnet18", "name": "3b" * 16}) == "3b" * 16
    assert uploaded_dataset({"task": "mnist_lenet5", "name": "mnist_lenet5"}) is None
    assert uploaded_dataset({"task": None, "name": None}) is None
