"""Prometheus metrics of the API process (served at /metrics)."""

from __future__ import annotations

import time

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUESTS = Counter(
    "imgclf_http_requests_total", "HTTP requests by route and status.", ["method", "route", "status"]
)
REQUEST_SECONDS = Histogram(
    "imgclf_http_request_seconds", "HTTP request latency, seconds.", ["method", "route"]
)
PREDICTION_SECONDS = Histogram(
    "imgclf_prediction_seconds", "Model step per image, waiting for its batch included, seconds.", ["task"]
)


class MetricsMiddleware:
    """Counts requests and their latency by route template (not raw path, to bound cardinality)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", "unmatched")
            REQUESTS.labels(scope["method"], name, str(status)).inc()
            REQUEST_SECONDS.labels(scope["method"], name).observe(time.perf_counter() - start)
