"""Exception handlers: every expected failure becomes a 4xx/503 with a message that says why."""

from __future__ import annotations

import logging
from urllib.parse import urlsplit, urlunsplit

import redis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError

from app.images import ImageRejected
from models_store.checkpoint import CheckpointInvalid, InvalidModelId, ModelNotFound

log = logging.getLogger(__name__)


def redact_url(url: str) -> str:
    """The URL without its password."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        parts = parts._replace(netloc=netloc)
    return urlunsplit(parts)


def _detail(status_code: int, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status_code, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(redis.exceptions.RedisError)
    async def redis_unavailable(request: Request, exc: redis.exceptions.RedisError) -> JSONResponse:
        url = redact_url(request.app.state.settings.redis_url)
        log.warning("Redis error on %s %s: %s", request.method, request.url.path, exc)
        return _detail(
            503,
            f"Redis at {url} is unreachable ({type(exc).__name__}: {exc}); jobs cannot be read or "
            "submitted until it is back. Retry later.",
            {"Retry-After": "5"},
        )

    @app.exception_handler(OperationalError)
    async def broker_unavailable(request: Request, exc: OperationalError) -> JSONResponse:
        url = redact_url(request.app.state.settings.redis_url)
        return _detail(
            503, f"the job queue (Redis at {url}) is unreachable: {exc}. Retry later.", {"Retry-After": "5"}
        )

    @app.exception_handler(InvalidModelId)
    async def invalid_model_id(request: Request, exc: InvalidModelId) -> JSONResponse:
        return _detail(422, str(exc))

    @app.exception_handler(ModelNotFound)
    async def model_not_found(request: Request, exc: ModelNotFound) -> JSONResponse:
        return _detail(404, str(exc))

    @app.exception_handler(CheckpointInvalid)
    async def checkpoint_invalid(request: Request, exc: CheckpointInvalid) -> JSONResponse:
        return _detail(409, str(exc))

    @app.exception_handler(ImageRejected)
    async def image_rejected(request: Request, exc: ImageRejected) -> JSONResponse:
        return _detail(exc.status_code, exc.detail)
