"""Live job events: reading a job's Redis stream (see ``core.jobs``) as Server-Sent Events.

Pull-based: an event is read only when the client has taken the previous one, so a slow or
stalled reader costs the API at most a page of ``PAGE`` events, never an unbounded buffer (and
sse-starlette drops a client that does not read for ``send_timeout``).

* History (what the stream holds when the client connects, or after its ``Last-Event-ID``) is
  read with ``XRANGE``, a page at a time.
* The live tail of a job is read once per API process, however many clients watch it: a
  ``_Feed`` task waits on ``XREAD BLOCK`` (asyncio Redis, no thread held) and keeps the latest
  ``FEED_KEPT`` to ``2 * FEED_KEPT`` entries in memory; each client takes the entries after its
  own cursor from there. A client that falls behind that window reads from Redis again
  (``XRANGE``) until it has caught up, so nothing is skipped or sent twice.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
from collections.abc import AsyncIterator

import redis
import redis.asyncio as aioredis
from sse_starlette import ServerSentEvent

from core.jobs import TERMINAL_STATUSES

log = logging.getLogger(__name__)

PAGE = 100
BLOCK_MS = 5_000
FEED_KEPT = 500
WAKE_GROUP = 16


def async_redis_client(url: str, timeout_s: float) -> aioredis.Redis:
    """The API's asyncio client for event streams: its socket timeout outlasts ``XREAD BLOCK``."""
    return aioredis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=BLOCK_MS / 1000 + timeout_s,
        socket_connect_timeout=timeout_s,
        max_connections=10_000,
    )


def _key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _encode(entry_id: str, fields: dict[str, str]) -> bytes:
    """One stream entry as an encoded SSE message (``event``, ``id``, ``data`` lines)."""
    event = ServerSentEvent(data=fields.get("data", "null"), event=fields.get("type", "message"), id=entry_id)
    return event.encode()


def _is_final(fields: dict[str, str]) -> bool:
    if fields.get("type") != "status":
        return False
    try:
        return json.loads(fields["data"]).get("status") in TERMINAL_STATUSES
    except (KeyError, ValueError, AttributeError):
        return False


class _Feed:
    """The live tail of one job's stream, read once for every client of this process.

    Holds every entry after ``floor`` (a stream id as a (ms, seq) tuple) up to the newest read;
    ``done`` once the job ended (its final status was read, or the record is gone or final while
    nothing new came) or Redis failed.
    """

    def __init__(self, client: aioredis.Redis, job_key: str, stream_key: str, start_id: str):
        self.client, self.job_key, self.stream_key = client, job_key, stream_key
        self.ids: list[str] = []
        self.keys: list[tuple[int, int]] = []
        self.fields: list[dict[str, str]] = []
        self.encoded: list[bytes] = []  # each entry encoded once, sent as is to every client
        self.floor = _key(start_id)
        self.last = start_id
        self.done = False
        self.subscribers = 0
        self.waiters: list[asyncio.Future[None]] = []
        self.task = asyncio.create_task(self._read())

    def after(self, cursor: tuple[int, int]) -> list[tuple[str, dict[str, str], bytes]] | None:
        """The entries after ``cursor`` (at most ``PAGE``) as (id, fields, encoded SSE message),
        or None if the feed does not hold them all (the cursor is older than its window)."""
        if cursor < self.floor:
            return None
        start = bisect.bisect_right(self.keys, cursor)
        end = start + PAGE
        return list(zip(self.ids[start:end], self.fields[start:end], self.encoded[start:end], strict=True))

    async def wait(self) -> None:
        """Until the feed has read more entries or is done."""
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        await waiter

    async def _wake_in_groups(self) -> None:
        # WAKE_GROUP waiters per loop iteration: a request that arrives while 200 clients are
        # sent an event waits for one group, not for all of them (the p99 of /predict).
        waiters, self.waiters = self.waiters, []
        for start in range(0, len(waiters), WAKE_GROUP):
            for waiter in waiters[start : start + WAKE_GROUP]:
                if not waiter.done():
                    waiter.set_result(None)
            await asyncio.sleep(0)

    def _wake_all(self) -> None:
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _read(self) -> None:
        try:
            while not self.done:
                reply = await self.client.xread({self.stream_key: self.last}, count=PAGE, block=BLOCK_MS)
                entries = reply[0][1] if reply else []
                for entry_id, fields in entries:
                    self.ids.append(entry_id)
                    self.keys.append(_key(entry_id))
                    self.fields.append(fields)
                    self.encoded.append(_encode(entry_id, fields))
                    self.last = entry_id
                    self.done = self.done or _is_final(fields)
                if len(self.ids) > 2 * FEED_KEPT:
                    self.floor = self.keys[-FEED_KEPT - 1]
                    for kept in (self.ids, self.keys, self.fields, self.encoded):
                        del kept[:-FEED_KEPT]
                if not entries:  # quiet: did the job end (or go) without our seeing it?
                    status = await self.client.hget(self.job_key, "status")
                    self.done = status is None or status in TERMINAL_STATUSES
                await self._wake_in_groups()
        except redis.RedisError as exc:
            log.warning("event feed %s stopped: Redis error %s: %s", self.stream_key, type(exc).__name__, exc)
        finally:
            self.done = True
            self._wake_all()


class EventHub:
    """The ``_Feed`` of each watched job in this process (one event loop); a feed stops when its
    last client leaves."""

    def __init__(self, client: aioredis.Redis):
        self.client = client
        self.feeds: dict[str, _Feed] = {}

    def join(self, job_key: str, stream_key: str, cursor: str) -> _Feed:
        feed = self.feeds.get(stream_key)
        if feed is None or feed.done:
            feed = self.feeds[stream_key] = _Feed(self.client, job_key, stream_key, cursor)
        feed.subscribers += 1
        return feed

    def leave(self, feed: _Feed) -> None:
        feed.subscribers -= 1
        if feed.subscribers <= 0:
            feed.task.cancel()
            if self.feeds.get(feed.stream_key) is feed:
                del self.feeds[feed.stream_key]


async def job_events(
    client: aioredis.Redis, hub: EventHub, job_key: str, stream_key: str, last_id: str | None
) -> AsyncIterator[bytes | ServerSentEvent]:
    """The events of one job after ``last_id`` (all of them when None), ending after a final status.

    Args:
        client: asyncio Redis client (``decode_responses=True``).
        hub: the process's ``EventHub`` (live tails shared between clients).
        job_key: the job's record hash, read to tell whether the job already ended.
        stream_key: the job's event stream.
        last_id: exclusive start, a stream id ``<ms>-<seq>`` (the client's ``Last-Event-ID``).

    Yields encoded SSE messages (bytes, every event that is ready in one chunk; each entry of the
    live tail is encoded once per process, not once per client) or a ``ServerSentEvent``, each
    event with ``id`` = the stream entry id, ``event`` = progress, epoch or status, ``data`` = the
    entry's JSON. When Redis fails the stream just ends (logged); an
    EventSource then reconnects with its Last-Event-ID.
    """
    try:
        async for event in _job_events(client, hub, job_key, stream_key, last_id or "0-0"):
            yield event
    except redis.RedisError as exc:
        log.warning("event stream %s ended: Redis error %s: %s", stream_key, type(exc).__name__, exc)


async def _job_events(
    client: aioredis.Redis, hub: EventHub, job_key: str, stream_key: str, cursor: str
) -> AsyncIterator[bytes | ServerSentEvent]:
    feed: _Feed | None = None
    try:
        while True:
            entries = feed.after(_key(cursor)) if feed is not None else None
            if entries is None or (not entries and feed.done):
                # From Redis: the history, a client behind the feed's window, or the job ended.
                page = await client.xrange(stream_key, min=f"({cursor}", max="+", count=PAGE)
                entries = [(entry_id, fields, _encode(entry_id, fields)) for entry_id, fields in page]
            if entries:
                # All that is ready goes out as one chunk: one send per wake-up, not per event.
                chunk, final = [], False
                for entry_id, fields, encoded in entries:
                    cursor = entry_id
                    chunk.append(encoded)
                    if final := _is_final(fields):
                        break
                yield b"".join(chunk)
                if final:
                    return
                continue
            if feed is None or feed.done:
                status = await client.hget(job_key, "status")
                if status is None:
                    return  # the job was deleted
                if status in TERMINAL_STATUSES:  # the client resumed after the last event
                    if cursor == "0-0" and not await client.exists(stream_key):  # older than events
                        error, model_id = await client.hmget(job_key, "error", "model_id")
                        data = {"status": status, "error": error or None, "model_id": model_id or None}
                        yield ServerSentEvent(data=json.dumps(data), event="status", id="0-1")
                    return
                if feed is not None:
                    hub.leave(feed)
                feed = hub.join(job_key, stream_key, cursor)
                continue
            # Caught up with the live tail: wait until the feed has read more.
            if not feed.after(_key(cursor)) and not feed.done:
                await feed.wait()
    finally:
        if feed is not None:
            hub.leave(feed)
