"""Uploaded datasets on the command line: find one by its name, and wait for its ingestion (poll
GET /datasets/{id} until it is ``ready`` or ``failed``, drawing the decoding progress, archive
entries done of total, with rich)."""

from __future__ import annotations

import re
import time
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from cli.client import ApiError, Client
from cli.follow import RETRY_DELAYS_S

INGESTING = "ingesting"
DATASET_ID = re.compile(r"[0-9a-f]{32}")


class DatasetNameUnknown(Exception):
    """A dataset reference that is neither an id nor the name of exactly one dataset; the message
    says which ids to use instead."""


def all_datasets(client: Client, page_size: int = 200) -> list[dict[str, Any]]:
    """Every dataset record (built-in, then uploaded, newest first), page by page."""
    records: list[dict[str, Any]] = []
    while True:
        page = client.get("/datasets", params={"offset": len(records), "limit": page_size})
        records += page["data"]
        if not page["data"] or len(records) >= page["count"]:
            return records


def resolve_dataset(client: Client, reference: str) -> str:
    """The dataset id that ``reference`` means: an id (32 hex digits) or a built-in dataset's name
    as it is, else the name given at upload time, when exactly one dataset has it (GET /datasets).

    Raises ``DatasetNameUnknown`` (no dataset, or several, of that name) and ``ApiError``.
    """
    if DATASET_ID.fullmatch(reference):  # an id as it is: no listing needed
        return reference
    records = all_datasets(client)
    if any(r.get("builtin") and r["id"] == reference for r in records):
        return reference
    named = [r for r in records if r.get("name") == reference]
    if len(named) == 1:
        return named[0]["id"]
    if not named:
        raise DatasetNameUnknown(f"no dataset with id or name {reference!r}: imgclf datasets ls lists them")
    ids = ", ".join(f"{r['id']} ({r.get('status')})" for r in named)
    raise DatasetNameUnknown(f"{len(named)} datasets are named {reference!r}: give one of their ids, {ids}")


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
