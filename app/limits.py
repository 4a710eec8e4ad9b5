"""Request body limits, enforced while the body streams in, before it is all in memory."""

from __future__ import annotations

import json
from collections.abc import Callable

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int, why: str):
        super().__init__(413, _message(limit, why))


def _message(limit: int, why: str) -> str:
    return f"request body is larger than the limit of {limit} bytes ({why})"


class BodySizeLimitMiddleware:
    """Answer 413 when a request's body exceeds the limit of its path.

    ``limit_for(path)`` returns (limit in bytes, where the limit comes from, for the message).

    A declared Content-Length over the limit is refused before reading anything; otherwise the
    bytes are counted as they arrive and reading stops at the first chunk past the limit.
    """

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], tuple[int, str]]):
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, why = self.limit_for(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_413(send, limit, why)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit, why)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _send_413(send, limit, why)


async def _send_413(send: Send, limit: int, why: str) -> None:
    body = json.dumps({"detail": _message(limit, why)}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
