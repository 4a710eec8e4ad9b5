"""Service settings: the only place the environment is read.

Every value can be set as an environment variable of the same name in upper case
(``REDIS_URL``, ``DATA_DIR``, ``API_KEYS`` ...) or in a ``.env`` file in the working
directory. ``get_settings()`` is cached; tests build their own ``Settings`` or clear
the cache after changing the environment.
"""

from __future__ import annotations

import json
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

log = logging.getLogger(__name__)


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Configuration shared by the API, the Celery worker and the benchmark."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True, hide_input_in_errors=True)

    environment: Literal["development", "production"] = Field(
        "production",
        description="`development` allows running without API keys (a warning is logged at start).",
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", description="Redis for the Celery broker and job records."
    )
    redis_prefix: str = Field(
        "imgclf",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="Prefix of every Redis key this service writes.",
    )
    redis_timeout_s: float = Field(
        2.0, gt=0, le=60, description="Connect and socket timeout for Redis calls, seconds."
    )
    celery_queue: str = Field(
        "training",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="Name of the Celery queue that carries training jobs.",
    )

    celery_transport_options: Annotated[dict[str, int | float | str | bool], NoDecode] = Field(
        default_factory=dict,
        description=(
            "Extra kombu Redis transport options as JSON, merged over the defaults, e.g. "
            '{"unacked_restore_interval": 1}.'
        ),
    )

    data_dir: Path = Field(Path("data"), description="Where datasets are looked for (standard layouts).")
    models_dir: Path = Field(Path("var/models"), description="Checkpoint store.")
    cache_dir: Path = Field(
        Path("var/cache"),
        description="Decoded-dataset caches (uint8 tensors), feature caches and resume state.",
    )
    allow_download: bool = Field(
        False, description="Download a dataset with torchvision / its official URL when it is missing."
    )

    resnet18_weights: Literal["IMAGENET1K_V1", "local", "none"] = Field(
        "IMAGENET1K_V1",
        description=(
            "Initial weights of hymenoptera_resnet18: torchvision's IMAGENET1K_V1 (looked up in the "
            "torch hub cache under TORCH_HOME, downloaded there when ALLOW_DOWNLOAD is set), "
            "`local` (the file RESNET18_WEIGHTS_FILE) or `none` (random init)."
        ),
    )
    resnet18_weights_file: Path | None = Field(
        None,
        description="A ResNet18 ImageNet state dict: .safetensors, or .pth/.pt read with weights_only=True.",
    )

    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Training device of the worker; `auto` picks CUDA when available."
    )
    torch_threads: int | None = Field(
        None, ge=1, le=1024, description="torch intra-op threads in the worker; default: torch's own."
    )

    job_lease_ttl_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="A running job's lease in Redis; renewed every third of it by the worker that runs it.",
    )
    reaper_interval_s: float = Field(
        10.0, gt=0, le=3600, description="How often a worker looks for jobs whose worker died."
    )
    max_attempts: int = Field(3, ge=1, le=100, description="Deliveries of a job before it is failed as lost.")
    visibility_timeout_s: int = Field(
        43200,
        ge=1,
        description=(
            "Redis transport visibility timeout, seconds. Kept long: lost workers are detected by the "
            "job lease, not by redelivery (celery#5935)."
        ),
    )

    max_upload_bytes: int = Field(
        10 * 1024 * 1024, ge=1024, description="Largest accepted upload to /predict, bytes."
    )
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="Largest accepted image, width x height, checked before decoding."
    )
    max_jpeg_scans: int = Field(
        500,
        ge=1,
        description="Most scans (SOS markers) accepted in a JPEG; each progressive scan re-walks the image.",
    )
    max_decode_cost: int = Field(
        500_000_000,
        ge=1,
        description="Largest decoding cost accepted, pixels x JPEG scans (pixels for other formats).",
    )
    heavy_decode_cost: int = Field(
        16_000_000,
        ge=1,
        description=(
            "Uploads costing more than this to decode (pixels x scans) are decoded one at a time in a "
            "lane of their own, never in the INFERENCE_CONCURRENCY slots that smaller images use."
        ),
    )
    model_cache_size: int = Field(4, ge=1, le=256, description="Loaded models kept in the API's memory.")
    inference_threads: int = Field(
        1, ge=1, le=64, description="torch intra-op threads per inference call in the API."
    )
    inference_concurrency: int = Field(
        default_factory=lambda: os.cpu_count() or 1,
        ge=1,
        le=256,
        description="Images decoded and classified at once by the API; more requests wait their turn.",
    )

    datasets_dir: Path = Field(
        Path("var/datasets"),
        description="Uploaded datasets (POST /datasets): each one's decoded uint8 images under <id>/.",
    )
    max_dataset_bytes: int = Field(
        1 << 30, ge=1024, description="Largest dataset archive accepted by POST /datasets, bytes."
    )
    max_dataset_entries: int = Field(
        50_000, ge=1, description="Most entries (files, folders, links) a dataset archive may hold."
    )
    max_dataset_uncompressed_bytes: int = Field(
        2 << 30, ge=1024, description="Largest total uncompressed size of a dataset archive, bytes."
    )
    max_compression_ratio: float = Field(
        100.0,
        gt=1,
        description="Largest uncompressed/compressed ratio of one archive entry (zip bombs); a file over "
        "it is skipped, a gzip stream over it fails the dataset.",
    )
    web_concurrency: int = Field(
        default_factory=lambda: min(os.cpu_count() or 1, 8),
        ge=1,
        le=64,
        description=(
            "API processes (uvicorn workers) that scripts/up.sh and the Docker image start; default "
            "the CPU count, at most 8. Each process keeps its own loaded models (MODEL_CACHE_SIZE "
            "of them) and has INFERENCE_CONCURRENCY slots."
        ),
    )
    inference_device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the API runs models: `auto` picks CUDA when available."
    )
    inference_backend: Literal["auto", "torch", "onnxruntime"] = Field(
        "auto",
        description=(
            "What runs a model on the CPU: `onnxruntime` (the weights exported to ONNX when loaded; "
            "kept only if its outputs match PyTorch's), `torch`, or `auto` (ONNX Runtime when it "
            "matches, else PyTorch). CUDA always uses PyTorch."
        ),
    )
    inference_precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description=(
            "Arithmetic of the served models: `fp32` (the outputs evaluation computed), or `bf16` "
            "(PyTorch with bfloat16 weights and activations: ResNet18 about twice as fast on CPUs "
            "with AVX512-BF16 or AMX and on CUDA; probabilities move by up to ~1e-2, so close calls "
            "can change class). Falls back to fp32, with a warning, where bf16 is not native."
        ),
    )
    inference_max_batch: int | None = Field(
        None,
        ge=1,
        le=256,
        description=(
            "Largest batch of concurrent /predict images of one model run as one forward pass "
            "(micro-batching; 1 turns it off). Unset: 4 on the CPU (larger batches save no CPU "
            "there and lengthen the wait of the requests behind them: p99 532 against 611-629 ms "
            "with 8, bench/README.md), 32 on CUDA."
        ),
    )
    inference_max_wait_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description=(
            "How long the inference thread waits for more images once it has one; 0 runs what is "
            "queued at once (no added latency; batches still form under load)."
        ),
    )
    inference_inline_ms: float = Field(
        2.0,
        ge=0,
        le=1000,
        description=(
            "A model whose one-image forward pass takes less than this (ms, measured when loaded) "
            "is classified in the event loop for uploads up to 256 KiB, without thread hops or the "
            "batcher (LeNet-5, the dense net); 0 always uses the worker threads."
        ),
    )

    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated bearer tokens; empty disables auth (development only).",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated allowed CORS origins; empty disables CORS."
    )

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _parse_csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("celery_transport_options", mode="before")
    @classmethod
    def _parse_json(cls, value: object) -> object:
        return json.loads(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_secure(self) -> Settings:
        if self.resnet18_weights == "local" and self.resnet18_weights_file is None:
            raise ValueError("RESNET18_WEIGHTS=local needs RESNET18_WEIGHTS_FILE")
        if any(len(key) < 16 for key in self.api_keys):
            raise ValueError("API_KEYS: every API key must be at least 16 characters long")
        if any(not key.isprintable() or any(c.isspace() for c in key) for key in self.api_keys):
            raise ValueError("API_KEYS: keys cannot contain spaces or control characters (a Bearer token)")
        return self

    def resume_dir(self, job_id: str) -> Path:
        """Where job ``job_id`` keeps its per-epoch resume state (worker side)."""
        return self.cache_dir / "jobs" / job_id

    def check_api_security(self) -> None:
        """Refuse to serve without API keys outside development; raises ``RuntimeError``."""
        if not self.api_keys and self.environment != "development":
            raise RuntimeError(
                "API_KEYS is empty: set API_KEYS=<key>[,<key>...] or, for local development only, "
                "ENVIRONMENT=development to run without authentication"
            )


@lru_cache
def get_settings() -> Settings:
    """Settings read once from the environment; raises ``pydantic.ValidationError`` if invalid."""
    return Settings()
