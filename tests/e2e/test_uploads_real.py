"""Uploads against a LeNet-5 really trained on MNIST (the worker's recipe, 20,000 images, one
epoch), served by the API:

* a BMP whose alpha is zero everywhere shows its digit: real test "7"s answer 7 like their
  opaque twins, and so do the QA's case files (tests/cases);
* MNIST framing (``normalize=auto``) costs nothing on MNIST's own test digits and helps on the
  same digits drawn larger, smaller, off-centre, cropped tight or on paper (bench/framing.py is
  the full measurement).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.framing import VARIANTS, mnist_test_digits, train_lenet, variants
from tests.conftest import Stack, api_client
from tests.factories import bmp_v5, image_bytes
from tests.factories_models import save_training_result

pytestmark = [pytest.mark.realdata, pytest.mark.integration]

CASES = Path(__file__).resolve().parents[1] / "cases"


@pytest.fixture(scope="module")
def served_lenet(tmp_path_factory, redis_url, real_data_dir):
    stack = Stack(tmp_path_factory.mktemp("uploads-real"), redis_url)
    result, _ = train_lenet(real_data_dir, train_samples=20_000, epochs=1)
    assert result.metrics[-1].test_accuracy > 0.95
    model_id = save_training_result(stack.settings().models_dir, "mnist_lenet5", result)
    with api_client(stack) as client:
        yield client, model_id
    stack.cleanup_redis()


def top1(client, model_id: str, data: bytes, **form) -> str:
    response = client.post(
        "/predict", files={"file": ("upload", data)}, data={"model_id": model_id, "top_k": 1, **form}
    )
    assert response.status_code == 200, response.text
    return response.json()["predictions"][0]["label"]


def test_zero_alpha_bmp_sevens_answer_seven(served_lenet, real_data_dir):
    client, model_id = served_lenet
    digits, labels = mnist_test_digits(real_data_dir, 1000)
    sevens = digits[labels == 7][:20]
    answers = []
    for digit in sevens:
        rgb = np.repeat(digit[..., None], 3, axis=2)
        zero = top1(client, model_id, bmp_v5(rgb, alpha=0))
        assert zero == top1(client, model_id, bmp_v5(rgb, alpha=255))
        answers.append(zero)
    assert answers.count("7") >= 18, answers
    for name in ("bmp_v5_alpha_zero_digit7.bmp", "bmp_v5_alpha_ff_digit7.bmp"):
        assert top1(client, model_id, (CASES / name).read_bytes()) == "7", name


def test_framing_costs_nothing_on_mnist_and_helps_on_redrawn_digits(served_lenet, real_data_dir):
    client, model_id = served_lenet
    digits, labels = mnist_test_digits(real_data_dir, 300)
    rng = np.random.default_rng(0)
    right = {name: {"none": 0, "auto": 0} for name in VARIANTS}
    for digit, label in zip(digits, labels, strict=True):
        for name, image in variants(digit, rng).items():
            data = image_bytes(image, "PNG")
            for mode in ("none", "auto"):
                right[name][mode] += top1(client, model_id, data, normalize=mode) == str(label)
    accuracy = {name: {m: c / len(digits) for m, c in modes.items()} for name, modes in right.items()}
    assert accuracy["original"]["auto"] >= accuracy["original"]["none"] - 0.01, accuracy
    assert accuracy["original"]["auto"] >= 0.93, accuracy
    for name in ("larger", "smaller", "off_centre", "tight_crop", "on_paper"):
        assert accuracy[name]["auto"] >= accuracy[name]["none"] + 0.05, (name, accuracy)
        assert accuracy[name]["auto"] >= 0.85, (name, accuracy)
