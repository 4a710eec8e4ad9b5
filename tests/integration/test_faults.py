"""Faults against the real stack: killed workers, redelivery, Redis down, API restarts, out of
memory, unwritable or full disks. Each test starts its own workers (and, for Redis faults, its own
redis-server) and stops only what it started."""

from __future__ import annotations

import json
import resource
import select
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO, RedisServer, api_client, wait_for, wait_for_status
from tests.factories import digit_image, image_bytes
from tests.factories_models import make_model_checkpoint

pytestmark = pytest.mark.integration

FAST_REAPER = {"job_lease_ttl_s": 3, "reaper_interval_s": 1}


def submit(client, task: str, **hp) -> str:
    response = client.post("/jobs", json={"task": task, "hyperparameters": hp})
    assert response.status_code == 202, response.text
    return response.json()["id"]


def train_in_fresh_process(task: str, hp: dict, data_dir, cache_dir) -> list[dict]:
    """Metrics of an uninterrupted run in a new process (torch's default threads, like a worker;
    this test process has had its thread count changed by the API's lifespan)."""
    args = [sys.executable, "-m", "tests.train_once", task, json.dumps(hp), str(data_dir), str(cache_dir)]
    out = subprocess.run(args, capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_worker_killed_mid_training_resumes_from_last_epoch(
    make_stack, start_worker, synthetic_data_dir, tmp_path
):
    stack = make_stack(data_dir=synthetic_data_dir, **FAST_REAPER)
    hp = {"epochs": 30, "seed": 3}
    first = start_worker(stack)
    with api_client(stack) as client:
        job_id = submit(client, "mnist_lenet5", **hp)
        wait_for(lambda: len(client.get(f"/jobs/{job_id}").json()["metrics"]) >= 2, 120, 0.02, "two epochs")
        first.kill()
        killed_at = client.get(f"/jobs/{job_id}").json()
        assert killed_at["status"] == "running" and len(killed_at["metrics"]) < 30
        second = start_worker(stack)
        done = wait_for_status(client, job_id, {"succeeded", "failed"}, timeout=180)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2 and done["worker"] == second.hostname
    assert [m["epoch"] for m in done["metrics"]] == list(range(1, 31))
    resumed_from = [line for line in second.log().splitlines() if "resuming mnist_lenet5 at epoch" in line]
    assert resumed_from, second.log()[-2000:]
    straight = train_in_fresh_process("mnist_lenet5", hp, synthetic_data_dir, tmp_path / "cache")
    for got, want in zip(done["metrics"], straight, strict=True):
        assert (got["train_loss"], got["test_accuracy"]) == (want["train_loss"], want["test_accuracy"])
    assert not (stack.root / "cache" / "jobs" / job_id).exists()


def test_worker_lost_too_often_fails_with_the_reason(make_stack, start_worker, synthetic_data_dir):
    stack = make_stack(data_dir=synthetic_data_dir, max_attempts=1, **FAST_REAPER)
    first = start_worker(stack)
    with api_client(stack) as client:
        job_id = submit(client, "mnist_lenet5", epochs=100)
        wait_for(lambda: client.get(f"/jobs/{job_id}").json()["metrics"], 120, 0.05, "one epoch")
        resume_dir = stack.settings().resume_dir(job_id)
        wait_for(lambda: any(resume_dir.glob("*")), 30, 0.05, "resume state")
        first.kill()
        start_worker(stack)
        done = wait_for_status(client, job_id, {"succeeded", "failed"}, timeout=120)
    assert (
        done["status"] == "failed" and "gave up after 1 attempts" in done["error"] and "lost" in done["error"]
    )
    wait_for(lambda: not resume_dir.exists(), 10, 0.05, "the resume state to be deleted")


def test_redelivery_while_running_never_runs_the_job_twice(make_stack, start_worker, synthetic_data_dir):
    """A visibility timeout shorter than the job makes Redis hand the message to a second worker
    while the first still runs it (celery#5935); the lease makes the second one decline."""
    sweep_every_second = '{"unacked_restore_interval": 1, "unacked_restore_throttle": 1}'
    stack = make_stack(
        data_dir=synthetic_data_dir, visibility_timeout_s=2, celery_transport_options=sweep_every_second
    )
    first = start_worker(stack)
    second = start_worker(stack)
    with api_client(stack) as client:
        job_id = submit(client, "mnist_lenet5", epochs=40)
        done = wait_for_status(client, job_id, {"succeeded", "failed"}, timeout=240)
    assert done["status"] == "succeeded" and done["attempts"] == 1
    logs = first.log() + second.log()
    assert logs.count(f"job {job_id} (mnist_lenet5) started") == 1
    assert f"job {job_id} not run: leased" in logs


@pytest.fixture
def private_redis(tmp_path):
    """A persistent redis-server of this test only (the shared one is never stopped)."""
    server = RedisServer(tmp_path / "redis", persistent=True).start()
    yield server
    server.stop()


def test_redis_down_answers_503_then_recovers(make_stack, private_redis):
    server = private_redis
    stack = make_stack(redis_url=server.url)
    make_model_checkpoint(stack.settings().models_dir)
    digit = image_bytes(Image.fromarray(digit_image(3, np.random.default_rng(0))), "PNG")
    with api_client(stack) as client:
        assert client.post("/jobs", json={"task": "mnist_lenet5"}).status_code == 202
        server.stop()
        for method, path, kwargs in (
            ("POST", "/jobs", {"json": {"task": "mnist_lenet5"}}),
            ("GET", "/jobs", {}),
            ("GET", "/jobs/" + "a" * 32, {}),
            ("POST", "/jobs/" + "a" * 32 + "/cancel", {}),
        ):
            started = time.monotonic()
            response = client.request(method, path, **kwargs)
            assert response.status_code == 503, (path, response.text)
            assert "unreachable" in response.json()["detail"] and time.monotonic() - started < 10
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "unavailable"
        assert client.get("/healthz").status_code == 200
        predicted = client.post("/predict", files={"file": ("d.png", digit)}, data={"task": "mnist_lenet5"})
        assert predicted.status_code == 200  # serving needs no Redis
        server.start()
        assert client.get("/readyz").status_code == 200
        assert client.post("/jobs", json={"task": "mnist_lenet5"}).status_code == 202
        assert client.get("/jobs").json()["count"] == 2  # the one from before the outage too


def test_redis_down_while_training_keeps_every_epoch_on_the_record(
    make_stack, start_worker, private_redis, synthetic_data_dir
):
    """The job ends while Redis is away: its per-epoch writes were lost, and the final write (retried
    until Redis is back) repeats them."""
    server = private_redis
    stack = make_stack(redis_url=server.url, data_dir=synthetic_data_dir)
    worker = start_worker(stack)
    epochs = 20
    with api_client(stack) as client:
        job_id = submit(client, "mnist_lenet5", epochs=epochs)
        wait_for(lambda: len(client.get(f"/jobs/{job_id}").json()["metrics"]) >= 2, 120, 0.02, "two epochs")
        server.stop()
        wait_for(lambda: "retrying final status" in worker.log(), 180, 0.1, "the job to end")
        assert "could not record progress" in worker.log()
        server.start()
        done = wait_for_status(client, job_id, {"succeeded", "failed"}, timeout=180)
    assert done["status"] == "succeeded", done["error"]
    assert [m["epoch"] for m in done["metrics"]] == list(range(1, epochs + 1))
    assert done["progress"]["epoch"] == epochs


def test_api_restart_loses_nothing(make_stack, start_worker, start_api, synthetic_data_dir):
    stack = make_stack(data_dir=synthetic_data_dir)
    start_worker(stack)
    api = start_api(stack)
    job_id = httpx.post(
        f"{api.url}/jobs", json={"task": "mnist_lenet5", "hyperparameters": {"epochs": 2}}
    ).json()["id"]
    wait_for(lambda: httpx.get(f"{api.url}/jobs/{job_id}").json()["status"] == "succeeded", 120, 0.2, "job")
    before = (httpx.get(f"{api.url}/jobs").json(), httpx.get(f"{api.url}/models").json())
    api.kill()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{api.url}/healthz", timeout=1)
    api.start()
    after = (httpx.get(f"{api.url}/jobs").json(), httpx.get(f"{api.url}/models").json())
    assert after == before and before[0]["count"] == 1 and before[1]["count"] == 1
    digit = image_bytes(Image.fromarray(digit_image(3, np.random.default_rng(0))), "PNG")
    response = httpx.post(
        f"{api.url}/predict", files={"file": ("d.png", digit)}, data={"task": "mnist_lenet5"}
    )
    assert response.status_code == 200


def test_streamed_upload_over_the_limit_is_cut_off(make_stack, start_api):
    """A chunked upload with no Content-Length is refused with 413 after ~the limit, not read whole."""
    stack = make_stack(max_upload_bytes=64 * 1024)
    api = start_api(stack)
    chunk = b"x" * 65536
    total_chunks = 800  # 50 MiB offered
    sent = 0
    with socket.create_connection(("127.0.0.1", api.port)) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
        )
        preamble = b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n'
        sock.sendall(b"%x\r\n%s\r\n" % (len(preamble), preamble))
        reply = b""
        try:
            for _ in range(total_chunks):
                if select.select([sock], [], [], 0)[0]:
                    break
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += 1
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.settimeout(10)
        try:
            while b"\r\n\r\n" not in reply:
                data = sock.recv(65536)
                if not data:
                    break
                reply += data
        except (ConnectionResetError, TimeoutError):
            pass
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert sent < total_chunks // 4, f"the server read {sent} of {total_chunks} chunks"


def _limit_memory() -> None:
    """Address-space limit of 4 GiB: torch (~3.3 GiB mapped) trains LeNet-5 but cannot hold ResNet18
    activations for a batch of 16, which then fails with a real allocator error."""
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def test_out_of_memory_fails_the_job_and_the_worker_serves_the_next(
    make_stack, start_worker, synthetic_data_dir
):
    stack = make_stack(data_dir=synthetic_data_dir)
    worker = start_worker(stack, preexec=_limit_memory)
    with api_client(stack) as client:
        oom = submit(client, "hymenoptera_resnet18", epochs=2, batch_size=16)
        failed = wait_for_status(client, oom, {"succeeded", "failed"}, timeout=180)
        assert failed["status"] == "failed" and "out of memory" in failed["error"], failed["error"]
        nxt = submit(client, "mnist_lenet5", epochs=1)
        assert wait_for_status(client, nxt, {"succeeded", "failed"}, timeout=120)["status"] == "succeeded"
        assert client.get("/models").json()["count"] == 1
    assert worker.process.poll() is None
    assert not (stack.root / "cache" / "jobs" / oom).exists()


def test_unwritable_models_dir_fails_the_job_clearly(make_stack, start_worker, synthetic_data_dir, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where MODELS_DIR should be")
    stack = make_stack(data_dir=synthetic_data_dir, models_dir=blocker / "models")
    worker = start_worker(stack)
    with api_client(stack) as client:
        for _ in range(2):
            job = wait_for_status(client, submit(client, "mnist_lenet5", epochs=1), {"succeeded", "failed"})
            assert job["status"] == "failed" and "could not write checkpoint" in job["error"], job["error"]
            assert job["model_id"] is None
            assert job["metrics"] == []  # found out before training, not after
        assert client.get("/models").json() == {"data": [], "count": 0}
    assert worker.process.poll() is None


def _limit_file_size() -> None:
    """Writes beyond 2 MB fail with EFBIG, like a full disk (SIGXFSZ ignored so write() errors)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20))


def test_disk_full_while_writing_the_checkpoint_leaves_nothing_visible(
    make_stack, start_worker, synthetic_data_dir
):
    stack = make_stack(data_dir=synthetic_data_dir)
    worker = start_worker(stack, preexec=_limit_file_size)
    models_dir = stack.settings().models_dir
    with api_client(stack) as client:
        job_id = submit(client, "cifar10_dense", epochs=1, hidden_size=1024)  # 12.6 MB of weights
        job = wait_for_status(client, job_id, {"succeeded", "failed"}, timeout=120)
        assert job["status"] == "failed" and "could not write checkpoint" in job["error"], job["error"]
        assert client.get("/models").json()["count"] == 0
    assert not models_dir.exists() or list(models_dir.iterdir()) == []
    assert worker.process.poll() is None
