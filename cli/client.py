"""A small synchronous client of the imgclf API (httpx): errors become ``ApiError``."""

from __future__ import annotations

import mimetypes
from pathlib import Path
from typing import Any

import httpx

FINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


class ApiError(Exception):
    """A non-2xx answer: ``status`` (int) and ``detail`` (the body's detail, a string or a list)."""

    def __init__(self, status: int, reason: str, detail: Any):
        self.status = status
        self.reason = reason
        self.detail = detail
        super().__init__(f"{status} {reason}: {format_detail(detail)}")


def format_detail(detail: Any) -> str:
    """FastAPI's ``detail`` as one line: a 422's list becomes ``field.path: message; ...``."""
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict) and "msg" in item:
                loc = ".".join(str(p) for p in item.get("loc", []) if p != "body")
                parts.append(f"{loc}: {item['msg']}" if loc else str(item["msg"]))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return str(detail)


def eval_accuracy(metrics: dict[str, Any]) -> float | None:
    """Test accuracy (CIFAR-10, MNIST) or val accuracy (hymenoptera) of an epoch's metrics, a fraction."""
    value = metrics.get("test_accuracy")
    return value if value is not None else metrics.get("val_accuracy")


class Client:
    """The API at ``url``; ``api_key`` sent as ``Authorization: Bearer``; ``timeout`` in seconds."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 30.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    @staticmethod
    def check(response: httpx.Response) -> httpx.Response:
        """``response`` if 2xx; raises ``ApiError`` with its detail otherwise."""
        if response.is_success:
            return response
        try:
            detail = response.json().get("detail", response.text)
        except (ValueError, AttributeError):
            detail = response.text.strip() or response.reason_phrase
        raise ApiError(response.status_code, response.reason_phrase, detail)

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.check(self.http.get(path, **kwargs)).json()

    def post_json(self, path: str, body: Any) -> Any:
        kwargs = {"json": body} if body is not None else {}
        return self.check(self.http.post(path, **kwargs)).json()

    def put(self, path: str) -> Any:
        return self.check(self.http.put(path)).json()

    def delete(self, path: str, **kwargs: Any) -> None:
        self.check(self.http.delete(path, **kwargs))

    def download(self, path: str, destination: Path, **kwargs: Any) -> int:
        """GET ``path`` into the file ``destination``, streamed; returns its size in bytes. Written
        to a temporary file beside it and renamed at the end, so an error leaves nothing behind."""
        temporary = destination.with_name(f".{destination.name}.part")
        try:
            with self.http.stream("GET", path, **kwargs) as response:
                if not response.is_success:
                    response.read()
                    self.check(response)
                with temporary.open("wb") as file:
                    for chunk in response.iter_bytes(1 << 20):
                        file.write(chunk)
            temporary.replace(destination)
        finally:
            temporary.unlink(missing_ok=True)
        return destination.stat().st_size

    def upload_dataset(self, path: Path, name: str | None = None) -> tuple[dict[str, Any], bool]:
        """POST /datasets with the archive at ``path``, streamed from disk (httpx reads a file
        object in 64 KiB chunks and sends its size as Content-Length), and ``name`` if given.
        Returns the dataset record and whether it is new (202) rather than the same bytes
        uploaded before (200)."""
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        form = {"name": name} if name is not None else {}
        with path.open("rb") as file:
            response = self.http.post("/datasets", files={"file": (path.name, file, content_type)}, data=form)
        return self.check(response).json(), response.status_code == 202

    def predict(self, path: Path, form: dict[str, str]) -> dict[str, Any]:
        """POST /predict with the file at ``path`` and ``form`` fields (task or model_id, top_k)."""
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        with path.open("rb") as file:
            response = self.http.post("/predict", files={"file": (path.name, file, content_type)}, data=form)
        return self.check(response).json()
