"""Follow a job until it ends: GET /jobs/{id}/events (Server-Sent Events, resumed with
Last-Event-ID after a dropped connection), or polling GET /jobs/{id} on a server without it.
Progress is drawn with rich: one bar per epoch, and one for data loading or feature extraction."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
from httpx_sse import SSEError, connect_sse
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from cli.client import FINAL_STATUSES, ApiError, Client, eval_accuracy

RETRY_DELAYS_S = (0.5, 1, 2, 4, 8, 8, 8, 8)  # about 40 s in all: long enough for an API restart


class ProgressView:
    """Rich progress bars fed by a job's progress and epoch objects."""

    def __init__(self, console: Console):
        self.progress = Progress(
            TextColumn("{task.description:<18}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self.epochs: dict[int, TaskID] = {}
        self.stage_task: TaskID | None = None
        self.stage = ""

    def __enter__(self) -> ProgressView:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def on_progress(self, p: dict[str, Any]) -> None:
        stage = p.get("stage", "")
        if stage == "training" and p.get("epoch") and p.get("batches_total"):
            epoch = int(p["epoch"])
            task = self.epochs.get(epoch)
            if task is None:
                task = self.progress.add_task(
                    f"epoch {epoch}/{p.get('epochs', '?')}", total=p["batches_total"], info=""
                )
                self.epochs[epoch] = task
            info = []
            if p.get("loss") is not None:
                info.append(f"loss {p['loss']:.4f}")
            if p.get("images_per_s"):
                info.append(f"{p['images_per_s']:,.0f} img/s")
            self.progress.update(
                task, completed=p["batches_done"], total=p["batches_total"], info="  ".join(info)
            )
            return
        done, total = None, None
        if p.get("images_total"):
            done, total = p.get("images_done", 0), p["images_total"]
        elif p.get("features_total"):
            done, total = p.get("features_done", 0), p["features_total"]
        if total and stage:
            label = stage.replace("_", " ")
            if self.stage_task is None or self.stage != stage:
                self.stage_task = self.progress.add_task(label, total=total, info="")
                self.stage = stage
            self.progress.update(self.stage_task, completed=done, total=total)

    def on_epoch(self, m: dict[str, Any]) -> None:
        epoch = int(m["epoch"])
        task = self.epochs.get(epoch)
        if task is not None:
            total = self.progress.tasks[task].total or 0
            self.progress.update(task, completed=total)
        self.progress.console.print(
            f"epoch {epoch}: train loss {m['train_loss']:.4f}, train acc {100 * m['train_accuracy']:.2f} %, "
            f"test/val acc {100 * (eval_accuracy(m) or 0):.2f} %, {m['duration_s']:.1f} s",
            markup=False,
            highlight=False,
        )


def follow_job(client: Client, job_id: str, console: Console) -> dict[str, Any]:
    """Draw the job's progress until it ends; returns its final record (GET /jobs/{id}).
    Raises ``ApiError`` (no such job, refused key) or ``httpx.HTTPError`` (API unreachable
    for longer than the retries)."""
    client.get(f"/jobs/{job_id}")  # 404 for an unknown job, before choosing how to follow
    with ProgressView(console) as view:
        try:
            _stream(client, job_id, view)
        except EventsUnavailable:
            _poll(client, job_id, view)
    return client.get(f"/jobs/{job_id}")


class EventsUnavailable(Exception):
    """The server has no GET /jobs/{id}/events."""


def _handle(event_type: str, data: dict[str, Any], view: ProgressView) -> bool:
    """Apply one event; True when it is the job's final status."""
    if event_type == "progress":
        view.on_progress(data)
    elif event_type == "epoch":
        view.on_epoch(data)
    elif event_type == "status":
        return data.get("status") in FINAL_STATUSES
    return False


def _stream(client: Client, job_id: str, view: ProgressView) -> None:
    last_event_id = ""
    failures = 0
    while True:
        headers = {"Accept": "text/event-stream"} | (
            {"Last-Event-ID": last_event_id} if last_event_id else {}
        )
        try:
            with connect_sse(
                client.http,
                "GET",
                f"/jobs/{job_id}/events",
                headers=headers,
                timeout=httpx.Timeout(30, read=60),
            ) as source:
                if source.response.status_code == 404:
                    raise EventsUnavailable
                if not source.response.is_success:
                    source.response.read()
                    client.check(source.response)
                for sse in source.iter_sse():
                    failures = 0
                    if sse.id:
                        last_event_id = sse.id
                    try:
                        data = json.loads(sse.data)
                    except json.JSONDecodeError:
                        continue
                    if _handle(sse.event, data, view):
                        return
        except (httpx.TransportError, SSEError) as exc:
            if failures >= len(RETRY_DELAYS_S):
                raise httpx.TransportError(f"lost the event stream of job {job_id}: {exc}") from exc
            time.sleep(RETRY_DELAYS_S[failures])
            failures += 1
            continue
        except ApiError as exc:
            if exc.status < 500 or failures >= len(RETRY_DELAYS_S):
                raise
            time.sleep(RETRY_DELAYS_S[failures])
            failures += 1
            continue
        # The server ended the stream without a final status (e.g. it restarted): resume, but not
        # forever if it keeps closing streams without sending anything.
        if failures >= len(RETRY_DELAYS_S):
            raise httpx.TransportError(
                f"the event stream of job {job_id} keeps ending without its final status"
            )
        time.sleep(RETRY_DELAYS_S[failures])
        failures += 1


def _poll(client: Client, job_id: str, view: ProgressView, interval_s: float = 1.0) -> None:
    seen: list[dict[str, Any]] = []
    while True:
        job = client.get(f"/jobs/{job_id}")
        if job.get("progress"):
            view.on_progress(job["progress"])
        for metrics in (job.get("metrics") or [])[len(seen) :]:
            seen.append(metrics)
            view.on_epoch(metrics)
        if job["status"] in FINAL_STATUSES:
            return
        time.sleep(interval_s)
