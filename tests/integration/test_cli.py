"""The `imgclf` command line end to end: `python -m cli.main` subprocesses against a real uvicorn
API and a real Celery worker (synthetic MNIST), as a user would run it."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import zipfile

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO, ApiProcess, Stack, served_stack, wait_for
from tests.factories import digit_image
from tests.factories_datasets import class_images, zip_bytes
from tests.factories_models import make_model_checkpoint

pytestmark = pytest.mark.integration

KEY = "cli-test-key-0123456789abcdef"
FOLLOWED_JOB = ["--set", "epochs=4", "--set", "max_train_samples=600"]


@pytest.fixture(scope="module")
def cli_stack(tmp_path_factory, redis_url, synthetic_data_dir):
    root = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as patch:
        # Uploaded datasets under the stack's root, not the checkout's var/datasets (the API and
        # worker processes inherit os.environ).
        patch.setenv("DATASETS_DIR", str(root / "datasets"))
        with served_stack(root, redis_url, synthetic_data_dir) as served:
            yield served


def imgclf(url: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("IMGCLF_")}
    environment |= {"IMGCLF_URL": url, **env}
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=240,
    )


def no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr


def test_train_follow_prints_accuracy_and_predict_prints_one_line_per_file(cli_stack, tmp_path):
    _, api = cli_stack
    result = imgclf(
        api.url,
        "train",
        "mnist_lenet5",
        "--set",
        "epochs=1",
        "--set",
        "max_train_samples=1000",
        "--set",
        "batch_size=1",  # an epoch of 1,000 steps: long enough for progress events on a fast machine
        "--follow",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = re.search(r"job ([0-9a-f]{32}) queued", result.stdout).group(1)
    accuracy = float(re.search(r"test accuracy: ([\d.]+) %", result.stdout).group(1))
    job = httpx.get(f"{api.url}/jobs/{job_id}").json()
    assert job["status"] == "succeeded"
    assert job["hyperparameters"]["epochs"] == 1 and job["hyperparameters"]["max_train_samples"] == 1000
    assert accuracy == pytest.approx(100 * job["metrics"][-1]["test_accuracy"], abs=0.006)
    assert f"model: {job['model_id']}" in result.stdout
    assert re.search(r"epoch 1: train loss [\d.]+", result.stdout)
    # Followed through the event stream, whose progress events drew the epoch's bar.
    assert f'GET /jobs/{job_id}/events HTTP/1.1" 200' in api.log_path.read_text()
    assert re.search(r"epoch 1/1 .* (\d+)/\1 ", result.stdout), result.stdout

    listing = imgclf(api.url, "jobs", "ls")
    assert listing.returncode == 0 and job_id in listing.stdout and "succeeded" in listing.stdout
    shown = imgclf(api.url, "jobs", "show", job_id)
    assert shown.returncode == 0 and job["model_id"] in shown.stdout and "Epochs" in shown.stdout
    models = imgclf(api.url, "models", "ls")
    assert models.returncode == 0 and job["model_id"] in models.stdout
    model = imgclf(api.url, "models", "show", job["model_id"])
    assert model.returncode == 0 and "mnist_lenet5" in model.stdout

    rng = np.random.default_rng(0)
    files = []
    for label in (3, 5, 8):
        path = tmp_path / f"digit_{label}.png"
        Image.fromarray(digit_image(label, rng)).save(path)
        files.append(path)
    result = imgclf(api.url, "predict", *map(str, files), "--model", job["model_id"], "--top-k", "2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3, result.stdout
    for path, line in zip(files, lines, strict=True):
        assert re.fullmatch(rf"{re.escape(str(path))}: \S+ \([\d.]+ %\), \S+ \([\d.]+ %\)", line), line

    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("not an image")
    result = imgclf(api.url, "predict", str(files[0]), str(not_an_image), "--task", "mnist_lenet5")
    assert result.returncode == 1
    assert len(result.stdout.strip().splitlines()) == 1 and result.stdout.startswith(str(files[0]))
    assert f"{not_an_image}: error: 415 Unsupported Media Type" in result.stderr
    no_traceback(result)


def test_failed_job_exits_1(cli_stack):
    _, api = cli_stack
    # ImageNet weights that are neither in TORCH_HOME nor downloadable: the job fails.
    result = imgclf(
        api.url,
        "train",
        "hymenoptera_resnet18",
        "--set",
        "weights=IMAGENET1K_V1",
        "--set",
        "epochs=1",
        "--follow",
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(
        r"job [0-9a-f]{32} failed: .*IMAGENET1K_V1|job [0-9a-f]{32} failed: .*weights", result.stderr
    )
    no_traceback(result)


def test_cancel(cli_stack):
    _, api = cli_stack
    submitted = imgclf(api.url, "train", "mnist_lenet5", "--set", "epochs=50")
    job_id = re.search(r"job ([0-9a-f]{32})", submitted.stdout).group(1)
    result = imgclf(api.url, "jobs", "cancel", job_id)
    assert result.returncode == 0 and re.search(rf"job {job_id} (cancelled|running)", result.stdout), (
        result.stdout
    )
    wait_for(
        lambda: httpx.get(f"{api.url}/jobs/{job_id}").json()["status"] == "cancelled", 120, 0.2, "cancel"
    )
    shown = imgclf(api.url, "jobs", "show", job_id)
    assert shown.returncode == 0 and "cancelled" in shown.stdout
    followed = imgclf(api.url, "jobs", "show", job_id, "--follow")
    assert followed.returncode == 1 and f"job {job_id} cancelled" in followed.stderr
    again = imgclf(api.url, "jobs", "cancel", job_id)
    assert again.returncode == 1 and again.stderr.startswith("error: 409 Conflict: ")


def test_api_errors_are_printed_plainly(cli_stack):
    stack, api = cli_stack
    result = imgclf(api.url, "jobs", "show", "0" * 32)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: 404 Not Found: no job with id {'0' * 32}"
    assert result.stdout == ""

    result = imgclf(api.url, "train", "mnist_lenet5", "--set", "epochs=0")
    assert result.returncode == 1
    assert result.stderr.startswith("error: 422 Unprocessable Entity: mnist_lenet5.hyperparameters.epochs: ")
    assert httpx.get(f"{api.url}/jobs", params={"status": "queued"}).json()["count"] == 0

    result = imgclf(api.url, "train", "custom_resnet18", "--dataset", "0" * 32)  # the dataset is sent
    assert result.returncode == 1 and result.stderr.startswith("error: 422 Unprocessable Entity: ")
    assert "0" * 32 in result.stderr and "Field required" not in result.stderr

    result = imgclf(api.url, "train", "custom_resnet18")  # QA: said only "dataset: Field required"
    assert result.returncode == 1 and "give --dataset ID or NAME (imgclf datasets ls)" in result.stderr

    result = imgclf("notaurl", "jobs", "ls", COLUMNS="300")  # QA: "cannot reach the API at : ..."
    assert result.returncode == 2 and "'notaurl' is not an http:// or https:// URL" in result.stderr

    result = imgclf("http://127.0.0.1:9", "models", "ls")
    assert result.returncode == 1 and result.stderr.startswith(
        "error: cannot reach the API at http://127.0.0.1:9"
    )
    no_traceback(result)

    keyed = ApiProcess(Stack(stack.root / "keyed", stack.env["REDIS_URL"], **{**stack.env, "API_KEYS": KEY}))
    try:
        keyed.start()
        refused = imgclf(keyed.url, "jobs", "ls")
        assert refused.returncode == 1 and refused.stderr.startswith(
            "error: 401 Unauthorized: missing API key"
        )
        accepted = imgclf(keyed.url, "jobs", "ls", IMGCLF_API_KEY=KEY)
        assert accepted.returncode == 0, accepted.stderr
    finally:
        keyed.stop()


def test_datasets_upload_wait_ls_show_rm(cli_stack, tmp_path):
    """The README's CLI path for your own photos: upload a zip with --wait, list it, show it (with its
    skipped files, capped), train on it, and remove it (refused while the job uses it)."""
    _, api = cli_stack
    entries = class_images({"birds": 5, "cats": 6, "dogs": 6})
    for name in ("birds/b.txt", "cats/notes.txt", "dogs/a.txt"):
        entries[name] = b"not an image"
    archive = tmp_path / "photos.zip"
    archive.write_bytes(zip_bytes(entries))
    dataset_id = hashlib.sha256(archive.read_bytes()).hexdigest()[:32]

    uploaded = imgclf(api.url, "datasets", "upload", str(archive), "--name", "pets", "--wait")
    assert uploaded.returncode == 0, uploaded.stdout + uploaded.stderr
    record = httpx.get(f"{api.url}/datasets/{dataset_id}").json()
    assert record["status"] == "ready" and record["name"] == "pets" and record["skipped_count"] == 3
    train, val = record["images"]["train"], record["images"]["val"]
    assert f"dataset {dataset_id} ingesting (pets)" in uploaded.stdout
    assert f"dataset {dataset_id} ready: 3 classes, {train} train / {val} val images, 3 files skipped" in (
        uploaded.stdout
    )
    for cls in ("birds", "cats", "dogs"):  # the images per class and split
        counts = rf"\b{cls}\W+{record['counts']['train'][cls]}\W+{record['counts']['val'][cls]}\W*$"
        assert re.search(counts, uploaded.stdout, re.M), uploaded.stdout
    no_traceback(uploaded)

    again = imgclf(api.url, "datasets", "upload", str(archive), "--wait", "--quiet")  # the same bytes
    assert again.returncode == 0 and again.stdout == f"{dataset_id}\n", again.stdout + again.stderr

    listing = imgclf(api.url, "datasets", "ls")
    assert listing.returncode == 0, listing.stderr
    assert re.search(rf"{dataset_id}\W+pets\W+ready\W+3\W+{train} train / {val} val\W", listing.stdout)
    assert re.search(r"\bhymenoptera\W+hymenoptera\W+ready\W+2\W", listing.stdout), listing.stdout

    shown = imgclf(api.url, "datasets", "show", "pets")  # by its name, the only dataset named so
    assert shown.returncode == 0, shown.stderr
    assert re.search(rf"id\s+{dataset_id}\b", shown.stdout), shown.stdout
    assert re.search(r"classes\s+3: birds, cats, dogs", shown.stdout), shown.stdout
    assert re.search(r"skipped\s+3\b", shown.stdout) and "Skipped files (3 of 3)" in shown.stdout
    for name in ("birds/b.txt", "cats/notes.txt", "dogs/a.txt"):
        assert re.search(rf"{name}\W+\.txt files are not read", shown.stdout), shown.stdout
    capped = imgclf(api.url, "datasets", "show", dataset_id, "--skipped", "1")
    assert "Skipped files (1 of 3)" in capped.stdout and "... and 2 more (see --skipped 3)" in capped.stdout
    assert sum(name in capped.stdout for name in ("birds/b.txt", "cats/notes.txt", "dogs/a.txt")) == 1

    submitted = imgclf(
        api.url,
        "train",
        "custom_resnet18",
        "--dataset",
        "pets",
        "--set",
        "epochs=50",
        "--set",
        "weights=none",
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = re.search(r"job ([0-9a-f]{32}) queued", submitted.stdout).group(1)
    assert httpx.get(f"{api.url}/jobs/{job_id}").json()["dataset"] == dataset_id
    unknown = imgclf(api.url, "datasets", "show", "kittens")
    assert unknown.returncode == 1
    expected = "error: no dataset with id or name 'kittens': imgclf datasets ls lists them"
    assert unknown.stderr.strip() == expected
    refused = imgclf(api.url, "datasets", "rm", dataset_id)
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.splitlines() == [
        f"error: 409 Conflict: job {job_id} is queued or running on dataset {dataset_id}",
        f"cancel it (imgclf jobs cancel {job_id}) or wait until it ends, then remove the dataset",
    ]
    assert httpx.get(f"{api.url}/datasets/{dataset_id}").status_code == 200
    assert imgclf(api.url, "jobs", "cancel", job_id).returncode == 0
    wait_for(
        lambda: httpx.get(f"{api.url}/jobs/{job_id}").json()["status"] == "cancelled", 120, 0.2, "cancel"
    )
    removed = imgclf(api.url, "datasets", "rm", dataset_id)
    assert removed.returncode == 0 and removed.stdout.strip() == f"dataset {dataset_id} deleted"
    assert httpx.get(f"{api.url}/datasets/{dataset_id}").status_code == 404
    assert dataset_id not in imgclf(api.url, "datasets", "ls").stdout
    gone = imgclf(api.url, "datasets", "rm", dataset_id)
    assert (
        gone.returncode == 1
        and gone.stderr.strip() == f"error: 404 Not Found: no dataset with id {dataset_id}"
    )


def test_a_failed_dataset_exits_1_with_its_reason(cli_stack, tmp_path):
    _, api = cli_stack
    archive = tmp_path / "one-class.zip"
    archive.write_bytes(zip_bytes(class_images({"cats": 4})))
    dataset_id = hashlib.sha256(archive.read_bytes()).hexdigest()[:32]
    result = imgclf(api.url, "datasets", "upload", str(archive), "--wait")
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.startswith(f"dataset {dataset_id} ingesting (one-class)")
    error = httpx.get(f"{api.url}/datasets/{dataset_id}").json()["error"]
    assert "need at least 2 class" in error
    assert result.stderr.strip() == f"dataset {dataset_id} failed: {error}"
    no_traceback(result)
    quiet = imgclf(api.url, "datasets", "upload", str(archive), "--wait", "-q")  # retried, fails again
    assert quiet.returncode == 1 and quiet.stdout == "" and f"dataset {dataset_id} failed: " in quiet.stderr

    not_an_archive = tmp_path / "photos.zip"
    not_an_archive.write_text("not an archive")
    result = imgclf(api.url, "datasets", "upload", str(not_an_archive))
    assert result.returncode == 1 and result.stderr.startswith("error: 415 Unsupported Media Type: ")
    no_traceback(result)


def test_follow_resumes_after_the_api_restarts(make_stack, start_worker, start_api, synthetic_data_dir):
    """`train --follow` keeps following across an API restart (same port) and ends with every epoch."""
    stack = make_stack(data_dir=synthetic_data_dir)
    api = start_api(stack)
    start_worker(stack)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("IMGCLF_")} | {
        "IMGCLF_URL": api.url
    }
    follower = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "train", "mnist_lenet5", "--follow", *FOLLOWED_JOB],
        cwd=REPO,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: any(j["metrics"] for j in httpx.get(f"{api.url}/jobs").json()["data"]),
            180,
            0.1,
            "the first epoch",
        )
        api.kill()
        api.start()
        stdout, stderr = follower.communicate(timeout=240)
    finally:
        follower.kill()
    assert follower.returncode == 0, stdout + stderr
    # Each epoch printed once: the stream resumed after the last event seen (Last-Event-ID), no replay.
    assert [int(n) for n in re.findall(r"^epoch (\d+): train loss", stdout, re.M)] == [1, 2, 3, 4], stdout
    assert "test accuracy: " in stdout
    log = api.log_path.read_text()
    assert log.count('/events HTTP/1.1" 200') >= 2, log[-2000:]


def test_models_alias_unalias_export_and_rm(cli_stack, tmp_path):
    """QA: the CLI could list and show models but not pin, export or delete them."""
    stack, api = cli_stack
    models_dir = stack.settings().models_dir
    first = make_model_checkpoint(models_dir, "mnist_lenet5", seed=11)
    second = make_model_checkpoint(models_dir, "mnist_lenet5", seed=12)
    pinned = imgclf(api.url, "models", "alias", first, "canary")
    assert pinned.returncode == 0, pinned.stderr
    assert pinned.stdout.strip() == f"mnist_lenet5 canary -> {first}"
    moved = imgclf(api.url, "models", "alias", second, "canary")
    assert moved.stdout.strip() == f"mnist_lenet5 canary -> {second} (was {first})"
    assert httpx.get(f"{api.url}/models/{second}").json()["aliases"] == ["canary"]

    onnx_file = tmp_path / "lenet.onnx"
    exported = imgclf(api.url, "models", "export", second, "-o", str(onnx_file))
    assert exported.returncode == 0, exported.stderr
    assert onnx_file.read_bytes() == httpx.get(f"{api.url}/models/{second}/export").content
    assert exported.stdout.strip() == f"{onnx_file}: {onnx_file.stat().st_size:,} bytes"
    archive = imgclf(
        api.url, "models", "export", second, "--format", "safetensors", "-o", str(tmp_path / "w.zip")
    )
    assert archive.returncode == 0 and zipfile.is_zipfile(tmp_path / "w.zip"), archive.stderr
    missing = imgclf(api.url, "models", "export", "mnist_lenet5-nope", "-o", str(tmp_path / "none.onnx"))
    assert missing.returncode == 1 and "404" in missing.stderr
    nowhere = imgclf(api.url, "models", "export", second, "-o", str(tmp_path / "no" / "such" / "x.onnx"))
    assert nowhere.returncode == 1 and nowhere.stderr.startswith(
        f"error: cannot write {tmp_path}/no/such/x.onnx"
    )
    no_traceback(nowhere)  # QA: a traceback
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lenet.onnx", "w.zip"]  # nothing half-written

    refused = imgclf(api.url, "models", "rm", second)
    assert refused.returncode == 1 and "carries the alias(es) canary" in refused.stderr
    assert "imgclf models alias ID ALIAS" in refused.stderr
    removed = imgclf(api.url, "models", "unalias", second, "canary")
    assert removed.returncode == 0 and removed.stdout.strip() == f"alias canary removed from {second}"
    for model_id in (first, second):
        deleted = imgclf(api.url, "models", "rm", model_id)
        assert deleted.returncode == 0 and deleted.stdout.strip() == f"model {model_id} deleted"
        assert httpx.get(f"{api.url}/models/{model_id}").status_code == 404
    no_traceback(refused)
