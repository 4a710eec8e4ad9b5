"""Real photos uploaded as datasets, trained as custom_resnet18 through the API, predicted.

* hymenoptera_data.zip re-packed as an upload in both layouts. With ``train/`` + ``val/`` and the
  same hyperparameters and seed as a ``hymenoptera_resnet18`` job (weights none, a 32-image
  subset, one epoch), the upload must train to the same numbers as the built-in task: the same
  pixels, order, subset and initialisation. With ``<class>/`` folders the split is made here
  (stratified 80/20, seeded); the model is trained and real val images are predicted by its id.
* Three CIFAR-10 classes re-packed as ``<class>/*.png`` of mixed sizes and modes (L, RGBA,
  upscaled, upper-case ``.PNG``), trained for one epoch.
"""

from __future__ import annotations

import zipfile

import pytest

from bench.data import repack_hymenoptera
from tests.conftest import Stack, WorkerProcess, api_client, wait_for_status
from tests.factories_datasets import cifar_mixed_modes
from tests.integration.test_datasets import upload, wait_dataset

pytestmark = [pytest.mark.realdata, pytest.mark.integration]

QUICK = {"epochs": 1, "max_train_samples": 32, "weights": "none", "seed": 0}


@pytest.fixture(scope="module")
def stack_and_worker(tmp_path_factory, redis_url, real_data_dir):
    root = tmp_path_factory.mktemp("uploads")
    stack = Stack(root, redis_url, data_dir=real_data_dir, datasets_dir=root / "datasets")
    worker = WorkerProcess(stack).start()
    yield stack, worker
    worker.stop()
    stack.cleanup_redis()


def train(client, body: dict, worker) -> dict:
    response = client.post("/jobs", json=body)
    assert response.status_code == 202, response.text
    job = wait_for_status(client, response.json()["id"], {"succeeded", "failed"}, timeout=600)
    assert job["status"] == "succeeded", f"{job['error']}\n{worker.log()[-3000:]}"
    return job


def test_hymenoptera_uploaded_as_train_val_trains_exactly_like_the_builtin_task(
    stack_and_worker, real_data_dir
):
    stack, worker = stack_and_worker
    archive = repack_hymenoptera(real_data_dir / "hymenoptera_data.zip", "train_val")
    with api_client(stack) as client:
        dataset = wait_dataset(client, upload(client, archive, "hymenoptera-photos.zip").json()["id"], 300)
        assert dataset["status"] == "ready", dataset
        assert dataset["layout"] == "train_val" and dataset["classes"] == ["ants", "bees"]
        assert dataset["counts"] == {"train": {"ants": 123, "bees": 121}, "val": {"ants": 70, "bees": 83}}
        assert [s["reason"] for s in dataset["skipped"]] == [
            ".gif files are not read (ImageFolder's: .jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp)"
        ]
        builtin = train(client, {"task": "hymenoptera_resnet18", "hyperparameters": QUICK}, worker)
        custom = train(
            client, {"task": "custom_resnet18", "dataset": dataset["id"], "hyperparameters": QUICK}, worker
        )
    ours, theirs = custom["metrics"][0], builtin["metrics"][0]
    print(f"\nhymenoptera_resnet18 {theirs}\ncustom_resnet18      {ours}")
    assert abs(ours["val_accuracy"] - theirs["val_accuracy"]) <= 1 / 153 + 1e-9, (ours, theirs)
    assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-4), (ours, theirs)
    assert ours["train_accuracy"] == theirs["train_accuracy"]


def test_hymenoptera_uploaded_as_class_folders_is_split_trained_and_predicted(
    stack_and_worker, real_data_dir
):
    stack, worker = stack_and_worker
    source = real_data_dir / "hymenoptera_data.zip"
    with api_client(stack) as client:
        dataset = wait_dataset(
            client, upload(client, repack_hymenoptera(source, "class_folders")).json()["id"], 300
        )
        assert dataset["status"] == "ready", dataset
        assert dataset["layout"] == "class_folders"
        assert dataset["split"] == {"method": "stratified", "val_fraction": 0.2, "seed": 0}
        # 193 ants and 204 bees: 20 % of each goes to val
        assert dataset["counts"] == {"train": {"ants": 154, "bees": 163}, "val": {"ants": 39, "bees": 41}}
        job = train(
            client, {"task": "custom_resnet18", "dataset": dataset["id"], "hyperparameters": QUICK}, worker
        )
        model_id = job["model_id"]
        assert model_id.startswith("custom_resnet18-")
        model = client.get(f"/models/{model_id}").json()
        assert model["classes"] == ["ants", "bees"]
        with zipfile.ZipFile(source) as zf:
            names = [n for n in zf.namelist() if "/val/" in n and n.endswith(".jpg")][::15]
            for name in names:
                response = client.post(
                    "/predict", files={"file": (name, zf.read(name))}, data={"model_id": model_id}
                )
                assert response.status_code == 200, response.text
                body = response.json()
                assert body["model_id"] == model_id
                assert {p["label"] for p in body["predictions"]} == {"ants", "bees"}
                assert sum(p["probability"] for p in body["predictions"]) == pytest.approx(1, abs=1e-5)


def test_three_cifar10_classes_of_mixed_modes_and_sizes_train_for_one_epoch(stack_and_worker, real_data_dir):
    stack, worker = stack_and_worker
    classes = ("cat", "ship", "truck")
    archive = cifar_mixed_modes(real_data_dir / "cifar10-jpg.zip", classes, per_class=40)
    with api_client(stack) as client:
        dataset = wait_dataset(client, upload(client, archive, "cifar3.zip").json()["id"], 300)
        assert dataset["status"] == "ready", dataset
        assert dataset["classes"] == list(classes) and dataset["skipped_count"] == 0
        assert dataset["images"] == {"train": 96, "val": 24}
        job = train(
            client,
            {
                "task": "custom_resnet18",
                "dataset": dataset["id"],
                "hyperparameters": {"epochs": 1, "weights": "none", "augment": True},
            },
            worker,
        )
        assert 0 <= job["metrics"][0]["val_accuracy"] <= 1
        assert client.get(f"/models/{job['model_id']}").json()["classes"] == list(classes)
