"""Schemathesis against the real stack: every response matches /openapi.json.

A real uvicorn API process on the real Redis (no worker: queued jobs are enough for the spec),
with API keys on and off, and a LeNet-5 checkpoint so that /predict answers 200. Generated
/predict uploads are real images (PNG, JPEG, GIF, BMP, WebP in several modes), not random bytes,
so that the image paths of the API are exercised too. Bounded: a few examples per operation.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from PIL import Image
from pydantic import TypeAdapter, ValidationError
from schemathesis import GenerationMode

from app.schemas import JobCreate
from core.datasets import DatasetRecord, DatasetStore
from tests.factories import image_bytes
from tests.factories_datasets import class_images, zip_bytes
from tests.factories_models import make_model_checkpoint

pytestmark = pytest.mark.integration

KEY = "schemathesis-key-0123456789"
MAX_EXAMPLES = 25
JOB_CREATE = TypeAdapter(JobCreate)


CROSS_FIELD_RULES = ("larger than max_train_samples", "augment needs mode finetune")


def ready_dataset(stack) -> str:
    """A ready uploaded dataset's record (no worker runs here to ingest one)."""
    record = DatasetRecord(
        id="d" * 32, name="ready", status="ready", task="custom_resnet18", classes=["a", "b"]
    )
    DatasetStore(stack.redis(), stack.env["REDIS_PREFIX"]).create(record)
    return record.id


def with_references(body: dict, archive: bytes, dataset_id: str, resnet_id: str) -> dict:
    """Positive cases name things that exist: an upload is a real archive, a custom_resnet18 job
    names the ready dataset and, for ``model:`` weights, a ResNet18 checkpoint (unknown ones are
    422s that no schema can foresee)."""
    if "file" in body:  # POST /datasets
        return {**body, "file": archive}
    if body.get("task") != "custom_resnet18":
        return body
    body = {**body, "dataset": dataset_id}
    hyperparameters = body.get("hyperparameters")
    if isinstance(hyperparameters, dict) and str(hyperparameters.get("weights", "")).startswith("model:"):
        body["hyperparameters"] = {**hyperparameters, "weights": f"model:{resnet_id}"}
    return body


def real_images() -> list[bytes]:
    rng = np.random.default_rng(0)
    digit = np.zeros((28, 28), dtype=np.uint8)
    digit[6:22, 12:16] = 255
    photo = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    return [
        image_bytes(Image.fromarray(digit), "PNG"),
        image_bytes(Image.fromarray(255 - digit), "JPEG"),
        image_bytes(Image.fromarray(photo), "PNG"),
        image_bytes(Image.fromarray(photo), "JPEG"),
        image_bytes(Image.fromarray(photo).convert("P"), "GIF"),
        image_bytes(Image.fromarray(photo).convert("RGBA"), "WEBP"),
        image_bytes(Image.fromarray(digit).convert("1"), "BMP"),
    ]


@pytest.mark.parametrize("keys", [False, True], ids=["keys-off", "keys-on"])
def test_every_response_matches_the_spec(make_stack, start_api, keys):
    """Positive cases (valid by the spec) and negative ones (invalid: must get a documented 4xx)
    for every operation; all failures are collected, then reported together."""
    stack = make_stack(api_keys=[KEY], environment="production") if keys else make_stack()
    api = start_api(stack)
    headers = {"Authorization": f"Bearer {KEY}"} if keys else {}
    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json", headers=headers)
    model_id = make_model_checkpoint(stack.settings().models_dir, "mnist_lenet5")
    resnet_id = make_model_checkpoint(stack.settings().models_dir, "hymenoptera_resnet18")
    dataset_id = ready_dataset(stack)
    archive = zip_bytes(class_images({"a": 2, "b": 2}, size=8))
    images = st.sampled_from(real_images())
    now = {"mode": GenerationMode.POSITIVE}

    @schema.hook
    def flatmap_body(context, body):
        """/predict gets real images (schemathesis would send random bytes) and, in positive cases,
        often the model that exists: its id alone, or its task alone (generated ids are unknown,
        404; a known id with another task is a 422 that no schema can foresee). Those drop any
        generated alias (an alias nobody carries is a 404 that hides the model)."""
        positive = now["mode"] == GenerationMode.POSITIVE
        if positive and isinstance(body, dict) and context.operation.path in ("/jobs", "/datasets"):
            return st.just(with_references(body, archive, dataset_id, resnet_id))
        if context.operation.path != "/predict" or not isinstance(body, dict) or "file" not in body:
            return st.just(body)
        with_image = images.map(lambda image: {**body, "file": image})
        if now["mode"] != GenerationMode.POSITIVE:
            # a file made invalid on purpose (null, a number) stays so: replaced by an image, the
            # request would be valid and its 200 a false "schema-violating request accepted"
            return with_image if isinstance(body["file"], (str, bytes)) else st.just(body)
        rest = {k: v for k, v in body.items() if k not in ("task", "model_id", "alias", "dataset")}
        return st.one_of(
            with_image,
            images.map(lambda image: {**rest, "file": image, "model_id": model_id}),
            images.map(lambda image: {**rest, "file": image, "task": "mnist_lenet5"}),
        )

    @schema.hook
    def filter_query(context, query):
        """Unknown query parameters are ignored, as HTTP servers do (cache busters and the like);
        the spec does not forbid them, so a negative case made only of one proves nothing."""
        declared = {parameter.name for parameter in context.operation.query}
        if query and any(isinstance(value, list) and len(value) == 1 for value in query.values()):
            return False  # a one-item array is sent as its item (?offset=0.0): no invalid request
        return not query or set(query) <= declared

    @schema.hook
    def filter_body(context, body):
        """A job's batch_size must not exceed its max_train_samples: a rule across two fields that
        JSON Schema cannot state (the field descriptions do); such bodies get a 422 naming both."""
        if context.operation.path == "/predict" and isinstance(body, dict):
            # an empty form field counts as absent (documented: Swagger UI sends its empty fields),
            # so a negative case whose only fault is an empty value is a valid request
            return now["mode"] == GenerationMode.POSITIVE or all(value != "" for value in body.values())
        if context.operation.path != "/jobs" or not isinstance(body, dict):
            return True
        try:
            JOB_CREATE.validate_json(json.dumps(body))
        except (ValidationError, ValueError) as exc:
            return not any(rule in str(exc) for rule in CROSS_FIELD_RULES)
        return True

    failures: list[str] = []
    statuses: dict[str, set[int]] = {}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            now["mode"] = mode
            label = f"{operation.label} {mode.value}"

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=MAX_EXAMPLES,
                deadline=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
                database=None,
                derandomize=True,  # the same cases on every run: CI's verdict does not depend on luck
            )
            def check(case):
                response = case.call_and_validate(base_url=api.url, headers=headers)
                statuses.setdefault(label, set()).add(response.status_code)  # noqa: B023 - run at once

            try:
                check()
            except Unsatisfiable:  # nothing invalid can be sent (GET /healthz has no inputs)
                assert mode == GenerationMode.NEGATIVE, operation.label
            except (Exception, BaseExceptionGroup) as exc:
                failures.append(f"{operation.label} ({mode.value}): {str(exc)[:1500]}")
    assert not failures, "\n\n".join(failures)
    # The real images reached a model, and valid jobs were queued.
    assert 200 in statuses["POST /predict positive"], statuses
    assert 202 in statuses["POST /jobs positive"], statuses
