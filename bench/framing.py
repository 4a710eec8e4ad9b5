"""MNIST framing (``normalize=auto``) against resizing only (``normalize=none``), on real MNIST test
digits drawn the way users draw them.

    .venv/bin/python -m bench.framing                         # 2000 test digits, LeNet-5 trained 1 epoch
    .venv/bin/python -m bench.framing --digits 300 --train-samples 12000    # a quick run

A LeNet-5 is trained with the product's own recipe (``worker.training.run_training``) on real
MNIST (DATA_DIR, or ../shared/datasets). Each of the first ``--digits`` test digits is then sent
in several versions, each through the product's decoding and inference path (PNG bytes ->
``core.images.decode_image`` -> ``app.inference.predict``), once with ``normalize=none`` and once
with ``normalize=auto``:

* ``original``: the MNIST digit as stored (already framed: 20 x 20 box, centre of mass centred);
* ``larger``: its ink scaled to fill the 28 x 28 frame (aspect kept);
* ``smaller``: its ink scaled into a 10 x 10 box, centred;
* ``off_centre``: its ink scaled into 14 x 14 and put in a corner;
* ``tight_crop``: the image cropped to the ink's bounding box (the preset stretches it to 28 x 28);
* ``on_paper``: dark on a light 160 x 120 page, 56 px high at a random place (``invert=auto``).

Accuracy per version and mode is printed and written as JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets.mnist import read_image_file, read_label_file

from app.inference import LoadedModel, predict
from core.images import decode_image
from tasks import get_task

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DATA_CANDIDATES = [ROOT.parent / "shared" / "datasets", Path("/work/shared/datasets"), ROOT / "data"]
VARIANTS = ("original", "larger", "smaller", "off_centre", "tight_crop", "on_paper")


def find_data_dir(configured: str | None = None) -> Path:
    """A directory holding ``MNIST/raw/t10k-images-idx3-ubyte``; raises ``FileNotFoundError``."""
    candidates = (
        [Path(configured)] if configured else [Path(os.environ.get("DATA_DIR", "data")), *DATA_CANDIDATES]
    )
    for candidate in candidates:
        if (candidate / "MNIST" / "raw" / "t10k-images-idx3-ubyte").exists():
            return candidate
    raise FileNotFoundError(f"no MNIST/raw under any of {[str(c) for c in candidates]}")


def train_lenet(data_dir: Path, train_samples: int | None, epochs: int, seed: int = 0) -> tuple[object, dict]:
    """LeNet-5 trained by ``run_training`` (the worker's recipe) on real MNIST.

    Returns:
        (``worker.training.TrainingResult``, its hyperparameters).
    """
    from worker.training import TrainingContext, run_training

    hyperparameters = {"epochs": epochs, "lr": 0.05, "momentum": 0.9, "seed": seed}
    if train_samples:
        hyperparameters["max_train_samples"] = train_samples
    with tempfile.TemporaryDirectory() as cache_dir:
        ctx = TrainingContext(data_dir=data_dir, cache_dir=Path(cache_dir), show_progress_bar=False)
        return run_training("mnist_lenet5", hyperparameters, ctx), hyperparameters


def as_loaded(result: object) -> LoadedModel:
    """A ``TrainingResult`` of mnist_lenet5 ready for ``app.inference.predict`` (eval mode, CPU)."""
    task = get_task("mnist_lenet5")
    model = task.build_model(result.architecture)
    model.load_state_dict(result.tensors)
    model.eval()
    return LoadedModel("bench", "mnist_lenet5", model, task.preset, result.classes, "")


def mnist_test_digits(data_dir: Path, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``count`` MNIST test digits: uint8 (count, 28, 28) and int64 labels (count,)."""
    raw = data_dir / "MNIST" / "raw"
    images = read_image_file(str(raw / "t10k-images-idx3-ubyte"))[:count].numpy()
    labels = read_label_file(str(raw / "t10k-labels-idx1-ubyte"))[:count].numpy()
    return images, labels


def _scaled_ink(digit: np.ndarray, longer: int) -> Image.Image:
    """The digit's ink box, scaled (anti-aliased, aspect kept) to ``longer`` px on its longer side."""
    rows, cols = np.flatnonzero(digit.any(1)), np.flatnonzero(digit.any(0))
    crop = Image.fromarray(digit[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
    scale = longer / max(crop.size)
    return crop.resize(
        (max(1, round(crop.width * scale)), max(1, round(crop.height * scale))), Image.Resampling.LANCZOS
    )


def _placed(ink: Image.Image, size: tuple[int, int], left: int, top: int, background: int = 0) -> Image.Image:
    canvas = Image.new("L", size, background)
    canvas.paste(ink, (left, top))
    return canvas


def variants(digit: np.ndarray, rng: np.random.Generator) -> dict[str, Image.Image]:
    """The versions of one white-on-black 28 x 28 digit listed in the module docstring."""
    larger = _scaled_ink(digit, 28)
    smaller = _scaled_ink(digit, 10)
    corner = _scaled_ink(digit, 14)
    rows, cols = np.flatnonzero(digit.any(1)), np.flatnonzero(digit.any(0))
    paper_ink = Image.eval(_scaled_ink(digit, 56), lambda v: 255 - v)
    page = Image.new("L", (160, 120), 255)
    left, top = int(rng.integers(0, 160 - paper_ink.width)), int(rng.integers(0, 120 - paper_ink.height))
    page.paste(paper_ink, (left, top))
    page = Image.eval(page, lambda v: int(v * 0.85 + 20))  # greyish paper, dark grey ink
    corner_left = int(rng.choice([1, 28 - corner.width - 1]))
    corner_top = int(rng.choice([1, 28 - corner.height - 1]))
    return {
        "original": Image.fromarray(digit),
        "larger": _placed(larger, (28, 28), (28 - larger.width) // 2, (28 - larger.height) // 2),
        "smaller": _placed(smaller, (28, 28), (28 - smaller.width) // 2, (28 - smaller.height) // 2),
        "off_centre": _placed(corner, (28, 28), corner_left, corner_top),
        "tight_crop": Image.fromarray(digit[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]),
        "on_paper": page,
    }


def classify(loaded: LoadedModel, image: Image.Image, normalize: str) -> int:
    """Top-1 class of ``image`` sent as PNG bytes through the product's decoding and inference."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    decoded, _ = decode_image(buffer.getvalue())
    return predict(loaded, decoded, top_k=1, invert="auto", normalize=normalize).indices[0]


def evaluate(
    loaded: LoadedModel, digits: np.ndarray, labels: np.ndarray, seed: int = 0
) -> dict[str, dict[str, float]]:
    """{variant: {"none": accuracy, "auto": accuracy}} over ``digits``."""
    rng = np.random.default_rng(seed)
    right = {v: {"none": 0, "auto": 0} for v in VARIANTS}
    for digit, label in zip(digits, labels, strict=True):
        for name, image in variants(digit, rng).items():
            for mode in ("none", "auto"):
                right[name][mode] += classify(loaded, image, mode) == int(label)
    return {
        name: {mode: count / len(digits) for mode, count in modes.items()} for name, modes in right.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--digits", type=int, default=2000, help="MNIST test digits to send (default 2000)")
    parser.add_argument(
        "--train-samples", type=int, default=None, help="training images (default all 60,000)"
    )
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument(
        "--data-dir", default=None, help="holds MNIST/raw (default DATA_DIR, ../shared/datasets)"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    data_dir = find_data_dir(args.data_dir)
    start = time.perf_counter()
    trained, hyperparameters = train_lenet(data_dir, args.train_samples, args.epochs)
    loaded = as_loaded(trained)
    train_s = time.perf_counter() - start
    training = {"hyperparameters": hyperparameters, "metrics": [m.model_dump() for m in trained.metrics]}
    digits, labels = mnist_test_digits(data_dir, args.digits)
    start = time.perf_counter()
    accuracy = evaluate(loaded, digits, labels)
    result = {
        "digits": args.digits,
        "training": training,
        "train_s": round(train_s, 1),
        "evaluate_s": round(time.perf_counter() - start, 1),
        "accuracy": accuracy,
        "torch": torch.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    print("| version | normalize=none | normalize=auto |\n|---|---|---|")
    for name, modes in accuracy.items():
        print(f"| {name} | {modes['none']:.1%} | {modes['auto']:.1%} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"framing-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
