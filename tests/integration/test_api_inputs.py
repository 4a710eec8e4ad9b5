"""Bad input gets a clear 4xx and changes nothing: uploads, job requests, ids, auth, CORS."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from tests.conftest import api_client
from tests.factories import image_bytes
from tests.factories_models import make_model_checkpoint
from tests.unit.test_images import _mode_images, png_header_only

pytestmark = pytest.mark.integration


@pytest.fixture
def lenet_stack(stack):
    model_id = make_model_checkpoint(stack.settings().models_dir, "mnist_lenet5")
    return stack, model_id


def digit_png() -> bytes:
    return image_bytes(Image.fromarray(np.zeros((28, 28), dtype=np.uint8)), "PNG")


def noise_png() -> bytes:
    return image_bytes(
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)), "PNG"
    )


def record_loads(registry) -> list[str]:
    """The model ids ``registry`` loads (reads and verifies from its store) from now on."""
    loads: list[str] = []
    store_load = registry.store.load

    def load(model_id: str):
        loads.append(model_id)
        return store_load(model_id)

    registry.store.load = load
    return loads


def post_image(client, data: bytes, **form):
    return client.post(
        "/predict", files={"file": ("upload.bin", data)}, data={"task": "mnist_lenet5", **form}
    )


# Uploads -------------------------------------------------------------------------------------


def test_good_upload_then_bad_uploads_never_touch_the_model(lenet_stack):
    stack, model_id = lenet_stack
    with api_client(stack) as client:
        loads = record_loads(client.app.state.registry)
        cases = [
            (b"", 400, "empty"),
            (b"hello, I am text", 415, "not an image"),
            (noise_png()[:600], 422, "corrupt"),
            (png_header_only(20_000, 20_000), 413, "pixels"),
        ]
        for data, status, words in cases:
            response = post_image(client, data)
            assert response.status_code == status, response.text
            assert words in response.json()["detail"]
            assert loads == []
        ok = post_image(client, digit_png())
        assert ok.status_code == 200 and ok.json()["model_id"] == model_id
        assert loads == [model_id]


@pytest.mark.parametrize("name", list(_mode_images()))
def test_every_pil_mode_is_classified_by_every_task(stack, name):
    """Each mode reaches each task's preset (RGB for CIFAR-10 and ResNet18, L for MNIST)."""
    image, fmt = _mode_images()[name]
    models_dir = stack.settings().models_dir
    ids = {
        task: make_model_checkpoint(models_dir, task)
        for task in ("mnist_lenet5", "cifar10_dense", "hymenoptera_resnet18")
    }
    with api_client(stack) as client:
        for task, model_id in ids.items():
            response = client.post(
                "/predict", files={"file": ("x", image_bytes(image, fmt))}, data={"model_id": model_id}
            )
            assert response.status_code == 200, (task, response.text)
            body = response.json()
            assert body["image"]["mode"] == name.split("+")[0] and len(body["predictions"]) >= 2
            assert (body["inverted"] is None) == (task != "mnist_lenet5")


def test_upload_over_byte_limit_is_413(make_stack):
    stack = make_stack(max_upload_bytes=4096)
    make_model_checkpoint(stack.settings().models_dir)
    noise = np.random.default_rng(0).integers(0, 256, (128, 128), dtype=np.uint8)
    big = image_bytes(Image.fromarray(noise), "PNG")
    assert 4096 < len(big) < 4096 + 64 * 1024  # under the body limit: the file-size check answers
    with api_client(stack) as client:
        response = post_image(client, big)
        assert response.status_code == 413 and "MAX_UPLOAD_BYTES" in response.json()["detail"]
        huge = b"\x89PNG" + b"\x00" * (200 * 1024)
        response = post_image(client, huge)
        assert response.status_code == 413 and "MAX_UPLOAD_BYTES=4096" in response.json()["detail"]


def test_image_that_resizing_would_blow_up_is_413(make_stack):
    """A 1 x 8000 strip is 8,000 pixels, but Resize(256) would make it 256 x 2,048,000: refused
    before resizing. The same strip is fine for a fixed-size preset (MNIST: 28 x 28)."""
    stack = make_stack(max_image_pixels=1_000_000)
    make_model_checkpoint(stack.settings().models_dir, "hymenoptera_resnet18")
    make_model_checkpoint(stack.settings().models_dir, "mnist_lenet5")
    strip = image_bytes(Image.new("RGB", (1, 8000), (120, 60, 30)), "PNG")
    with api_client(stack) as client:
        refused = post_image(client, strip, task="hymenoptera_resnet18")
        assert refused.status_code == 413
        assert "256x2048000" in refused.json()["detail"] and "MAX_IMAGE_PIXELS" in refused.json()["detail"]
        assert post_image(client, strip, task="mnist_lenet5").status_code == 200
        photo = image_bytes(Image.new("RGB", (500, 375), (120, 60, 30)), "JPEG")
        assert post_image(client, photo, task="hymenoptera_resnet18").status_code == 200


def test_top_k_bounds_and_clamping(lenet_stack):
    stack, _ = lenet_stack
    with api_client(stack) as client:
        for bad in (0, -1, 101, "x"):
            response = post_image(client, digit_png(), top_k=bad)
            assert response.status_code == 422 and response.json()["detail"][0]["loc"][-1] == "top_k"
        body = post_image(client, digit_png(), top_k=100).json()
        assert len(body["predictions"]) == 10
        assert sum(p["probability"] for p in body["predictions"]) == pytest.approx(1, abs=1e-5)


def test_a_file_input_left_empty_is_a_missing_file(lenet_stack):
    """A browser's form with no file chosen sends a part with no name and no bytes: FastAPI's rule
    (kept by app.forms.read_form) is that it counts as absent."""
    stack, _ = lenet_stack
    with api_client(stack) as client:
        body = (
            b'--b\r\nContent-Disposition: form-data; name="task"\r\n\r\nmnist_lenet5\r\n'
            b'--b\r\nContent-Disposition: form-data; name="file"; filename=""\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n\r\n--b--\r\n"
        )  # as Chromium sends it
        response = client.post(
            "/predict", content=body, headers={"content-type": "multipart/form-data; boundary=b"}
        )
        assert response.status_code == 422
        assert response.json()["detail"] == [
            {"type": "missing", "loc": ["body", "file"], "msg": "Field required", "input": None}
        ]
        named = client.post("/predict", files={"file": ("d.png", b"")}, data={"task": "mnist_lenet5"})
        assert named.status_code == 400 and named.json()["detail"] == "the uploaded file is empty"


@pytest.mark.parametrize("bad_id", ["../../etc/passwd", "a/b", ".hidden", "x" * 200, "Upper", "a.b", "a b"])
def test_invalid_model_id_is_422(lenet_stack, bad_id):
    stack, _ = lenet_stack
    with api_client(stack) as client:
        response = client.post("/predict", files={"file": ("d.png", digit_png())}, data={"model_id": bad_id})
        assert response.status_code == 422
        assert client.get(f"/models/{bad_id}").status_code in (404, 422)


def test_unknown_model_and_missing_task(lenet_stack):
    stack, _ = lenet_stack
    with api_client(stack) as client:
        response = client.post(
            "/predict", files={"file": ("d.png", digit_png())}, data={"model_id": "nope-123"}
        )
        assert response.status_code == 404 and "nope-123" in response.json()["detail"]
        response = client.post(
            "/predict", files={"file": ("d.png", digit_png())}, data={"task": "cifar10_dense"}
        )
        assert response.status_code == 404 and "no trained cifar10_dense model" in response.json()["detail"]
        response = client.post("/predict", files={"file": ("d.png", digit_png())})
        assert response.status_code == 422
        response = client.post("/predict", files={"file": ("d.png", digit_png())}, data={"task": "nope"})
        assert response.status_code == 422
        assert client.get("/models/nope-123").status_code == 404


def test_unknown_or_repeated_form_fields_are_422(lenet_stack):
    stack, _ = lenet_stack
    with api_client(stack) as client:
        loads = record_loads(client.app.state.registry)
        typo = client.post(
            "/predict", files={"file": ("d.png", digit_png())}, data={"task": "mnist_lenet5", "topk": 3}
        )
        assert typo.status_code == 422 and "topk" in typo.json()["detail"]
        twice = client.post(
            "/predict",
            files=[
                ("file", ("d.png", digit_png())),
                ("task", (None, b"mnist_lenet5")),
                ("task", (None, b"cifar10_dense")),
            ],
        )
        assert twice.status_code == 422 and "task" in twice.json()["detail"]
        mixed = client.post(  # a built-in task and an uploaded dataset name no one model family
            "/predict",
            files={"file": ("d.png", digit_png())},
            data={"task": "mnist_lenet5", "dataset": "0" * 32},
        )
        assert mixed.status_code == 422 and "give task or dataset, not both" in mixed.json()["detail"]
        uploads = client.post(  # each upload has its own classes: its models are chosen by dataset
            "/predict", files={"file": ("d.png", digit_png())}, data={"task": "custom_resnet18"}
        )
        assert uploads.status_code == 422 and uploads.json()["detail"][0]["loc"] == ["body", "task"]
        assert loads == []
        empty = client.post(  # as Swagger UI sends its empty fields: empty counts as absent
            "/predict",
            files={"file": ("d.png", digit_png())},
            data={"task": "mnist_lenet5", "model_id": "", "alias": "", "dataset": "", "top_k": ""},
        )
        assert empty.status_code == 200, empty.text
        assert len(empty.json()["predictions"]) == 5 and empty.json()["alias"] is None


def test_models_are_paged(stack):
    models_dir = stack.settings().models_dir
    ids = [make_model_checkpoint(models_dir, seed=i) for i in range(3)]
    with api_client(stack) as client:
        first = client.get("/models", params={"limit": 2}).json()
        second = client.get("/models", params={"limit": 2, "offset": 2}).json()
        assert first["count"] == second["count"] == 3 and len(first["data"]) == 2 and len(second["data"]) == 1
        assert {m["id"] for m in first["data"] + second["data"]} == set(ids)
        assert client.get("/models", params={"limit": 0}).status_code == 422


def test_model_id_of_another_task_is_refused(lenet_stack):
    stack, model_id = lenet_stack
    with api_client(stack) as client:
        response = client.post(
            "/predict",
            files={"file": ("d.png", digit_png())},
            data={"model_id": model_id, "task": "cifar10_dense"},
        )
        assert response.status_code == 422 and "mnist_lenet5" in response.json()["detail"]


def test_tampered_checkpoint_is_listed_invalid_and_refused(stack):
    models_dir = stack.settings().models_dir
    older = make_model_checkpoint(models_dir, seed=1)
    newer = make_model_checkpoint(models_dir, seed=2)
    weights = models_dir / newer / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with api_client(stack) as client:
        loads = record_loads(client.app.state.registry)
        listed = {m["id"]: m for m in client.get("/models").json()["data"]}
        assert listed[newer]["valid"] is False and "sha256" in listed[newer]["error"]
        assert listed[older]["valid"] is True
        response = client.post("/predict", files={"file": ("d.png", digit_png())}, data={"model_id": newer})
        assert response.status_code == 409 and "verification" in response.json()["detail"]
        fallback = post_image(client, digit_png())
        assert fallback.status_code == 200 and fallback.json()["model_id"] == older
        assert loads == [older]


def test_checkpoint_changed_after_loading_is_reverified(lenet_stack):
    stack, model_id = lenet_stack
    with api_client(stack) as client:
        assert post_image(client, digit_png()).status_code == 200
        weights = stack.settings().models_dir / model_id / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-8])
        response = client.post(
            "/predict", files={"file": ("d.png", digit_png())}, data={"model_id": model_id}
        )
        assert response.status_code == 409


def test_metadata_whose_classes_do_not_match_the_weights_is_refused(stack):
    """metadata.json edited to list fewer classes than the model has outputs (its sha256 covers
    only the weights): refused with 409 instead of an IndexError; deep JSON is listed invalid."""
    models_dir = stack.settings().models_dir
    model_id = make_model_checkpoint(models_dir)
    metadata_file = models_dir / model_id / "metadata.json"
    metadata = json.loads(metadata_file.read_text())
    metadata_file.write_text(json.dumps({**metadata, "classes": ["0", "1"]}))
    (models_dir / "deep").mkdir()
    (models_dir / "deep" / "metadata.json").write_text("[" * 100_000 + "]" * 100_000)
    (models_dir / "deep" / "model.safetensors").write_bytes(b"")
    with api_client(stack) as client:
        response = client.post(
            "/predict", files={"file": ("d.png", digit_png())}, data={"model_id": model_id}
        )
        assert (
            response.status_code == 409
            and "2 classes, the weights have 10 outputs" in response.json()["detail"]
        )
        listed = {m["id"]: m for m in client.get("/models").json()["data"]}
        assert listed["deep"]["valid"] is False and "RecursionError" in listed["deep"]["error"]


# Job requests --------------------------------------------------------------------------------

BAD_JOBS = [
    ({"task": "nope"}, "cifar10_dense"),
    ({"task": "mnist_lenet5", "hyperparameters": {"epochs": 10**9}}, "epochs"),
    ({"task": "mnist_lenet5", "hyperparameters": {"epochs": 0}}, "epochs"),
    ({"task": "mnist_lenet5", "hyperparameters": {"epochs": "10"}}, "epochs"),
    ({"task": "mnist_lenet5", "hyperparameters": {"epochs": 2.5}}, "epochs"),
    ({"task": "mnist_lenet5", "hyperparameters": {"lr": -0.1}}, "lr"),
    ({"task": "mnist_lenet5", "hyperparameters": {"lr": "NaN"}}, "lr"),
    ({"task": "mnist_lenet5", "hyperparameters": {"momentum": 1.5}}, "momentum"),
    ({"task": "mnist_lenet5", "hyperparameters": {"batch_size": 100000}}, "batch_size"),
    (
        {"task": "mnist_lenet5", "hyperparameters": {"batch_size": 128, "max_train_samples": 64}},
        "max_train_samples",
    ),
    ({"task": "mnist_lenet5", "hyperparameters": {"lerning_rate": 0.1}}, "lerning_rate"),
    ({"task": "mnist_lenet5", "hyperparameters": {"reg": 0.1}}, "reg"),
    ({"task": "mnist_lenet5", "hyperparameters": {"seed": -1}}, "seed"),
    ({"task": "mnist_lenet5", "extra": 1}, "extra"),
    ({"task": "cifar10_dense", "hyperparameters": {"init_std": 0}}, "init_std"),
    ({"task": "cifar10_dense", "hyperparameters": {"hidden_size": 10**6}}, "hidden_size"),
    ({"task": "hymenoptera_resnet18", "hyperparameters": {"mode": "both"}}, "mode"),
    ({"task": "hymenoptera_resnet18", "hyperparameters": {"weights": "/etc/passwd"}}, "weights"),
    ({"task": "hymenoptera_resnet18", "hyperparameters": {"epochs": True}}, "epochs"),
]


@pytest.mark.parametrize(("payload", "field"), BAD_JOBS)
def test_bad_job_request_is_422_naming_the_field_and_enqueues_nothing(stack, payload, field):
    with api_client(stack) as client:
        response = client.post("/jobs", json=payload)
        assert response.status_code == 422, response.text
        assert field in response.text
        assert client.get("/jobs").json()["count"] == 0
    queue_key = f"{stack.env['REDIS_PREFIX']}:celery:{stack.env['CELERY_QUEUE']}"
    assert stack.redis().llen(queue_key) == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"task": "mnist_lenet5", "hyperparameters": {"lr": NaN}}', "lr"),
        (b'{"task": "mnist_lenet5", "hyperparameters": {"lr": Infinity}}', "lr"),
        (b'{"task": "mnist_lenet5", "hyperparameters": {"lr": -Infinity}}', "lr"),
        (b'{"task": "mnist_lenet5", "hyperparameters": {"epochs": 1e400}}', "epochs"),
        (b'{"task": "cifar10_dense", "hyperparameters": {"init_std": 1e309}}', "init_std"),
        (b'{"task": "mnist_lenet5", "x": NaN}', "x"),
        (b'{"task": "foo", "x": Infinity}', "task"),
        (b'{"task": "\\ud800"}', "task"),
        (b'{"\\ud800": 1, "task": "mnist_lenet5"}', "mnist_lenet5"),
    ],
)
def test_json_that_cannot_be_echoed_is_still_a_422(stack, body, field):
    """NaN, Infinity, 1e400 and lone surrogates are valid to Python's JSON parser but cannot be
    written back; the 422 must still be JSON and name the field."""
    with api_client(stack) as client:
        response = client.post("/jobs", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 422, response.text
        assert field in str(response.json()["detail"][0]["loc"]) or field in response.text
        assert client.get("/jobs").json()["count"] == 0


def test_non_json_and_oversized_job_bodies(stack):
    with api_client(stack) as client:
        for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
            headers = {"content-type": content_type} if content_type else {}
            response = client.post("/jobs", content=b'{"task": "mnist_lenet5"}', headers=headers)
            assert response.status_code == 415 and "application/json" in response.json()["detail"]
        response = client.post("/jobs", content=b"{not json", headers={"content-type": "application/json"})
        assert response.status_code == 422
        for body, reason in (
            (b'{"task": "\xff"}', "UnicodeDecodeError"),
            (b"[" * 100_000 + b"]" * 100_000, "RecursionError"),
            (b'{"task": ' + b"9" * 5000 + b"}", "digits"),
        ):
            response = client.post("/jobs", content=body, headers={"content-type": "application/json"})
            assert response.status_code == 400 and "not valid JSON" in response.json()["detail"]
            assert reason in response.json()["detail"]
        assert client.get("/jobs").json()["count"] == 0
        assert client.get("/jobs/" + "a" * 32).status_code == 404  # other HTTP errors as before
        response = client.post(
            "/jobs", content=b" " * (2 * 1024 * 1024), headers={"content-type": "application/json"}
        )
        assert response.status_code == 413


def test_idempotency_key_returns_the_same_job(stack):
    body = {"task": "mnist_lenet5", "hyperparameters": {"epochs": 1}}
    with api_client(stack) as client:
        first = client.post("/jobs", json=body, headers={"Idempotency-Key": "abc-123"})
        second = client.post("/jobs", json=body, headers={"Idempotency-Key": "abc-123"})
        assert first.status_code == second.status_code == 202
        assert first.json()["id"] == second.json()["id"] and second.headers["idempotent-replayed"] == "true"
        conflict = client.post(
            "/jobs", json={**body, "hyperparameters": {"epochs": 2}}, headers={"Idempotency-Key": "abc-123"}
        )
        assert conflict.status_code == 409
        assert client.get("/jobs").json()["count"] == 1
    queue_key = f"{stack.env['REDIS_PREFIX']}:celery:{stack.env['CELERY_QUEUE']}"
    assert stack.redis().llen(queue_key) == 1


def test_one_unreadable_job_record_does_not_break_the_listing(stack):
    """A job hash edited by hand (or left by an incompatible version): listed around, and reading
    it says what is wrong."""
    with api_client(stack) as client:
        good = client.post("/jobs", json={"task": "mnist_lenet5"}).json()["id"]
        bad = "f" * 32
        prefix = stack.env["REDIS_PREFIX"]
        stack.redis().hset(f"{prefix}:job:{bad}", mapping={"status": "bogus", "task": "mnist_lenet5"})
        stack.redis().zadd(f"{prefix}:jobs", {bad: 9e18})
        listed = client.get("/jobs")
        assert listed.status_code == 200 and [j["id"] for j in listed.json()["data"]] == [good]
        assert [j["id"] for j in client.get("/jobs", params={"status": "queued"}).json()["data"]] == [good]
        one = client.get(f"/jobs/{bad}")
        assert one.status_code == 500 and f"record of job {bad} is unreadable" in one.json()["detail"]
        assert client.get(f"/jobs/{good}").status_code == 200
        wrong_type = "e" * 32  # not even a hash
        stack.redis().set(f"{prefix}:job:{wrong_type}", "hello")
        stack.redis().zadd(f"{prefix}:jobs", {wrong_type: 9e18})
        assert [j["id"] for j in client.get("/jobs").json()["data"]] == [good]
        one = client.get(f"/jobs/{wrong_type}")
        assert one.status_code == 500 and "unreadable" in one.json()["detail"]
        cancel = client.post(f"/jobs/{wrong_type}/cancel")
        assert cancel.status_code == 500 and "refused a command" in cancel.json()["detail"]


# Access --------------------------------------------------------------------------------------

KEY = "k" * 24


def test_api_keys_guard_everything_but_probes_and_docs(make_stack):
    stack = make_stack(api_keys=[KEY, "second-key-0123456789"], environment="production")
    make_model_checkpoint(stack.settings().models_dir)
    with api_client(stack) as client:
        for path in (
            "/healthz",
            "/readyz",
            "/docs",
            "/redoc",
            "/openapi.json",
            "/static-docs/swagger-ui.css",
        ):
            assert client.get(path).status_code == 200, path
        protected = [("GET", "/jobs"), ("GET", "/models"), ("GET", "/metrics"), ("GET", "/jobs/" + "a" * 32)]
        for method, path in protected:
            assert client.request(method, path).status_code == 401
            wrong = client.request(method, path, headers={"Authorization": "Bearer " + "x" * 24})
            assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert client.post("/jobs", json={"task": "mnist_lenet5"}).status_code == 401
        assert post_image(client, digit_png()).status_code == 401
        auth = {"Authorization": f"Bearer {KEY}"}
        assert client.get("/jobs", headers=auth).status_code == 200
        assert (
            client.get("/models", headers={"Authorization": "Bearer second-key-0123456789"}).status_code
            == 200
        )
        assert post_image(client, digit_png(), **{}).status_code == 401
        ok = client.post(
            "/predict", files={"file": ("d.png", digit_png())}, data={"task": "mnist_lenet5"}, headers=auth
        )
        assert ok.status_code == 200
        schema = client.get("/openapi.json").json()
        assert schema["components"]["securitySchemes"]["APIKey"] == {
            "type": "http",
            "scheme": "bearer",
            "description": schema["components"]["securitySchemes"]["APIKey"]["description"],
        }
        assert schema["paths"]["/jobs"]["post"]["security"] == [{"APIKey": []}]
        assert "security" not in schema["paths"]["/healthz"]["get"]


def test_no_keys_outside_development_refuses_to_start(make_stack):
    from app.main import create_app

    stack = make_stack(environment="production")
    with pytest.raises(RuntimeError, match="API_KEYS is empty"):
        create_app(stack.settings())


def test_no_keys_in_development_warns(stack, caplog):
    with caplog.at_level(logging.WARNING), api_client(stack) as client:
        assert client.get("/jobs").status_code == 200
    assert any("authentication is OFF" in r.message for r in caplog.records)


def test_short_keys_are_refused(make_stack):
    with pytest.raises(ValueError, match="API_KEYS: every API key must be at least 16 characters"):
        make_stack(api_keys=["short"]).settings()
    with pytest.raises(ValueError, match="API_KEYS: keys cannot contain spaces"):
        make_stack(api_keys=["abcdefgh ijklmnopqrstu"]).settings()


def test_cors_off_by_default_and_configurable(make_stack):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    with api_client(make_stack()) as client:
        assert (
            "access-control-allow-origin"
            not in client.get("/healthz", headers={"Origin": "https://app.example"}).headers
        )
        assert client.options("/jobs", headers=preflight).status_code in (405, 400)
    with api_client(make_stack(cors_origins=["https://app.example"])) as client:
        response = client.options("/jobs", headers=preflight)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        other = client.get("/healthz", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
