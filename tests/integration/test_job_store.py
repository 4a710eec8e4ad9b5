"""Job state transitions against the real Redis: leases, fencing, cancel, orphans, idempotency."""

from __future__ import annotations

import json
import time

import pytest

from core.jobs import (
    CancelOutcome,
    CancelResult,
    FinishOutcome,
    IdempotencyConflict,
    JobStatus,
    JobStore,
    RequeueOutcome,
    StartOutcome,
    redis_client,
)

pytestmark = pytest.mark.integration

HP = {"epochs": 2, "batch_size": 64}


@pytest.fixture
def store(stack) -> JobStore:
    settings = stack.settings()
    return JobStore(redis_client(settings.redis_url, 2.0), settings.redis_prefix)


def test_create_get_list_newest_first(store):
    ids = [store.create("mnist_lenet5", HP)[0].id for _ in range(3)]
    record = store.get(ids[0])
    assert record.status == JobStatus.queued and record.hyperparameters == HP and record.attempts == 0
    page, total = store.list(offset=0, limit=2)
    assert total == 3 and [r.id for r in page] == ids[::-1][:2]
    page, _ = store.list(offset=2, limit=2)
    assert [r.id for r in page] == [ids[0]]
    assert store.list(task="cifar10_dense") == ([], 0)


def test_start_takes_lease_once(store):
    job, _ = store.create("mnist_lenet5", HP)
    first = store.start(job.id, "tok1", 30, "w1", "cpu", max_attempts=3)
    assert first.outcome == StartOutcome.started and first.attempts == 1
    assert store.start(job.id, "tok2", 30, "w2", "cpu", max_attempts=3).outcome == StartOutcome.leased
    record = store.get(job.id)
    assert record.status == JobStatus.running and record.worker == "w1" and record.started_at


def test_writes_are_fenced_by_the_lease_token(store):
    job, _ = store.create("mnist_lenet5", HP)
    store.start(job.id, "tok1", 30, "w1", "cpu", max_attempts=3)
    assert not store.update(job.id, "intruder", device="cuda:0")
    assert store.finish(job.id, "intruder", JobStatus.succeeded) == FinishOutcome.not_holder
    assert store.get(job.id).status == JobStatus.running
    assert store.update(job.id, "tok1", device="cuda:0")
    assert store.finish(job.id, "tok1", JobStatus.succeeded, model_id="m1") == FinishOutcome.finished
    record = store.get(job.id)
    assert record.status == JobStatus.succeeded and record.model_id == "m1" and record.finished_at
    assert not store.renew_lease(job.id, "tok1", 30)


def test_success_gives_way_to_a_cancel_that_arrived_first(store):
    job, _ = store.create("mnist_lenet5", HP)
    store.start(job.id, "tok", 30, "w", "cpu", 3)
    store.request_cancel(job.id)
    assert (
        store.finish(job.id, "tok", JobStatus.succeeded, unless_cancel_requested=True)
        == FinishOutcome.cancel_requested
    )
    assert store.get(job.id).status == JobStatus.running
    assert store.finish(job.id, "tok", JobStatus.cancelled) == FinishOutcome.finished
    record = store.get(job.id)
    assert record.status == JobStatus.cancelled and record.progress.stage == "cancelled"


def test_cancel_queued_never_starts(store):
    job, _ = store.create("mnist_lenet5", HP)
    assert store.request_cancel(job.id) == CancelResult(
        outcome=CancelOutcome.cancelled, status=JobStatus.cancelled
    )
    assert store.start(job.id, "tok", 30, "w", "cpu", 3).outcome == StartOutcome.cancelled
    assert store.get(job.id).status == JobStatus.cancelled
    assert store.request_cancel(job.id) == CancelResult(
        outcome=CancelOutcome.ended, status=JobStatus.cancelled
    )
    assert store.request_cancel("0" * 32) == CancelResult(outcome=CancelOutcome.missing, status=None)


def test_cancel_running_sets_flag(store):
    job, _ = store.create("mnist_lenet5", HP)
    store.start(job.id, "tok", 30, "w", "cpu", 3)
    assert store.request_cancel(job.id).outcome == CancelOutcome.cancel_requested
    assert store.is_cancel_requested(job.id)
    assert store.get(job.id).status == JobStatus.running


def test_orphan_is_requeued_then_failed_after_max_attempts(store):
    job, _ = store.create("mnist_lenet5", HP)
    for attempt in (1, 2):
        assert store.start(job.id, f"t{attempt}", 0.2, "w", "cpu", max_attempts=2).attempts == attempt
        assert store.requeue_orphans() == []  # lease still alive
        time.sleep(0.3)
        assert store.requeue_orphans() == [(job.id, RequeueOutcome.requeued)]
        assert store.get(job.id).status == JobStatus.queued
    assert store.start(job.id, "t3", 0.2, "w", "cpu", max_attempts=2).outcome == StartOutcome.failed
    record = store.get(job.id)
    assert record.status == JobStatus.failed and "gave up after 2 attempts" in record.error
    assert record.attempts == 2 and record.progress.stage == "failed"


def test_orphan_with_pending_cancel_ends_cancelled(store):
    job, _ = store.create("mnist_lenet5", HP)
    store.start(job.id, "t", 0.2, "w", "cpu", 3)
    store.request_cancel(job.id)
    time.sleep(0.3)
    assert store.requeue_orphans() == [(job.id, RequeueOutcome.cancelled)]
    assert store.get(job.id).status == JobStatus.cancelled


def test_idempotency_key(store):
    first, created = store.create("mnist_lenet5", HP, "key-1", "hash-a")
    again, created_again = store.create("mnist_lenet5", HP, "key-1", "hash-a")
    assert created and not created_again and again.id == first.id
    with pytest.raises(IdempotencyConflict):
        store.create("mnist_lenet5", HP, "key-1", "hash-b")
    other, created_other = store.create("mnist_lenet5", HP, "key-2", "hash-a")
    assert created_other and other.id != first.id
    _, total = store.list()
    assert total == 2


def test_delete_rolls_back_job_and_key(store):
    job, _ = store.create("mnist_lenet5", HP, "key-x", "h")
    store.delete(job.id, "key-x")
    assert store.get(job.id) is None and store.list() == ([], 0)
    again, created = store.create("mnist_lenet5", HP, "key-x", "h")
    assert created and again.id != job.id


def test_unreadable_worker_entries_are_skipped(store):
    store.register_worker("good@host", {"name": "good@host"}, ttl_s=30)
    store.redis.set(f"{store.prefix}:worker:bogus", "notjson")
    store.redis.set(f"{store.prefix}:worker:list", "[1, 2]")
    assert store.workers() == [{"name": "good@host"}]


def test_a_stage_change_is_always_an_event_on_the_stream(store):
    """QA: the evaluation after each epoch started within the 0.2 s throttle of the last batch's
    progress, so its event was dropped and the stream (and the console) said "training" while
    GET /jobs said "evaluating". A change of stage now always goes to the stream."""
    from worker.runner import JobLease, _safe

    job, _ = store.create("mnist_lenet5", HP)
    assert store.start(job.id, "token", 30, "w", "cpu", 3).outcome == "started"
    write = _safe(JobLease(store, job.id, "token", 30), {}, lambda p: {"progress": p}, event_interval_s=60)
    for progress in (
        {"stage": "training", "epoch": 1, "batches_done": 1},
        {"stage": "training", "epoch": 1, "batches_done": 2},  # throttled
        {"stage": "evaluating", "epoch": 1},
        {"stage": "evaluating", "epoch": 1, "images_done": 10},  # throttled
        {"stage": "training", "epoch": 2, "batches_done": 1},
    ):
        write(progress)
    entries = store.redis.xrange(store.events_key(job.id))
    stages = [json.loads(f["data"])["stage"] for _, f in entries if f.get("type") == "progress"]
    assert stages == ["training", "evaluating", "training"], entries
    assert store.get(job.id).progress.batches_done == 1  # the record has every write
