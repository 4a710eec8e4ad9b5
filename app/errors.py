"""Exception handlers: every expected failure becomes a 4xx/503 with a message that says why."""

from __future__ import annotations

import logging
import math
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from app.inference import AliasDangling
from app.protocol import allowed_methods
from core.images import ImageRejected
from core.jobs import JobRecordCorrupt
from models_store.aliases import AliasStoreUnavailable, InvalidAlias
from models_store.checkpoint import CheckpointInvalid, InvalidModelId, ModelNotFound

log = logging.getLogger(__name__)

BODY_PARSE_ERROR = "There was an error parsing the body"  # fastapi.routing's message


def redact_url(url: str) -> str:
    """The URL without its password."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        parts = parts._replace(netloc=netloc)
    return urlunsplit(parts)


def _detail(status_code: int, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status_code, headers=headers)


MAX_ECHO_CHARS = 200  # an error echoes at most this much of a string input
MAX_ECHO_ITEMS = 50  # ... and of a list or object input


def json_safe(value: Any) -> Any:
    """``value`` made safe to echo in a validation error: numbers stay numbers, non-finite floats
    become strings (JSON cannot carry them), unencodable (surrogate) characters are escaped, and
    long strings and containers are cut (an error never echoes a whole upload back)."""
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        if len(value) > MAX_ECHO_CHARS:
            value = f"{value[:MAX_ECHO_CHARS]}... ({len(value)} characters in all)"
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        items = list(value.items())
        safe = {json_safe(str(k)): json_safe(v) for k, v in items[:MAX_ECHO_ITEMS]}
        if len(items) > MAX_ECHO_ITEMS:
            safe["..."] = f"{len(items) - MAX_ECHO_ITEMS} more keys"
        return safe
    if isinstance(value, (list, tuple)):
        safe = [json_safe(v) for v in value[:MAX_ECHO_ITEMS]]
        if len(value) > MAX_ECHO_ITEMS:
            safe.append(f"... {len(value) - MAX_ECHO_ITEMS} more items")
        return safe
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return json_safe(str(value))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def validation_failed(request: Request, exc: RequestValidationError) -> JSONResponse:
        """FastAPI's 422, but safe for inputs JSON cannot carry back (NaN, Infinity, 1e400, lone
        surrogates), which would otherwise turn the 422 into a 500."""
        return JSONResponse({"detail": jsonable_encoder(json_safe(exc.errors()))}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        """FastAPI's own, except that its bare "error parsing the body" 400 says what was wrong
        (invalid UTF-8, nesting too deep, an integer with too many digits, ...)."""
        if exc.status_code == 400 and exc.detail == BODY_PARSE_ERROR and exc.__cause__ is not None:
            cause = exc.__cause__
            reason = f"{type(cause).__name__}: {cause}"[:300]
            return _detail(400, f"the request body is not valid JSON ({reason})")
        if exc.status_code == 405:
            allowed = allowed_methods(request.app.router.routes, request.scope)
            method = "HEAD" if request.scope.get("imgclf.head") else request.method
            return _detail(
                405,
                f"{method} is not allowed on {request.url.path}; allowed: {', '.join(allowed)}",
                {"Allow": ", ".join(allowed)},
            )
        return await http_exception_handler(request, exc)

    @app.exception_handler(redis.exceptions.RedisError)
    async def redis_unavailable(request: Request, exc: redis.exceptions.RedisError) -> JSONResponse:
        url = redact_url(request.app.state.settings.redis_url)
        log.warning("Redis error on %s %s: %s", request.method, request.url.path, exc)
        if isinstance(exc, redis.exceptions.ResponseError):  # reachable, but refused the command
            return _detail(500, f"Redis at {url} refused a command ({exc}); the job data may be damaged")
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

    @app.exception_handler(JobRecordCorrupt)
    async def job_record_corrupt(request: Request, exc: JobRecordCorrupt) -> JSONResponse:
        log.error("%s", exc)
        return _detail(500, f"{exc}; the other jobs are unaffected")

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

    @app.exception_handler(InvalidAlias)
    async def invalid_alias(request: Request, exc: InvalidAlias) -> JSONResponse:
        return _detail(422, str(exc))

    @app.exception_handler(AliasDangling)
    async def alias_dangling(request: Request, exc: AliasDangling) -> JSONResponse:
        return _detail(409, str(exc))

    @app.exception_handler(AliasStoreUnavailable)
    async def alias_store_unavailable(request: Request, exc: AliasStoreUnavailable) -> JSONResponse:
        return _detail(503, str(exc), {"Retry-After": "5"})
