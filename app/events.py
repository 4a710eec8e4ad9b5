"""Live job events: reading a job's Redis stream (see ``core.jobs``) as Server-Sent Events.

The stream is read pull-based, a page of at most ``PAGE`` entries at a time and only when the
client has taken the previous page, so a slow or stalled reader costs the API one page, never an
unbounded buffer. Waiting for new entries is an ``XREAD BLOCK`` on an asyncio Redis client: no
thread is held while a stream is idle, and the connection goes back to the pool between reads.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator

import redis
import redis.asyncio as aioredis
from sse_starlette import ServerSentEvent

from core.jobs import TERMINAL_STATUSES

log = logging.getLogger(__name__)

PAGE = 100
BLOCK_MS = 5_000
EVENT_ID_PATTERN = re.compile(r"^\d{1,20}-\d{1,20}$")


def async_redis_client(url: str, timeout_s: float) -> aioredis.Redis:
    """The API's asyncio client for event streams: its socket timeout outlasts ``XREAD BLOCK``."""
    return aioredis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=BLOCK_MS / 1000 + timeout_s,
        socket_connect_timeout=timeout_s,
        max_connections=10_000,
    )


def _event(entry_id: str, fields: dict[str, str]) -> ServerSentEvent:
    return ServerSentEvent(data=fields.get("data", "null"), event=fields.get("type", "message"), id=entry_id)


def _is_final(fields: dict[str, str]) -> bool:
    if fields.get("type") != "status":
        return False
    try:
        return json.loads(fields["data"]).get("status") in TERMINAL_STATUSES
    except (KeyError, ValueError, AttributeError):
        return False


async def job_events(
    client: aioredis.Redis, job_key: str, stream_key: str, last_id: str | None
) -> AsyncIterator[ServerSentEvent]:
    """The events of one job after ``last_id`` (all of them when None), ending after a final status.

    Args:
        client: asyncio Redis client (``decode_responses=True``).
        job_key: the job's record hash, read to tell whether the job already ended.
        stream_key: the job's event stream.
        last_id: exclusive start, a stream id ``<ms>-<seq>`` (the client's ``Last-Event-ID``).

    Yields ``ServerSentEvent`` with ``id`` = the stream entry id, ``event`` = progress, epoch or
    status, ``data`` = the entry's JSON. When Redis fails the stream just ends (logged); an
    EventSource then reconnects with its Last-Event-ID.
    """
    try:
        async for event in _job_events(client, job_key, stream_key, last_id or "0-0"):
            yield event
    except redis.RedisError as exc:
        log.warning("event stream %s ended: Redis error %s: %s", stream_key, type(exc).__name__, exc)


async def _job_events(
    client: aioredis.Redis, job_key: str, stream_key: str, cursor: str
) -> AsyncIterator[ServerSentEvent]:
    # First what the stream holds (XRANGE, a page at a time: a page is read only once the client
    # has taken the previous one), then live (XREAD BLOCK). The job record is read only when
    # there is nothing new, to tell a job that ended (or was deleted) from one that is quiet.
    live = False
    while True:
        if live:
            reply = await client.xread({stream_key: cursor}, count=PAGE, block=BLOCK_MS)
            entries = reply[0][1] if reply else []
        else:
            entries = await client.xrange(stream_key, min=f"({cursor}", max="+", count=PAGE)
        for entry_id, fields in entries:
            cursor = entry_id
            yield _event(entry_id, fields)
            if _is_final(fields):
                return
        if entries and (live or len(entries) == PAGE):
            continue
        status = await client.hget(job_key, "status")
        if status is None:
            return  # the job was deleted
        if status not in TERMINAL_STATUSES:
            live = True
            continue
        # It ended: send what is left after the cursor (its final status is among it), then stop.
        if await client.xrange(stream_key, min=f"({cursor}", max="+", count=1):
            live = False
            continue
        if cursor == "0-0" and not await client.exists(stream_key):  # a job older than event streams
            error, model_id = await client.hmget(job_key, "error", "model_id")
            data = {"status": status, "error": error or None, "model_id": model_id or None}
            yield ServerSentEvent(data=json.dumps(data), event="status", id="0-1")
        return
