"""Serving stage 2, batch inference: the backends that run a model, and the micro-batcher.

``/predict`` runs three named stages (``app.inference``): ``preprocess`` (decoded upload ->
uint8 (C, H, W), in the request's worker thread), ``infer`` (a batch of those -> class
probabilities, here) and ``postprocess`` (top-k). The middle stage is where batching happens:

* ``TorchBackend`` runs the PyTorch module (CPU or CUDA).
* ``OnnxBackend`` runs the same weights exported to ONNX with ONNX Runtime on the CPU: about twice
  as fast as eager PyTorch for ResNet18 on one thread, with the same outputs (checked on every
  load: ``build_backend`` compares it with PyTorch and keeps PyTorch if they differ by more than
  ``PARITY_ATOL`` in any probability).
* ``TorchBackend`` with ``dtype=torch.bfloat16`` (``INFERENCE_PRECISION=bf16``) runs the module in
  bfloat16: other maths, opt-in, where the hardware has it natively.
* ``MicroBatcher`` collects concurrent requests into batches for one inference thread: whatever
  is queued when the thread is free (at most ``max_batch``), waiting at most ``max_wait_s`` for
  more. With one request at a time it adds no wait (``max_wait_s`` 0, the default).

Normalisation (``Preset.normalize``) and the softmax stay in PyTorch for every backend, so only
the network itself changes hands.
"""

from __future__ import annotations

import ctypes
import io
import logging
import queue
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from functools import lru_cache

import numpy as np
import torch

from tasks.base import Preset

log = logging.getLogger(__name__)

PARITY_ATOL = 1e-4  # largest accepted probability difference between ONNX Runtime and PyTorch

Backend = Callable[[torch.Tensor], torch.Tensor]


class TorchBackend:
    """The PyTorch module on ``device``: uint8 (N, C, H, W) -> float32 (N, classes) probabilities
    on the CPU. With ``dtype=torch.bfloat16`` the weights and activations are bfloat16 (the input
    is normalised in float32 first, the softmax is taken in float32)."""

    def __init__(
        self, model: torch.nn.Module, preset: Preset, device: torch.device, dtype: torch.dtype = torch.float32
    ):
        # convolutional nets run channels-last, as they were trained (oneDNN's faster layout)
        self.channels_last = any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
        memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        self.model = model.to(device, dtype=dtype, memory_format=memory_format).eval()
        self.preset = preset
        self.device = device
        self.dtype = dtype
        self.name = "torch" if dtype == torch.float32 else "torch-bf16"

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            batch = self.preset.normalize(pixels.to(self.device, non_blocking=True)).to(self.dtype)
            if self.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            logits = self.model(batch)
            return torch.softmax(logits.float(), dim=1).cpu()


def onnx_graph(model: torch.nn.Module, preset: Preset) -> bytes:
    """``model`` (on the CPU, in eval mode) as a serialised ONNX graph: input ``input``, float32
    (N, C, H, W) normalised images with N dynamic; output ``logits`` (N, classes). The TorchScript
    exporter: fast, and what the parity check was measured with. Raises what the exporter raises."""
    example = torch.zeros(1, preset.channels, *preset.input_size)
    buffer = io.BytesIO()
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(
            model.cpu().eval(),
            (example,),
            buffer,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )
    return buffer.getvalue()


class OnnxBackend:
    """The module exported to ONNX (batch dimension dynamic), run by ONNX Runtime on the CPU with
    ``threads`` intra-op threads. Raises ``ImportError`` without onnxruntime, and whatever the
    exporter raises for a module it cannot export."""

    name = "onnxruntime"

    def __init__(self, model: torch.nn.Module, preset: Preset, threads: int = 1):
        import onnxruntime

        self.preset = preset
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # idle threads sleep instead of spinning: the API's HTTP work shares these cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(
            onnx_graph(model, preset), options, providers=["CPUExecutionProvider"]
        )
        # Preset.normalize's (x / 255 - mean) / std in numpy: the same float32 operations, without
        # torch's per-operation dispatch (a third of the model step of a LeNet-5 image)
        self.mean = np.asarray(preset.mean, dtype=np.float32).reshape(1, -1, 1, 1)
        self.std = np.asarray(preset.std, dtype=np.float32).reshape(1, -1, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        batch = pixels.cpu().numpy().astype(np.float32)
        batch /= 255
        batch -= self.mean
        batch /= self.std
        (logits,) = self.session.run(None, {"input": batch})
        return torch.softmax(torch.from_numpy(logits).float(), dim=1)


@lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_freed_memory() -> None:
    """Hand the memory that large decodes freed back to the OS (glibc's ``malloc_trim(0)``; a
    no-op elsewhere). glibc keeps freed blocks of its per-thread arenas for reuse, so after a few
    6000 x 6000 uploads an API process stayed 1-3 GB larger for good; trimmed, it returns to its
    size before them. Takes milliseconds: called after costly decodes only."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def bf16_is_native(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: a CUDA device that supports it, or a CPU
    that oneDNN runs bf16 on (AVX512-BF16 or AMX); elsewhere it is emulated, slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def build_backend(
    model: torch.nn.Module,
    preset: Preset,
    device: torch.device,
    backend: str = "auto",
    threads: int = 1,
    precision: str = "fp32",
) -> Backend:
    """The inference backend of one loaded model.

    Args:
        model: the network in eval mode (its logits are compared for the parity check).
        preset: its preset (input size, normalisation).
        device: ``cpu`` or ``cuda``; ONNX Runtime is only used on the CPU.
        backend: ``torch``, ``onnxruntime`` or ``auto`` (ONNX Runtime on the CPU when it loads and
            agrees with PyTorch, else PyTorch).
        threads: intra-op threads of ONNX Runtime.
        precision: ``fp32``, or ``bf16``: PyTorch in bfloat16 (``backend`` is then not used), where
            ``bf16_is_native`` (else fp32, with a warning).

    Returns:
        a callable uint8 (N, C, H, W) -> float32 (N, classes) probabilities on the CPU, with a
        ``name``. An ONNX Runtime backend that fails to export or disagrees with PyTorch (any
        probability off by more than ``PARITY_ATOL`` on the parity images) falls back to PyTorch
        with a warning.
    """
    if precision == "bf16":
        if bf16_is_native(device):
            return TorchBackend(model, preset, device, dtype=torch.bfloat16)
        log.warning(
            "INFERENCE_PRECISION=bf16: %s has no native bfloat16, serving %s in fp32", device, preset.task
        )
    torch_backend = TorchBackend(model, preset, device)
    if backend == "torch" or device.type != "cpu":
        return torch_backend
    try:
        onnx_backend = OnnxBackend(model, preset, threads)
    except Exception as exc:  # no onnxruntime, or an operator the exporter cannot write
        log.warning("ONNX Runtime backend unavailable for %s, using PyTorch: %s", preset.task, exc)
        return torch_backend
    difference = parity_difference(torch_backend, onnx_backend, preset)
    if difference > PARITY_ATOL:
        log.warning(
            "ONNX Runtime differs from PyTorch by %.2g for %s (limit %g), using PyTorch",
            difference,
            preset.task,
            PARITY_ATOL,
        )
        return torch_backend
    return onnx_backend


def parity_difference(first: Backend, second: Backend, preset: Preset) -> float:
    """Largest absolute probability difference between two backends on four fixed images of the
    preset's size (black, white, and two seeded noise images), as float."""
    height, width = preset.input_size
    generator = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (2, preset.channels, height, width), generator=generator, dtype=torch.uint8)
    images = torch.cat(
        [
            torch.zeros(1, preset.channels, height, width, dtype=torch.uint8),
            torch.full((1, preset.channels, height, width), 255, dtype=torch.uint8),
            noise,
        ]
    )
    return float((first(images) - second(images)).abs().max())


class MicroBatcher:
    """One inference thread that runs concurrent single-image requests as batches.

    ``run`` may be called from many threads at once; requests for the same backend that are
    queued together are stacked into one batch (at most ``max_batch``), others run in turn, in
    arrival order.

    Args:
        max_batch: largest batch (1: no batching, but still one inference at a time).
        max_wait_s: how long the thread waits for more requests once it has one (0: it takes
            what is queued and never waits, so a lone request is not delayed).
    """

    def __init__(self, max_batch: int = 8, max_wait_s: float = 0.0):
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.batches = 0
        self.images = 0

    def run(self, backend: Backend, pixels: torch.Tensor) -> torch.Tensor:
        """Probabilities of one image: uint8 (C, H, W) -> float32 (classes,). Blocks until its
        batch has run; raises what the backend raised."""
        return self.submit(backend, pixels).result()

    def submit(self, backend: Backend, pixels: torch.Tensor) -> Future:
        """Queue one image; the future's result is its float32 (classes,) probabilities. A future
        cancelled before its batch starts (``asyncio.wrap_future`` of a request whose client left)
        is dropped from the batch."""
        future: Future = Future()
        self._ensure_thread()
        self._queue.put((backend, pixels, future))
        return future

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="inference", daemon=True)
                self._thread.start()

    def _collect(self) -> list[tuple[Backend, torch.Tensor, Future]]:
        items = [self._queue.get()]
        deadline = time.monotonic() + self.max_wait_s
        while len(items) < self.max_batch:
            try:
                if self.max_wait_s > 0:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    items.append(self._queue.get(timeout=remaining))
                else:
                    items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return items

    def _loop(self) -> None:
        while True:
            items = self._collect()
            groups: dict[int, list[tuple[Backend, torch.Tensor, Future]]] = {}
            for item in items:
                # a request whose client went away (its future cancelled) is skipped; from here on
                # the future cannot be cancelled, so setting its result cannot fail
                if item[2].set_running_or_notify_cancel():
                    groups.setdefault(id(item[0]), []).append(item)
            for group in groups.values():
                backend = group[0][0]
                try:
                    probabilities = backend(torch.stack([pixels for _, pixels, _ in group]))
                except BaseException as exc:  # handed to every waiting request
                    for _, _, future in group:
                        future.set_exception(exc)
                    continue
                self.batches += 1
                self.images += len(group)
                for row, (_, _, future) in zip(probabilities, group, strict=True):
                    future.set_result(row)
