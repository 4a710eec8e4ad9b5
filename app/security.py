"""Bearer API keys: when API_KEYS is set, every endpoint but /healthz, /readyz and the docs needs one."""

from __future__ import annotations

import secrets

from fastapi import HTTPException, Request, Security, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="APIKey",
    description="One of the keys in API_KEYS, sent as `Authorization: Bearer <key>`.",
)


def _matches_any(token: str, keys: list[str]) -> bool:
    """Constant-time comparison against every key (no early exit that would leak which matched)."""
    matched = False
    for key in keys:
        matched |= secrets.compare_digest(token.encode(), key.encode())
    return matched


def require_api_key(
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
            detail="missing API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not _matches_any(credentials.credentials, keys):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="invalid API key",
            headers={"WWW-Authenticate": "Bearer"},
        )
