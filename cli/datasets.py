"""Wait for an uploaded dataset's ingestion: poll GET /datasets/{id} until it is ``ready`` or
``failed``, drawing the decoding progress (archive entries done of total) with rich."""

from __future__ import annotations

import time
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from cli.client import ApiError, Client
from cli.follow import RETRY_DELAYS_S

INGESTING = "ingesting"


def wait_dataset(
    client: Client, dataset_id: str, console: Console | None, interval_s: float = 1.0
) -> dict[str, Any]:
    """Poll the dataset until its ingestion ends; returns its final record. Progress is drawn on
    ``console`` (None: nothing drawn). A dropped connection or a 5xx (API restarting, Redis
    away) is retried for about 40 s; raises ``ApiError`` (no such dataset, refused key) or
    ``httpx.HTTPError`` (API unreachable for longer)."""
    progress = Progress(
        TextColumn("{task.description:<18}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        disable=console is None,
    )
    bar: TaskID | None = None  # the bar (and the live display) starts with the first counts
    failures = 0
    try:
        while True:
            try:
                record = client.get(f"/datasets/{dataset_id}")
                failures = 0
            except (httpx.TransportError, ApiError) as exc:
                transient = not isinstance(exc, ApiError) or exc.status >= 500
                if not transient or failures >= len(RETRY_DELAYS_S):
                    raise
                time.sleep(RETRY_DELAYS_S[failures])
                failures += 1
                continue
            if record["status"] != INGESTING:
                if bar is not None and record["status"] == "ready":
                    images = sum((record.get("images") or {}).values())
                    progress.update(bar, completed=progress.tasks[bar].total or 0, info=f"{images} images")
                return record
            p = record.get("progress") or {}
            if p.get("entries_total"):
                info = f"{p.get('images', 0)} images"
                if bar is None:
                    bar = progress.add_task("decoding", total=p["entries_total"], info=info)
                    progress.start()
                progress.update(bar, completed=p.get("entries_done", 0), total=p["entries_total"], info=info)
            time.sleep(interval_s)
    finally:
        if bar is not None:
            progress.stop()
