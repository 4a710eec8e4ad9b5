"""HTTP semantics that hold for every route, checked before any route (or body) is touched.

- ``HEAD`` is answered like ``GET`` without the body (monitors and load balancers probe with it);
- a URL (path + query) over ``MAX_URL_BYTES`` gets 414;
- a body with a ``Content-Encoding`` other than ``identity`` gets 415 naming the coding: the API
  never inflates compressed bodies (no decompression bombs);
- a 405 lists every method of the path in ``Allow`` (``allowed_methods``).
"""

from __future__ import annotations

import json

from starlette.routing import Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_URL_BYTES = 8 * 1024


async def send_json(send: Send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    """Send a whole ``{"detail": ...}`` JSON response from ASGI middleware."""
    body = json.dumps({"detail": detail}).encode()
    raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *[(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


def has_body(scope: Scope) -> bool:
    """Whether the request declares a body (a non-zero Content-Length, or chunked transfer)."""
    headers = dict(scope["headers"])
    length = headers.get(b"content-length", b"").strip()
    return b"transfer-encoding" in headers or (length not in (b"", b"0"))


class HeadAsGetMiddleware:
    """Serve ``HEAD`` with the ``GET`` route: same status and headers, no body.

    The app sees a GET; its body is dropped. After the response has started, further sends of the
    app are swallowed and ``receive`` reports a disconnect, so a streaming GET stops early.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        done = False

        async def receive_until_done() -> Message:
            if done:
                return {"type": "http.disconnect"}
            return await receive()

        async def send_headers_only(message: Message) -> None:
            nonlocal done
            if done:
                return
            if message["type"] == "http.response.start":
                await send(message)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                done = True

        await self.app({**scope, "method": "GET", "imgclf.head": True}, receive_until_done, send_headers_only)


class UrlLengthMiddleware:
    """414 with a JSON body when path + query string exceed ``limit`` bytes (default 8 KiB)."""

    def __init__(self, app: ASGIApp, limit: int = MAX_URL_BYTES):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope.get("raw_path") or scope["path"].encode()
            size = len(path) + len(scope.get("query_string", b""))
            if size > self.limit:
                await send_json(
                    send,
                    414,
                    f"the URL is {size} bytes (path and query), over the limit of {self.limit} bytes; "
                    "send large inputs in the request body",
                )
                return
        await self.app(scope, receive, send)


class ContentEncodingMiddleware:
    """415 for a request body with a ``Content-Encoding`` other than ``identity``.

    Compressed bodies are refused, not inflated: a few KB of gzip can inflate to gigabytes. The
    response names the coding and carries ``Accept-Encoding: identity`` (RFC 9110 §15.5.16).
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and has_body(scope):
            raw = b",".join(v for k, v in scope["headers"] if k == b"content-encoding")
            codings = [c.strip().lower() for c in raw.decode("latin-1").split(",") if c.strip()]
            unsupported = [c for c in codings if c != "identity"]
            if unsupported:
                await send_json(
                    send,
                    415,
                    f"Content-Encoding {', '.join(unsupported)} is not supported: send the body "
                    "uncompressed (identity)",
                    {"Accept-Encoding": "identity"},
                )
                return
        await self.app(scope, receive, send)


METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(routes: list, scope: Scope) -> list[str]:
    """Every method that a route of ``routes`` fully matches on the path of ``scope`` (HEAD with
    GET), sorted. Routes are asked (``matches``), so included routers count too; mounts are not."""
    methods: set[str] = set()
    for route in routes:
        if isinstance(route, Mount):
            continue
        for method in METHODS:
            match, _ = route.matches({**scope, "type": "http", "method": method})
            if match == Match.FULL:
                methods.add(method)
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)
