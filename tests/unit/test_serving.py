"""Serving stages: ONNX Runtime matches PyTorch, the micro-batcher batches and keeps results apart,
light models are recognised, and /predict's pipeline answers the same with every backend."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from app.inference import ModelRegistry, infer, predict
from app.serving import (
    PARITY_ATOL,
    MicroBatcher,
    OnnxBackend,
    TorchBackend,
    bf16_is_native,
    build_backend,
    parity_difference,
)
from core.images import open_image
from models_store.checkpoint import CheckpointStore
from tasks import get_task
from tests.factories_models import make_model_checkpoint

TASKS = ["mnist_lenet5", "cifar10_dense", "hymenoptera_resnet18"]


def _images(task: str, n: int, seed: int = 0) -> torch.Tensor:
    preset = get_task(task).preset
    height, width = preset.input_size
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, preset.channels, height, width), generator=generator, dtype=torch.uint8)


@pytest.mark.parametrize("task", TASKS)
def test_onnx_runtime_matches_pytorch_for_every_task(tmp_path, task):
    store = CheckpointStore(tmp_path)
    model_id = make_model_checkpoint(tmp_path, task)
    torch_model = ModelRegistry(store, backend="torch").get(store.get(model_id))
    onnx_model = ModelRegistry(store, backend="onnxruntime").get(store.get(model_id))
    assert isinstance(torch_model.backend, TorchBackend)
    assert isinstance(onnx_model.backend, OnnxBackend)
    images = _images(task, 5, seed=3)
    expected, got = infer(torch_model, images), infer(onnx_model, images)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert torch.allclose(got.sum(1), torch.ones(5), atol=1e-5)
    assert float((got - expected).abs().max()) <= PARITY_ATOL
    assert torch.equal(got.argmax(1), expected.argmax(1))


def test_a_backend_that_disagrees_with_pytorch_is_not_used(monkeypatch):
    preset = get_task("mnist_lenet5").preset
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10)).eval()

    class Wrong(OnnxBackend):
        def __call__(self, pixels):
            return torch.roll(super().__call__(pixels), 1, dims=1)

    monkeypatch.setattr("app.serving.OnnxBackend", Wrong)
    backend = build_backend(model, preset, torch.device("cpu"), "auto")
    assert isinstance(backend, TorchBackend)
    assert parity_difference(backend, Wrong(model, preset), preset) > PARITY_ATOL


@pytest.mark.parametrize("task", TASKS)
def test_bf16_precision_serves_bfloat16_close_to_fp32_where_native(tmp_path, task, caplog):
    store = CheckpointStore(tmp_path)
    model_id = make_model_checkpoint(tmp_path, task)
    reference = ModelRegistry(store, backend="torch").get(store.get(model_id))
    loaded = ModelRegistry(store, backend="auto", precision="bf16").get(store.get(model_id))
    images = _images(task, 6, seed=5)
    expected, got = infer(reference, images), infer(loaded, images)
    assert got.dtype == torch.float32 and torch.allclose(got.sum(1), torch.ones(6), atol=1e-5)
    if not bf16_is_native(torch.device("cpu")):
        assert loaded.backend.name != "torch-bf16" and "no native bfloat16" in caplog.text
        return
    assert loaded.backend.name == "torch-bf16"
    weights = [t for t in loaded.backend.model.state_dict().values() if t.is_floating_point()]
    assert weights and all(t.dtype == torch.bfloat16 for t in weights)
    difference = float((got - expected).abs().max())
    assert 0 < difference < 0.05  # other maths: close, not equal


def test_micro_batcher_batches_concurrent_requests_and_keeps_each_result():
    calls: list[int] = []
    gate = threading.Event()

    def backend(pixels: torch.Tensor) -> torch.Tensor:
        gate.wait(5)  # the first batch holds the thread while the others queue
        calls.append(len(pixels))
        return pixels.float().flatten(1)[:, :2]

    batcher = MicroBatcher(max_batch=4)
    futures = [batcher.submit(backend, torch.full((1, 2, 2), i, dtype=torch.uint8)) for i in range(9)]
    time.sleep(0.2)
    gate.set()
    results = [f.result(5) for f in futures]
    assert [float(r[0]) for r in results] == [float(i) for i in range(9)]
    assert sum(calls) == 9 and max(calls) <= 4 and len(calls) < 9  # batched, never over max_batch
    assert batcher.images == 9 and batcher.batches == len(calls)


def test_micro_batcher_runs_other_models_separately_and_passes_errors_on():
    def double(pixels):
        return pixels.float() * 2

    def broken(pixels):
        raise RuntimeError("out of memory")

    batcher = MicroBatcher(max_batch=8, max_wait_s=0.05)
    ok = batcher.submit(double, torch.ones(3, dtype=torch.uint8))
    bad = batcher.submit(broken, torch.ones(3, dtype=torch.uint8))
    assert torch.equal(ok.result(5), torch.full((3,), 2.0))
    with pytest.raises(RuntimeError, match="out of memory"):
        bad.result(5)
    assert torch.equal(batcher.run(double, torch.zeros(3, dtype=torch.uint8)), torch.zeros(3))  # still alive


def test_micro_batcher_skips_requests_cancelled_while_queued_and_keeps_running():
    gate = threading.Event()
    seen: list[list[int]] = []

    def backend(pixels: torch.Tensor) -> torch.Tensor:
        gate.wait(5)
        seen.append([int(p.flatten()[0]) for p in pixels])
        return pixels.float().flatten(1)

    batcher = MicroBatcher(max_batch=8)
    first = batcher.submit(backend, torch.zeros(1, dtype=torch.uint8))  # holds the thread
    time.sleep(0.1)
    queued = [batcher.submit(backend, torch.full((1,), i, dtype=torch.uint8)) for i in (1, 2, 3)]
    assert queued[1].cancel()  # its client went away (asyncio.wrap_future cancels it)
    gate.set()
    assert float(first.result(5)[0]) == 0.0
    assert [float(f.result(5)[0]) for f in (queued[0], queued[2])] == [1.0, 3.0]
    assert seen == [[0], [1, 3]]  # the cancelled image never reached the model
    assert float(batcher.run(backend, torch.full((1,), 7, dtype=torch.uint8))[0]) == 7.0  # still alive


def test_predict_through_the_batcher_equals_a_direct_forward_pass(tmp_path):
    store = CheckpointStore(tmp_path)
    model_id = make_model_checkpoint(tmp_path, "hymenoptera_resnet18")
    plain = ModelRegistry(store, backend="torch").get(store.get(model_id))
    batched = ModelRegistry(store, backend="torch", batcher=MicroBatcher(4)).get(store.get(model_id))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)) for _ in range(6)]
    expected = [predict(plain, image, 2, "auto") for image in images]
    results: list = [None] * len(images)

    def one(i: int) -> None:
        results[i] = predict(batched, images[i], 2, "auto")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(images))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for got, want in zip(results, expected, strict=True):
        assert got.indices == want.indices
        assert np.allclose(got.probabilities, want.probabilities, atol=1e-5)
    assert batched.batcher.images == 6


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 0).save(buffer, format="PNG")
    return buffer.getvalue()


def test_light_models_run_inline_for_small_images_and_heavy_ones_do_not(tmp_path):
    store = CheckpointStore(tmp_path)
    lenet = make_model_checkpoint(tmp_path, "mnist_lenet5")
    resnet = make_model_checkpoint(tmp_path, "hymenoptera_resnet18")
    registry = ModelRegistry(store, backend="onnxruntime", batcher=MicroBatcher(), inline_ms=5.0)
    digit = _png(28, 28)
    assert not registry.runs_inline(lenet, None, len(digit))  # not loaded yet: no guess
    small = registry.get(store.get(lenet))
    big = registry.get(store.get(resnet))
    assert small.light and small.infer_ms < 5.0
    assert not big.light and big.infer_ms >= 5.0
    assert registry.runs_inline(lenet, None, len(digit))
    assert registry.runs_inline(None, "mnist_lenet5", len(digit))
    assert registry.fits_inline(open_image(digit)[1])
    # a small file of many pixels (PNG compresses a blank 4000 x 4000 to a few KB): decoded in a thread
    blank = _png(4000, 4000)
    assert len(blank) < registry.INLINE_MAX_UPLOAD_BYTES and not registry.fits_inline(open_image(blank)[1])
    assert not registry.runs_inline(lenet, None, registry.INLINE_MAX_UPLOAD_BYTES + 1)
    assert not registry.runs_inline(resnet, None, len(digit))
    assert not ModelRegistry(store, inline_ms=0).runs_inline(lenet, None, len(digit))
