"""The distributed event log and work queue of DAS, on Redis (Redis Streams, Lua scripts).

Same semantics as the embedded backends (:class:`~exfm.das.events.SQLiteEventLog`,
:class:`~exfm.das.queue.SQLiteWorkQueue`), so the joiner, the store and the workers run unchanged
on either. Keys, all under ``prefix`` (default ``exfm:das``)::

    {prefix}:meta            hash: ``partitions`` (the log's) and ``queue_partitions``, fixed once
    {prefix}:log:{p}         stream: partition p of the log (fields: encode_event(...) + ``_seq``)
    {prefix}:count:{p}       counter: events ever appended to partition p (the entries' ``_seq``)
    {prefix}:seen:{key}      deduplication key of one event (``event_key``), expires after dedup_ttl_s
    {prefix}:claim:{p}       ``worker|token`` of partition p's claim, with the lease as its PX expiry
    {prefix}:token:{p}       counter: the last fencing token issued for partition p
    {prefix}:workers         sorted set: live workers scored by heartbeat expiry (server time, ms)

**Log.** :meth:`RedisEventLog.append` runs one Lua script per batch: for each event it sets the
event's dedup key with ``SET NX PX`` and only if that key is new appends the event with ``XADD``,
so deduplication and append are atomic and a retried append (a lost reply after a Redis restart)
adds nothing twice. Offsets are the stream ids (``"<ms>-<seq>"``), increasing in append order;
:meth:`~RedisEventLog.trim` drops a prefix of a stream while the dedup keys stay (until their TTL,
which bounds how late a resend may come and still be recognised; the SQLite log keeps keys forever).

**No consumer groups.** Readers do not use ``XREADGROUP``/``XACK``. The authoritative resume point
of a partition is the offset checkpoint that the shared store commits atomically with the data,
fenced by the claim token (:meth:`exfm.das.store.SharedStore.open_partition`). A consumer-group
acknowledgement would be a second commit, not atomic with the first: after a crash between the
two, either events are acknowledged but not stored, or stored and redelivered, and the group's
pending list would have to be reconciled with the store's checkpoint anyway. Reading with
``XRANGE`` from the stored checkpoint has one source of truth and needs no reconciliation.

**Queue.** Claims, renewals and releases are Lua scripts: a claim succeeds only when the holder
key is absent (free, released or expired; Redis expires it), and takes its token from ``INCR``
on the partition's token counter, so every claim of a partition gets a strictly larger token. A
renewal succeeds only while the holder key holds exactly ``worker|token``, or when it expired and
nobody claimed the partition since (the token counter still equals the claim's token). A release
deletes only its own holder key and bumps the counter, so the released claim cannot be renewed
back. Heartbeats use the Redis server's ``TIME``, so the workers' clocks do not matter; a
:class:`~exfm.das.queue.Claim`'s ``expires_at`` is the worker's local estimate (taken before the
request, so never later than the server's expiry).

**Restarts.** :func:`connect_redis` builds a client that retries connection errors with
exponential backoff for about 30 s, so a Redis restart is a pause, not a failure. Run Redis with
``appendonly yes`` and ``appendfsync always`` (or accept losing the last second of appends and
claims on a crash). Everything assumes one Redis server (with replicas): the append script
touches keys of several partitions, so on Redis Cluster use a hash-tagged prefix (``{exfm:das}``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from exfm.das.events import Event, LogEntry, decode_event, encode_event, event_key, route
from exfm.das.queue import Claim

DEFAULT_PREFIX = "exfm:das"
SEQ_FIELD = "_seq"
APPEND_BATCH = 1000
APPEND_BYTES = 8 << 20
"""Events and bytes per append script (at most): bound how long one script blocks the server."""

_APPEND = """
-- KEYS: per event its dedup key, its partition's stream and its partition's counter.
-- ARGV[1]: dedup TTL in ms (0: keep forever); then per event: n, then n field/value strings.
local ttl = tonumber(ARGV[1])
local added = 0
local a = 2
for i = 1, #KEYS, 3 do
  local n = tonumber(ARGV[a])
  local new
  if ttl > 0 then
    new = redis.call('SET', KEYS[i], '1', 'NX', 'PX', ttl)
  else
    new = redis.call('SET', KEYS[i], '1', 'NX')
  end
  if new then
    local seq = redis.call('INCR', KEYS[i + 2])
    redis.call('XADD', KEYS[i + 1], '*', '_seq', seq, unpack(ARGV, a + 1, a + n))
    added = added + 1
  end
  a = a + n + 1
end
return added
"""

_CLAIM = """
-- KEYS: holder, token counter; ARGV: worker, ttl ms. Returns the new token, or nil if held.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return false
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. token, 'PX', ARGV[2])
return token
"""

_RENEW = """
-- KEYS: holder, token counter; ARGV: worker, token, ttl ms. Returns 1 if renewed.
local value = ARGV[1] .. '|' .. ARGV[2]
local current = redis.call('GET', KEYS[1])
if current == value then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
if current == false and redis.call('GET', KEYS[2]) == ARGV[2] then
  redis.call('SET', KEYS[1], value, 'PX', ARGV[3])
  return 1
end
return 0
"""

_RELEASE = """
-- KEYS: holder, token counter; ARGV: worker, token. Returns 1 if the claim was still this one's.
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] .. '|' .. ARGV[2] then
  redis.call('DEL', KEYS[1])
elseif current ~= false then
  return 0
end
if redis.call('GET', KEYS[2]) == ARGV[2] then
  redis.call('INCR', KEYS[2])
end
return 1
"""

_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

_HEARTBEAT = (
    _NOW_MS
    + """
-- KEYS: workers; ARGV: worker, ttl ms.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now))
redis.call('ZADD', KEYS[1], string.format('%.0f', now + tonumber(ARGV[2])), ARGV[1])
return 1
"""
)

_LIVE = (
    _NOW_MS
    + """
-- KEYS: workers. Returns the workers whose heartbeat expires after now.
return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. string.format('%.0f', now), '+inf')
"""
)


def connect_redis(url: str, retry_s: float = 30.0, **kwargs: Any) -> redis.Redis:
    """A Redis client that survives a server restart: it retries connection errors and timeouts.

    Retries back off exponentially (0.1 s doubling, capped at 1 s) for about ``retry_s`` seconds
    in total, then raise. Replies are decoded to ``str``.

    Args:
        url: ``redis://host:port/db`` (see ``redis.Redis.from_url``).
        retry_s: roughly how long one command keeps retrying while the server is unreachable.
        kwargs: further ``redis.Redis`` options (they override the defaults here).
    """
    backoff = ExponentialBackoff(cap=1.0, base=0.05)
    retries, waited = 0, 0.0
    while waited < retry_s:
        retries += 1
        waited += backoff.compute(retries)
    errors = (RedisConnectionError, RedisTimeoutError)
    options: dict[str, Any] = {
        "retry": Retry(backoff, retries, supported_errors=errors),
        "retry_on_error": list(errors),
        "socket_connect_timeout": 5.0,
        "socket_timeout": 30.0,
        "socket_keepalive": True,
        "health_check_interval": 30,
        "decode_responses": True,
    }
    options.update(kwargs)
    return redis.Redis.from_url(url, **options)


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _fields(raw: Mapping[Any, Any]) -> dict[str, str]:
    return {_str(k): _str(v) for k, v in raw.items()}


def _fixed_count(client: redis.Redis, key: str, field: str, value: int, what: str) -> None:
    """Store ``value`` in hash ``key`` once; a later different value raises ValueError."""
    client.hsetnx(key, field, value)
    stored = int(_str(client.hget(key, field)))
    if stored != value:
        raise ValueError(f"redis {key}: the {what} has {stored} partitions, not {value}")


def _next_id(stream_id: str) -> str:
    """The smallest stream id after ``stream_id``."""
    ms, _, seq = stream_id.partition("-")
    if not seq:
        return f"{int(ms)}-1"
    if int(seq) >= 2**64 - 1:
        return f"{int(ms) + 1}-0"
    return f"{int(ms)}-{int(seq) + 1}"


class RedisEventLog:
    """The distributed event log: one Redis Stream per partition, deduplicated by a Lua script.

    Args:
        client: a Redis client (:func:`connect_redis` makes one that survives restarts).
        partitions: number of partitions; stored in ``{prefix}:meta`` by the first log opened
            under ``prefix``, and every later one must use the same number.
        prefix: key prefix; separate prefixes are separate logs on one server.
        dedup_ttl_s: how long a deduplication key is kept (None: forever). A resend later than
            this after the original is appended again.

    Raises:
        ValueError: ``partitions`` < 1, or a different partition count is stored under ``prefix``.
    """

    def __init__(
        self,
        client: redis.Redis,
        partitions: int,
        prefix: str = DEFAULT_PREFIX,
        dedup_ttl_s: float | None = 7 * 86400,
    ):
        if partitions < 1:
            raise ValueError(f"partitions must be >= 1, got {partitions}")
        self.client, self.prefix = client, prefix
        self.dedup_ttl_ms = 0 if dedup_ttl_s is None else max(1, int(dedup_ttl_s * 1000))
        _fixed_count(client, f"{prefix}:meta", "partitions", partitions, "log")
        self.partitions = partitions
        self._append = client.register_script(_APPEND)

    def stream_key(self, partition: int) -> str:
        return f"{self.prefix}:log:{partition}"

    def append(self, events: Iterable[Event]) -> int:
        """Append events; returns how many were new (resends are ignored).

        Events are routed as by :func:`~exfm.das.events.route` (an impression batch becomes one
        entry per partition it touches; a watermark goes to its partition). Each entry's
        deduplication and append are one atomic step (up to ``APPEND_BATCH`` entries or
        ``APPEND_BYTES`` bytes run as one script); a script retried after a lost reply adds
        nothing twice.
        """
        added = size = 0
        keys: list[str] = []
        args: list[str | int] = [self.dedup_ttl_ms]
        for partition, event in route(events, self.partitions):
            fields = encode_event(event)
            keys += [
                f"{self.prefix}:seen:{event_key(event)}",
                self.stream_key(partition),
                f"{self.prefix}:count:{partition}",
            ]
            args.append(2 * len(fields))
            for name, value in fields.items():
                args += [name, value]
                size += len(value)
            if len(keys) >= 3 * APPEND_BATCH or size >= APPEND_BYTES:
                added += int(self._append(keys=keys, args=args))
                keys, args, size = [], [self.dedup_ttl_ms], 0
        if keys:
            added += int(self._append(keys=keys, args=args))
        return added

    def read(self, partition: int, after: str | None = None, limit: int = 10_000) -> list[LogEntry]:
        """Up to ``limit`` entries of ``partition`` appended after offset ``after``, in append order."""
        start = "-" if after is None else f"({after}"
        entries = self.client.xrange(self.stream_key(partition), start, "+", count=limit)
        return [(_str(entry_id), decode_event(_fields(fields))) for entry_id, fields in entries]

    def backlog(self, partition: int, after: str | None = None) -> int:
        """How many entries of ``partition`` lie after offset ``after``.

        Constant time: entries carry their partition's append count (``_seq``), and trimming only
        ever removes a prefix, so the entries after ``after`` are numbered contiguously.
        """
        key = self.stream_key(partition)
        start = "-" if after is None else f"({after}"
        pipe = self.client.pipeline(transaction=True)
        pipe.xrange(key, start, "+", count=1)
        pipe.xrevrange(key, "+", "-", count=1)
        first, last = pipe.execute()
        if not first:
            return 0
        return int(_fields(last[0][1])[SEQ_FIELD]) - int(_fields(first[0][1])[SEQ_FIELD]) + 1

    def trim(self, partition: int, through: str) -> None:
        """Drop the entries of ``partition`` up to and including offset ``through`` (dedup keys stay)."""
        self.client.xtrim(self.stream_key(partition), minid=_next_id(through), approximate=False)

    def __len__(self) -> int:
        """Events ever appended (trimmed ones included), like ``len`` of the SQLite log."""
        counts = self.client.mget([f"{self.prefix}:count:{p}" for p in range(self.partitions)])
        return sum(int(_str(c)) for c in counts if c is not None)

    def close(self) -> None:
        """Close the client's connections (a shared client reconnects on its next command)."""
        self.client.close()


class RedisWorkQueue:
    """The distributed work queue: partition claims with fencing tokens, and worker heartbeats.

    Args:
        client: a Redis client (:func:`connect_redis` makes one that survives restarts).
        partitions: number of partitions; stored in ``{prefix}:meta`` (``queue_partitions``) by
            the first queue opened under ``prefix``, and every later one must use the same number.
        prefix: key prefix (the same as the log's, normally).

    Raises:
        ValueError: a different partition count is stored under ``prefix``.
    """

    def __init__(self, client: redis.Redis, partitions: int, prefix: str = DEFAULT_PREFIX):
        if partitions < 1:
            raise ValueError(f"partitions must be >= 1, got {partitions}")
        self.client, self.prefix = client, prefix
        _fixed_count(client, f"{prefix}:meta", "queue_partitions", partitions, "work queue")
        self.partitions = partitions
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._live = client.register_script(_LIVE)

    def _keys(self, partition: int) -> list[str]:
        return [f"{self.prefix}:claim:{partition}", f"{self.prefix}:token:{partition}"]

    @property
    def _workers_key(self) -> str:
        return f"{self.prefix}:workers"

    def heartbeat(self, worker_id: str, ttl_s: float) -> None:
        """Mark ``worker_id`` alive for ``ttl_s`` seconds (of the Redis server's clock)."""
        self._heartbeat(keys=[self._workers_key], args=[worker_id, _ms(ttl_s)])

    def leave(self, worker_id: str) -> None:
        """Remove ``worker_id`` from the live workers (a clean shutdown)."""
        self.client.zrem(self._workers_key, worker_id)

    def live_workers(self) -> list[str]:
        """Workers whose heartbeat has not expired, sorted."""
        return sorted(_str(w) for w in self._live(keys=[self._workers_key]))

    def claim(self, worker_id: str, partition: int, ttl_s: float) -> Claim | None:
        """Claim a free, released or expired partition with a new, larger token; None if another holds it."""
        self._check(partition)
        expires_at = time.time() + ttl_s
        token = self._claim(keys=self._keys(partition), args=[worker_id, _ms(ttl_s)])
        return None if token is None else Claim(partition, worker_id, int(token), expires_at)

    def renew(self, claim: Claim, ttl_s: float) -> Claim | None:
        """Extend a claim still held with its token; None if it was lost (released, or taken with a newer token)."""
        expires_at = time.time() + ttl_s
        renewed = self._renew(keys=self._keys(claim.partition), args=[claim.worker_id, claim.token, _ms(ttl_s)])
        return Claim(claim.partition, claim.worker_id, claim.token, expires_at) if int(renewed) else None

    def release(self, claim: Claim) -> None:
        """Give a claim up (no-op if it was lost)."""
        self._release(keys=self._keys(claim.partition), args=[claim.worker_id, claim.token])

    def holders(self) -> dict[int, Claim]:
        """The unexpired claims by partition (``expires_at`` from the keys' remaining TTL)."""
        pipe = self.client.pipeline(transaction=True)
        for partition in range(self.partitions):
            holder = self._keys(partition)[0]
            pipe.get(holder)
            pipe.pttl(holder)
        now = time.time()
        replies = pipe.execute()
        claims = {}
        for partition in range(self.partitions):
            value, pttl = replies[2 * partition], replies[2 * partition + 1]
            if value is None or pttl is None or int(pttl) <= 0:
                continue
            worker_id, _, token = _str(value).rpartition("|")
            claims[partition] = Claim(partition, worker_id, int(token), now + int(pttl) / 1000)
        return claims

    def close(self) -> None:
        """Close the client's connections (a shared client reconnects on its next command)."""
        self.client.close()

    def _check(self, partition: int) -> None:
        if not 0 <= partition < self.partitions:
            raise ValueError(f"partition {partition} out of range 0..{self.partitions - 1}")


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
