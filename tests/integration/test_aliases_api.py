"""Aliases, deletion and export through the API, against the real Redis (and a real worker for
the pinning scenario)."""

from __future__ import annotations

import io
import json
import shutil
import threading
import time
import zipfile

import numpy as np
import onnx
import pytest
from PIL import Image
from safetensors.torch import load as load_safetensors

from tests.conftest import RedisServer, api_client, wait_for_status
from tests.factories import digit_image, image_bytes
from tests.factories_models import make_model_checkpoint

pytestmark = pytest.mark.integration

DIGIT = image_bytes(Image.fromarray(digit_image(3, np.random.default_rng(0))), "PNG")


def predict(client, **data):
    return client.post("/predict", files={"file": ("d.png", DIGIT, "image/png")}, data=data)


def test_pinned_model_keeps_answering_after_a_newer_job(make_stack, start_worker, synthetic_data_dir):
    stack = make_stack(data_dir=synthetic_data_dir)
    start_worker(stack)
    with api_client(stack) as client:

        def train() -> str:
            response = client.post(
                "/jobs",
                json={"task": "mnist_lenet5", "hyperparameters": {"epochs": 1, "max_train_samples": 256}},
            )
            done = wait_for_status(client, response.json()["id"], {"succeeded", "failed"})
            assert done["status"] == "succeeded", done["error"]
            return done["model_id"]

        first = train()
        pinned = client.put(f"/models/{first}/aliases/production")
        assert pinned.status_code == 200, pinned.text
        assert pinned.json() == {
            "name": "mnist_lenet5",
            "alias": "production",
            "model_id": first,
            "previous_model_id": None,
        }
        second = train()
        assert client.get("/models").json()["data"][0]["id"] == second  # the newer one
        by_task = predict(client, task="mnist_lenet5")
        assert by_task.status_code == 200, by_task.text
        assert (by_task.json()["model_id"], by_task.json()["alias"]) == (first, "production")
        by_id = predict(client, model_id=second).json()
        assert (by_id["model_id"], by_id["alias"]) == (second, None)
        # staging on the newer one, then promote it: production moves
        assert client.put(f"/models/{second}/aliases/staging").status_code == 200
        staged = predict(client, task="mnist_lenet5", alias="staging").json()
        assert (staged["model_id"], staged["alias"]) == (second, "staging")
        moved = client.put(f"/models/{second}/aliases/production").json()
        assert moved["previous_model_id"] == first
        assert client.get(f"/models/{first}").json()["aliases"] == []
        assert client.get(f"/models/{second}").json()["aliases"] == ["production", "staging"]
        assert predict(client, task="mnist_lenet5").json()["model_id"] == second
        # without production, the newest valid model answers again, and says no alias chose it
        assert client.delete(f"/models/{second}/aliases/production").status_code == 204
        plain = predict(client, task="mnist_lenet5").json()
        assert (plain["model_id"], plain["alias"]) == (second, None)
        assert client.delete(f"/models/{second}/aliases/production").status_code == 404


def test_aliases_are_listed_and_seen_by_every_api_process(stack):
    models_dir = stack.settings().models_dir
    lenet = make_model_checkpoint(models_dir, "mnist_lenet5")
    dense = make_model_checkpoint(models_dir, "cifar10_dense")
    with api_client(stack) as first, api_client(stack) as second:
        assert first.put(f"/models/{lenet}/aliases/production").status_code == 200
        assert first.put(f"/models/{dense}/aliases/production").status_code == 200  # another name
        listed = {m["id"]: m for m in second.get("/models").json()["data"]}
        assert listed[lenet]["aliases"] == ["production"] and listed[lenet]["name"] == "mnist_lenet5"
        assert listed[dense]["aliases"] == ["production"] and listed[dense]["name"] == "cifar10_dense"
        assert second.get(f"/models/{lenet}").json()["aliases"] == ["production"]
        answered = predict(second, task="mnist_lenet5").json()
        assert (answered["model_id"], answered["alias"]) == (lenet, "production")


def test_alias_requests_are_checked(stack):
    models_dir = stack.settings().models_dir
    model_id = make_model_checkpoint(models_dir, "mnist_lenet5")
    with api_client(stack) as client:
        for alias in ("Production", "1st", "a" * 65, "a.b", "x%0A"):
            response = client.put(f"/models/{model_id}/aliases/{alias}")
            assert response.status_code == 422, (alias, response.text)
        assert client.put("/models/mnist_lenet5-nope/aliases/production").status_code == 404
        assert client.put("/models/..%2Fetc/aliases/production").status_code in (404, 422)
        assert client.put("/models/UPPER/aliases/production").status_code == 422
        # an invalid (tampered) model cannot carry an alias
        weights = models_dir / model_id / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
        refused = client.put(f"/models/{model_id}/aliases/production")
        assert refused.status_code == 409 and "verification" in refused.json()["detail"]
        assert client.get(f"/models/{model_id}").json()["aliases"] == []
        # /predict: unknown alias, alias with model_id, alias without task
        unknown = predict(client, task="mnist_lenet5", alias="canary")
        assert unknown.status_code == 404 and "canary" in unknown.json()["detail"]
        assert predict(client, model_id=model_id, alias="production").status_code == 422
        assert predict(client, alias="production").status_code == 422
        assert predict(client, task="mnist_lenet5", alias="Bad Alias").status_code == 422
        empty = predict(client, task="mnist_lenet5", alias="")  # as Swagger UI sends it: no alias
        plain = predict(client, task="mnist_lenet5")
        assert (empty.status_code, empty.json()) == (plain.status_code, plain.json())


def test_delete_refuses_aliased_model_unless_forced(stack):
    models_dir = stack.settings().models_dir
    model_id = make_model_checkpoint(models_dir, "mnist_lenet5")
    with api_client(stack) as client:
        assert client.put(f"/models/{model_id}/aliases/production").status_code == 200
        assert client.get(f"/models/{model_id}/export", params={"format": "safetensors"}).status_code == 200
        refused = client.delete(f"/models/{model_id}")
        assert refused.status_code == 409 and "production" in refused.json()["detail"]
        assert (models_dir / model_id).is_dir()
        assert predict(client, task="mnist_lenet5").json()["model_id"] == model_id
        assert client.delete(f"/models/{model_id}", params={"force": "true"}).status_code == 204
        assert not (models_dir / model_id).exists()
        assert not (stack.settings().cache_dir / "exports" / model_id).exists()
        assert client.get(f"/models/{model_id}").status_code == 404
        assert client.delete(f"/models/{model_id}").status_code == 404
        assert predict(client, task="mnist_lenet5", alias="production").status_code == 404
        assert predict(client, task="mnist_lenet5").status_code == 404  # no model left at all
        keys = list(stack.redis().scan_iter(f"{stack.env['REDIS_PREFIX']}:alias*"))
        assert keys == []
        # a model without aliases is deleted at once
        other = make_model_checkpoint(models_dir, "mnist_lenet5", seed=1)
        assert client.delete(f"/models/{other}").status_code == 204
        assert client.get("/models").json()["count"] == 0


def test_alias_of_a_model_deleted_out_of_band(stack):
    models_dir = stack.settings().models_dir
    model_id = make_model_checkpoint(models_dir, "mnist_lenet5")
    make_model_checkpoint(models_dir, "mnist_lenet5", seed=1)
    with api_client(stack) as client:
        assert client.put(f"/models/{model_id}/aliases/production").status_code == 200
        shutil.rmtree(models_dir / model_id)
        for data in ({"task": "mnist_lenet5"}, {"task": "mnist_lenet5", "alias": "production"}):
            response = predict(client, **data)
            assert response.status_code == 409, response.text
            assert "no longer exists" in response.json()["detail"] and model_id in response.json()["detail"]
        # the alias can still be removed (or the model deleted with force), then the newest answers
        assert client.delete(f"/models/{model_id}").status_code == 409
        assert client.delete(f"/models/{model_id}", params={"force": "true"}).status_code == 204
        assert predict(client, task="mnist_lenet5").status_code == 200


def test_delete_while_a_prediction_runs_lets_it_finish(stack):
    stack.update(inference_inline_ms=0)  # the held prediction must not run in the event loop
    models_dir = stack.settings().models_dir
    model_id = make_model_checkpoint(models_dir, "mnist_lenet5")
    with api_client(stack) as client:
        registry = client.app.state.registry
        loaded = registry.get(registry.resolve(model_id, None))
        entered, release = threading.Event(), threading.Event()
        backend = loaded.backend

        def slow_backend(pixels):  # holds the prediction inside the model until the delete is done
            entered.set()
            assert release.wait(30)
            return backend(pixels)

        loaded.backend = slow_backend
        result = {}
        request = threading.Thread(target=lambda: result.update(r=predict(client, model_id=model_id)))
        request.start()
        assert entered.wait(30)
        assert client.delete(f"/models/{model_id}").status_code == 204
        assert not (models_dir / model_id).exists()
        release.set()
        request.join(30)
        assert result["r"].status_code == 200, result["r"].text
        assert result["r"].json()["model_id"] == model_id
        assert predict(client, model_id=model_id).status_code == 404


def test_delete_refuses_a_model_that_queued_jobs_start_from_unless_forced(stack):
    """QA: a model named as a queued job's initial weights (weights: model:<id>) could be deleted,
    and the job then failed. Now DELETE answers 409 naming the job, until it ends (or force)."""
    from core.jobs import JobStore, redis_client

    settings = stack.settings()
    models_dir = settings.models_dir
    model_id = make_model_checkpoint(models_dir, "hymenoptera_resnet18")
    other = make_model_checkpoint(models_dir, "mnist_lenet5")
    jobs = JobStore(redis_client(settings.redis_url, 2.0), settings.redis_prefix)
    weights = {"epochs": 1, "weights": f"model:{model_id}"}
    first, _ = jobs.create("custom_resnet18", weights, dataset="a" * 32)
    second, _ = jobs.create("custom_resnet18", weights, dataset="a" * 32)
    with api_client(stack) as client:
        refused = client.delete(f"/models/{model_id}")
        assert refused.status_code == 409, refused.text
        assert f"job(s) {first.id}, {second.id} start from model {model_id}" in refused.json()["detail"]
        assert (models_dir / model_id).is_dir()
        assert client.delete(f"/models/{other}").status_code == 204  # other models are not held
        for job in (first, second):
            assert client.post(f"/jobs/{job.id}/cancel").status_code == 202
        assert client.delete(f"/models/{model_id}").status_code == 204
        again = make_model_checkpoint(models_dir, "hymenoptera_resnet18", seed=3)
        jobs.create("custom_resnet18", {"weights": f"model:{again}"}, dataset="a" * 32)
        assert client.delete(f"/models/{again}", params={"force": "true"}).status_code == 204


@pytest.mark.parametrize("fmt", ["onnx", "safetensors"])
def test_delete_during_an_export_answers_404_not_500(stack, fmt, monkeypatch):
    """QA: a DELETE while the export was being built made the export answer 500 (the directory of
    its temporary file was removed under it). Now the delete waits for the build, the export
    answers 404 naming the deletion, and nothing of the model is left in the cache."""
    from app.api.routes import models as routes

    models_dir = stack.settings().models_dir
    model_id = make_model_checkpoint(models_dir, "mnist_lenet5")

    def after_the_delete(build):  # the build runs on while the DELETE removes the checkpoint
        def slow(*args, **kwargs):
            deadline = time.monotonic() + 30
            while (models_dir / model_id).exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            return build(*args, **kwargs)

        return slow

    monkeypatch.setattr(routes, "export_onnx", after_the_delete(routes.export_onnx))
    monkeypatch.setattr(routes, "safetensors_zip", after_the_delete(routes.safetensors_zip))
    with api_client(stack) as client:
        assert predict(client, model_id=model_id).status_code == 200  # loaded: ONNX builds from memory
        result = {}
        export = threading.Thread(
            target=lambda: result.update(r=client.get(f"/models/{model_id}/export?format={fmt}"))
        )
        export.start()
        time.sleep(0.5)  # the export is now building
        assert client.delete(f"/models/{model_id}").status_code == 204
        export.join(60)
        assert result["r"].status_code == 404, result["r"].text
        assert "deleted while it was being exported" in result["r"].json()["detail"]
        assert not (stack.settings().cache_dir / "exports" / model_id).exists()


def test_pinned_model_is_served_while_redis_is_down(make_stack, tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    try:
        stack = make_stack(redis_url=server.url)
        models_dir = stack.settings().models_dir
        pinned = make_model_checkpoint(models_dir, "mnist_lenet5")
        with api_client(stack) as client:
            assert client.put(f"/models/{pinned}/aliases/production").status_code == 200
        time.sleep(0.01)
        make_model_checkpoint(models_dir, "mnist_lenet5", seed=1)  # newer
        with api_client(stack) as client:  # a fresh process reads the alias table at start-up
            server.stop()
            answered = predict(client, task="mnist_lenet5")
            assert answered.status_code == 200, answered.text
            assert (answered.json()["model_id"], answered.json()["alias"]) == (pinned, "production")
            assert client.get("/models").json()["data"][1]["aliases"] == ["production"]
            refused = client.put(f"/models/{pinned}/aliases/staging")
            assert refused.status_code == 503 and "unreachable" in refused.json()["detail"]
    finally:
        server.stop()


def test_export_onnx_and_safetensors(stack):
    models_dir = stack.settings().models_dir
    model_id = make_model_checkpoint(models_dir, "mnist_lenet5")
    with api_client(stack) as client:
        started = time.perf_counter()
        response = client.get(f"/models/{model_id}/export", params={"format": "onnx"})
        first_s = time.perf_counter() - started
        assert response.status_code == 200, response.text
        assert f'filename="{model_id}.onnx"' in response.headers["content-disposition"]
        proto = onnx.load_from_string(response.content)
        props = {p.key: p.value for p in proto.metadata_props}
        assert props["model_id"] == model_id and props["mode"] == "L"
        assert json.loads(props["classes"]) == [str(d) for d in range(10)]
        assert json.loads(props["input_size"]) == [28, 28]
        assert json.loads(props["mean"]) == [0.5] and json.loads(props["std"]) == [0.5]
        batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
        assert batch_dim.dim_param and not batch_dim.dim_value  # dynamic batch axis
        started = time.perf_counter()
        again = client.get(f"/models/{model_id}/export")  # onnx is the default; now cached
        assert again.content == response.content and time.perf_counter() - started < min(first_s, 1.0)

        archive = client.get(f"/models/{model_id}/export", params={"format": "safetensors"})
        assert archive.status_code == 200 and archive.headers["content-type"] == "application/zip"
        with zipfile.ZipFile(io.BytesIO(archive.content)) as zipped:
            assert sorted(zipped.namelist()) == ["metadata.json", "model.safetensors"]
            weights = zipped.read("model.safetensors")
            metadata = json.loads(zipped.read("metadata.json"))
        assert weights == (models_dir / model_id / "model.safetensors").read_bytes()
        assert metadata["model_id"] == model_id and set(load_safetensors(weights)) >= {"features.0.weight"}

        assert client.get(f"/models/{model_id}/export", params={"format": "pt"}).status_code == 422
        assert client.get("/models/mnist_lenet5-nope/export").status_code == 404
        weights_path = models_dir / model_id / "model.safetensors"
        weights_path.write_bytes(weights_path.read_bytes()[:-1] + b"\x01")
        assert client.get(f"/models/{model_id}/export").status_code == 409
