"""Export cache (one build per model at a time, atomic files, stale exports dropped) and the ONNX
exporter on each task's network (dynamic batch, metadata, parity on random inputs)."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import onnxruntime as ort
import pytest
import torch

from models_store.export import ExportCache, export_onnx
from tasks import get_task
from tests.factories_models import ARCHITECTURES


def test_concurrent_requests_build_once_and_share_the_file(tmp_path):
    cache = ExportCache(tmp_path)
    builds = []

    def build(path):
        builds.append(path)
        time.sleep(0.3)
        path.write_bytes(b"onnx")

    results = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get_or_build("m1", "ab" * 32, "onnx", build)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1 and len(set(results)) == 1
    assert results[0].read_bytes() == b"onnx" and results[0].parent == tmp_path / "m1"
    assert [p.name for p in (tmp_path / "m1").iterdir() if not p.name.startswith(".lock")] == [
        results[0].name
    ]


def test_new_weights_replace_the_stale_export_and_failures_leave_nothing(tmp_path):
    cache = ExportCache(tmp_path)
    old = cache.get_or_build("m1", "aa" * 32, "onnx", lambda p: p.write_bytes(b"old"))
    cache.get_or_build("m1", "aa" * 32, "safetensors", lambda p: p.write_bytes(b"zip"))
    new = cache.get_or_build("m1", "bb" * 32, "onnx", lambda p: p.write_bytes(b"new"))
    assert not old.exists() and new.read_bytes() == b"new"
    assert cache.path("m1", "aa" * 32, "safetensors").exists()  # other formats untouched

    def broken(path):
        path.write_bytes(b"half")
        raise RuntimeError("exporter failed")

    with pytest.raises(RuntimeError):
        cache.get_or_build("m1", "cc" * 32, "onnx", broken)
    assert sorted(p.name for p in (tmp_path / "m1").iterdir() if p.name != ".lock") == sorted(
        [new.name, cache.path("m1", "aa" * 32, "safetensors").name]
    )
    cache.remove("m1")
    assert not (tmp_path / "m1").exists()


@pytest.mark.parametrize("task", sorted(ARCHITECTURES))
def test_onnx_export_has_dynamic_batch_metadata_and_matches(task):
    architecture, classes = ARCHITECTURES[task]
    torch.manual_seed(0)
    model = get_task(task).build_model(architecture).eval()
    if task == "cifar10_dense":  # its buffers start at zero
        for buffer in model.buffers():
            buffer.normal_(0, 0.1)
    preset = get_task(task).preset
    metadata = {"model_id": f"{task}-x", "task": task, "weights": {"sha256": "0" * 64}}
    proto = export_onnx(model, preset, classes, metadata)
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["classes"]) == classes and props["mode"] == preset.mode
    assert json.loads(props["mean"]) == list(preset.mean) and json.loads(props["std"]) == list(preset.std)
    assert json.loads(props["input_size"]) == list(preset.input_size) and props["name"] == task
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    height, width = preset.input_size
    for n in (1, 3):
        x = torch.randn(n, preset.channels, height, width)
        (logits,) = session.run(["logits"], {"input": x.numpy()})
        with torch.inference_mode():
            expected = model(x).numpy()
        np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
        assert np.abs(expected).max() > 1e-3


class DataDependent(torch.nn.Module):
    """A branch on a tensor's value: torch.export refuses it, the TorchScript tracer follows it."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(28 * 28, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.fc(x.flatten(1))
        return logits if logits.sum() > -1e9 else -logits


def test_falls_back_to_the_torchscript_exporter(caplog):
    torch.manual_seed(0)
    model = DataDependent().eval()
    with caplog.at_level("WARNING"):
        proto = export_onnx(model, get_task("mnist_lenet5").preset, [str(d) for d in range(10)], {})
    assert "using the TorchScript exporter" in caplog.text
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 1, 28, 28)
    (logits,) = session.run(["logits"], {"input": x.numpy()})
    with torch.inference_mode():
        np.testing.assert_allclose(logits, model(x).numpy(), atol=1e-4, rtol=0)
