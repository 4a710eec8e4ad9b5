"""Exports on real test images of every task: onnxruntime reproduces PyTorch, and the README's
snippets (onnxruntime + Pillow + numpy; safetensors zip) reproduce /predict.

The checkpoints are randomly initialised (parity needs no training), saved by the worker's own
code; the images are real: MNIST test digits, CIFAR-10 test JPEGs, hymenoptera val JPEGs.
"""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from torchvision.datasets.mnist import read_image_file

from core.images import to_mode
from tests.conftest import Stack, api_client
from tests.factories import image_bytes
from tests.factories_models import make_model_checkpoint

pytestmark = [pytest.mark.realdata, pytest.mark.integration]

TASKS = ("mnist_lenet5", "cifar10_dense", "hymenoptera_resnet18")
README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def readme_snippet(marker: str) -> str:
    """The README's python code block that contains ``marker``."""
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    (block,) = [b for b in blocks if marker in b]
    return block


def real_images(task: str, data_dir: Path) -> list[bytes]:
    """Encoded real test images: 16 MNIST digits (PNG), 20 CIFAR-10 (2 per class), 8 hymenoptera."""
    if task == "mnist_lenet5":
        digits = read_image_file(str(data_dir / "MNIST" / "raw" / "t10k-images-idx3-ubyte"))[:16]
        return [image_bytes(Image.fromarray(d.numpy()), "PNG") for d in digits]
    archive, split, per_class = {
        "cifar10_dense": ("cifar10-jpg.zip", "test", 2),
        "hymenoptera_resnet18": ("hymenoptera_data.zip", "val", 4),
    }[task]
    with zipfile.ZipFile(data_dir / archive) as zipped:
        names = sorted(n for n in zipped.namelist() if f"/{split}/" in n and n.endswith(".jpg"))
        by_class: dict[str, list[str]] = {}
        for name in names:
            by_class.setdefault(name.split("/")[-2], []).append(name)
        return [zipped.read(n) for files in by_class.values() for n in files[:per_class]]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, redis_url, real_data_dir):
    """(client, {task: (model_id, onnx path, zip bytes, encoded images)})."""
    root = tmp_path_factory.mktemp("export")
    stack = Stack(root, redis_url)
    models = {task: make_model_checkpoint(stack.settings().models_dir, task) for task in TASKS}
    with api_client(stack) as client:
        result = {}
        for task, model_id in models.items():
            onnx_response = client.get(f"/models/{model_id}/export", params={"format": "onnx"})
            assert onnx_response.status_code == 200, onnx_response.text
            path = root / f"{model_id}.onnx"
            path.write_bytes(onnx_response.content)
            archive = client.get(f"/models/{model_id}/export", params={"format": "safetensors"})
            assert archive.status_code == 200, archive.text
            result[task] = (model_id, path, archive.content, real_images(task, real_data_dir))
        yield client, result
    stack.cleanup_redis()


@pytest.mark.parametrize("task", TASKS)
def test_onnxruntime_matches_pytorch_on_real_images(exported, task):
    client, models = exported
    model_id, path, _, images = models[task]
    registry = client.app.state.registry
    loaded = registry.get(registry.resolve(model_id, None))
    preset = loaded.preset
    pixels = torch.stack(
        [preset.to_uint8(to_mode(Image.open(io.BytesIO(data)), preset.mode)) for data in images]
    )
    batch = preset.normalize(pixels)
    with torch.inference_mode():
        expected = loaded.model(batch)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input": batch.numpy()})
    assert logits.shape == (len(images), len(loaded.classes))
    torch.testing.assert_close(torch.from_numpy(logits), expected, atol=1e-4, rtol=0)
    (single,) = session.run(["logits"], {"input": batch[:1].numpy()})  # batch axis is dynamic
    torch.testing.assert_close(torch.from_numpy(single), expected[:1], atol=1e-4, rtol=0)
    assert expected.abs().max() > 1e-3  # not a degenerate all-zero comparison


@pytest.mark.parametrize("task", TASKS)
def test_readme_onnx_snippet_reproduces_predict(exported, task):
    client, models = exported
    model_id, path, _, images = models[task]
    code = readme_snippet('ort.InferenceSession("model.onnx"').split("\nprobabilities = classify(")[0]
    namespace: dict = {}
    exec(code.replace('"model.onnx"', repr(str(path))), namespace)
    for data in images:
        response = client.post(
            "/predict",
            files={"file": ("image", data)},
            data={"model_id": model_id, "top_k": 100, "normalize": "none"},
        )
        assert response.status_code == 200, response.text
        served = np.zeros(len(namespace["classes"]), np.float32)
        for p in response.json()["predictions"]:
            served[p["index"]] = p["probability"]
        probabilities = namespace["classify"](Image.open(io.BytesIO(data)))
        np.testing.assert_allclose(probabilities, served, atol=1e-4, rtol=0)


@pytest.mark.parametrize("task", TASKS)
def test_readme_safetensors_snippet_loads_the_same_network(exported, task):
    client, models = exported
    model_id, _, archive, images = models[task]
    code = readme_snippet('zipfile.ZipFile("model.zip")')
    namespace: dict = {"io": io, "archive": archive}
    exec(code.replace('zipfile.ZipFile("model.zip")', "zipfile.ZipFile(io.BytesIO(archive))"), namespace)
    model = namespace["model"]
    registry = client.app.state.registry
    loaded = registry.get(registry.resolve(model_id, None))
    preset = loaded.preset
    pixels = torch.stack(
        [preset.to_uint8(to_mode(Image.open(io.BytesIO(d)), preset.mode)) for d in images[:4]]
    )
    with torch.inference_mode():
        assert torch.equal(model(preset.normalize(pixels)), loaded.model(preset.normalize(pixels)))
