"""Builds the FastAPI application. Run with ``uvicorn app.main:create_app --factory``."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import anyio
import torch
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline

from app.api.main import api_router
from app.api.routes.ui import is_ui_path, mount_ui
from app.errors import install_error_handlers, redact_url
from app.events import EventHub, async_redis_client
from app.forms import form_limits
from app.inference import ModelRegistry
from app.job_metrics import jobs_registry
from app.limits import BodySizeLimitMiddleware
from app.metrics import MetricsMiddleware
from app.openapi import TAGS, install_openapi
from app.protocol import MAX_URL_BYTES, ContentEncodingMiddleware, HeadAsGetMiddleware, UrlLengthMiddleware
from app.security import ApiKeyMiddleware
from app.serving import MicroBatcher
from core.config import Settings, get_settings
from core.datasets import DatasetStore
from core.jobs import JobStore, redis_client
from core.queue import make_celery
from models_store.aliases import AliasStore
from models_store.checkpoint import CheckpointStore
from models_store.export import ExportCache

log = logging.getLogger("app")

DESCRIPTION = """
Train the three reference image classifiers (CIFAR-10 dense net, MNIST LeNet-5, hymenoptera
ResNet18) as background jobs on Celery workers, and classify uploaded images with the resulting
checkpoints.

1. `POST /jobs` with a task (and optional hyperparameters): 202 with the queued job.
2. `GET /jobs/{id}`: status, live progress, per-epoch metrics, and finally `model_id`.
3. `POST /predict` with an image file and the task (or a `model_id`): top-k classes.

Authenticate with **Authorize** (`Bearer <API key>`) unless the server runs without keys.
"""

# Bytes of a /predict multipart body beyond the file itself (boundaries, form fields).
MULTIPART_OVERHEAD = 64 * 1024
JSON_BODY_LIMIT = 1024 * 1024
DOCS_STATIC_URL = "/static-docs"
# Paths that need no API key: the probes and the documentation.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


def is_open_path(path: str) -> bool:
    """Whether ``path`` is served without an API key (probes, docs and their static files, the
    console's files: the API calls the console makes carry the key)."""
    return path in OPEN_PATHS or path.startswith(DOCS_STATIC_URL + "/") or is_ui_path(path)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API. ``settings`` defaults to the environment's; raises ``RuntimeError`` when
    API_KEYS is empty outside development."""
    settings = settings or get_settings()
    settings.check_api_security()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not settings.api_keys:
            log.warning("API_KEYS is empty: authentication is OFF (ENVIRONMENT=development)")
        torch.set_num_threads(settings.inference_threads)
        client = redis_client(settings.redis_url, settings.redis_timeout_s)
        checkpoints = CheckpointStore(settings.models_dir)
        app.state.settings = settings
        app.state.jobs = JobStore(client, settings.redis_prefix)
        app.state.datasets = DatasetStore(client, settings.redis_prefix)
        app.state.checkpoints = checkpoints
        app.state.aliases = AliasStore(client, settings.redis_prefix)
        await anyio.to_thread.run_sync(app.state.aliases.refresh)
        device = inference_device(settings.inference_device)
        max_batch = settings.inference_max_batch or (32 if device.type == "cuda" else 4)
        app.state.registry = ModelRegistry(
            checkpoints,
            settings.model_cache_size,
            app.state.aliases,
            device=device,
            backend=settings.inference_backend,
            threads=settings.inference_threads,
            batcher=MicroBatcher(max_batch, settings.inference_max_wait_ms / 1000),
            inline_ms=settings.inference_inline_ms,
            precision=settings.inference_precision,
        )
        app.state.exports = ExportCache(settings.cache_dir / "exports")
        app.state.celery = make_celery(settings)
        app.state.inference_slots = anyio.Semaphore(settings.inference_concurrency)
        app.state.heavy_decode_lane = anyio.Semaphore(1)  # uploads over HEAVY_DECODE_COST
        app.state.redis_async = async_redis_client(settings.redis_url, settings.redis_timeout_s)
        app.state.event_hub = EventHub(app.state.redis_async)
        app.state.jobs_registry = jobs_registry(app.state.jobs)
        log.info("API ready: Redis %s, models in %s", redact_url(settings.redis_url), settings.models_dir)
        yield
        client.close()
        await app.state.redis_async.aclose()

    # Swagger UI 5 and ReDoc served from the package (no CDN), so /docs works offline.
    app = FastAPIOffline(
        static_url=DOCS_STATIC_URL,
        title="imgclf: train and serve image classifiers",
        version="0.1.0",
        description=DESCRIPTION,
        openapi_tags=TAGS,
        lifespan=lifespan,
    )
    app.state.form_limits = form_limits(settings.max_upload_bytes)  # app.forms.read_form's
    app.include_router(api_router)
    mount_ui(app)
    install_error_handlers(app)
    install_openapi(app, auth=bool(settings.api_keys))
    upload_limit = (
        settings.max_upload_bytes + MULTIPART_OVERHEAD,
        f"MAX_UPLOAD_BYTES={settings.max_upload_bytes} for the file, plus {MULTIPART_OVERHEAD} for the form",
    )
    json_limit = (JSON_BODY_LIMIT, "the limit of a JSON request")
    dataset_limit = (
        settings.max_dataset_bytes + MULTIPART_OVERHEAD,
        f"MAX_DATASET_BYTES={settings.max_dataset_bytes} for the archive, plus {MULTIPART_OVERHEAD} more",
    )
    app.add_middleware(
        BodySizeLimitMiddleware,
        limit_for=lambda path: (
            upload_limit if path == "/predict" else dataset_limit if path == "/datasets" else json_limit
        ),
    )
    # Added innermost first; outside in: HEAD -> metrics -> CORS -> 414 -> 401 -> 415 -> 413 ->
    # routes. Each check answers before the body is read.
    app.add_middleware(ContentEncodingMiddleware)
    app.add_middleware(ApiKeyMiddleware, keys=settings.api_keys, is_open=is_open_path)
    app.add_middleware(UrlLengthMiddleware, limit=MAX_URL_BYTES)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "HEAD", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
        )
    app.add_middleware(MetricsMiddleware)
    app.add_middleware(HeadAsGetMiddleware)
    return app


def inference_device(choice: str) -> torch.device:
    """``INFERENCE_DEVICE`` as a device: ``auto`` is CUDA when available, else the CPU. Raises
    ``RuntimeError`` for ``cuda`` on a machine without CUDA."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("INFERENCE_DEVICE=cuda but CUDA is not available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)
