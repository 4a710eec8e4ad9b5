"""Bearer API keys: when API_KEYS is set, every endpoint but /healthz, /readyz and the docs needs one."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable

from fastapi import HTTPException, Request, Security, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

from app.protocol import send_json

bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="APIKey",
    description="One of the keys in API_KEYS, sent as `Authorization: Bearer <key>`.",
)

MISSING_KEY = "missing API key: send 'Authorization: Bearer <key>'"
INVALID_KEY = "invalid API key"


def _matches_any(token: str, keys: list[str]) -> bool:
    """Constant-time comparison against every key (no early exit that would leak which matched)."""
    matched = False
    for key in keys:
        matched |= secrets.compare_digest(token.encode(), key.encode())
    return matched


async def require_api_key(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Security(bearer_scheme),
) -> None:
    """Raise 401 unless auth is off (no API_KEYS) or the bearer token is a configured key."""
    keys = request.app.state.settings.api_keys
    if not keys:
        return
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail=MISSING_KEY,
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not _matches_any(credentials.credentials, keys):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail=INVALID_KEY,
            headers={"WWW-Authenticate": "Bearer"},
        )


def key_error(authorization: str | None, keys: list[str]) -> str | None:
    """Why an ``Authorization`` header value does not authenticate (None when it does, or when
    ``keys`` is empty: auth off)."""
    if not keys:
        return None
    scheme, _, token = (authorization or "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return MISSING_KEY
    if not _matches_any(token, keys):
        return INVALID_KEY
    return None


def key_owner(authorization: str | None) -> str:
    """A stable, non-secret name of the caller's API key (sha256 of the token, 16 hex digits), to
    scope per-client state such as Idempotency-Key; "" without a bearer token (auth off)."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return ""
    return hashlib.sha256(token.strip().encode()).hexdigest()[:16]


class ApiKeyMiddleware:
    """401 for a protected path without a valid key, before the app reads (or parses) the body.

    ``is_open(path)`` says which paths need no key (probes, docs). The route dependency
    ``require_api_key`` checks again and keeps the security scheme in the OpenAPI document, so
    Swagger's Authorize button works.
    """

    def __init__(self, app: ASGIApp, keys: list[str], is_open: Callable[[str], bool]):
        self.app = app
        self.keys = keys
        self.is_open = is_open

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.keys and not self.is_open(scope["path"]):
            authorization = next(
                (v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None
            )
            error = key_error(authorization, self.keys)
            if error:
                await send_json(send, 401, error, {"WWW-Authenticate": "Bearer"})
                return
        await self.app(scope, receive, send)
