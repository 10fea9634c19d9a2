"""DAS events (impressions and labels) and the append-only event log they are written to.

Producers append :class:`Impression` and :class:`Label` events; both may be resent. The log
absorbs exact resends:

* an impression is keyed by its ``request_id``: the first one appended is kept, later ones with
  the same id are ignored (a resend carries the same content);
* a label is keyed by ``(request_id, task, time_us, value)``: exact resends are ignored, while
  distinct labels for the same request and task are all kept, so that the joiner can apply its
  rule (a positive label inside the window wins, see :mod:`exfm.das.joiner`).

The log is split into partitions by a stable hash of the request id (:func:`partition_of`), so
all events of one request land in one partition and a worker that owns a partition can join it
alone. Readers consume a partition from an offset in **append order** (the order the log received
events). Event time does not order the log, because late events arrive after later ones; the
joiner's output depends only on event times and the watermark, not on the order of arrival.
Committed entries may be trimmed; their deduplication keys are kept.

The embedded backend, :class:`SQLiteEventLog`, is one SQLite file in WAL mode: several processes
on one machine may append and read concurrently. The distributed one is
:class:`exfm.das.redis_backend.RedisEventLog` (Redis Streams). :func:`replay_dataset` turns the rows of an
exfm dataset back into events (for tests and demos).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import json
import math
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from exfm.das.sqlite import write_transaction
from exfm.data.dataset import DOMAIN_COLUMN, REQUEST_ID_COLUMN, TIME_COLUMN, open_dataset
from exfm.data.hashing import stable_hash


@dataclass(frozen=True)
class Impression:
    """One served request: its features and the tasks it will be labelled for.

    Attributes:
        request_id: unique id of the request; the join key.
        time_us: event time, microseconds since the Unix epoch (UTC).
        features: the row's feature values in the partition format of an exfm dataset
            (categorical hashes, sequence hash lists, numeric floats or None, passthrough floats).
        domain: the traffic slice / domain the request belongs to (None if the schema has none).
        tasks: the tasks it waits labels for; empty means every task the joiner has a window for.
    """

    request_id: str
    time_us: int
    features: Mapping[str, Any] = field(default_factory=dict)
    domain: str | None = None
    tasks: tuple[str, ...] = ()


@dataclass(frozen=True)
class Label:
    """A label event for one task of one request (``value`` is 0 or 1)."""

    request_id: str
    task: str
    value: int
    time_us: int


@dataclass(frozen=True)
class Watermark:
    """A producer's promise to one partition: no event with time ``<= time_us`` will come any more.

    The joiner of the partition may then close every window that ends at or before ``time_us``
    even if the partition's own events lag (an idle partition, the end of a replay).
    """

    partition: int
    time_us: int


@dataclass(frozen=True, eq=False)
class ImpressionBatch:
    """Many impressions as one table: how producers send them at volume (one log entry).

    Columns: ``_request_id`` (string), ``_time`` (int64 µs), ``_domain`` (string, if the schema has
    domains) and the features in the partition format of an exfm dataset. Every impression of a
    batch waits labels for every task the joiner has a window for.
    """

    table: pa.Table

    def __post_init__(self) -> None:
        for column in (REQUEST_ID_COLUMN, TIME_COLUMN):
            if column not in self.table.column_names:
                raise ValueError(f"impression batch: no {column!r} column (columns: {self.table.column_names})")

    def __len__(self) -> int:
        return self.table.num_rows

    @functools.cached_property
    def request_ids(self) -> list[str]:
        return self.table.column(REQUEST_ID_COLUMN).to_pylist()

    @functools.cached_property
    def times_us(self) -> list[int]:
        return self.table.column(TIME_COLUMN).to_pylist()

    @functools.cached_property
    def ipc(self) -> bytes:
        """The table in Arrow's IPC stream format (how logs store it)."""
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, self.table.schema) as writer:
            writer.write_table(self.table)
        return sink.getvalue().to_pybytes()

    def impression(self, row: int) -> Impression:
        """Row ``row`` as a single :class:`Impression` (slow; for inspection and tests)."""
        return _impression(self.table.slice(row, 1).to_pylist()[0])

    def impressions(self) -> list[Impression]:
        """Every row as a single :class:`Impression`, in order (slow; for tests and small replays)."""
        return [_impression(record) for record in self.table.to_pylist()]


def _impression(record: dict[str, Any]) -> Impression:
    """A batch row (``_request_id``, ``_time``, ``_domain``, features) as an :class:`Impression`."""
    request_id, time_us = record.pop(REQUEST_ID_COLUMN), record.pop(TIME_COLUMN)
    return Impression(request_id, time_us, record, record.pop(DOMAIN_COLUMN, None))


Event = Impression | ImpressionBatch | Label | Watermark
"""Anything an event log holds."""


LogEntry = tuple[str, Event]
"""``(offset, event)``: an event and its offset in its partition of the log (opaque, ordered by append)."""


class EventLog(Protocol):
    """An append-only, deduplicating, partitioned log of impressions and labels.

    Every event of a request goes to partition :func:`partition_of` ``(request_id, partitions)``,
    so one reader of a partition sees all events it needs to join. Offsets are opaque strings,
    increasing in append order within a partition; ``after=None`` means the partition's start.
    Backends: :class:`SQLiteEventLog` (embedded) and :class:`exfm.das.redis_backend.RedisEventLog`.
    """

    partitions: int

    def append(self, events: Iterable[Event]) -> int:
        """Append events; returns how many were new (resends are ignored)."""
        ...

    def read(self, partition: int, after: str | None = None, limit: int = 10_000) -> list[LogEntry]:
        """Up to ``limit`` entries of ``partition`` appended after offset ``after``, in append order."""
        ...

    def backlog(self, partition: int, after: str | None = None) -> int:
        """How many entries of ``partition`` lie after offset ``after``."""
        ...

    def trim(self, partition: int, through: str) -> None:
        """Drop the entries of ``partition`` up to and including offset ``through`` (already committed)."""
        ...

    def close(self) -> None: ...


def partition_of(request_id: str, partitions: int) -> int:
    """The log partition of a request: its stable hash modulo ``partitions``."""
    return int(stable_hash([request_id])[0]) % partitions


def route(events: Iterable[Event], partitions: int) -> Iterator[tuple[int, Event]]:
    """``(partition, event)`` for each event; an impression batch is split into one batch per partition."""
    for event in events:
        if isinstance(event, ImpressionBatch):
            numbers = stable_hash(event.table.column(REQUEST_ID_COLUMN)) % partitions
            for number in np.unique(numbers).tolist():
                yield number, ImpressionBatch(event.table.filter(pa.array(numbers == number)))
        elif isinstance(event, Watermark):
            if not 0 <= event.partition < partitions:
                raise ValueError(f"watermark for partition {event.partition}: the log has {partitions} partitions")
            yield event.partition, event
        else:
            yield partition_of(event.request_id, partitions), event


def watermarks(time_us: int, partitions: int) -> list[Watermark]:
    """One watermark at ``time_us`` for every partition (what a producer sends to all of them)."""
    return [Watermark(p, time_us) for p in range(partitions)]


def encode_event(event: Event) -> dict[str, str]:
    """An event as flat string fields (the storage format of every backend); validates labels."""
    if isinstance(event, Impression):
        return {
            "kind": "i",
            "request_id": event.request_id,
            "time_us": str(int(event.time_us)),
            "domain": "" if event.domain is None else event.domain,
            "has_domain": "1" if event.domain is not None else "0",
            "tasks": json.dumps(list(event.tasks)),
            "features": json.dumps({k: _plain(v) for k, v in event.features.items()}, sort_keys=True),
        }
    if isinstance(event, Watermark):
        return {"kind": "w", "partition": str(event.partition), "time_us": str(int(event.time_us))}
    if isinstance(event, ImpressionBatch):
        return {"kind": "b", "ipc": base64.b64encode(event.ipc).decode("ascii")}
    if event.value not in (0, 1):
        raise ValueError(f"label {event.request_id!r}/{event.task!r}: value must be 0 or 1, got {event.value!r}")
    return {
        "kind": "l",
        "request_id": event.request_id,
        "time_us": str(int(event.time_us)),
        "task": event.task,
        "value": str(int(event.value)),
    }


def decode_event(fields: Mapping[str, str]) -> Event:
    """The inverse of :func:`encode_event`."""
    if fields["kind"] == "i":
        domain = fields["domain"] if fields["has_domain"] == "1" else None
        return Impression(
            fields["request_id"],
            int(fields["time_us"]),
            json.loads(fields["features"]),
            domain,
            tuple(json.loads(fields["tasks"])),
        )
    if fields["kind"] == "w":
        return Watermark(int(fields["partition"]), int(fields["time_us"]))
    if fields["kind"] == "b":
        return ImpressionBatch(pa.ipc.open_stream(base64.b64decode(fields["ipc"])).read_all())
    return Label(fields["request_id"], fields["task"], int(fields["value"]), int(fields["time_us"]))


def event_key(event: Event) -> str:
    """The deduplication key: the request id for an impression, every field for a label or watermark."""
    if isinstance(event, Watermark):
        return f"w\x1f{event.partition}\x1f{event.time_us}"
    if isinstance(event, ImpressionBatch):  # an exact resend of the whole batch
        return f"b\x1f{hashlib.sha256(event.ipc).hexdigest()}"
    if isinstance(event, Impression):
        return f"i\x1f{event.request_id}"
    return f"l\x1f{event.request_id}\x1f{event.task}\x1f{event.time_us}\x1f{event.value}"


def _plain(value: Any) -> Any:
    """A JSON-safe copy of a feature value (numpy scalars and arrays become Python values)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


class SQLiteEventLog:
    """The embedded event log: one SQLite file in WAL mode, safe for several local processes.

    Args:
        path: the database file (created if missing).
        partitions: number of partitions; fixed when the file is created (a later value must match).
        timeout_s: how long a writer waits for another process's write lock.
    """

    def __init__(self, path: str | Path, partitions: int = 1, timeout_s: float = 30.0):
        if partitions < 1:
            raise ValueError(f"partitions must be >= 1, got {partitions}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        with self._transaction() as db:
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            db.execute(
                "CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
                " partition INTEGER NOT NULL, key TEXT NOT NULL UNIQUE, body TEXT NOT NULL)"
            )
            db.execute("CREATE INDEX IF NOT EXISTS events_by_partition ON events (partition, seq)")
            db.execute("INSERT OR IGNORE INTO meta VALUES ('partitions', ?)", (str(partitions),))
            stored = int(db.execute("SELECT value FROM meta WHERE key = 'partitions'").fetchone()[0])
        if stored != partitions:
            raise ValueError(f"{self.path}: the log has {stored} partitions, not {partitions}")
        self.partitions = partitions

    def append(self, events: Iterable[Event]) -> int:
        """Append events in one transaction; returns how many were new (resends are ignored).

        A trimmed entry's key is kept (its row stays, with an empty body), so a resend of an
        event that was already committed and trimmed is still ignored.
        """
        rows = [
            (number, event_key(event), json.dumps(encode_event(event)))
            for number, event in route(events, self.partitions)
        ]
        with self._transaction() as db:
            before = db.total_changes
            db.executemany("INSERT OR IGNORE INTO events (partition, key, body) VALUES (?, ?, ?)", rows)
            return db.total_changes - before

    def read(self, partition: int, after: str | None = None, limit: int = 10_000) -> list[LogEntry]:
        """Up to ``limit`` entries of ``partition`` appended after offset ``after``, in append order."""
        rows = self._db.execute(
            "SELECT seq, body FROM events WHERE partition = ? AND seq > ? AND body != '' ORDER BY seq LIMIT ?",
            (partition, _seq(after), limit),
        ).fetchall()
        return [(str(seq), decode_event(json.loads(body))) for seq, body in rows]

    def backlog(self, partition: int, after: str | None = None) -> int:
        """How many entries of ``partition`` lie after offset ``after``."""
        return self._db.execute(
            "SELECT COUNT(*) FROM events WHERE partition = ? AND seq > ? AND body != ''", (partition, _seq(after))
        ).fetchone()[0]

    def trim(self, partition: int, through: str) -> None:
        """Empty the bodies of the entries of ``partition`` up to ``through`` (keys stay for dedup)."""
        with self._transaction() as db:
            db.execute(
                "UPDATE events SET body = '' WHERE partition = ? AND seq <= ? AND body != ''",
                (partition, _seq(through)),
            )

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0]

    def close(self) -> None:
        self._db.close()

    def _transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return write_transaction(self._db)


def _seq(offset: str | None) -> int:
    return 0 if offset is None else int(offset)


def replay_dataset(
    dataset_dir: str | Path, days: Iterable[int], label_delay_us: int = 1_000_000
) -> Iterator[tuple[Impression, list[Label]]]:
    """Turn the rows of an exfm dataset back into the events that would have produced them.

    Each row becomes an impression with request id ``f"{day}:{row}"`` (row = index within the
    day), its time, domain and every non-label column as features, labelled for every task the
    joiner has a window for; each positive task becomes a label at ``time + label_delay_us``. Joining these events
    with windows of at least ``label_delay_us`` gives back the dataset's rows.

    Args:
        dataset_dir: a complete exfm dataset.
        days: the days to replay, in order.
        label_delay_us: how long after its impression each positive label happens.

    Yields:
        ``(impression, positive labels)`` per row, in the dataset's order (the rows of
        :func:`replay_batches`, one by one).
    """
    for batch, labels in replay_batches(dataset_dir, days, label_delay_us):
        by_request: dict[str, list[Label]] = {}
        for label in labels:
            by_request.setdefault(label.request_id, []).append(label)
        for impression in batch.impressions():
            yield impression, by_request.get(impression.request_id, [])


def replay_batches(
    dataset_dir: str | Path,
    days: Iterable[int],
    label_delay_us: int = 1_000_000,
    batch_rows: int = 4096,
    max_span_us: int | None = None,
) -> Iterator[tuple[ImpressionBatch, list[Label]]]:
    """The same events as :func:`replay_dataset`, with the impressions in batches.

    A batch holds at most ``batch_rows`` rows spanning at most ``max_span_us`` of event time, as a
    live producer's batch would: the joiner's watermark follows the newest event time, so a batch
    spanning longer than the shortest label window would close the windows of its own first rows
    before the labels that follow it are read (keep ``max_span_us`` below that window).
    """
    dataset = open_dataset(dataset_dir)
    tasks = dataset.schema.tasks
    for day in days:
        row = 0
        for path in dataset.day_files(day):
            for chunk in pq.ParquetFile(path).iter_batches(batch_rows):
                table = pa.Table.from_batches([chunk])
                for piece in _time_slices(table, max_span_us):
                    yield _impressions_and_labels(piece, day, row, tasks, label_delay_us)
                    row += piece.num_rows


def _time_slices(table: pa.Table, max_span_us: int | None) -> Iterator[pa.Table]:
    """Consecutive slices of a time-sorted table, each spanning at most ``max_span_us``."""
    if max_span_us is None:
        yield table
        return
    times = table.column(TIME_COLUMN).to_numpy()
    start = 0
    while start < len(times):
        end = int(np.searchsorted(times, times[start] + max_span_us, side="right"))
        yield table.slice(start, end - start)
        start = end


def _impressions_and_labels(
    table: pa.Table, day: int, first_row: int, tasks: list[str], label_delay_us: int
) -> tuple[ImpressionBatch, list[Label]]:
    request_ids = [f"{day}:{r}" for r in range(first_row, first_row + table.num_rows)]
    times = table.column(TIME_COLUMN).to_numpy()
    labels = [
        Label(request_ids[i], task, 1, int(times[i]) + label_delay_us)
        for task in tasks
        for i in np.flatnonzero(table.column(task).to_numpy()).tolist()
    ]
    table = table.drop_columns(tasks).append_column(REQUEST_ID_COLUMN, pa.array(request_ids, pa.string()))
    return ImpressionBatch(table), sorted(labels, key=lambda label: label.time_us)


def replay_into(
    log: EventLog,
    dataset_dir: str | Path,
    days: Iterable[int],
    *,
    speed: float = 0.0,
    batch_rows: int = 4096,
    max_span_us: int | None = None,
    label_delay_us: int = 1_000_000,
    close_with_watermark_us: int | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Append a dataset's rows to a log as impression batches and labels (:func:`replay_batches`).

    Args:
        log: the event log.
        dataset_dir: a complete exfm dataset.
        days: the days to replay, in order.
        speed: event time per wall time (3600: an hour of events per second); 0 = as fast as possible.
        batch_rows: impressions per batch (one log entry per batch and partition).
        max_span_us: event time one batch spans at most (keep it below the shortest label window,
            see :func:`replay_batches`).
        label_delay_us: how long after its impression each positive label happens.
        close_with_watermark_us: if given, finally send every partition a watermark this far after
            the last impression (e.g. the longest label window), so that all windows close.

    Returns:
        The number of log entries appended (exact resends of an earlier replay count 0).
    """
    appended = 0
    first_time = last_time = None
    started = clock()
    for batch, labels in replay_batches(dataset_dir, days, label_delay_us, batch_rows, max_span_us):
        times = batch.times_us
        first_time = times[0] if first_time is None else first_time
        last_time = max(times[-1], last_time or times[-1])
        if speed > 0:
            sleep(max((last_time - first_time) / 1e6 / speed - (clock() - started), 0.0))
        appended += log.append([batch, *labels])
    if close_with_watermark_us is not None and last_time is not None:
        appended += log.append(watermarks(last_time + close_with_watermark_us, log.partitions))
    return appended
