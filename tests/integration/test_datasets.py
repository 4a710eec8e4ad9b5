"""Uploaded datasets against the real Redis and a real worker: upload, ingestion, dedupe, listing,
deletion, bad requests, and hostile archives (each with its documented outcome, nothing left on
disk, API and worker still healthy)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import resource
import shutil
import signal
import time
from urllib.parse import unquote

import pytest
from PIL import Image

from core.datasets import (
    AttachOutcome,
    AttachResult,
    DatasetRecord,
    DatasetStatus,
    DatasetStore,
    DeleteOutcome,
    DeleteResult,
    UpdateOutcome,
    ingest_folder,
    utcnow,
)
from core.jobs import JobStore, redis_client
from tests.conftest import api_client, wait_for, wait_for_status
from tests.factories_datasets import (
    class_images,
    device_entry,
    gzip_bomb_tar,
    link_entry,
    many_entries_zip,
    overlapping_zip_bomb,
    tar_bytes,
    zip_bytes,
    zip_symlink,
    zip_with_huge_entry,
)
from tests.factories_models import make_model_checkpoint
from worker import ingest

pytestmark = pytest.mark.integration


def upload(client, data: bytes, filename: str = "photos.zip", **form):
    return client.post("/datasets", files={"file": (filename, data)}, data=form)


def wait_dataset(client, dataset_id: str, timeout: float = 120) -> dict:
    def done():
        record = client.get(f"/datasets/{dataset_id}").json()
        return record if record["status"] != "ingesting" else None

    return wait_for(done, timeout, interval=0.2, what=f"dataset {dataset_id} to be ingested")


def dataset_files(stack) -> list[str]:
    """Files under the datasets folder; os.walk skips folders the worker removes while we look."""
    root = stack.settings().datasets_dir
    found = (os.path.join(folder, name) for folder, _, names in os.walk(root) for name in names)
    return sorted(os.path.relpath(path, root) for path in found)


def queue_key(stack) -> str:
    """The Redis list of the stack's Celery queue (ingestion and training messages)."""
    return f"{stack.env['REDIS_PREFIX']}:celery:{stack.env['CELERY_QUEUE']}"


def test_upload_ingest_same_bytes_same_dataset_list_and_delete(make_stack, start_worker, tmp_path):
    stack = make_stack(datasets_dir=tmp_path / "datasets")
    start_worker(stack)
    archive = zip_bytes(class_images({"cats": 10, "dogs": 10, "birds": 5}))
    with api_client(stack) as client:
        response = upload(client, archive, "pets.zip")
        assert response.status_code == 202, response.text
        first = response.json()
        assert first["id"] == hashlib.sha256(archive).hexdigest()[:32]
        assert first["status"] == "ingesting" and first["name"] == "pets" and first["format"] == "zip"
        assert response.headers["location"] == f"/datasets/{first['id']}"
        record = wait_dataset(client, first["id"])
        assert record["status"] == "ready", record
        assert record["classes"] == ["birds", "cats", "dogs"]
        assert record["layout"] == "class_folders"
        assert record["split"] == {"method": "stratified", "val_fraction": 0.2, "seed": 0}
        assert record["counts"] == {
            "train": {"birds": 4, "cats": 8, "dogs": 8},
            "val": {"birds": 1, "cats": 2, "dogs": 2},
        }
        assert record["images"] == {"train": 20, "val": 5}
        assert record["skipped"] == [] and record["duplicates"]["train_val"] == 0
        assert record["preset"]["resize"] == 256 and record["preset"]["crop"] == 224
        # the archive is gone, the decoded cache stays: 25 images of 3x224x224 bytes
        assert dataset_files(stack) == [f"{first['id']}/images.safetensors"]
        cache = stack.settings().datasets_dir / first["id"] / "images.safetensors"
        assert cache.stat().st_size > 25 * 3 * 224 * 224

        again = upload(client, archive, "other-name.zip", name="ignored")
        assert again.status_code == 200 and again.json()["id"] == first["id"]
        assert again.json()["name"] == "pets"

        listing = client.get("/datasets").json()
        ids = [d["id"] for d in listing["data"]]
        assert ids == ["cifar10", "mnist", "hymenoptera", first["id"]] and listing["count"] == 4
        assert listing["data"][2]["builtin"] and listing["data"][2]["classes"] == ["ants", "bees"]

        assert client.delete(f"/datasets/{first['id']}").status_code == 204
        assert client.get(f"/datasets/{first['id']}").status_code == 404
        assert client.delete(f"/datasets/{first['id']}").status_code == 404
        assert dataset_files(stack) == []


def test_store_outcomes_of_update_attach_and_delete(stack):
    """``DatasetStore`` against the real Redis: each outcome, and the job that holds a dataset."""
    settings = stack.settings()
    client = redis_client(settings.redis_url, 2.0)
    datasets, jobs = DatasetStore(client, settings.redis_prefix), JobStore(client, settings.redis_prefix)
    jobs_prefix = f"{settings.redis_prefix}:job:"
    record = DatasetRecord(id="a" * 32, name="pets", status=DatasetStatus.ingesting)
    datasets.create(record)
    assert datasets.attach_job(record.id, "j" * 32) == AttachResult(
        outcome=AttachOutcome.not_ready, status=DatasetStatus.ingesting
    )
    ready = record.model_copy(update={"status": DatasetStatus.ready})
    assert datasets.update(ready) is UpdateOutcome.ok
    assert datasets.update(ready) is UpdateOutcome.status_changed  # no longer ingesting
    job, _ = jobs.create("custom_resnet18", {}, dataset=record.id)
    assert datasets.attach_job(record.id, job.id) == AttachResult(outcome=AttachOutcome.ok)
    in_use = DeleteResult(outcome=DeleteOutcome.in_use, job_ids=[job.id])
    assert datasets.delete(record.id, jobs_prefix) == in_use
    other, _ = jobs.create("custom_resnet18", {}, dataset=record.id)
    assert datasets.attach_job(record.id, other.id) == AttachResult(outcome=AttachOutcome.ok)
    both = DeleteResult(outcome=DeleteOutcome.in_use, job_ids=sorted([job.id, other.id]))
    assert datasets.delete(record.id, jobs_prefix) == both  # every job that holds it is named
    jobs.request_cancel(other.id)
    jobs.request_cancel(job.id)  # queued: cancelled at once, so it no longer holds the dataset
    assert datasets.delete(record.id, jobs_prefix) == DeleteResult(outcome=DeleteOutcome.deleted)
    assert datasets.delete(record.id, jobs_prefix) == DeleteResult(outcome=DeleteOutcome.missing)
    assert datasets.update(ready) is UpdateOutcome.missing
    assert datasets.attach_job(record.id, job.id) == AttachResult(outcome=AttachOutcome.missing)


def test_a_dataset_deleted_while_its_files_are_read_ends_missing_without_an_error(
    stack, tmp_path, monkeypatch, caplog
):
    """DELETE removes the files under the worker's feet: its next read fails before its next
    progress write notices. That is a deletion (info), not a failed ingestion (error)."""
    settings = stack.settings().model_copy(update={"datasets_dir": tmp_path / "datasets"})
    client = redis_client(settings.redis_url, 2.0)
    datasets = DatasetStore(client, settings.redis_prefix)
    record = DatasetRecord(id="d" * 32, name="gone", status=DatasetStatus.ingesting, created_at=utcnow())
    datasets.create(record)
    ingest_folder(tmp_path / "datasets", record).mkdir(parents=True)

    def deleted_meanwhile(folder, settings, progress):
        datasets.delete(record.id, f"{settings.redis_prefix}:job:")
        shutil.rmtree(folder)
        raise FileNotFoundError(2, "No such file or directory", str(folder / "upload.bin"))

    monkeypatch.setattr(ingest, "build_dataset", deleted_meanwhile)
    with caplog.at_level(logging.INFO, logger=ingest.__name__):
        assert ingest.ingest_dataset(record.id, settings) == "missing"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert "deleted while ingesting" in caplog.text
    assert datasets.get(record.id) is None and not ingest_folder(tmp_path / "datasets", record).exists()


def test_an_ingestion_superseded_by_a_new_upload_of_the_same_bytes_leaves_it_alone(
    stack, tmp_path, monkeypatch
):
    """QA: DELETE while ingesting, then the same archive uploaded again under another name: the
    first ingestion failed on its removed files, marked the new upload failed under the old name
    and removed its archive. Now each upload has its own folder and the first ingestion's writes
    are refused: it stops, and the second upload ingests under its own name."""
    settings = stack.settings().model_copy(update={"datasets_dir": tmp_path / "datasets"})
    datasets = DatasetStore(redis_client(settings.redis_url, 2.0), settings.redis_prefix)
    archive = zip_bytes(class_images({"a": 2, "b": 2}))
    first = DatasetRecord(id="e" * 32, name="r1", status=DatasetStatus.ingesting, created_at=utcnow())
    datasets.create(first)
    ingest_folder(settings.datasets_dir, first).mkdir(parents=True)
    (ingest_folder(settings.datasets_dir, first) / "upload").write_bytes(archive)
    second = first.model_copy(update={"name": "r2", "created_at": utcnow()})
    real_build = ingest.build_dataset

    def superseded_meanwhile(folder, settings, progress):  # DELETE, then the same bytes again
        datasets.delete(first.id, f"{settings.redis_prefix}:job:")
        datasets.create(second)
        ingest_folder(settings.datasets_dir, second).mkdir(parents=True)
        (ingest_folder(settings.datasets_dir, second) / "upload").write_bytes(archive)
        shutil.rmtree(folder)  # as the DELETE does
        return real_build(folder, settings, progress)

    monkeypatch.setattr(ingest, "build_dataset", superseded_meanwhile)
    assert ingest.ingest_dataset(first.id, settings) == "missing"
    stored = datasets.get(first.id)
    assert (stored.name, stored.status, stored.error) == ("r2", DatasetStatus.ingesting, None)
    assert (ingest_folder(settings.datasets_dir, second) / "upload").read_bytes() == archive
    monkeypatch.setattr(ingest, "build_dataset", real_build)
    assert ingest.ingest_dataset(first.id, settings) == "ready"
    stored = datasets.get(first.id)
    assert (stored.name, stored.status, stored.images) == ("r2", DatasetStatus.ready, {"train": 2, "val": 2})
    assert sorted(os.listdir(settings.datasets_dir / first.id)) == ["images.safetensors"]
    assert os.listdir(settings.datasets_dir / ".ingest") == []


def test_the_dataset_list_is_paged_built_ins_first_then_uploads_newest_first(stack):
    settings = stack.settings()
    datasets = DatasetStore(redis_client(settings.redis_url, 2.0), settings.redis_prefix)
    ids = [f"{i:x}" * 32 for i in range(1, 6)]  # created oldest first
    for dataset_id in ids:
        datasets.create(DatasetRecord(id=dataset_id, name="paged", status=DatasetStatus.ingesting))
        time.sleep(0.01)
    newest_first = ids[::-1]
    with api_client(stack) as client:
        everything = client.get("/datasets").json()
        assert [d["id"] for d in everything["data"]] == ["cifar10", "mnist", "hymenoptera", *newest_first]
        assert everything["count"] == 8
        page = client.get("/datasets", params={"offset": 2, "limit": 3}).json()
        assert [d["id"] for d in page["data"]] == ["hymenoptera", *newest_first[:2]] and page["count"] == 8
        tail = client.get("/datasets", params={"offset": 6, "limit": 50}).json()
        assert [d["id"] for d in tail["data"]] == newest_first[3:]
        assert client.get("/datasets", params={"offset": 8}).json() == {"data": [], "count": 8}
        assert client.get("/datasets", params={"limit": 201}).status_code == 422


def test_bad_upload_requests_are_refused_and_leave_nothing(stack, tmp_path):
    stack.update(datasets_dir=tmp_path / "datasets", max_dataset_bytes=100_000)
    good = zip_bytes(class_images({"a": 2, "b": 2}))
    with api_client(stack) as client:
        cases = [
            (client.post("/datasets", content=good, headers={"content-type": "application/zip"}), 415),
            (client.post("/datasets", data={"name": "x"}, files={"other": ("x", b"x")}), 422),
            (client.post("/datasets", files={"file": ("a.zip", good), "file2": ("b", b"x")}), 422),
            (client.post("/datasets", files=[("file", ("a.zip", good)), ("file", ("b.zip", good))]), 422),
            (client.post("/datasets", data={"name": "only a name"}, files={}), 415),
            (upload(client, b""), 400),
            (upload(client, b"just some text, not an archive"), 415),
            (upload(client, good + bytes(200_000)), 413),  # refused from Content-Length
            (upload(client, good + bytes(120_000)), 413),  # counted while streaming
            (client.get("/datasets/not-an-id"), 422),
            (client.get("/datasets/" + "0" * 32), 404),
            (client.delete("/datasets/hymenoptera"), 409),
        ]
        for response, status in cases:
            assert response.status_code == status, (status, response.text)
            assert response.json()["detail"]
        assert client.get("/datasets").json()["count"] == 3  # only the built-in ones
    assert dataset_files(stack) == []


def test_hostile_archives_get_their_documented_outcome(make_stack, start_worker, tmp_path):
    stack = make_stack(datasets_dir=tmp_path / "datasets")
    worker = start_worker(stack)
    good = class_images({"cats": 3, "dogs": 3})
    failed, ready = "failed", "ready"
    cases = {
        "zip slip": (zip_bytes({**good, "../../evil.png": b"x"}), failed, "'..' would escape"),
        "absolute path": (zip_bytes({**good, "/etc/evil.png": b"x"}), failed, "absolute path"),
        "drive letter": (zip_bytes({**good, "C:/evil.png": b"x"}), failed, "drive letter"),
        "tar symlink and hard link": (
            tar_bytes(
                good, special=[link_entry("cats/l.png", "/etc/passwd"), link_entry("dogs/h.png", "x", True)]
            ),
            ready,
            "symlink entry",
        ),
        "zip symlink": (zip_symlink(good, "cats/link.png", "/etc/passwd"), ready, "symlink entry"),
        "1 MB inflating to 1 GiB": (zip_with_huge_entry(good, "cats/huge.png"), ready, "compression ratio"),
        "overlapping entries": (overlapping_zip_bomb(), failed, "overlap"),
        "gzip bomb": (gzip_bomb_tar(good), failed, "gzip bomb"),
        "100,000 entries": (many_entries_zip(100_000), failed, "100000 entries, over the limit"),
        "nested zip": (zip_bytes({**good, "cats/inner.zip": zip_bytes(good)}), ready, "nested archive"),
        "junk and non-images": (
            zip_bytes(
                {
                    **good,
                    "__MACOSX/cats/._000.png": b"x",
                    "cats/.DS_Store": b"x",
                    "Thumbs.db": b"x",
                    "dogs/desktop.ini": b"x",
                    "cats/readme.txt": b"hello",
                    "dogs/fake.png": b"not a png",
                }
            ),
            ready,
            "not an image",
        ),
        "class with one image": (
            zip_bytes({**class_images({"cats": 3}), "dogs/0.png": good["dogs/000.png"]}),
            failed,
            "class 'dogs' has 1 usable image",
        ),
        "tar.gz with a device": (
            tar_bytes(good, special=[device_entry("cats/null.png")]),
            ready,
            "device entry",
        ),
        "truncated zip": (zip_bytes(good)[:3000], failed, "truncated"),
        "truncated tar.gz": (tar_bytes(good)[:3000], failed, "truncated"),
        "one class": (zip_bytes(class_images({"cats": 4})), failed, "at least 2 class folders"),
    }
    with api_client(stack) as client:
        ids = {}
        for name, (data, _, _) in cases.items():
            response = upload(client, data, "x.tar.gz" if data[:2] == b"\x1f\x8b" else "x.zip")
            assert response.status_code == 202, (name, response.text)
            ids[name] = response.json()["id"]
        for name, (_, status, words) in cases.items():
            record = wait_dataset(client, ids[name], timeout=180)
            assert record["status"] == status, (name, record)
            if status == failed:
                assert words in record["error"], (name, record["error"])
                assert not (stack.settings().datasets_dir / ids[name]).exists(), name
            else:
                reasons = " | ".join(s["reason"] for s in record["skipped"])
                assert words in reasons, (name, reasons)
                assert record["classes"] == ["cats", "dogs"] and record["images"] == {"train": 4, "val": 2}
                assert dataset_files(stack).count(f"{ids[name]}/images.safetensors") == 1
        junk = client.get(f"/datasets/{ids['junk and non-images']}").json()
        assert junk["ignored_count"] == 4 and junk["skipped_count"] == 2
        # nothing but the ready datasets' caches is left; the API and the worker still work
        ready_ids = {ids[n] for n, c in cases.items() if c[1] == ready}
        assert dataset_files(stack) == sorted(f"{i}/images.safetensors" for i in ready_ids)
        assert client.get("/readyz").json()["workers"]
        assert worker.process.poll() is None
        # a job on a failed dataset is refused before anything is stored or enqueued
        queue = stack.redis().llen(queue_key(stack))
        for name in ("zip slip", "one class"):
            refused = submit_custom(client, ids[name], epochs=1, weights="none")
            assert refused.status_code == 422, refused.text
            assert (
                f"dataset {ids[name]} is failed, not ready: GET /datasets/{ids[name]} says why"
                in (refused.json()["detail"])
            )
        assert client.get("/jobs").json()["count"] == 0
        assert stack.redis().llen(queue_key(stack)) == queue
        after = upload(client, zip_bytes(class_images({"x": 2, "y": 2})))
        assert wait_dataset(client, after.json()["id"])["status"] == ready


def _limit_file_size() -> None:
    """Writes beyond 2 MB fail with EFBIG, like a full disk (SIGXFSZ ignored so write() errors)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20))


def test_disk_full_while_ingesting_fails_cleanly(make_stack, start_worker, tmp_path):
    stack = make_stack(datasets_dir=tmp_path / "datasets")
    worker = start_worker(stack, preexec=_limit_file_size)
    archive = zip_bytes(class_images({"a": 12, "b": 12}))  # 24 x 150 KB decoded: over 2 MB
    with api_client(stack) as client:
        dataset_id = upload(client, archive).json()["id"]
        record = wait_dataset(client, dataset_id)
        assert record["status"] == "failed" and "disk full" in record["error"], record
        assert dataset_files(stack) == []
        time.sleep(0.2)
        assert worker.process.poll() is None
        # the same bytes again: a failed dataset is retried (and fails the same way here)
        assert upload(client, archive).status_code == 202
        assert wait_dataset(client, dataset_id)["status"] == "failed"


def test_disk_full_while_receiving_the_upload_is_507_and_leaves_no_part_file(make_stack, tmp_path):
    stack = make_stack(datasets_dir=tmp_path / "datasets")
    archive = zip_bytes({**class_images({"a": 2, "b": 2}), "a/filler.bin": os.urandom(300_000)})
    assert len(archive) > 256 << 10
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    with api_client(stack) as client:
        resource.setrlimit(resource.RLIMIT_FSIZE, (128 << 10, hard))  # this process: the API's
        try:
            response = upload(client, archive)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, previous)
        assert response.status_code == 507, response.text
        assert "could not store the upload" in response.json()["detail"]
        assert client.get("/datasets").json()["count"] == 3  # the built-in ones only
    leftovers = [p for p in (tmp_path / "datasets").rglob("*") if p.is_file()]
    assert leftovers == [], leftovers


# Training on an uploaded dataset -------------------------------------------------------------


def assert_png(response, size: tuple[int, int] | None = None) -> None:
    """A 200 answer whose body is a PNG image (of ``size`` when given)."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.content.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "PNG"
    if size is not None:
        assert image.size == size


def submit_custom(client, dataset_id: str, **hyperparameters):
    return client.post(
        "/jobs",
        json={"task": "custom_resnet18", "dataset": dataset_id, "hyperparameters": hyperparameters},
    )


def test_a_job_on_an_ingesting_dataset_is_refused_before_enqueue(stack, tmp_path):
    stack.update(datasets_dir=tmp_path / "datasets")
    with api_client(stack) as client:  # no worker: the dataset stays ingesting
        dataset_id = upload(client, zip_bytes(class_images({"a": 2, "b": 2}))).json()["id"]
        assert client.get(f"/datasets/{dataset_id}").json()["status"] == "ingesting"
        assert stack.redis().llen(queue_key(stack)) == 1  # its ingestion message
        for hyperparameters in ({"epochs": 1, "weights": "none"}, {}):
            refused = submit_custom(client, dataset_id, **hyperparameters)
            assert refused.status_code == 422, refused.text
            detail = refused.json()["detail"]
            assert detail == (
                f"dataset {dataset_id} is ingesting, not ready: "
                f"wait for GET /datasets/{dataset_id} to say ready"
            )
        keyed = client.post(
            "/jobs",
            json={"task": "custom_resnet18", "dataset": dataset_id, "hyperparameters": {}},
            headers={"Idempotency-Key": "k-ingesting"},
        )
        assert keyed.status_code == 422 and "ingesting, not ready" in keyed.text
        assert client.get("/jobs").json() == {"data": [], "count": 0}
        assert stack.redis().llen(queue_key(stack)) == 1
        # no job was attached to it: it can still be deleted
        assert client.delete(f"/datasets/{dataset_id}").status_code == 204


def test_custom_resnet18_trains_on_an_upload_and_predicts_its_classes(make_stack, start_worker, tmp_path):
    stack = make_stack(datasets_dir=tmp_path / "datasets")
    worker = start_worker(stack)
    images = class_images({"red": 12, "green": 12, "blue": 12}, size=64)
    with api_client(stack) as client:
        dataset_id = upload(client, zip_bytes(images)).json()["id"]
        assert wait_dataset(client, dataset_id)["status"] == "ready"
        quick = {"epochs": 1, "batch_size": 8, "max_train_samples": 16, "weights": "none"}
        response = submit_custom(client, dataset_id, augment=True, **quick)
        assert response.status_code == 202, response.text
        assert response.json()["dataset"] == dataset_id
        job = wait_for_status(client, response.json()["id"], {"succeeded", "failed"}, timeout=300)
        assert job["status"] == "succeeded", job["error"]
        model = client.get(f"/models/{job['model_id']}").json()
        assert model["task"] == "custom_resnet18" and model["classes"] == ["blue", "green", "red"]
        stored = stack.settings().models_dir / job["model_id"] / "metadata.json"
        metadata = json.loads(stored.read_text())
        assert metadata["dataset"] == dataset_id and metadata["augment"] is True
        assert metadata["preset"]["task"] == "custom_resnet18" and metadata["preset"]["crop"] == 224
        predicted = client.post(
            "/predict", files={"file": ("x.png", images["red/000.png"])}, data={"model_id": job["model_id"]}
        ).json()
        assert {p["label"] for p in predicted["predictions"]} == {"blue", "green", "red"}
        # the evaluation names the uploaded dataset, so the console finds the mistakes' images
        evaluation = model["evaluation"]
        assert evaluation["dataset"] == dataset_id and sum(map(sum, evaluation["confusion_matrix"])) > 0
        shown = client.get(f"/datasets/{dataset_id}/images/val/0")
        assert shown.status_code == 200 and shown.headers["content-type"] == "image/png", shown.text
        assert Image.open(io.BytesIO(shown.content)).size == (224, 224)
        assert unquote(shown.headers["x-class"]) in {"blue", "green", "red"}
        grid = client.get(f"/datasets/{dataset_id}/samples.png", params={"n": 4})
        assert grid.status_code == 200 and Image.open(io.BytesIO(grid.content)).format == "PNG"
        assert client.get(f"/datasets/{dataset_id}/images/val/100000").status_code == 404
        assert client.get(f"/datasets/{dataset_id}/images/test/0").status_code == 404
        # the custom model's figures: every val image of the dataset is shown (as a mistake or not)
        assert_png(client.get(f"/models/{job['model_id']}/confusion.png"))
        assert_png(client.get(f"/jobs/{job['id']}/curves.png"))
        val_size = client.get(f"/datasets/{dataset_id}").json()["images"]["val"]
        assert val_size == sum(map(sum, evaluation["confusion_matrix"]))
        for index in range(val_size):
            assert_png(client.get(f"/datasets/{dataset_id}/images/val/{index}"), size=(224, 224))

        # from that checkpoint (same classes: its fc is kept), in feature-extraction mode
        follow = submit_custom(
            client,
            dataset_id,
            **{**quick, "weights": f"model:{job['model_id']}", "mode": "feature_extraction"},
        )
        assert follow.status_code == 202, follow.text
        second = wait_for_status(client, follow.json()["id"], {"succeeded", "failed"}, timeout=300)
        assert second["status"] == "succeeded", second["error"]
        assert second["weights"].startswith(f"model:{job['model_id']}")
        assert_png(client.get(f"/models/{second['model_id']}/confusion.png"))
        assert_png(client.get(f"/jobs/{second['id']}/curves.png"))
        by_dataset = client.post(
            "/predict", files={"file": ("x.png", images["red/000.png"])}, data={"dataset": dataset_id}
        )
        assert by_dataset.status_code == 200 and by_dataset.json()["model_id"] == second["model_id"]

        # refused before anything is enqueued
        lenet = make_model_checkpoint(stack.settings().models_dir, "mnist_lenet5")
        before = client.get("/jobs").json()["count"]
        refused = [
            (submit_custom(client, "0" * 32, **quick), "no dataset"),
            (submit_custom(client, "not-an-id"), "dataset"),
            (submit_custom(client, dataset_id, weights="model:no-such-model"), "no-such-model"),
            (submit_custom(client, dataset_id, weights=f"model:{lenet}"), "not ResNet18"),
            (submit_custom(client, dataset_id, weights="model:../x"), "weights"),
            (submit_custom(client, dataset_id, augment=True, mode="feature_extraction"), "augment"),
            (client.post("/jobs", json={"task": "custom_resnet18"}), "dataset"),
            (client.post("/jobs", json={"task": "mnist_lenet5", "dataset": dataset_id}), "dataset"),
        ]
        for response, words in refused:
            assert response.status_code == 422, response.text
            assert words in response.text
        red = ("x.png", images["red/000.png"])
        mismatch = client.post(
            "/predict", files={"file": red}, data={"dataset": dataset_id, "model_id": lenet}
        )
        assert mismatch.status_code == 422 and "not trained on dataset" in mismatch.text
        unknown = client.post("/predict", files={"file": red}, data={"dataset": "f" * 32})
        assert unknown.status_code == 404, unknown.text
        assert f"no model trained on dataset {'f' * 32}: GET /datasets/{'f' * 32}" in unknown.json()["detail"]
        assert client.get("/jobs").json()["count"] == before

        # a dataset in use by a queued job cannot be deleted
        worker.stop()
        queued = submit_custom(client, dataset_id, **quick).json()
        conflict = client.delete(f"/datasets/{dataset_id}")
        assert conflict.status_code == 409 and queued["id"] in conflict.json()["detail"]
        assert client.post(f"/jobs/{queued['id']}/cancel").status_code == 202
        assert client.delete(f"/datasets/{dataset_id}").status_code == 204
        assert submit_custom(client, dataset_id, **quick).status_code == 422
        # its models stay
        assert client.get(f"/models/{job['model_id']}").status_code == 200


def test_an_ingesting_dataset_can_be_deleted_and_a_stalled_one_is_queued_again(
    make_stack, start_worker, tmp_path, monkeypatch
):
    import core.datasets

    stack = make_stack(datasets_dir=tmp_path / "datasets")
    first = zip_bytes(class_images({"a": 2, "b": 2}))
    second = zip_bytes(class_images({"a": 3, "b": 3}))
    with api_client(stack) as client:  # no worker yet: both stay ingesting
        doomed = upload(client, first).json()["id"]
        assert client.delete(f"/datasets/{doomed}").status_code == 204
        assert client.get(f"/datasets/{doomed}").status_code == 404
        stalled = upload(client, second).json()["id"]
        assert upload(client, second).status_code == 200  # fresh: the queued message will do
        monkeypatch.setattr(core.datasets, "STALE_INGESTION_S", -1)
        assert upload(client, second).status_code == 202  # stalled: queued again
        start_worker(stack)
        assert wait_dataset(client, stalled)["status"] == "ready"
        time.sleep(1)  # the second message finds it ready and does nothing
        assert client.get(f"/datasets/{stalled}").json()["images"] == {"train": 4, "val": 2}
    assert dataset_files(stack) == [f"{stalled}/images.safetensors"]
