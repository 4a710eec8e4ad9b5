"""The service end to end on synthetic data: real Redis, a real Celery worker process, the API."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.conftest import Stack, WorkerProcess, api_client, wait_for, wait_for_status
from tests.factories import colour_image, digit_image, image_bytes

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def service(tmp_path_factory, redis_url, synthetic_data_dir):
    stack = Stack(tmp_path_factory.mktemp("service"), redis_url, data_dir=synthetic_data_dir)
    worker = WorkerProcess(stack).start()
    yield stack, worker
    worker.stop()
    stack.cleanup_redis()


@pytest.fixture
def client(service):
    stack, worker = service
    with api_client(stack) as c:
        yield c
    if worker.process.poll() is not None:
        pytest.fail(f"worker died:\n{worker.log()[-3000:]}")


def submit(client, task: str, **hp) -> dict:
    response = client.post("/jobs", json={"task": task, "hyperparameters": hp})
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/jobs/{job['id']}"
    assert job["status"] == "queued"
    return job


def test_lenet_job_progress_checkpoint_and_predict(client):
    job = submit(client, "mnist_lenet5", epochs=12)

    def running_with_progress():
        current = client.get(f"/jobs/{job['id']}").json()
        return current["status"] == "running" and (
            current["progress"]["batches_done"] > 0 or current["metrics"]
        )

    wait_for(running_with_progress, timeout=90, interval=0.05, what="visible progress while running")
    done = wait_for_status(client, job["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done["error"]
    assert [m["epoch"] for m in done["metrics"]] == list(range(1, 13))
    assert done["metrics"][-1]["test_accuracy"] > 0.9
    assert done["device"] == "cpu" and done["attempts"] == 1
    assert done["timings"]["train_s"] > 0 and done["metrics"][-1]["images_per_s"] > 0
    model_id = done["model_id"]

    listed = client.get("/models", params={"task": "mnist_lenet5"}).json()
    assert model_id in [m["id"] for m in listed["data"]]
    model = client.get(f"/models/{model_id}").json()
    assert model["valid"] and model["classes"] == [str(d) for d in range(10)] and model["job_id"] == job["id"]

    rng = np.random.default_rng(123)
    right = 0
    for label in range(10):
        data = image_bytes(Image.fromarray(digit_image(label, rng)), "PNG")
        response = client.post(
            "/predict",
            files={"file": ("d.png", data, "image/png")},
            # the synthetic classes are positions of a square, which MNIST framing would centre
            data={"task": "mnist_lenet5", "top_k": 3, "normalize": "none"},
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model_id"] == model_id and len(body["predictions"]) == 3
        assert sum(p["probability"] for p in body["predictions"]) <= 1 + 1e-6
        right += body["predictions"][0]["label"] == str(label)
    assert right >= 8


def test_dense_and_resnet_train_and_predict(client):
    dense = submit(client, "cifar10_dense", epochs=4, lr=0.01, init_std=0.01)
    resnet = submit(client, "hymenoptera_resnet18", epochs=1, batch_size=8, mode="feature_extraction")
    for job, task in ((dense, "cifar10_dense"), (resnet, "hymenoptera_resnet18")):
        done = wait_for_status(client, job["id"], {"succeeded", "failed"}, timeout=180)
        assert done["status"] == "succeeded", done["error"]
        image = image_bytes(Image.fromarray(colour_image(3, np.random.default_rng(0))), "JPEG")
        response = client.post(
            "/predict", files={"file": ("x.jpg", image)}, data={"model_id": done["model_id"]}
        )
        assert response.status_code == 200, response.text
        assert response.json()["task"] == task
    assert client.get(f"/jobs/{resnet['id']}").json()["weights"] == "none"
    assert client.get(f"/models/{done['model_id']}").json()["pretrained"]["name"] == "none"


def test_cancel_running_job_then_worker_serves_next(client, service):
    stack, _ = service
    job = submit(client, "mnist_lenet5", epochs=500)
    wait_for(
        lambda: client.get(f"/jobs/{job['id']}").json()["progress"]["batches_done"] > 0, 90, 0.05, "progress"
    )
    response = client.post(f"/jobs/{job['id']}/cancel")
    assert response.status_code == 202 and response.json()["cancel_requested"]
    done = wait_for_status(client, job["id"], {"cancelled", "succeeded", "failed"}, timeout=30)
    assert done["status"] == "cancelled" and done["model_id"] is None
    assert len(done["metrics"]) < 500
    assert client.post(f"/jobs/{job['id']}/cancel").status_code == 409
    assert not (stack.root / "cache" / "jobs" / job["id"]).exists()
    quick = submit(client, "mnist_lenet5", epochs=1, max_train_samples=256)
    assert wait_for_status(client, quick["id"], {"succeeded", "failed"})["status"] == "succeeded"


@pytest.mark.parametrize(
    ("task", "hp"),
    [
        ("mnist_lenet5", {"epochs": 300, "max_train_samples": 64}),  # epochs far shorter than a stop check
        ("hymenoptera_resnet18", {"epochs": 3, "batch_size": 8, "mode": "feature_extraction", "seed": 9}),
    ],
)
def test_an_accepted_cancel_always_ends_cancelled(client, task, hp):
    """Whatever the job is doing when the cancel lands (loading data, extracting features, short
    epochs, writing the checkpoint), a 202 to /cancel means it ends cancelled, with no model."""
    models_before = client.get("/models").json()["count"]
    job = submit(client, task, **hp)
    wait_for(lambda: client.get(f"/jobs/{job['id']}").json()["status"] == "running", 90, 0.02, "running")
    response = client.post(f"/jobs/{job['id']}/cancel")
    assert response.status_code == 202, response.text
    done = wait_for_status(client, job["id"], {"cancelled", "succeeded", "failed"}, timeout=60)
    assert done["status"] == "cancelled" and done["model_id"] is None
    assert done["progress"]["stage"] == "cancelled"
    assert client.get("/models").json()["count"] == models_before


def test_cancel_queued_job_never_starts(client):
    blocker = submit(client, "mnist_lenet5", epochs=500)
    wait_for(
        lambda: client.get(f"/jobs/{blocker['id']}").json()["status"] == "running",
        90,
        0.05,
        "blocker running",
    )
    queued = submit(client, "mnist_lenet5", epochs=1)
    response = client.post(f"/jobs/{queued['id']}/cancel")
    assert response.status_code == 202 and response.json()["status"] == "cancelled"
    client.post(f"/jobs/{blocker['id']}/cancel")
    wait_for_status(client, blocker["id"], {"cancelled"}, timeout=30)
    after = client.get(f"/jobs/{queued['id']}").json()
    follow_up = submit(client, "mnist_lenet5", epochs=1, max_train_samples=128)
    wait_for_status(client, follow_up["id"], {"succeeded"})
    after = client.get(f"/jobs/{queued['id']}").json()
    assert after["status"] == "cancelled" and after["started_at"] is None and after["attempts"] == 0


def test_job_with_missing_data_fails_with_its_message(make_stack, start_worker, tmp_path):
    stack = make_stack(data_dir=tmp_path / "empty")
    start_worker(stack)
    with api_client(stack) as client:
        job = submit(client, "cifar10_dense", epochs=1)
        done = wait_for_status(client, job["id"], {"succeeded", "failed"})
    assert done["status"] == "failed"
    assert "CIFAR-10 train split not found" in done["error"] and "cifar10-jpg.zip" in done["error"]
    assert done["model_id"] is None and done["finished_at"]


def test_list_jobs_newest_first_with_paging(client):
    ids = [submit(client, "mnist_lenet5", epochs=1, max_train_samples=64)["id"] for _ in range(3)]
    page = client.get("/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:2] and page["count"] >= 3
    second = client.get("/jobs", params={"limit": 2, "offset": 2}).json()
    assert second["data"][0]["id"] == ids[0]
    assert all(
        j["task"] == "mnist_lenet5"
        for j in client.get("/jobs", params={"task": "mnist_lenet5"}).json()["data"]
    )
    for job_id in ids:
        wait_for_status(client, job_id, {"succeeded", "failed"})
    assert client.get("/jobs/" + "f" * 32).status_code == 404
    assert client.get("/jobs/not-an-id").status_code == 422
