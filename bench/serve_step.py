"""Where ResNet18 serving time goes on a CPU: the forward pass of one image in each backend.

    .venv/bin/python -m bench.serve_step                  # eager, TorchScript, ONNX Runtime (~1 min)
    .venv/bin/python -m bench.serve_step --compile        # also torch.compile (~1 min to compile)

Times what ``/predict``'s inference thread runs per batch -- normalisation, the network, softmax
-- for torchvision's ResNet18 (2 classes, random init) on one thread, in the backends a server
could use at the same fp32 arithmetic:

* ``torch eager (channels-last)``: ``app.serving.TorchBackend``, what the peers of ``bench.peers``
  serve with;
* ``torchscript frozen``: ``torch.jit.freeze`` of the traced module, channels-last;
* ``torch.compile``: inductor (``--compile``);
* ``onnxruntime``: ``app.serving.OnnxBackend``, what this API serves with;
* ``openvino``: OpenVINO's CPU plugin on the same ONNX graph, when ``openvino`` is installed (it is
  not a dependency of the service).

Reports CPU milliseconds per image (``time.process_time``: the thread's own work, not other
users' load; the best of ``--repeats`` runs of ``--seconds`` each) at batch 1, 4 and 8, and each
backend's largest probability difference from eager PyTorch on the same random batch.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable

import torch
import torchvision

from app.serving import OnnxBackend, TorchBackend, onnx_graph
from tasks import get_task

BATCHES = (1, 4, 8)


def cpu_ms_per_image(run: Callable[[], object], batch: int, seconds: float, repeats: int) -> float:
    """Best of ``repeats`` runs of ``seconds`` CPU seconds each: CPU ms per image."""
    run()
    best = float("inf")
    for _ in range(repeats):
        start, calls = time.process_time(), 0
        while time.process_time() - start < seconds:
            run()
            calls += 1
        best = min(best, (time.process_time() - start) / calls / batch)
    return round(1000 * best, 2)


def torchscript_backend(model: torch.nn.Module, preset) -> Callable[[torch.Tensor], torch.Tensor]:
    """A frozen TorchScript trace of ``model`` (channels-last), with the preset's normalisation."""
    example = torch.zeros(1, preset.channels, *preset.input_size)
    example = example.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notices
        frozen = torch.jit.freeze(torch.jit.trace(model.to(memory_format=torch.channels_last), example))

    def run(pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            batch = preset.normalize(pixels).contiguous(memory_format=torch.channels_last)
            return torch.softmax(frozen(batch), dim=1)

    return run


def compiled_backend(model: torch.nn.Module, preset) -> Callable[[torch.Tensor], torch.Tensor]:
    """``torch.compile`` (inductor) of ``model``, channels-last."""
    compiled = torch.compile(model.to(memory_format=torch.channels_last))

    def run(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            batch = preset.normalize(pixels).contiguous(memory_format=torch.channels_last)
            return torch.softmax(compiled(batch), dim=1)

    return run


def openvino_backend(model: torch.nn.Module, preset) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """OpenVINO's CPU plugin (1 thread, fp32) on the ONNX export of ``model``; None without
    the ``openvino`` package."""
    try:
        import openvino
    except ImportError:
        return None
    core = openvino.Core()
    config = {"INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": 1}
    compiled = core.compile_model(core.read_model(onnx_graph(model, preset)), "CPU", config)
    request = compiled.create_infer_request()

    def run(pixels: torch.Tensor) -> torch.Tensor:
        batch = preset.normalize(pixels).numpy()
        return torch.softmax(torch.from_numpy(request.infer({0: batch})[0].copy()), dim=1)

    return run


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="CPU seconds per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (inductor)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(0)
    preset = get_task("hymenoptera_resnet18").preset
    model = torchvision.models.resnet18(num_classes=2).eval()
    backends: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "torch eager (channels-last)": TorchBackend(model, preset, torch.device("cpu")),
        "torchscript frozen": torchscript_backend(model, preset),
        "onnxruntime": OnnxBackend(model, preset, threads=1),
    }
    if args.compile:
        backends["torch.compile"] = compiled_backend(model, preset)
    openvino = openvino_backend(model, preset)
    if openvino is not None:
        backends["openvino"] = openvino

    pixels = {n: torch.randint(0, 256, (n, 3, *preset.input_size), dtype=torch.uint8) for n in BATCHES}
    reference = backends["torch eager (channels-last)"](pixels[4])
    results = []
    for name, backend in backends.items():
        row = {"backend": name, "max_probability_diff": float((backend(pixels[4]) - reference).abs().max())}
        for n in BATCHES:
            row[f"batch_{n}_ms_per_image"] = cpu_ms_per_image(
                lambda n=n, backend=backend: backend(pixels[n]), n, args.seconds, args.repeats
            )
        results.append(row)
        cells = "  ".join(f"{row[f'batch_{n}_ms_per_image']:7.2f}" for n in BATCHES)
        print(f"{name:30s} {cells}   diff {row['max_probability_diff']:.1e}", flush=True)
    print("(CPU ms per image on one thread at batch " + ", ".join(map(str, BATCHES)) + ")")
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
