"""Model aliases (MLflow-style): a named pointer such as ``production`` from a model *name* to one
model id, moved by operators; callers ask for the alias instead of "the newest model".

``models_store`` holds the store of trained models: checkpoints, metadata, aliases and exports.
Checkpoints live on disk (``checkpoint.py``); aliases live in Redis, so that every API process
sees a change at once and they survive restarts (Redis persistence).

A model's *name* groups the models that compete for an alias: the dataset it was trained on
when its metadata names one (uploaded datasets), else its task (``model_name``). An alias is
unique per name: setting ``production`` on one model moves it from any other model of the name.

Keys (``p`` = ``REDIS_PREFIX``)::

    p:alias:<name>:<alias>   string: the model id the alias points at
    p:aliases:<model_id>     hash: alias -> name, the aliases a model carries (reverse index)

Both are changed together by Lua scripts, so they never disagree. The store also keeps, per
process, the last alias table it read from Redis: when Redis is unreachable, ``get`` answers
from it (so ``/predict`` keeps serving the pinned model during an outage) instead of failing.
"""

from __future__ import annotations

import logging
import re
import threading
import time

import redis

log = logging.getLogger(__name__)

# $ also matches before a final newline ("abc\n"), so aliases are checked with fullmatch.
ALIAS_PATTERN = r"^[a-z][a-z0-9_-]{0,63}$"
_ALIAS_RE = re.compile(ALIAS_PATTERN)
DEFAULT_ALIAS = "production"
_RETRY_AFTER_FAILURE_S = 2.0

_SET = """
local old = redis.call('GET', KEYS[1])
if old and old ~= ARGV[1] then
  redis.call('HDEL', ARGV[4] .. ':aliases:' .. old, ARGV[2])
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return old
"""

_DELETE = """
local name = redis.call('HGET', KEYS[1], ARGV[2])
if not name then return false end
redis.call('HDEL', KEYS[1], ARGV[2])
local forward = ARGV[3] .. ':alias:' .. name .. ':' .. ARGV[2]
if redis.call('GET', forward) == ARGV[1] then
  redis.call('DEL', forward)
end
return name
"""

_REMOVE_MODEL = """
local entries = redis.call('HGETALL', KEYS[1])
local removed = {}
for i = 1, #entries, 2 do
  local forward = ARGV[2] .. ':alias:' .. entries[i + 1] .. ':' .. entries[i]
  if redis.call('GET', forward) == ARGV[1] then
    redis.call('DEL', forward)
    table.insert(removed, entries[i])
  end
end
redis.call('DEL', KEYS[1])
return removed
"""


class InvalidAlias(ValueError):
    """The alias is not of the form ``ALIAS_PATTERN``."""


class AliasStoreUnavailable(Exception):
    """Redis is unreachable and this process has no copy of the alias table to answer from."""


def validate_alias(alias: str) -> str:
    """Return ``alias`` if it is 1-64 characters of a-z, 0-9, '_' and '-' starting with a letter;
    raise ``InvalidAlias`` otherwise."""
    if not isinstance(alias, str) or not _ALIAS_RE.fullmatch(alias):
        raise InvalidAlias(
            f"invalid alias {alias!r}: expected 1-64 characters of a-z, 0-9, '_' and '-', "
            "starting with a letter"
        )
    return alias


def model_name(metadata: dict) -> str | None:
    """The name a model's aliases live under: its metadata's ``dataset`` when present (models of
    uploaded datasets share a task but not a name), else its ``task``; None if it has neither."""
    name = metadata.get("dataset") or metadata.get("task")
    return name if isinstance(name, str) and name else None


class AliasStore:
    """Aliases of one ``REDIS_PREFIX``; safe to use from many threads and processes.

    Args:
        client: a Redis client with ``decode_responses=True`` (see ``core.jobs.redis_client``).
        prefix: the ``REDIS_PREFIX``.

    Redis errors (``redis.exceptions.RedisError``) propagate from every method except ``get`` and
    ``aliases_of_many``, which answer from this process's last copy of the table when Redis is
    unreachable.
    """

    def __init__(self, client: redis.Redis, prefix: str):
        self.client = client
        self.prefix = prefix
        self._set = client.register_script(_SET)
        self._delete = client.register_script(_DELETE)
        self._remove_model = client.register_script(_REMOVE_MODEL)
        self._lock = threading.Lock()
        self._table: dict[tuple[str, str], str] | None = None  # (name, alias) -> model id
        self._down_until = 0.0

    def _key(self, name: str, alias: str) -> str:
        return f"{self.prefix}:alias:{name}:{alias}"

    def _reverse_key(self, model_id: str) -> str:
        return f"{self.prefix}:aliases:{model_id}"

    def set(self, name: str, alias: str, model_id: str) -> str | None:
        """Point ``alias`` of ``name`` at ``model_id``, moving it from any other model.

        Returns the model id it pointed at before (None if new). Raises ``InvalidAlias``.
        """
        validate_alias(alias)
        old = self._set(
            keys=[self._key(name, alias), self._reverse_key(model_id)],
            args=[model_id, alias, name, self.prefix],
        )
        self._remember((name, alias), model_id)
        return old

    def delete(self, model_id: str, alias: str) -> str | None:
        """Remove ``alias`` from ``model_id``; returns the name it was under, or None if the model
        did not carry it. Needs no checkpoint: works for a model deleted outside the API."""
        validate_alias(alias)
        name = self._delete(keys=[self._reverse_key(model_id)], args=[model_id, alias, self.prefix])
        if name:
            self._remember((name, alias), None)
        return name or None

    def get(self, name: str, alias: str) -> str | None:
        """The model id ``alias`` of ``name`` points at, or None.

        Reads Redis; when Redis is unreachable, answers from the last table this process read
        (logged) and raises ``AliasStoreUnavailable`` if it never read one.
        """
        validate_alias(alias)
        if time.monotonic() >= self._down_until:
            try:
                model_id = self.client.get(self._key(name, alias))
            except redis.exceptions.ConnectionError as exc:  # TimeoutError is a ConnectionError
                self._down_until = time.monotonic() + _RETRY_AFTER_FAILURE_S
                log.warning("Redis unreachable for alias %s@%s (%s): using the last table", name, alias, exc)
            else:
                if self._table is None:
                    self.refresh()  # Redis was down at start-up: take the copy now
                self._remember((name, alias), model_id)
                return model_id
        with self._lock:
            if self._table is None:
                raise AliasStoreUnavailable(
                    f"Redis is unreachable and this process has not read the aliases yet, so it cannot "
                    f"tell which model {name}@{alias} is; retry later or pass model_id"
                )
            return self._table.get((name, alias))

    def aliases_of(self, model_id: str) -> list[str]:
        """The aliases ``model_id`` carries, sorted."""
        return sorted(self.client.hkeys(self._reverse_key(model_id)))

    def aliases_of_many(self, model_ids: list[str]) -> dict[str, list[str]]:
        """model id -> its aliases (sorted), in one round trip; from the last table read when
        Redis is unreachable (raises ``AliasStoreUnavailable`` if there is none)."""
        if not model_ids:
            return {}
        if time.monotonic() >= self._down_until:
            try:
                pipe = self.client.pipeline(transaction=False)
                for model_id in model_ids:
                    pipe.hkeys(self._reverse_key(model_id))
                return {m: sorted(a) for m, a in zip(model_ids, pipe.execute(), strict=True)}
            except redis.exceptions.ConnectionError as exc:
                self._down_until = time.monotonic() + _RETRY_AFTER_FAILURE_S
                log.warning("Redis unreachable for model aliases (%s): using the last alias table", exc)
        with self._lock:
            if self._table is None:
                raise AliasStoreUnavailable("Redis is unreachable and this process never read the aliases")
            result: dict[str, list[str]] = {m: [] for m in model_ids}
            for (_, alias), model_id in self._table.items():
                if model_id in result:
                    result[model_id].append(alias)
            return {m: sorted(a) for m, a in result.items()}

    def remove_model(self, model_id: str) -> list[str]:
        """Remove every alias that points at ``model_id``; returns them (sorted)."""
        removed = self._remove_model(keys=[self._reverse_key(model_id)], args=[model_id, self.prefix])
        with self._lock:
            if self._table is not None:
                self._table = {k: v for k, v in self._table.items() if v != model_id}
        return sorted(removed)

    def all(self) -> dict[tuple[str, str], str]:
        """Every alias: (name, alias) -> model id. Scans the prefix (for listings and start-up)."""
        keys = list(self.client.scan_iter(f"{self.prefix}:alias:*", count=1000))
        values = self.client.mget(keys) if keys else []
        table = {}
        for key, model_id in zip(keys, values, strict=True):
            name, _, alias = key[len(self.prefix) + len(":alias:") :].rpartition(":")
            if model_id is not None and name:
                table[(name, alias)] = model_id
        return table

    def refresh(self) -> bool:
        """Read the whole table into this process's copy (at start-up); False if Redis is
        unreachable (the copy stays as it was)."""
        try:
            table = self.all()
        except redis.exceptions.RedisError as exc:
            log.warning("could not read the alias table (%s); aliases are read when Redis is back", exc)
            return False
        with self._lock:
            self._table = table
        return True

    def _remember(self, key: tuple[str, str], model_id: str | None) -> None:
        with self._lock:
            if self._table is None:
                return
            if model_id is None:
                self._table.pop(key, None)
            else:
                self._table[key] = model_id
