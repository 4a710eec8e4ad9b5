"""Prometheus metrics of the jobs, computed from Redis when /metrics is scraped.

The job records in Redis are the truth every API process shares, so these metrics are the same
whichever process answers the scrape, however many API processes run (the HTTP metrics of
``app.metrics`` are per process; see ``metrics_payload`` for prometheus-client's multiprocess
mode). Job records are never expired, so the histograms below only grow, as Prometheus
histograms must: a finished job's contribution is computed once and remembered.

Metrics:
    imgclf_jobs{task,status}                  gauge: jobs by status
    imgclf_queue_depth                        gauge: jobs waiting for a worker (status queued)
    imgclf_workers                            gauge: live workers
    imgclf_training_images_per_second{task}   gauge: current throughput of the jobs training now
    imgclf_job_duration_seconds{task,status}  histogram: start to end of finished jobs
    imgclf_epoch_duration_seconds{task}       histogram: per finished epoch (train + eval)
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime

import redis
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

from core.jobs import TERMINAL_STATUSES, JobStatus, JobStore

log = logging.getLogger(__name__)

JOB_BUCKETS = (10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 43200, 86400)
EPOCH_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


@dataclass
class _Contribution:
    """What one job adds to the metrics."""

    task: str
    status: str
    duration_s: float | None = None
    epoch_durations: list[float] = field(default_factory=list)
    images_per_s: float = 0.0


def _contribution(raw: dict[str, str]) -> _Contribution:
    item = _Contribution(task=raw.get("task") or "unknown", status=raw.get("status") or "unknown")
    try:
        if item.status in TERMINAL_STATUSES and raw.get("started_at") and raw.get("finished_at"):
            started = datetime.fromisoformat(raw["started_at"])
            finished = datetime.fromisoformat(raw["finished_at"])
            item.duration_s = max((finished - started).total_seconds(), 0.0)
        metrics = json.loads(raw.get("metrics") or "[]")
        item.epoch_durations = [float(m["duration_s"]) for m in metrics if isinstance(m, dict)]
        if item.status == JobStatus.running:
            progress = json.loads(raw.get("progress") or "{}")
            # an epoch shorter than the progress interval is only reported as it ends (evaluating),
            # with that epoch's throughput
            if progress.get("stage") in ("training", "evaluating"):
                item.images_per_s = float(progress.get("images_per_s") or 0.0)
    except (
        ValueError,
        TypeError,
        KeyError,
        AttributeError,
    ) as exc:  # an unreadable record counts by status only
        log.debug("job metrics: unreadable record: %s", exc)
    return item


class JobsCollector:
    """A prometheus-client collector reading the job records of ``store`` at each scrape."""

    FIELDS = ("task", "status", "started_at", "finished_at", "metrics", "progress")

    def __init__(self, store: JobStore):
        self.store = store
        self._finished: dict[str, _Contribution] = {}
        self._lock = threading.Lock()

    def _jobs(self) -> list[_Contribution]:
        client = self.store.redis
        ids = client.zrange(self.store.index_key, 0, -1)
        with self._lock:
            known = dict(self._finished)
        todo = [job_id for job_id in ids if job_id not in known]
        pipe = client.pipeline(transaction=False)
        for job_id in todo:
            pipe.hmget(self.store.job_key(job_id), *self.FIELDS)
        replies = pipe.execute(raise_on_error=False) if todo else []
        items = [known[job_id] for job_id in ids if job_id in known]
        for job_id, reply in zip(todo, replies, strict=True):
            if isinstance(reply, Exception) or reply is None or reply[1] is None:
                continue  # gone, or not a hash
            item = _contribution(dict(zip(self.FIELDS, reply, strict=True)))
            items.append(item)
            if item.status in TERMINAL_STATUSES:
                with self._lock:
                    self._finished[job_id] = item
        return items

    def collect(self):
        try:
            items = self._jobs()
            workers = len(self.store.workers())
        except redis.RedisError as exc:
            log.warning("job metrics unavailable: Redis error %s", exc)
            up = GaugeMetricFamily(
                "imgclf_job_metrics_up", "1 when the job metrics could be read from Redis."
            )
            up.add_metric([], 0)
            yield up
            return
        up = GaugeMetricFamily("imgclf_job_metrics_up", "1 when the job metrics could be read from Redis.")
        up.add_metric([], 1)
        yield up

        by_status = Counter((i.task, i.status) for i in items)
        jobs = GaugeMetricFamily("imgclf_jobs", "Jobs by task and status.", labels=["task", "status"])
        for (task, status), count in sorted(by_status.items()):
            jobs.add_metric([task, status], count)
        yield jobs
        queue = GaugeMetricFamily("imgclf_queue_depth", "Jobs waiting for a worker (status queued).")
        queue.add_metric([], sum(1 for i in items if i.status == JobStatus.queued))
        yield queue
        live = GaugeMetricFamily("imgclf_workers", "Live training workers.")
        live.add_metric([], workers)
        yield live

        throughput: dict[str, float] = defaultdict(float)
        for item in items:
            if item.status == JobStatus.running:
                throughput[item.task] += item.images_per_s
        speed = GaugeMetricFamily(
            "imgclf_training_images_per_second",
            "Training throughput of the jobs training now, images/s (0 when none trains).",
            labels=["task"],
        )
        for task, value in sorted(throughput.items()):
            speed.add_metric([task], value)
        yield speed

        durations: dict[tuple[str, str], list[float]] = defaultdict(list)
        epochs: dict[str, list[float]] = defaultdict(list)
        for item in items:
            if item.duration_s is not None:
                durations[(item.task, item.status)].append(item.duration_s)
            epochs[item.task].extend(item.epoch_durations)
        job_hist = HistogramMetricFamily(
            "imgclf_job_duration_seconds",
            "Run time of finished jobs (start of the first attempt to the end), seconds.",
            labels=["task", "status"],
        )
        for labels, values in sorted(durations.items()):
            job_hist.add_metric(list(labels), _buckets(values, JOB_BUCKETS), sum(values))
        yield job_hist
        epoch_hist = HistogramMetricFamily(
            "imgclf_epoch_duration_seconds",
            "Duration of finished epochs (train + eval), seconds.",
            labels=["task"],
        )
        for task, values in sorted(epochs.items()):
            if values:
                epoch_hist.add_metric([task], _buckets(values, EPOCH_BUCKETS), sum(values))
        yield epoch_hist


def _buckets(values: list[float], bounds: tuple[float, ...]) -> list[tuple[str, int]]:
    """Cumulative (le, count) pairs, ending with +Inf."""
    return [(str(float(b)), sum(1 for v in values if v <= b)) for b in bounds] + [("+Inf", len(values))]


def metrics_payload(jobs_registry: CollectorRegistry) -> tuple[bytes, str]:
    """(body, content type) of /metrics: this process's HTTP metrics, or with
    ``PROMETHEUS_MULTIPROC_DIR`` set those of every API process (prometheus-client's multiprocess
    mode), followed by the job metrics of ``jobs_registry``."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return generate_latest(registry) + generate_latest(jobs_registry), CONTENT_TYPE_LATEST


def jobs_registry(store: JobStore) -> CollectorRegistry:
    """A registry holding only the ``JobsCollector`` of ``store``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobsCollector(store))
    return registry
