"""Every task trained through a running API with its default (assignment) settings, then served.

    ./scripts/up.sh                                        # the stack, in another shell
    .venv/bin/python -m bench.service_run                  # 10 epochs each, ~8 min on 2 CPU cores
    .venv/bin/python -m bench.service_run --api http://host:8000 --api-key KEY --epochs 1
    .venv/bin/python -m bench.service_run --tasks hymenoptera_resnet18 custom_resnet18   # upload vs built-in

For each of cifar10_dense, mnist_lenet5 and hymenoptera_resnet18 (finetune and
feature_extraction, ``weights`` as given by ``--resnet-weights``) it submits one job with
``POST /jobs``, polls ``GET /jobs/{id}`` until the job ends, then classifies real test images
with ``POST /predict`` against the job's ``model_id``: 200 MNIST test digits (every 50th), 500
CIFAR-10 test JPEGs (a seeded sample) and all 153 hymenoptera val images. It prints, per job, the
device, final train and test/val accuracy as the job reports them, the share of uploaded images
/predict got right, and the job's timings (seconds), and writes them as JSON under bench/results/.
``custom_resnet18`` (in ``--tasks``) uploads hymenoptera_data.zip re-packed as ``photos/train/``
+ ``photos/val/`` with ``POST /datasets`` and trains it with the same hyperparameters as the
built-in task: the two must reach the same accuracy.
Exit status 1 if a job did not succeed. Data: ``--data-dir`` (default DATA_DIR, else
../shared/datasets), read-only.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import time
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
from PIL import Image
from torchvision.datasets.mnist import read_image_file, read_label_file

from bench.data import DEFAULT_DATA_DIR, repack_hymenoptera

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
FINAL = ("succeeded", "failed", "cancelled")
TASKS = ("cifar10_dense", "mnist_lenet5", "hymenoptera_resnet18")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--api", default="http://127.0.0.1:8000", help="base URL of the API")
    parser.add_argument(
        "--api-key", default=os.environ.get("API_KEY"), help="bearer key, if the API has keys"
    )
    parser.add_argument("--epochs", type=int, default=None, help="default: the assignment's 10")
    parser.add_argument("--resnet-weights", default="none", choices=["none", "IMAGENET1K_V1", "local"])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=[*TASKS, "custom_resnet18"])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    return parser.parse_args()


def jobs(args: argparse.Namespace) -> list[tuple[str, dict]]:
    common = {"epochs": args.epochs} if args.epochs else {}
    resnet = {**common, "weights": args.resnet_weights}
    every = [
        ("cifar10_dense", common),
        ("mnist_lenet5", common),
        ("hymenoptera_resnet18", {**resnet, "mode": "finetune"}),
        ("hymenoptera_resnet18", {**resnet, "mode": "feature_extraction"}),
        ("custom_resnet18", {**resnet, "mode": "finetune"}),
        ("custom_resnet18", {**resnet, "mode": "feature_extraction"}),
    ]
    return [(task, hyperparameters) for task, hyperparameters in every if task in args.tasks]


def upload_hymenoptera(client: httpx.Client, data_dir: Path) -> str:
    """Upload hymenoptera_data.zip re-packed as ``photos/{train,val}/<class>/``; the dataset id
    once it is ready. Raises ``SystemExit`` if ingestion fails."""
    archive = repack_hymenoptera(data_dir / "hymenoptera_data.zip", "train_val")
    response = client.post("/datasets", files={"file": ("hymenoptera-photos.zip", archive)})
    response.raise_for_status()
    dataset = response.json()
    while dataset["status"] == "ingesting":
        time.sleep(1)
        dataset = client.get(f"/datasets/{dataset['id']}").json()
    if dataset["status"] != "ready":
        sys.exit(f"the uploaded hymenoptera dataset {dataset['id']} failed: {dataset.get('error')}")
    return dataset["id"]


def test_images(task: str, data_dir: Path) -> Iterator[tuple[bytes, str]]:
    """(encoded image, true label) pairs of real test (val) images of ``task``."""
    if task == "mnist_lenet5":
        raw = data_dir / "MNIST" / "raw"
        images = read_image_file(str(raw / "t10k-images-idx3-ubyte"))
        labels = read_label_file(str(raw / "t10k-labels-idx1-ubyte"))
        for i in range(0, len(images), 50):
            buffer = io.BytesIO()
            Image.fromarray(images[i].numpy()).save(buffer, "PNG")
            yield buffer.getvalue(), str(labels[i].item())
        return
    archive, prefix = {
        "cifar10_dense": ("cifar10-jpg.zip", "cifar10-jpg/test/"),
        "hymenoptera_resnet18": ("hymenoptera_data.zip", "hymenoptera_data/val/"),
        "custom_resnet18": ("hymenoptera_data.zip", "hymenoptera_data/val/"),  # the upload's val split
    }[task]
    with zipfile.ZipFile(data_dir / archive) as zf:
        names = sorted(
            n for n in zf.namelist() if n.startswith(prefix) and n.lower().endswith((".jpg", ".jpeg", ".png"))
        )
        if task == "cifar10_dense":
            names = random.Random(0).sample(names, 500)
        for name in names:
            yield zf.read(name), name[len(prefix) :].split("/")[0]


def run_job(client: httpx.Client, task: str, hyperparameters: dict, dataset: str | None = None) -> dict:
    body = {"task": task, "hyperparameters": hyperparameters, **({"dataset": dataset} if dataset else {})}
    response = client.post("/jobs", json=body)
    response.raise_for_status()
    job = response.json()
    while job["status"] not in FINAL:
        time.sleep(2)
        job = client.get(f"/jobs/{job['id']}").json()
    return job


def score_predictions(client: httpx.Client, task: str, model_id: str, data_dir: Path) -> tuple[int, int]:
    right = total = 0
    for data, label in test_images(task, data_dir):
        response = client.post("/predict", files={"file": ("image", data)}, data={"model_id": model_id})
        response.raise_for_status()
        right += response.json()["predictions"][0]["label"] == label
        total += 1
    return right, total


def main() -> None:
    args = parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    client = httpx.Client(base_url=args.api, headers=headers, timeout=120)
    rows = []
    dataset = upload_hymenoptera(client, args.data_dir) if "custom_resnet18" in args.tasks else None
    for task, hyperparameters in jobs(args):
        job = run_job(client, task, hyperparameters, dataset if task == "custom_resnet18" else None)
        if job["status"] != "succeeded":
            sys.exit(f"{task} {hyperparameters}: job {job['id']} ended {job['status']}: {job.get('error')}")
        right, total = score_predictions(client, task, job["model_id"], args.data_dir)
        last = job["metrics"][-1]
        row = {
            "task": task,
            "mode": hyperparameters.get("mode"),
            "device": job["device"],
            "epochs": len(job["metrics"]),
            "train_accuracy": last["train_accuracy"],
            "test_accuracy": last["test_accuracy"]
            if last["test_accuracy"] is not None
            else last["val_accuracy"],
            "predict_right": right,
            "predict_total": total,
            "timings": job["timings"],
            "last_epoch_images_per_s": last["images_per_s"],
            "model_id": job["model_id"],
        }
        rows.append(row)
        print(
            f"{task:22} {row['mode'] or '':18} {row['device']:5} {row['epochs']:2} ep  "
            f"train {100 * row['train_accuracy']:.2f} %  test/val {100 * row['test_accuracy']:.2f} %  "
            f"/predict {right}/{total} right  job {job['timings']['total_s']:.1f} s",
            flush=True,
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"service-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps({"api": args.api, "dataset": dataset, "jobs": rows}, indent=1))
    print(f"written to {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
