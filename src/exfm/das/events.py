"""DAS events (impressions and labels) and the append-only event log they are written to.

Producers append :class:`Impression` and :class:`Label` events; both may be resent. The log
absorbs exact resends:

* an impression is keyed by its ``request_id``: the first one appended is kept, later ones with
  the same id are ignored (a resend carries the same content);
* a label is keyed by ``(request_id, task, time_us, value)``: exact resends are ignored, while
  distinct labels for the same request and task are all kept, so that the joiner can apply its
  rule (a positive label inside the window wins, see :mod:`exfm.das.joiner`).

Readers consume the log from a cursor in **append order** (the order the log received events).
Event time does not order the log, because late events arrive after later ones; the joiner's
output depends only on event times and the watermark, not on the order of arrival.

The embedded backend, :class:`SQLiteEventLog`, is one SQLite file in WAL mode: several processes
on one machine may append and read concurrently. :func:`replay_dataset` turns the rows of an
exfm dataset back into events (for tests and demos).
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pyarrow.parquet as pq

from exfm.data.dataset import DOMAIN_COLUMN, TIME_COLUMN, open_dataset


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


Event = Impression | Label
"""Anything an event log holds."""


class EventLog(Protocol):
    """An append-only, deduplicating log of impressions and labels read from a cursor."""

    def append(self, events: Iterable[Event]) -> int:
        """Append events; returns how many were new (resends are ignored)."""
        ...

    def read(self, cursor: int = 0, limit: int | None = None) -> tuple[list[Event], int]:
        """Events appended after ``cursor``, in append order, and the cursor after the last one."""
        ...


def _encode_features(features: Mapping[str, Any]) -> str:
    return json.dumps({k: _plain(v) for k, v in features.items()}, sort_keys=True)


def _plain(value: Any) -> Any:
    """A JSON-safe copy of a feature value (numpy scalars and arrays become Python values)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _event_key(event: Event) -> str:
    if isinstance(event, Impression):
        return f"i\x1f{event.request_id}"
    return f"l\x1f{event.request_id}\x1f{event.task}\x1f{event.time_us}\x1f{event.value}"


class SQLiteEventLog:
    """The embedded event log: one SQLite file in WAL mode, safe for several local processes.

    Args:
        path: the database file (created if missing).
        timeout_s: how long a writer waits for another process's write lock.
    """

    def __init__(self, path: str | Path, timeout_s: float = 30.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS events ("
            " seq INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL UNIQUE, kind TEXT NOT NULL,"
            " request_id TEXT NOT NULL, time_us INTEGER NOT NULL, task TEXT, value INTEGER,"
            " domain TEXT, tasks TEXT, features TEXT)"
        )

    def append(self, events: Iterable[Event]) -> int:
        """Append events in one transaction; returns how many were new (resends are ignored)."""
        rows = [_row(event) for event in events]
        with self._transaction():
            before = self._db.total_changes
            self._db.executemany(
                "INSERT OR IGNORE INTO events (key, kind, request_id, time_us, task, value, domain, tasks, features)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            return self._db.total_changes - before

    def read(self, cursor: int = 0, limit: int | None = None) -> tuple[list[Event], int]:
        """Events appended after ``cursor``, in append order, and the cursor after the last one."""
        rows = self._db.execute(
            "SELECT seq, kind, request_id, time_us, task, value, domain, tasks, features FROM events"
            " WHERE seq > ? ORDER BY seq LIMIT ?",
            (cursor, -1 if limit is None else limit),
        ).fetchall()
        events: list[Event] = []
        for seq, kind, request_id, time_us, task, value, domain, tasks, features in rows:
            if kind == "i":
                events.append(Impression(request_id, time_us, json.loads(features), domain, tuple(json.loads(tasks))))
            else:
                events.append(Label(request_id, task, value, time_us))
            cursor = seq
        return events, cursor

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0]

    def close(self) -> None:
        self._db.close()

    def _transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return write_transaction(self._db)


@contextlib.contextmanager
def write_transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` (take the write lock now); commit on success, roll back on error.

    The connection must be in autocommit mode (``isolation_level=None``).
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _row(event: Event) -> tuple:
    if isinstance(event, Impression):
        return (
            _event_key(event),
            "i",
            event.request_id,
            int(event.time_us),
            None,
            None,
            event.domain,
            json.dumps(list(event.tasks)),
            _encode_features(event.features),
        )
    if event.value not in (0, 1):
        raise ValueError(f"label {event.request_id!r}/{event.task!r}: value must be 0 or 1, got {event.value!r}")
    return (
        _event_key(event),
        "l",
        event.request_id,
        int(event.time_us),
        event.task,
        int(event.value),
        None,
        None,
        None,
    )


def replay_dataset(
    dataset_dir: str | Path, days: Iterable[int], label_delay_us: int = 1_000_000
) -> Iterator[tuple[Impression, list[Label]]]:
    """Turn the rows of an exfm dataset back into the events that would have produced them.

    Each row becomes an impression with request id ``f"{day}:{row}"`` (row = index within the
    day), its time, domain and every non-label column as features, labelled for all the schema's
    tasks; each positive task becomes a label at ``time + label_delay_us``. Joining these events
    with windows of at least ``label_delay_us`` gives back the dataset's rows.

    Args:
        dataset_dir: a complete exfm dataset.
        days: the days to replay, in order.
        label_delay_us: how long after its impression each positive label happens.

    Yields:
        ``(impression, positive labels)`` per row, in the dataset's order.
    """
    dataset = open_dataset(dataset_dir)
    tasks = dataset.schema.tasks
    for day in days:
        row = 0
        for path in dataset.day_files(day):
            for record in pq.read_table(path).to_pylist():
                time_us = record.pop(TIME_COLUMN)
                domain = record.pop(DOMAIN_COLUMN, None)
                values = {task: record.pop(task) for task in tasks}
                request_id = f"{day}:{row}"
                impression = Impression(request_id, time_us, record, domain, tuple(tasks))
                labels = [Label(request_id, task, 1, time_us + label_delay_us) for task in tasks if values[task]]
                yield impression, labels
                row += 1
