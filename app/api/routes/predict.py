"""/predict: classify an uploaded image with a trained checkpoint."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import torch
from fastapi import APIRouter, HTTPException, Request, Response, status
from PIL import Image
from starlette.concurrency import run_in_threadpool

from app.forms import CLIENT_CLOSED_REQUEST, FileFormRoute, read_form
from app.inference import LoadedModel, ModelRegistry, infer, postprocess, preprocess
from app.metrics import PREDICTION_SECONDS
from app.openapi import multipart_body
from app.schemas import ClassProbability, PredictForm, PredictionPublic, error_responses
from app.serving import release_freed_memory
from core.config import Settings
from core.images import DecodeLimits, ImageRejected, load_image, open_image
from tasks.base import Preset

router = APIRouter(tags=["predict"], route_class=FileFormRoute)


@router.post(
    "/predict",
    response_model=PredictionPublic,
    summary="Classify an uploaded image",
    openapi_extra=multipart_body(PredictForm),
    responses=error_responses(
        _400=("Empty file, or a body that is not valid multipart.", "the uploaded file is empty"),
        _404=(
            "Unknown model_id or alias, or no trained model of the task (or dataset) yet.",
            "no trained mnist_lenet5 model yet: submit a job with POST /jobs first",
        ),
        _409=(
            "The checkpoint failed verification (tampered or truncated), or the alias points at a "
            "model deleted outside the API.",
            "model mnist_lenet5-20261129-161500-5f2c1e0b failed verification: sha256 mismatch",
        ),
        _413=(
            "File over MAX_UPLOAD_BYTES; image (any frame) over MAX_IMAGE_PIXELS, MAX_JPEG_SCANS or "
            "MAX_DECODE_COST.",
            "the file is larger than the limit of 10485760 bytes (MAX_UPLOAD_BYTES)",
        ),
        _415=(
            "Not an accepted format (PNG, JPEG, GIF, TIFF, WebP, BMP), no decoder for it here, or a "
            "body with a Content-Encoding (compressed).",
            "the uploaded file is not an image in an accepted format (PNG, JPEG, GIF, TIFF, WebP, BMP)",
        ),
        _422=(
            "A form field is invalid (FastAPI's list of errors), or the request as a whole is: corrupt "
            "image, unknown or repeated form field, neither task, dataset nor model_id, a model_id not "
            "trained on the dataset (a sentence).",
            "give either task or model_id",
        ),
    ),
)
async def predict_image(request: Request) -> Response:
    """Top-k class probabilities. Preprocessing is the checkpoint's own evaluation preset.

    Decoding and inference run in worker threads, at most INFERENCE_CONCURRENCY at a time (first
    come, first served), so a burst of requests queues instead of thrashing the CPU. The header is
    read first (no slot held): uploads costing more than HEAVY_DECODE_COST to decode wait for a lane
    of their own, one at a time, so they never hold the slots that small images use. A client
    that disconnects while its request waits for a slot or for the model is dropped there (499
    in the metrics), so clients that time out and retry do not multiply the work.
    """
    async with read_form(request, PredictForm) as form:
        return await _predict(request, form)


async def _predict(request: Request, form: PredictForm) -> Response:
    registry: ModelRegistry = request.app.state.registry
    settings: Settings = request.app.state.settings
    if not form.task and not form.model_id and not form.dataset:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "give either task, dataset or model_id")
    _check_task_and_dataset(form.task, form.dataset)

    data = await form.file.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"the file is larger than the limit of {settings.max_upload_bytes} bytes (MAX_UPLOAD_BYTES)",
        )
    limits = DecodeLimits.from_settings(settings)
    if registry.runs_inline(form.model_id, form.task, len(data)):
        # a light model and a small file: the thread hops would cost more than the work, unless
        # its header (read here: a file of at most 256 KiB) says the image is large or costly to
        # decode (a scan bomb)
        image, info = open_image(data, limits)
        if registry.fits_inline(info) and info["cost"] <= settings.heavy_decode_cost:
            async with request.app.state.inference_slots:
                prepared = _prepare(registry, settings, image, info, limits, form)
                return _respond(prepared, infer(prepared.loaded, prepared.pixels[None])[0], form.top_k)
    else:
        image, info = await run_in_threadpool(open_image, data, limits)
    heavy = info["cost"] > settings.heavy_decode_cost
    lane = request.app.state.heavy_decode_lane if heavy else request.app.state.inference_slots
    async with lane:  # bounds the memory of decoding; the model step is the batcher's queue
        if await request.is_disconnected():  # it left while waiting: skip its decoding
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        prepared = await run_in_threadpool(_prepare, registry, settings, image, info, limits, form)
    # The opened image now holds the decoded pixels (up to MAX_IMAGE_PIXELS): let them go before
    # waiting for the model, so that only the slots' images are ever in memory at full size.
    del image, data
    if heavy:
        await run_in_threadpool(release_freed_memory)
    loaded = prepared.loaded
    if await request.is_disconnected():  # and its place in the model's queue
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    if loaded.batched:
        # awaited here, not in a worker thread: requests decode while others' batches run
        probabilities = await asyncio.wrap_future(loaded.batcher.submit(loaded.backend, prepared.pixels))
    else:
        probabilities = (await run_in_threadpool(infer, loaded, prepared.pixels[None]))[0]
    return _respond(prepared, probabilities, form.top_k)


def _check_task_and_dataset(task: str | None, dataset: str | None) -> None:
    """422 for a built-in task together with an uploaded dataset: they name two model families
    (the OpenAPI document declares the pair exclusive)."""
    if task and dataset:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"dataset chooses a model of an uploaded dataset, task a model of the built-in task {task}: "
            "give task or dataset, not both",
        )


@dataclass
class _Prepared:
    """An upload ready for the model: uint8 (C, H, W) ``pixels`` in ``loaded``'s preset."""

    loaded: LoadedModel
    alias: str | None
    pixels: torch.Tensor
    inverted: bool | None
    framing: dict | None
    info: dict
    start: float = field(default_factory=time.perf_counter)


def _prepare(
    registry: ModelRegistry,
    settings: Settings,
    image: Image.Image,
    info: dict,
    limits: DecodeLimits,
    form: PredictForm,
) -> _Prepared:
    """Decode the upload, resolve and load the model, and preprocess (blocking: run in a thread
    unless the model is light). Raises ``HTTPException`` 422 for a model that does not fit the
    request, ``ImageRejected`` and the ``CheckpointStore`` errors (answered by the handlers)."""
    image = load_image(image, info, limits)
    info = {k: v for k, v in info.items() if k != "cost"}
    try:
        checkpoint, alias = registry.resolve_with_alias(
            form.model_id, form.task, form.alias, name=form.dataset
        )
        if form.dataset and checkpoint.metadata.get("dataset") != form.dataset:
            raise ValueError(f"model {checkpoint.model_id} was not trained on dataset {form.dataset}")
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    loaded = registry.get(checkpoint)
    _check_resized_size(image, loaded.preset, settings.max_image_pixels)
    pixels, inverted, framing = preprocess(loaded, image, form.invert, form.normalize)
    return _Prepared(loaded, alias, pixels, inverted, framing, info)


def _respond(prepared: _Prepared, probabilities: torch.Tensor, top_k: int) -> Response:
    """The JSON answer from one image's float32 (classes,) probabilities."""
    loaded = prepared.loaded
    PREDICTION_SECONDS.labels(task=loaded.task).observe(time.perf_counter() - prepared.start)
    result = postprocess(probabilities, top_k, prepared.inverted, prepared.framing)
    prediction = PredictionPublic(
        model_id=loaded.model_id,
        alias=prepared.alias,
        task=loaded.task,
        predictions=[
            ClassProbability(index=i, label=loaded.classes[i], probability=p)
            for i, p in zip(result.indices, result.probabilities, strict=True)
        ],
        inverted=result.inverted,
        image=prepared.info,
        framing=result.framing,
    )
    # Serialised here: a returned model would be validated again by FastAPI (a tenth of the CPU
    # of a LeNet-5 request); the OpenAPI schema still comes from response_model.
    return Response(prediction.model_dump_json(), media_type="application/json")


def _check_resized_size(image: Image.Image, preset: Preset, max_pixels: int) -> None:
    """Refuse an image that the preset's Resize would blow up (a 1 x 8000 strip becomes
    256 x 2,048,000 under Resize(256)): the resized image must fit ``max_pixels`` too."""
    width, height = preset.resized_size(*image.size)
    if width * height > max_pixels:
        raise ImageRejected(
            413,
            f"the image is {image.width}x{image.height}; this model resizes it to {width}x{height} "
            f"= {width * height} pixels, over the limit of {max_pixels} (MAX_IMAGE_PIXELS): crop it to "
            "a less extreme aspect ratio",
        )
