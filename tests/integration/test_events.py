"""Live job events (GET /jobs/{id}/events) against a real uvicorn API, a real worker and Redis."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime

import httpx
import numpy as np
import pytest

from tests.conftest import (
    REPO,
    api_client,
    free_port,
    served_stack,
    wait_for,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def service(tmp_path_factory, redis_url, synthetic_data_dir):
    with served_stack(tmp_path_factory.mktemp("events"), redis_url, synthetic_data_dir) as served:
        yield served


@pytest.fixture(scope="module")
def trained(service) -> tuple[str, dict]:
    """A finished LeNet-5 job: (API url, job)."""
    _, api = service
    job = submit(api.url, "mnist_lenet5", epochs=2)
    wait_for(
        lambda: httpx.get(f"{api.url}/jobs/{job['id']}").json()["status"] in ("succeeded", "failed"),
        timeout=180,
        what="the job to end",
    )
    done = httpx.get(f"{api.url}/jobs/{job['id']}").json()
    assert done["status"] == "succeeded", done["error"]
    return api.url, done


def read_events(
    url: str,
    last_event_id: str | None = None,
    stop: callable = lambda events: False,
    timeout: float = 180,
) -> tuple[list[tuple[str, str, str]], bool]:
    """Read SSE events (id, event, data) until the server closes the stream (True) or ``stop``
    says so after an event (False: the client disconnects)."""
    headers = {"Accept": "text/event-stream"}
    if last_event_id:
        headers["Last-Event-ID"] = last_event_id
    events: list[tuple[str, str, str]] = []
    with httpx.stream("GET", url, headers=headers, timeout=httpx.Timeout(timeout, connect=10)) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        current: dict[str, str] = {}
        for line in response.iter_lines():
            if line == "":
                if "data" in current:
                    events.append((current.get("id", ""), current.get("event", "message"), current["data"]))
                    current = {}
                    if stop(events):
                        return events, False
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            current[name] = value[1:] if value.startswith(" ") else value
    return events, True


def submit(api_url: str, task: str, **hp) -> dict:
    response = httpx.post(f"{api_url}/jobs", json={"task": task, "hyperparameters": hp}, timeout=10)
    assert response.status_code == 202, response.text
    return response.json()


def test_events_resume_with_last_event_id_equals_one_read(
    make_stack, start_worker, start_api, synthetic_data_dir
):
    stack = make_stack(data_dir=synthetic_data_dir)
    start_worker(stack)
    api = start_api(stack)
    job = submit(api.url, "mnist_lenet5", epochs=6)
    events_url = f"{api.url}/jobs/{job['id']}/events"

    # Several clients read it in one go at once: they share the API's live reader of the job, which
    # wakes them in groups of WAKE_GROUP (more clients than one group).
    wholes: list[list] = []
    readers = [threading.Thread(target=lambda: wholes.append(read_events(events_url)[0])) for _ in range(20)]
    for reader in readers:
        reader.start()

    # A second client leaves after the first epoch, stays away while the next epoch ends, resumes.
    first, closed = read_events(events_url, stop=lambda ev: ev[-1][1] == "epoch")
    assert not closed
    seen_epochs = sum(1 for _, kind, _ in first if kind == "epoch")
    wait_for(
        lambda: len(httpx.get(f"{api.url}/jobs/{job['id']}").json()["metrics"]) > seen_epochs,
        timeout=120,
        what="another epoch while the client is away",
    )
    rest, closed = read_events(events_url, last_event_id=first[-1][0])
    assert closed
    for reader in readers:
        reader.join(180)
        assert not reader.is_alive()
    resumed = first + rest

    assert len(wholes) == 20 and all(whole == resumed for whole in wholes)
    ids = [event_id for event_id, _, _ in resumed]
    assert len(set(ids)) == len(ids) and ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))

    done = httpx.get(f"{api.url}/jobs/{job['id']}").json()
    assert done["status"] == "succeeded", done["error"]
    statuses = [json.loads(data) for _, kind, data in resumed if kind == "status"]
    assert [s["status"] for s in statuses] == ["queued", "running", "succeeded"]
    assert statuses[-1]["model_id"] == done["model_id"] and statuses[-1]["error"] is None
    epochs = [json.loads(data) for _, kind, data in resumed if kind == "epoch"]
    assert epochs == done["metrics"]  # exactly the stored per-epoch metrics, in order
    progress = [json.loads(data) for _, kind, data in resumed if kind == "progress"]
    assert progress and {"epoch", "epochs", "batches_done", "batches_total", "stage"} <= progress[-1].keys()
    times = [int(event_id.split("-")[0]) for event_id, kind, _ in resumed if kind == "progress"]
    span_s = (times[-1] - times[0]) / 1000
    assert len(times) <= 4 * span_s + 8  # at most ~4 progress events per second

    # A finished job replays its whole history and closes; resuming after its last event closes at once.
    replay, closed = read_events(events_url)
    assert closed and replay == resumed
    tail, closed = read_events(events_url, last_event_id=resumed[-1][0])
    assert closed and tail == []
    middle = len(resumed) // 2
    tail, closed = read_events(events_url, last_event_id=resumed[middle][0])
    assert closed and tail == resumed[middle + 1 :]


def test_events_errors_and_auth(make_stack, start_api):
    stack = make_stack(api_keys=["k" * 24], environment="production")
    api = start_api(stack)
    headers = {"Authorization": "Bearer " + "k" * 24}
    unknown = f"{api.url}/jobs/{'f' * 32}/events"
    assert httpx.get(unknown, timeout=10).status_code == 401
    assert httpx.get(unknown, params={"api_key": "k" * 24}, timeout=10).status_code == 401
    assert httpx.get(unknown, headers=headers, timeout=10).status_code == 404
    job = httpx.post(
        f"{api.url}/jobs", json={"task": "mnist_lenet5"}, headers=headers, timeout=10
    ).json()  # no worker: stays queued
    url = f"{api.url}/jobs/{job['id']}/events"
    bad = httpx.get(url, headers={**headers, "Last-Event-ID": "nope"}, timeout=10)
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["header", "last-event-id"]
    for too_large in ("18446744073709551616-0", "1-18446744073709551616"):  # QA: past 2**64 - 1
        bad = httpx.get(url, headers={**headers, "Last-Event-ID": too_large}, timeout=10)
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["header", "last-event-id"]
    with httpx.stream("GET", url, headers={**headers, "Last-Event-ID": "9999999999999999999-0"}) as live:
        assert live.status_code == 200  # 19 digits always fit Redis: the (live) stream opens
    curves = png(httpx.get(f"{api.url}/jobs/{job['id']}/curves.png", headers=headers, timeout=60))
    assert curves.size == (1200, 450)  # no epoch yet: empty panels
    # A queued job: the history so far (queued), then a cancel arrives live and ends the stream.
    got: dict[str, list] = {}

    def read() -> None:
        with httpx.stream("GET", url, headers=headers, timeout=30) as response:
            got["lines"] = [line for line in response.iter_lines() if line.startswith(("event:", "data:"))]

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(1)
    assert httpx.post(f"{api.url}/jobs/{job['id']}/cancel", headers=headers, timeout=10).status_code == 202
    reader.join(20)
    assert not reader.is_alive()
    kinds = [json.loads(line[5:])["status"] for line in got["lines"] if line.startswith("data:")]
    assert kinds == ["queued", "cancelled"]


def test_checkpoint_has_a_consistent_evaluation(trained):
    url, job = trained
    model = httpx.get(f"{url}/models/{job['model_id']}").json()
    evaluation = model["evaluation"]
    assert evaluation["split"] == "test" and evaluation["dataset"] == "mnist"
    classes = evaluation["classes"]
    assert classes == model["classes"] == [str(d) for d in range(10)]
    matrix = evaluation["confusion_matrix"]
    assert len(matrix) == 10 and all(len(row) == 10 for row in matrix)
    assert sum(map(sum, matrix)) == 300  # the synthetic MNIST test split
    right = sum(matrix[i][i] for i in range(10))
    assert evaluation["accuracy"] == pytest.approx(right / 300) == job["metrics"][-1]["test_accuracy"]
    for c, scores in enumerate(evaluation["per_class"]):
        assert scores["class"] == classes[c] and scores["support"] == sum(matrix[c])
        column = sum(row[c] for row in matrix)
        assert scores["recall"] == pytest.approx(matrix[c][c] / max(sum(matrix[c]), 1), abs=1e-6)
        assert scores["precision"] == pytest.approx(matrix[c][c] / column if column else 0.0, abs=1e-6)
    mistakes = evaluation["mistakes"]
    assert len(mistakes) == min(25, 300 - right)
    assert all(m["true"] != m["predicted"] and m["split"] == "test" for m in mistakes)
    assert [m["probability"] for m in mistakes] == sorted((m["probability"] for m in mistakes), reverse=True)
    assert len({m["index"] for m in mistakes}) == len(mistakes)
    assert all(0 <= m["index"] < 300 for m in mistakes)


def png(response: httpx.Response):
    from PIL import Image

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image


def has_colour(image, rgb: tuple[int, int, int], tolerance: int = 12) -> bool:
    pixels = np.asarray(image.convert("RGB")).astype(int)
    return bool((np.abs(pixels - np.array(rgb)).max(axis=2) <= tolerance).any())


def test_figures_of_a_job_and_its_model(trained):
    url, job = trained
    curves = png(httpx.get(f"{url}/jobs/{job['id']}/curves.png", timeout=60))
    assert curves.size == (1200, 450)
    left, right = curves.crop((0, 0, 600, 450)), curves.crop((600, 0, 1200, 450))
    blue, orange = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # matplotlib's first two line colours
    assert has_colour(left, blue) and not has_colour(left, orange)  # loss: one line
    assert has_colour(right, blue) and has_colour(right, orange)  # train and test accuracy
    confusion = png(httpx.get(f"{url}/models/{job['model_id']}/confusion.png", timeout=60))
    assert confusion.size == (800, 700)
    assert httpx.get(f"{url}/jobs/{'f' * 32}/curves.png").status_code == 404
    assert httpx.get(f"{url}/models/nope/confusion.png").status_code == 404


def test_dataset_samples_and_images(trained, synthetic_data_dir, tmp_path):
    from worker.data import clear_memory_cache, load_split

    url, job = trained
    grid = png(httpx.get(f"{url}/datasets/mnist/samples.png", timeout=60))  # n=25: 5 x 5 tiles
    assert grid.size == (5 * 120, 5 * 144)
    grid = png(httpx.get(f"{url}/datasets/cifar10/samples.png", params={"n": 7, "seed": 3}, timeout=60))
    assert grid.size == (3 * 120, 3 * 144)
    grid = png(
        httpx.get(f"{url}/datasets/hymenoptera/samples.png", params={"split": "val", "n": 4}, timeout=60)
    )
    assert grid.size == (2 * 120, 2 * 144)
    for params, code in [({"n": 0}, 422), ({"n": 101}, 422), ({"split": "val"}, 404)]:
        assert httpx.get(f"{url}/datasets/mnist/samples.png", params=params).status_code == code
    assert httpx.get(f"{url}/datasets/imagenet/samples.png").status_code == 404

    # One image, exactly as the loader gives it (the same index as in an evaluation's mistakes).
    clear_memory_cache()
    job_mistake = httpx.get(f"{url}/models/{job['model_id']}").json()["evaluation"]["mistakes"]
    index = job_mistake[0]["index"] if job_mistake else 0
    mnist = load_split("mnist_lenet5", "test", synthetic_data_dir, tmp_path / "cache")
    response = httpx.get(f"{url}/datasets/mnist/images/test/{index}", timeout=60)
    image = png(response)
    assert image.mode == "L" and image.size == (28, 28)
    assert np.array_equal(np.asarray(image), mnist.images[index, 0].numpy())
    assert response.headers["x-class"] == mnist.classes[int(mnist.labels[index])]
    if job_mistake:
        assert response.headers["x-class"] == job_mistake[0]["true"]
    bees = load_split("hymenoptera_resnet18", "val", synthetic_data_dir, tmp_path / "cache")
    image = png(httpx.get(f"{url}/datasets/hymenoptera/images/val/15", timeout=60))  # decoded from source
    assert image.mode == "RGB" and image.size == (224, 224)
    assert np.array_equal(np.asarray(image), bees.images[15].permute(1, 2, 0).numpy())
    assert httpx.get(f"{url}/datasets/hymenoptera/images/val/16").status_code == 404
    assert httpx.get(f"{url}/datasets/hymenoptera/images/test/0").status_code == 404
    assert httpx.get(f"{url}/datasets/mnist/images/test/-1").status_code == 422


def test_dataset_files_missing_is_a_clear_409(make_stack, tmp_path):
    stack = make_stack(data_dir=tmp_path / "nothing")
    with api_client(stack) as client:
        response = client.get("/datasets/cifar10/samples.png")
        assert response.status_code == 409
        assert "not available" in response.json()["detail"] and "CIFAR-10" in response.json()["detail"]
        assert client.get("/datasets/mnist/images/train/0").status_code == 409


def scrape(url: str, headers: dict | None = None) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(f"{url}/metrics", headers=headers or {}, timeout=30)
    assert response.status_code == 200, response.text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def test_metrics_cover_jobs(trained):
    url, _ = trained
    jobs = httpx.get(f"{url}/jobs", params={"limit": 200}).json()["data"]
    metrics = scrape(url)
    assert metrics[("imgclf_job_metrics_up", ())] == 1
    assert metrics[("imgclf_workers", ())] == 1
    by_status: dict[tuple, int] = {}
    for j in jobs:
        by_status[(j["task"], j["status"])] = by_status.get((j["task"], j["status"]), 0) + 1
    for (task, status), count in by_status.items():
        assert metrics[("imgclf_jobs", (("status", status), ("task", task)))] == count
    assert metrics[("imgclf_queue_depth", ())] == sum(1 for j in jobs if j["status"] == "queued")
    finished = [j for j in jobs if j["status"] == "succeeded" and j["task"] == "mnist_lenet5"]
    key = (("status", "succeeded"), ("task", "mnist_lenet5"))
    assert metrics[("imgclf_job_duration_seconds_count", key)] == len(finished)
    total = sum(
        (datetime.fromisoformat(j["finished_at"]) - datetime.fromisoformat(j["started_at"])).total_seconds()
        for j in finished
    )
    assert metrics[("imgclf_job_duration_seconds_sum", key)] == pytest.approx(total, abs=1e-3)
    epochs = [m for j in jobs if j["task"] == "mnist_lenet5" for m in j["metrics"]]
    epoch_key = (("task", "mnist_lenet5"),)
    assert metrics[("imgclf_epoch_duration_seconds_count", epoch_key)] == len(epochs)
    assert metrics[("imgclf_epoch_duration_seconds_sum", epoch_key)] == pytest.approx(
        sum(m["duration_s"] for m in epochs)
    )
    assert metrics[("imgclf_epoch_duration_seconds_bucket", (("le", "+Inf"), *epoch_key))] == len(epochs)
    # a training job's throughput shows while it trains
    running = submit(url, "mnist_lenet5", epochs=200)

    def training_speed():
        value = scrape(url).get(("imgclf_training_images_per_second", (("task", "mnist_lenet5"),)), 0)
        return value if value > 0 else None

    assert wait_for(training_speed, timeout=120, interval=0.3, what="training throughput in /metrics") > 0
    assert httpx.post(f"{url}/jobs/{running['id']}/cancel").status_code == 202
    wait_for(lambda: httpx.get(f"{url}/jobs/{running['id']}").json()["status"] == "cancelled", timeout=60)


def test_http_metrics_add_up_over_several_api_processes(make_stack, tmp_path):
    stack = make_stack()
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    port = free_port()
    env = {**os.environ, **stack.env, "PROMETHEUS_MULTIPROC_DIR": str(multiproc)}
    command = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--port", str(port)]
    with open(tmp_path / "api.log", "ab") as log:
        process = subprocess.Popen(
            [*command, "--workers", "2"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _answers(url), timeout=90, what="the API with 2 worker processes")
        for _ in range(20):  # new connections: spread over both processes
            assert httpx.get(f"{url}/jobs/{'e' * 32}").status_code == 404
        key = (
            "imgclf_http_requests_total",
            (("method", "GET"), ("route", "/jobs/{job_id}"), ("status", "404")),
        )
        for _ in range(6):  # whichever process answers the scrape, it counts all of them
            assert scrape(url)[key] == 20
        assert len(list(multiproc.glob("*.db"))) >= 2  # both processes wrote their values
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
