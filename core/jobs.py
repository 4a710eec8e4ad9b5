"""Job records in Redis: the one place where job state and its transitions live.

Both the API (create, read, cancel) and the worker (start, progress, finish) go through
``JobStore``. Every transition is a Lua script, so it is atomic with respect to the other side.

A running job holds a *lease* (``<prefix>:lease:<id>``, a random token with a TTL) that the
worker renews from a heartbeat thread. Every write a worker makes is fenced by its token: a worker
that lost its lease can no longer touch the job, and a job whose lease expired while ``running``
(its worker was killed) is put back in the queue by ``requeue_orphans``. A job is therefore never
run by two workers at once, even if the broker delivers its message twice (celery#5935).

Keys (``p`` = ``REDIS_PREFIX``)::

    p:job:<id>        hash: the record (JSON-encoded fields for nested values)
    p:jobs            sorted set of ids by creation order (p:jobs:seq), for listing newest first
    p:jobs:running    set of ids in status running, scanned by requeue_orphans
    p:lease:<id>      token of the worker that runs the job, with a TTL
    p:idem:<key>      "<job id>|<sha256 of the request>" for Idempotency-Key, 24 h
    p:worker:<name>   JSON of a live worker, with a TTL
    p:events:<id>     stream of the job's events (status, progress, epoch), see below
    p:events:<id>:progress  list of the ids of its progress events still in the stream

Every transition appends its event to the job's stream inside the same script that writes the
record, so the record and the stream never disagree: create -> ``status`` queued; start ->
``status`` running; update -> ``progress`` (when asked) and one ``epoch`` per epoch not yet in
the stream; finish, cancel, requeue -> ``status``. Each entry has the fields ``type`` and
``data`` (JSON). Status and epoch events are kept for the life of the record; of the progress
events (snapshots, at most ~4/s) the latest ``PROGRESS_EVENTS_KEPT`` stay, older ones are
deleted (``XDEL``), so a stream stays small however long its job runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import redis
from pydantic import BaseModel, Field, ValidationError
from redis.backoff import NoBackoff
from redis.retry import Retry

from tasks import TaskName

log = logging.getLogger(__name__)

# A job id: 32 hex digits (uuid4().hex). A JSON-Schema / Rust-regex pattern, where $ is the end of
# the text; Python code matches ids with fullmatch (Python's $ also matches before a final newline).
JOB_ID_PATTERN = r"^[0-9a-f]{32}$"
IDEMPOTENCY_TTL_S = 24 * 3600
PROGRESS_EVENTS_KEPT = 1000  # ~4 min of progress at 4 events/s
EVENT_STREAM_MAXLEN = 20_000  # a safety cap; status + epoch events of any job fit well below it
_JSON_FIELDS = ("hyperparameters", "progress", "metrics", "timings")


class JobStatus(StrEnum):
    """Lifecycle of a job: queued -> running -> succeeded | failed | cancelled."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


TERMINAL_STATUSES = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})


class JobProgress(BaseModel):
    """Where a job is: updated by the worker a few times a second while it trains."""

    epoch: int = Field(0, description="Current epoch, 1-based; 0 before training starts.", examples=[3])
    epochs: int = Field(0, description="Total epochs of the job.", examples=[10])
    batches_done: int = Field(0, description="Batches done in the current epoch.", examples=[412])
    batches_total: int = Field(0, description="Batches per epoch.", examples=[938])
    images_per_s: float | None = Field(
        None, description="Training throughput of the current epoch, images/s.", examples=[9100.5]
    )
    loss: float | None = Field(
        None,
        description="Running mean training loss of the current epoch so far (null before its first batch).",
        examples=[0.213],
    )
    images_done: int = Field(
        0,
        description=(
            "While loading_data: images decoded (or read from the dataset cache) so far, over all the "
            "job's splits."
        ),
        examples=[12000],
    )
    images_total: int = Field(
        0,
        description="While loading_data: images in the splits loaded so far and the one being loaded.",
        examples=[60000],
    )
    features_done: int = Field(
        0,
        description=(
            "While extracting_features (ResNet18 feature_extraction): images through the frozen backbone "
            "so far (the BatchNorm calibration pass over train, then the train and val features)."
        ),
        examples=[500],
    )
    features_total: int = Field(
        0, description="While extracting_features: images to put through the backbone.", examples=[641]
    )
    stage: str = Field(
        "queued",
        description=(
            "While running: loading_data, extracting_features, training, evaluating or "
            "saving_checkpoint; otherwise the job's status (queued, succeeded, failed, cancelled)."
        ),
        examples=["training"],
    )


class EpochMetrics(BaseModel):
    """Metrics of one finished epoch. Accuracies are fractions in [0, 1]."""

    epoch: int = Field(description="1-based epoch.", examples=[1])
    lr: float = Field(description="Learning rate used in this epoch.", examples=[0.01])
    train_loss: float = Field(description="Mean training loss over the epoch's batches.", examples=[0.21])
    train_accuracy: float = Field(
        description="Fraction of training images classified right during the epoch.", examples=[0.93]
    )
    test_accuracy: float | None = Field(
        None, description="Accuracy on the test split (CIFAR-10, MNIST).", examples=[0.975]
    )
    val_accuracy: float | None = Field(
        None, description="Accuracy on the val split (hymenoptera).", examples=[None]
    )
    duration_s: float = Field(description="Wall time of the epoch (train + eval), seconds.", examples=[7.9])
    images_per_s: float = Field(description="Training images per second in this epoch.", examples=[9100.5])


class JobRecordCorrupt(Exception):
    """A job's hash in Redis cannot be read as a ``JobRecord`` (edited by hand, or written by an
    incompatible version)."""


class JobRecord(BaseModel):
    """A training job as stored in Redis and returned by the API."""

    id: str = Field(description="Job id (32 hex digits).", examples=["5f2c1e0b9a7d4c3e8f1a2b3c4d5e6f70"])
    task: TaskName = Field(description="Reference task this job trains.", examples=["mnist_lenet5"])
    status: JobStatus = Field(
        description="queued, running, succeeded, failed or cancelled.", examples=["running"]
    )
    hyperparameters: dict[str, Any] = Field(
        description="Hyperparameters in effect: the request's values over the task's defaults.",
        examples=[{"epochs": 10, "batch_size": 64, "lr": 0.01, "momentum": 0.9}],
    )
    created_at: datetime = Field(
        description="When the job was submitted (UTC).", examples=["2026-11-29T16:15:00.000000+00:00"]
    )
    started_at: datetime | None = Field(
        None,
        description="When a worker first started it (UTC).",
        examples=["2026-11-29T16:15:01.000000+00:00"],
    )
    finished_at: datetime | None = Field(
        None, description="When it reached a final status (UTC).", examples=[None]
    )
    progress: JobProgress = Field(
        default_factory=JobProgress, description="Live progress of the current epoch."
    )
    metrics: list[EpochMetrics] = Field(
        default_factory=list,
        description="One entry per finished epoch.",
        examples=[
            [
                {
                    "epoch": 1,
                    "lr": 0.01,
                    "train_loss": 0.43,
                    "train_accuracy": 0.864,
                    "test_accuracy": 0.978,
                    "val_accuracy": None,
                    "duration_s": 9.6,
                    "images_per_s": 6964.5,
                }
            ]
        ],
    )
    timings: dict[str, float] = Field(
        default_factory=dict,
        description=(
            "Seconds spent: data_s (loading/decoding data), features_s (ResNet18 feature extraction: "
            "frozen-backbone features), train_s, eval_s, checkpoint_s, total_s (start to end of the last "
            "attempt)."
        ),
        examples=[{"data_s": 1.2, "train_s": 61.0, "eval_s": 3.1, "checkpoint_s": 0.1, "total_s": 66.0}],
    )
    device: str | None = Field(None, description="Device it trains on: cpu or cuda:N.", examples=["cpu"])
    weights: str | None = Field(
        None,
        description="Initial weights of hymenoptera_resnet18 (IMAGENET1K_V1, local:<file>, none).",
        examples=[None],
    )
    error: str | None = Field(None, description="Why it failed.", examples=[None])
    dataset: str | None = Field(
        None,
        description="Uploaded dataset it trains on (custom_resnet18; see /datasets).",
        examples=[None],
    )
    model_id: str | None = Field(
        None,
        description="Checkpoint it produced (see /models).",
        examples=["mnist_lenet5-20261129-161500-5f2c1e0b"],
    )
    attempts: int = Field(
        0, description="How many times a worker started it (>1 after a worker was lost).", examples=[1]
    )
    cancel_requested: bool = Field(
        False, description="A cancel was asked for while it was running.", examples=[False]
    )
    worker: str | None = Field(
        None, description="Celery worker that runs or ran it.", examples=["celery@gpu-1"]
    )


class CancelOutcome(StrEnum):
    """What ``JobStore.request_cancel`` did."""

    cancelled = "cancelled"  # it was queued: cancelled at once
    cancel_requested = "cancel_requested"  # it is running: its worker stops at the next batch
    ended = "ended"  # it already had a final status: nothing changed
    missing = "missing"  # no such job


class CancelResult(BaseModel):
    """Outcome of ``JobStore.request_cancel`` and the job's status after it (None when missing)."""

    outcome: CancelOutcome
    status: JobStatus | None = None


class StartOutcome(StrEnum):
    """What ``JobStore.start`` did: ``started``, or why the job did not start."""

    started = "started"  # this worker holds the lease; the job is running
    missing = "missing"  # no such job
    leased = "leased"  # another worker holds it
    cancelled = "cancelled"  # a cancel was pending: it ended cancelled without running
    failed = "failed"  # too many attempts (or it had already failed)
    succeeded = "succeeded"  # it had already succeeded


class StartResult(BaseModel):
    """Outcome of ``JobStore.start``: ``started`` with the attempt number, or why not."""

    outcome: StartOutcome
    attempts: int = 0


class FinishOutcome(StrEnum):
    """What ``JobStore.finish`` (and ``worker.runner.JobLease.finish``) did."""

    finished = "finished"  # the final status is recorded and the lease released
    not_holder = "not_holder"  # this worker no longer holds the lease: nothing written
    cancel_requested = "cancel_requested"  # unless_cancel_requested, and one arrived: nothing written
    unrecorded = "unrecorded"  # JobLease.finish only: Redis stayed unreachable, nothing written


class RequeueOutcome(StrEnum):
    """What ``JobStore.requeue_orphans`` did to one job of the running set."""

    requeued = "requeued"  # its lease had expired: back in the queue
    cancelled = "cancelled"  # its lease had expired with a cancel pending: ended cancelled
    gone = "gone"  # it was no longer running (only dropped from the running set)
    alive = "alive"  # its lease is still held: left alone


def utcnow() -> str:
    return datetime.now(UTC).isoformat()


def request_hash(payload: dict) -> str:
    """sha256 of a request body in canonical JSON (sorted keys), for Idempotency-Key checks."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def redis_client(url: str, timeout_s: float) -> redis.Redis:
    """A Redis client that fails fast: one try, ``timeout_s`` to connect and per call."""
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=15,
    )


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request body."""


# Shared Lua: append one event to the job's stream; progress events beyond PROGRESS_EVENTS_KEPT
# are deleted oldest first. ``emit_events`` reads, from ARGV[start], the count of the job's epoch
# metrics and their JSON (an epoch event is added for each one past those already in the record's
# ``metrics``), then the count of other events and (type, data) pairs; returns the next ARGV index.
_EVENTS_LUA = f"""
local function add_event(stream, plist, kind, data)
  local id = redis.call('XADD', stream, 'MAXLEN', '~', {EVENT_STREAM_MAXLEN}, '*', 'type', kind, 'data', data)
  if kind == 'progress' then
    redis.call('RPUSH', plist, id)
    if redis.call('LLEN', plist) > {PROGRESS_EVENTS_KEPT} then
      redis.call('XDEL', stream, redis.call('LPOP', plist))
    end
  end
  return id
end
local function emit_events(job, stream, plist, start)
  local i = start
  local n_epochs = tonumber(ARGV[i])
  i = i + 1
  if n_epochs > 0 then
    local done = 0
    local old = redis.call('HGET', job, 'metrics')
    if old then
      local ok, decoded = pcall(cjson.decode, old)
      if ok and type(decoded) == 'table' then done = #decoded end
    end
    for k = done + 1, n_epochs do
      add_event(stream, plist, 'epoch', ARGV[i + k - 1])
    end
  end
  i = i + n_epochs
  local n_events = tonumber(ARGV[i])
  i = i + 1
  for k = 0, n_events - 1 do
    add_event(stream, plist, ARGV[i + 2 * k], ARGV[i + 2 * k + 1])
  end
  return i + 2 * n_events
end
"""


def status_event(status: str, error: str | None = None, model_id: str | None = None) -> str:
    """Data of a ``status`` event: JSON {"status", "error", "model_id"}."""
    return json.dumps({"status": status, "error": error, "model_id": model_id})


# KEYS: job, index, idem, seq, events, progress ids. ARGV: id, body hash, idem ttl, use idem, queued event,
# field, value, ...
_CREATE = (
    _EVENTS_LUA
    + """
if ARGV[4] == '1' then
  local existing = redis.call('GET', KEYS[3])
  if existing then return {'existing', existing} end
end
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[4]), ARGV[1])
add_event(KEYS[5], KEYS[6], 'status', ARGV[5])
if ARGV[4] == '1' then
  redis.call('SET', KEYS[3], ARGV[1] .. '|' .. ARGV[2], 'EX', ARGV[3])
end
return {'created', ARGV[1]}
"""
)

# KEYS: job, running set, lease, events, progress ids.
# ARGV: id, token, ttl_ms, worker, device, now, max_attempts, running event, cancelled event
_START = (
    _EVENTS_LUA
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing', 0} end
if redis.call('EXISTS', KEYS[3]) == 1 then return {'leased', 0} end
if status ~= 'queued' and status ~= 'running' then return {status, 0} end
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[6])
  redis.call('SREM', KEYS[2], ARGV[1])
  add_event(KEYS[4], KEYS[5], 'status', ARGV[9])
  return {'cancelled', 0}
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if attempts > tonumber(ARGV[7]) then
  redis.call('HINCRBY', KEYS[1], 'attempts', -1)
  local err = 'gave up after ' .. (attempts - 1) .. ' attempts: the worker running it was lost ' ..
    'each time (killed, out of memory or crashed)'
  redis.call('HSET', KEYS[1], 'status', 'failed', 'finished_at', ARGV[6], 'error', err)
  redis.call('SREM', KEYS[2], ARGV[1])
  add_event(KEYS[4], KEYS[5], 'status',
    '{"status": "failed", "error": ' .. cjson.encode(err) .. ', "model_id": null}')
  return {'failed', attempts - 1}
end
redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[3])
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[4], 'device', ARGV[5])
if redis.call('HEXISTS', KEYS[1], 'started_at') == 0 then
  redis.call('HSET', KEYS[1], 'started_at', ARGV[6])
end
redis.call('SADD', KEYS[2], ARGV[1])
add_event(KEYS[4], KEYS[5], 'status', ARGV[8])
return {'started', attempts}
"""
)

# KEYS: lease. ARGV: token, ttl_ms
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: job, lease, events, progress ids. ARGV: token, <events (see emit_events)>, field, value, ...
_UPDATE = (
    _EVENTS_LUA
    + """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
local rest = emit_events(KEYS[1], KEYS[3], KEYS[4], 2)
redis.call('HSET', KEYS[1], unpack(ARGV, rest))
return 1
"""
)

# KEYS: job, running set, lease, events, progress ids.
# ARGV: token, id, unless_cancel_requested ('1'/'0'), <events (see emit_events)>, field, value, ...
_FINISH = (
    _EVENTS_LUA
    + """
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return 'not_holder' end
if ARGV[3] == '1' and redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
  return 'cancel_requested'
end
local rest = emit_events(KEYS[1], KEYS[4], KEYS[5], 4)
redis.call('HSET', KEYS[1], unpack(ARGV, rest))
redis.call('SREM', KEYS[2], ARGV[2])
redis.call('DEL', KEYS[3])
return 'finished'
"""
)

# KEYS: job, events, progress ids. ARGV: now, cancelled event
_CANCEL = (
    _EVENTS_LUA
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing', ''} end
if status == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[1])
  add_event(KEYS[2], KEYS[3], 'status', ARGV[2])
  return {'cancelled', 'cancelled'}
end
if status == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
  return {'cancel_requested', status}
end
return {'ended', status}
"""
)

# KEYS: job, running set, lease, events, progress ids. ARGV: id, now, cancelled event, queued event
_REQUEUE = (
    _EVENTS_LUA
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'running' then
  redis.call('SREM', KEYS[2], ARGV[1])
  return 'gone'
end
if redis.call('EXISTS', KEYS[3]) == 1 then return 'alive' end
redis.call('SREM', KEYS[2], ARGV[1])
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[2])
  add_event(KEYS[4], KEYS[5], 'status', ARGV[3])
  return 'cancelled'
end
redis.call('HSET', KEYS[1], 'status', 'queued')
add_event(KEYS[4], KEYS[5], 'status', ARGV[4])
return 'requeued'
"""
)


class JobStore:
    """Job records in Redis.

    Args:
        client: a ``redis.Redis`` with ``decode_responses=True`` (see ``redis_client``).
        prefix: key prefix (``REDIS_PREFIX``).

    Every method may raise ``redis.exceptions.RedisError`` when Redis is unreachable.
    """

    def __init__(self, client: redis.Redis, prefix: str):
        self.redis = client
        self.prefix = prefix
        self._create = client.register_script(_CREATE)
        self._start = client.register_script(_START)
        self._renew = client.register_script(_RENEW)
        self._update = client.register_script(_UPDATE)
        self._finish = client.register_script(_FINISH)
        self._cancel = client.register_script(_CANCEL)
        self._requeue = client.register_script(_REQUEUE)

    # keys
    def job_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def lease_key(self, job_id: str) -> str:
        return f"{self.prefix}:lease:{job_id}"

    def events_key(self, job_id: str) -> str:
        """The job's event stream (see the module docstring)."""
        return f"{self.prefix}:events:{job_id}"

    def _event_keys(self, job_id: str) -> list[str]:
        return [self.events_key(job_id), f"{self.events_key(job_id)}:progress"]

    @property
    def index_key(self) -> str:
        return f"{self.prefix}:jobs"

    @property
    def running_key(self) -> str:
        return f"{self.prefix}:jobs:running"

    def _idem_key(self, key: str, owner: str = "") -> str:
        """Redis key of an Idempotency-Key, scoped to its ``owner`` (a hash of the API key, "" with
        auth off), so that one client can never replay another's job by reusing its key."""
        scoped = f"{owner}:{key}" if owner else key  # auth off: one owner, the keys as before
        return f"{self.prefix}:idem:{hashlib.sha256(scoped.encode()).hexdigest()}"

    # API side
    def ping(self) -> bool:
        return bool(self.redis.ping())

    def create(
        self,
        task: str,
        hyperparameters: dict,
        idempotency_key: str | None = None,
        body_hash: str = "",
        owner: str = "",
        dataset: str | None = None,
    ) -> tuple[JobRecord, bool]:
        """Store a new queued job; returns (record, created). ``dataset``: the uploaded dataset
        it trains on, if any.

        With ``idempotency_key``, a second call with the same key (and ``owner``, the caller's
        API-key hash) returns the first job and ``created=False``; the same key of another owner is
        another key. Raises ``IdempotencyConflict`` if the key was used with another body.
        """
        job_id = uuid.uuid4().hex
        now = datetime.now(UTC)
        fields = {
            "id": job_id,
            "task": task,
            "status": JobStatus.queued.value,
            "hyperparameters": json.dumps(hyperparameters),
            "created_at": now.isoformat(),
            "attempts": "0",
            "progress": json.dumps({"epochs": hyperparameters.get("epochs", 0)}),
            "metrics": "[]",
            "timings": "{}",
            "dataset": dataset or "",
        }
        argv = [
            job_id,
            body_hash,
            IDEMPOTENCY_TTL_S,
            "1" if idempotency_key else "0",
            status_event(JobStatus.queued),
            *[item for pair in fields.items() for item in pair],
        ]
        idem_key = self._idem_key(idempotency_key or "-", owner)
        keys = [
            self.job_key(job_id),
            self.index_key,
            idem_key,
            f"{self.index_key}:seq",
            *self._event_keys(job_id),
        ]
        outcome, value = self._create(keys=keys, args=argv)
        if outcome == "created":
            return self.get(job_id), True
        existing_id, _, existing_hash = value.partition("|")
        if existing_hash != body_hash:
            raise IdempotencyConflict("this Idempotency-Key was already used with a different request body")
        record = self.get(existing_id)
        if record is None:  # the first request's job was rolled back; start afresh
            self.redis.delete(idem_key)
            return self.create(task, hyperparameters, idempotency_key, body_hash, owner, dataset)
        return record, False

    def delete(self, job_id: str, idempotency_key: str | None = None, owner: str = "") -> None:
        """Remove a job that could not be enqueued (and its Idempotency-Key of ``owner``)."""
        pipe = self.redis.pipeline()
        pipe.delete(self.job_key(job_id), *self._event_keys(job_id))
        pipe.zrem(self.index_key, job_id)
        if idempotency_key:
            pipe.delete(self._idem_key(idempotency_key, owner))
        pipe.execute()

    def get(self, job_id: str) -> JobRecord | None:
        """The job, or None if there is none. Raises ``JobRecordCorrupt`` for an unreadable record."""
        try:
            raw = self.redis.hgetall(self.job_key(job_id))
        except redis.ResponseError as exc:  # the key holds another type (WRONGTYPE)
            raise JobRecordCorrupt(f"the stored record of job {job_id} is unreadable: {exc}") from None
        return _record_from_hash(job_id, raw) if raw else None

    def list(
        self, offset: int = 0, limit: int = 20, status: str | None = None, task: str | None = None
    ) -> tuple[list[JobRecord], int]:
        """Jobs newest first: (page, total). Filters scan the index; fine for thousands of jobs."""
        if status is None and task is None:
            total = self.redis.zcard(self.index_key)
            ids = self.redis.zrevrange(self.index_key, offset, offset + limit - 1)
            return [r for r in self._get_many(ids) if r is not None], total
        matching = [
            r
            for r in self._get_many(self.redis.zrevrange(self.index_key, 0, -1))
            if r is not None and (status is None or r.status == status) and (task is None or r.task == task)
        ]
        return matching[offset : offset + limit], len(matching)

    def request_cancel(self, job_id: str) -> CancelResult:
        """Cancel: a queued job becomes cancelled at once, a running one is flagged to stop.

        Returns the outcome (``cancelled``, ``cancel_requested``, ``ended``: it already had a final
        status, or ``missing``) and the job's status after the call (None when missing).
        """
        keys = [self.job_key(job_id), *self._event_keys(job_id)]
        outcome, status = self._cancel(keys=keys, args=[utcnow(), status_event(JobStatus.cancelled)])
        return CancelResult(outcome=CancelOutcome(outcome), status=JobStatus(status) if status else None)

    # worker side
    def start(
        self, job_id: str, token: str, ttl_s: float, worker: str, device: str, max_attempts: int
    ) -> StartResult:
        """Take the job's lease and mark it running.

        Outcome ``started`` (with the attempt number), or ``missing``, ``leased`` (another worker
        holds it), ``cancelled``, ``failed`` (too many attempts) or the job's final status.
        """
        outcome, attempts = self._start(
            keys=[self.job_key(job_id), self.running_key, self.lease_key(job_id), *self._event_keys(job_id)],
            args=[
                job_id,
                token,
                int(ttl_s * 1000),
                worker,
                device,
                utcnow(),
                max_attempts,
                status_event(JobStatus.running),
                status_event(JobStatus.cancelled),
            ],
        )
        return StartResult(outcome=StartOutcome(outcome), attempts=int(attempts))

    def renew_lease(self, job_id: str, token: str, ttl_s: float) -> bool:
        """Extend the lease; False if this worker no longer holds it."""
        return bool(self._renew(keys=[self.lease_key(job_id)], args=[token, int(ttl_s * 1000)]))

    def update(self, job_id: str, token: str, progress_event: bool = False, **fields: Any) -> bool:
        """Write fields of a running job (progress, metrics, timings, weights, device).

        With ``metrics``, an ``epoch`` event is added to the job's stream for each epoch not yet in
        the record; with ``progress_event`` (and ``progress``), a ``progress`` event. False if this
        worker no longer holds the lease (nothing is written).
        """
        events = (
            [("progress", _encode_fields({"progress": fields["progress"]})[1])]
            if (progress_event and "progress" in fields)
            else []
        )
        argv = [token, *_event_args(fields, events), *_encode_fields(fields)]
        keys = [self.job_key(job_id), self.lease_key(job_id), *self._event_keys(job_id)]
        return bool(self._update(keys=keys, args=argv))

    def finish(
        self, job_id: str, token: str, status: JobStatus, unless_cancel_requested: bool = False, **fields: Any
    ) -> FinishOutcome:
        """Move a running job to a final status and release its lease.

        Returns ``finished``; ``not_holder`` if this worker no longer holds the lease (nothing
        written); or, with ``unless_cancel_requested``, ``cancel_requested`` when a cancel arrived
        meanwhile (nothing written: the caller ends the job cancelled instead).
        """
        fields = {"status": status.value, "finished_at": utcnow(), **fields}
        event = status_event(status, fields.get("error"), fields.get("model_id"))
        argv = [
            token,
            job_id,
            "1" if unless_cancel_requested else "0",
            *_event_args(fields, [("status", event)]),
            *_encode_fields(fields),
        ]
        keys = [self.job_key(job_id), self.running_key, self.lease_key(job_id), *self._event_keys(job_id)]
        return FinishOutcome(self._finish(keys=keys, args=argv))

    def is_cancel_requested(self, job_id: str) -> bool:
        return self.redis.hget(self.job_key(job_id), "cancel_requested") == "1"

    def requeue_orphans(self) -> list[tuple[str, RequeueOutcome]]:
        """Running jobs whose lease expired: requeued (or cancelled if a cancel was pending).

        Returns [(job_id, outcome)] for those changed; the caller sends a new broker message
        for each ``requeued`` one.
        """
        changed = []
        for job_id in self.redis.smembers(self.running_key):
            keys = [self.job_key(job_id), self.running_key, self.lease_key(job_id), *self._event_keys(job_id)]
            args = [job_id, utcnow(), status_event(JobStatus.cancelled), status_event(JobStatus.queued)]
            outcome = RequeueOutcome(self._requeue(keys=keys, args=args))
            if outcome in (RequeueOutcome.requeued, RequeueOutcome.cancelled):
                changed.append((job_id, outcome))
        return changed

    def register_worker(self, name: str, info: dict, ttl_s: float) -> None:
        self.redis.set(f"{self.prefix}:worker:{name}", json.dumps(info), px=int(ttl_s * 1000))

    def unregister_worker(self, name: str) -> None:
        self.redis.delete(f"{self.prefix}:worker:{name}")

    def workers(self) -> list[dict]:
        """Live workers (those that refreshed their key within its TTL)."""
        keys = list(self.redis.scan_iter(f"{self.prefix}:worker:*", count=100))
        values = self.redis.mget(keys) if keys else []
        workers = []
        for key, value in zip(keys, values, strict=True):
            try:
                info = json.loads(value) if value else None
            except ValueError:
                info = None
            if isinstance(info, dict):
                workers.append(info)
            elif value:
                log.warning("ignoring unreadable worker entry %s", key)
        return workers

    def _get_many(self, ids: list[str]) -> list[JobRecord | None]:
        pipe = self.redis.pipeline()
        for job_id in ids:
            pipe.hgetall(self.job_key(job_id))
        replies = pipe.execute(raise_on_error=False)
        for reply in replies:  # a lost connection is an outage; other errors are bad records
            if isinstance(reply, redis.ConnectionError | redis.TimeoutError):
                raise reply
        return [_readable_record(job_id, raw) for job_id, raw in zip(ids, replies, strict=True)]


def _event_args(fields: dict[str, Any], events: list[tuple[str, str]]) -> list[str]:
    """ARGV of ``emit_events``: the JSON of every epoch in ``fields["metrics"]`` (those not yet
    in the record become ``epoch`` events), then ``events`` as (type, data) pairs."""
    metrics = fields.get("metrics") or []
    epochs = [m.model_dump_json() if isinstance(m, BaseModel) else json.dumps(m) for m in metrics]
    return [str(len(epochs)), *epochs, str(len(events)), *[x for pair in events for x in pair]]


def _encode_fields(fields: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for name, value in fields.items():
        if isinstance(value, BaseModel):
            value = value.model_dump_json()
        elif name in _JSON_FIELDS or isinstance(value, (dict, list)):
            value = json.dumps(value)
        elif value is None:
            value = ""
        out += [name, str(value)]
    return out


def _readable_record(job_id: str, raw: dict[str, str] | Exception) -> JobRecord | None:
    """For listings: a record that cannot be read is logged and left out, not fatal to the page."""
    if not raw:
        return None
    if isinstance(raw, Exception):
        log.warning("the stored record of job %s is unreadable: %s", job_id, raw)
        return None
    try:
        return _record_from_hash(job_id, raw)
    except JobRecordCorrupt as exc:
        log.warning("%s", exc)
        return None


def _record_from_hash(job_id: str, raw: dict[str, str]) -> JobRecord:
    try:
        data: dict[str, Any] = {k: v for k, v in raw.items() if v != ""}
        for name in _JSON_FIELDS:
            if name in data:
                data[name] = json.loads(data[name])
        data["cancel_requested"] = data.get("cancel_requested") == "1"
        if data.get("status") != JobStatus.running:  # the stage of a job that is not running is its status
            data["progress"] = {**data.get("progress", {}), "stage": data.get("status", "queued")}
        return JobRecord.model_validate(data)
    except (ValueError, TypeError, ValidationError) as exc:  # JSONDecodeError is a ValueError
        raise JobRecordCorrupt(f"the stored record of job {job_id} is unreadable: {exc}") from None
