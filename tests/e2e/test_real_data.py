"""Each task trained briefly through the API on the real datasets, then real test images predicted.

* LeNet-5: one epoch on all 60,000 MNIST images; >= 90 of the first 100 test digits right.
* Dense net: one epoch on all 50,000 CIFAR-10 JPEGs (decoded cold); clearly above chance (10 %)
  on 300 test images.
* ResNet18 (weights none, 64 training images, one epoch): cannot beat chance from random init,
  so instead every val image is sent to /predict and the answers must reproduce the job's own
  val accuracy exactly: serving preprocessing == evaluation preprocessing.
"""

from __future__ import annotations

import zipfile

import pytest
from PIL import Image
from torchvision.datasets.mnist import read_image_file, read_label_file

from tests.conftest import Stack, WorkerProcess, api_client, wait_for_status
from tests.factories import image_bytes

pytestmark = [pytest.mark.realdata, pytest.mark.integration]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, redis_url, real_data_dir):
    stack = Stack(tmp_path_factory.mktemp("realdata"), redis_url, data_dir=real_data_dir)
    worker = WorkerProcess(stack).start()
    jobs = {
        "mnist_lenet5": {"epochs": 1},
        "cifar10_dense": {"epochs": 1},
        "hymenoptera_resnet18": {"epochs": 1, "max_train_samples": 64, "weights": "none"},
    }
    with api_client(stack) as client:
        ids = {}
        for task, hp in jobs.items():
            response = client.post("/jobs", json={"task": task, "hyperparameters": hp})
            assert response.status_code == 202, response.text
            ids[task] = response.json()["id"]
        done = {
            task: wait_for_status(client, job_id, {"succeeded", "failed"}, timeout=900)
            for task, job_id in ids.items()
        }
    worker.stop()
    for task, job in done.items():
        assert job["status"] == "succeeded", f"{task}: {job['error']}\n{worker.log()[-3000:]}"
    yield stack, done
    stack.cleanup_redis()


def predict_top1(client, data: bytes, model_id: str, name: str = "image") -> str:
    response = client.post("/predict", files={"file": (name, data)}, data={"model_id": model_id, "top_k": 1})
    assert response.status_code == 200, response.text
    return response.json()["predictions"][0]["label"]


def test_lenet5_one_epoch_gets_90_of_100_test_digits(trained, real_data_dir):
    stack, done = trained
    job = done["mnist_lenet5"]
    assert job["metrics"][0]["test_accuracy"] > 0.95
    raw = real_data_dir / "MNIST" / "raw"
    images = read_image_file(str(raw / "t10k-images-idx3-ubyte"))[:100]
    labels = read_label_file(str(raw / "t10k-labels-idx1-ubyte"))[:100]
    with api_client(stack) as client:
        right = sum(
            predict_top1(client, image_bytes(Image.fromarray(image.numpy()), "PNG"), job["model_id"])
            == str(label.item())
            for image, label in zip(images, labels, strict=True)
        )
    assert right >= 90, right


def test_dense_one_epoch_beats_chance_on_real_cifar_jpegs(trained, real_data_dir):
    stack, done = trained
    job = done["cifar10_dense"]
    assert job["timings"]["data_s"] > 0 and job["metrics"][0]["test_accuracy"] > 0.2
    with zipfile.ZipFile(real_data_dir / "cifar10-jpg.zip") as zf:
        members = [n for n in zf.namelist() if n.startswith("cifar10-jpg/test/") and n.endswith(".jpg")]
        by_class: dict[str, list[str]] = {}
        for name in sorted(members):
            by_class.setdefault(name.split("/")[2], []).append(name)
        sample = [(cls, zf.read(name)) for cls, names in sorted(by_class.items()) for name in names[:30]]
    with api_client(stack) as client:
        right = sum(predict_top1(client, data, job["model_id"], "x.jpg") == cls for cls, data in sample)
    assert len(sample) == 300
    assert right >= 60, f"{right}/300 right (chance: 30)"


def test_resnet18_serving_reproduces_its_val_accuracy(trained, real_data_dir):
    stack, done = trained
    job = done["hymenoptera_resnet18"]
    assert job["weights"] == "none"
    with zipfile.ZipFile(real_data_dir / "hymenoptera_data.zip") as zf:
        val = [
            (name.split("/")[2], zf.read(name))
            for name in sorted(zf.namelist())
            if name.startswith("hymenoptera_data/val/") and name.lower().endswith((".jpg", ".jpeg"))
        ]
    assert len(val) == 153
    with api_client(stack) as client:
        right = sum(predict_top1(client, data, job["model_id"], "x.jpg") == cls for cls, data in val)
        model = client.get(f"/models/{job['model_id']}").json()
    assert model["pretrained"]["name"] == "none" and model["classes"] == ["ants", "bees"]
    assert right == round(job["metrics"][0]["val_accuracy"] * 153)
