"""The shared store: joined examples land exactly once in a day-partitioned exfm dataset.

The store's root *is* an exfm dataset (see :mod:`exfm.data.dataset`) that grows by commits::

    ROOT/store.sqlite                   commit records and the ids of every stored request
    ROOT/day=03/part-00007.parquet      rows of commit 7 that fall on day 3, sorted by time
    ROOT/day=03/hour=05/part-00007...   the same, partitioned by hour (``partition_by="hour"``)
    ROOT/manifest.json, schema.yaml     rewritten atomically after every commit

A commit (:meth:`SharedStore.commit`):

1. drops request ids repeated within the commit and writes the rows, one file per day, to hidden
   staging files (the slow part, outside the lock);
2. under SQLite's write lock, in one transaction: checks the fence, records the request ids as
   stored (``INSERT OR IGNORE``; if any was stored already, that is undone and step 1 is redone
   without them: the rare path of a replay or a takeover), renames the staging files to names
   carrying the commit's sequence number, and records the files and updated day summaries.

Writing the same batch twice therefore adds nothing, and a crash before the transaction commits
leaves only files that no record names: the next commit reuses the same sequence number and
overwrites them (a crash between steps may leave a hidden ``.staged-*`` file behind).
Keeping the lock short matters: a process stopped inside a write transaction (SIGSTOP) blocks
every other writer of the store until it resumes or dies.
The manifest lists recorded files only, so a reader never sees uncommitted rows; it is rewritten
when the store is opened, after a commit if the last rewrite is ``manifest_interval_s`` old, and
by :meth:`SharedStore.flush` / :meth:`SharedStore.close` (so readers lag the commits by at most
about that interval while writers run).

**Fencing.** A DAS worker commits for one log partition under a claim of the work queue
(:mod:`exfm.das.queue`). :meth:`SharedStore.open_partition` records the claim's token (refusing
one older than the newest seen) and returns the partition's checkpoint; :meth:`SharedStore.commit`
with ``fence=`` accepts the write only while that token is still the newest, and stores the
partition's new checkpoint (the log offset up to which everything is committed) in the same
transaction. A worker paused past its lease, whose partition another worker has opened since,
gets :class:`StaleClaimError` and writes nothing.

Besides the dataset's columns, every row has ``_request_id`` and the supervision columns
``fm:<task>``, ``fm_snapshot`` and ``fm_trained_through_us`` (null without supervision, see
:mod:`exfm.distill.supervision`).

Days come from the schema's split, which must be ``calendar`` with a ``start`` date (a stream
has no known end); rows outside days 1..N are counted in the manifest's ``dropped_out_of_range``.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import sqlite3
import time
from collections.abc import Sequence, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from exfm.das.events import Impression, ImpressionBatch
from exfm.das.joiner import JoinedExample
from exfm.das.sqlite import write_transaction
from exfm.data.dataset import (
    DOMAIN_COLUMN,
    MANIFEST_NAME,
    REQUEST_ID_COLUMN,
    TIME_COLUMN,
    DatasetError,
    Moments,
    assign_days,
    atomic_write_text,
    build_manifest,
    day_boundaries,
    day_dir_name,
    partition_arrow_schema,
    summarize_day,
    write_manifest,
)
from exfm.distill.supervision import supervision_columns, supervision_fields
from exfm.schema import Schema

DB_NAME = "store.sqlite"


class StaleClaimError(RuntimeError):
    """A commit or open under a claim token older than the newest the store has seen."""


@dataclass(frozen=True)
class Fence:
    """The partition a commit is for, and the claim token it is made under."""

    partition: int
    token: int


@dataclass(frozen=True)
class CommitResult:
    """What one commit did: its sequence number (None if nothing new), rows written, duplicates."""

    seq: int | None
    rows: int
    duplicates: int
    out_of_range: int


@dataclass
class _Prepared:
    """A commit's new rows, written to staging files but not recorded yet."""

    fresh: list[str]  # request ids to store
    duplicates: int
    out_of_range: int
    files: list[tuple[int, str, Path, dict]]  # (day, directory, staging file, summary)

    def discard(self) -> None:
        """Delete the staging files that were not moved into place."""
        for _, _, staged, _ in self.files:
            staged.unlink(missing_ok=True)
        self.files.clear()


class SharedStore:
    """A day-partitioned exfm dataset that joined examples are committed to exactly once.

    Args:
        root: the dataset directory (created if missing).
        schema: the feature schema; its split must be ``calendar`` with a ``start`` date.
        timeout_s: how long a commit waits for another process's write lock.
        manifest_interval_s: rewrite the manifest after a commit only if the last rewrite is this
            old (0: after every commit); :meth:`flush` and :meth:`close` always rewrite it.
        partition_by: ``day`` (``day=NN/part-SEQ.parquet``) or ``hour``
            (``day=NN/hour=HH/part-SEQ.parquet``, hours counted from the day's start).
    """

    def __init__(
        self,
        root: str | Path,
        schema: Schema,
        timeout_s: float = 30.0,
        manifest_interval_s: float = 0.0,
        partition_by: Literal["day", "hour"] = "day",
    ):
        if schema.split.mode != "calendar" or schema.split.start is None:
            raise DatasetError(f"schema {schema.name!r}: a shared store needs split.mode calendar with a start date")
        self.root = Path(root)
        self.schema = schema
        self.arrow_schema = store_arrow_schema(schema)
        self.boundaries = day_boundaries(schema.split, 0, 0)
        self.partition_by = partition_by
        self._manifest_count = 0
        self.manifest_interval_s = manifest_interval_s
        self._manifest_written_at = -math.inf
        self._manifest_stale = False
        self.root.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            self.root / DB_NAME, timeout=timeout_s, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(
            "CREATE TABLE IF NOT EXISTS stored (request_id TEXT PRIMARY KEY, seq INTEGER NOT NULL);"
            "CREATE TABLE IF NOT EXISTS commits (seq INTEGER PRIMARY KEY, rows INTEGER NOT NULL,"
            " duplicates INTEGER NOT NULL, out_of_range INTEGER NOT NULL, partition INTEGER, token INTEGER);"
            "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, day INTEGER NOT NULL, seq INTEGER NOT NULL);"
            "CREATE TABLE IF NOT EXISTS days (day INTEGER PRIMARY KEY, summary TEXT NOT NULL);"
            "CREATE TABLE IF NOT EXISTS partitions (partition INTEGER PRIMARY KEY, token INTEGER NOT NULL,"
            " checkpoint TEXT);"
        )
        self._write_manifest()

    def open_partition(self, fence: Fence) -> str | None:
        """Start committing for a partition under a new claim; returns its checkpoint (None: none yet).

        Raises:
            StaleClaimError: a newer token has opened the partition already.
        """
        with write_transaction(self._db) as db:
            token, checkpoint = self._partition(db, fence.partition)
            if fence.token < token:
                raise StaleClaimError(f"partition {fence.partition}: token {fence.token} is older than {token}")
            db.execute("INSERT OR REPLACE INTO partitions VALUES (?, ?, ?)", (fence.partition, fence.token, checkpoint))
            return checkpoint

    def checkpoints(self) -> dict[int, tuple[int, str | None]]:
        """``{partition: (newest token, checkpoint)}`` of every opened partition."""
        rows = self._db.execute("SELECT partition, token, checkpoint FROM partitions ORDER BY partition")
        return {partition: (token, checkpoint) for partition, token, checkpoint in rows}

    def commit(
        self, examples: Sequence[JoinedExample], fence: Fence | None = None, checkpoint: str | None = None
    ) -> CommitResult:
        """Store the examples whose request id is not stored yet, atomically and exactly once.

        Args:
            examples: joined examples, in any order.
            fence: the partition and claim token of a worker's commit (None: unfenced, e.g. tests).
            checkpoint: with ``fence``, the partition's new checkpoint, stored in the same transaction.

        Raises:
            StaleClaimError: ``fence.token`` is no longer the partition's newest (nothing is written).
        """
        if not examples and fence is None:
            return CommitResult(None, 0, 0, 0)
        prepared = self._prepare(examples)  # the slow part (Parquet files) runs outside the write lock
        try:
            with write_transaction(self._db) as db:
                if fence is not None:
                    token, _ = self._partition(db, fence.partition)
                    if fence.token != token:
                        raise StaleClaimError(
                            f"partition {fence.partition}: commit under token {fence.token}, but the newest is {token}"
                        )
                    db.execute(
                        "UPDATE partitions SET checkpoint = ? WHERE partition = ?", (checkpoint, fence.partition)
                    )
                seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM commits").fetchone()[0]
                if not self._claim_ids(db, prepared.fresh, seq):  # some were stored already: redo, rare
                    prepared.discard()
                    prepared = self._prepare(examples, exclude=self._stored_among(prepared.fresh))
                    self._claim_ids(db, prepared.fresh, seq)
                result = self._record(db, prepared, fence, seq)
        finally:
            prepared.discard()
        if result.seq is not None:
            self._manifest_stale = True
            if time.monotonic() - self._manifest_written_at >= self.manifest_interval_s:
                self._write_manifest()
        return result

    def _prepare(self, examples: Sequence[JoinedExample], exclude: Set[str] = frozenset()) -> _Prepared:
        """Drop repeated request ids and those in ``exclude``; write each day's rows to a hidden staging file."""
        unique = list({e.request_id: e for e in reversed(examples)}.values())[::-1]  # first of each id
        fresh = [e for e in unique if e.request_id not in exclude]
        prepared = _Prepared([e.request_id for e in fresh], len(examples) - len(fresh), 0, [])
        if not fresh:
            return prepared
        in_range = assign_days(np.array([e.time_us for e in fresh], dtype=np.int64), self.boundaries) > 0
        prepared.out_of_range = int((~in_range).sum())
        if not in_range.any():
            return prepared
        table = examples_table(
            [e for e, keep in zip(fresh, in_range, strict=True) if keep], self.schema, self.arrow_schema
        )
        table = table.sort_by([(TIME_COLUMN, "ascending"), (REQUEST_ID_COLUMN, "ascending")])
        days = assign_days(table.column(TIME_COLUMN).to_numpy(), self.boundaries)
        for day in np.unique(days[days > 0]).tolist():
            day_table = table.filter(pa.array(days == day))
            for directory, piece in self._directories(day, day_table):
                staged = self.root / directory / f".staged-{os.getpid()}-{secrets.token_hex(6)}.parquet"
                _atomic_write_table(piece, staged)
                prepared.files.append((day, directory, staged, summarize_day(piece, self.schema)))
        return prepared

    def _directories(self, day: int, table: pa.Table) -> list[tuple[str, pa.Table]]:
        """The day's rows by directory: ``day=NN`` or, partitioned by hour, ``day=NN/hour=HH``."""
        if self.partition_by == "day":
            return [(day_dir_name(day), table)]
        hours = (table.column(TIME_COLUMN).to_numpy() - int(self.boundaries[day - 1])) // (3600 * 1_000_000)
        return [
            (f"{day_dir_name(day)}/hour={hour:02d}", table.filter(pa.array(hours == hour)))
            for hour in np.unique(hours).tolist()
        ]

    @staticmethod
    def _claim_ids(db: sqlite3.Connection, request_ids: list[str], seq: int) -> bool:
        """Record the request ids as stored by commit ``seq``; False (and nothing recorded) if any was."""
        db.execute("SAVEPOINT claim_ids")
        before = db.total_changes
        db.executemany("INSERT OR IGNORE INTO stored VALUES (?, ?)", [(rid, seq) for rid in request_ids])
        if db.total_changes - before != len(request_ids):
            db.execute("ROLLBACK TO claim_ids")
            db.execute("RELEASE claim_ids")
            return False
        db.execute("RELEASE claim_ids")
        return True

    def _record(self, db: sqlite3.Connection, prepared: _Prepared, fence: Fence | None, seq: int) -> CommitResult:
        """Inside the write transaction: move the staged files to their names and record the commit."""
        if not prepared.fresh:
            return CommitResult(None, 0, prepared.duplicates, 0)
        for day, directory, staged, summary in prepared.files:
            relative = f"{directory}/part-{seq:05d}.parquet"
            os.replace(staged, self.root / relative)
            db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?)", (relative, day, seq))
            self._merge_summary(day, summary)
        prepared.files.clear()
        rows = len(prepared.fresh) - prepared.out_of_range
        owner = (fence.partition, fence.token) if fence else (None, None)
        db.execute(
            "INSERT INTO commits VALUES (?, ?, ?, ?, ?, ?)",
            (seq, rows, prepared.duplicates, prepared.out_of_range, *owner),
        )
        return CommitResult(seq, rows, prepared.duplicates, prepared.out_of_range)

    def commit_log(self) -> list[tuple[int, int, int | None, int | None]]:
        """``(seq, rows, partition, token)`` of every commit that stored rows, in order (an audit trail)."""
        return self._db.execute("SELECT seq, rows, partition, token FROM commits ORDER BY seq").fetchall()

    def stored_rows(self) -> int:
        """Rows committed so far (out-of-range rows excluded)."""
        return self._db.execute("SELECT COALESCE(SUM(rows), 0) FROM commits").fetchone()[0]

    def flush(self) -> None:
        """Rewrite the manifest now if this process committed since it last wrote it."""
        if self._manifest_stale:
            self._write_manifest()

    def close(self) -> None:
        """Flush the manifest and close the database."""
        self.flush()
        self._db.close()

    # --- internals ------------------------------------------------------------------------------
    @staticmethod
    def _partition(db: sqlite3.Connection, partition: int) -> tuple[int, str | None]:
        row = db.execute("SELECT token, checkpoint FROM partitions WHERE partition = ?", (partition,)).fetchone()
        return row or (0, None)

    def _stored_among(self, request_ids: Sequence[str]) -> set[str]:
        """Those of ``request_ids`` that are stored already."""
        found: set[str] = set()
        for start in range(0, len(request_ids), 900):  # SQLite allows 999 parameters per statement
            chunk = request_ids[start : start + 900]
            marks = ",".join("?" * len(chunk))
            query = f"SELECT request_id FROM stored WHERE request_id IN ({marks})"
            found.update(row[0] for row in self._db.execute(query, chunk))
        return found

    def _merge_summary(self, day: int, summary: dict) -> None:
        row = self._db.execute("SELECT summary FROM days WHERE day = ?", (day,)).fetchone()
        if row is not None:
            summary = _merge(json.loads(row[0]), summary)
        summary["numeric_moments"] = {
            k: m.model_dump() if isinstance(m, Moments) else m for k, m in summary["numeric_moments"].items()
        }
        self._db.execute("INSERT OR REPLACE INTO days VALUES (?, ?)", (day, json.dumps(summary)))

    def _write_manifest(self) -> None:
        """Rewrite schema.yaml and manifest.json from the committed records (under the write lock)."""
        with write_transaction(self._db) as db:
            files: dict[int, list[str]] = {}
            for path, day in db.execute("SELECT path, day FROM files ORDER BY day, seq, path"):
                files.setdefault(day, []).append(path)
            entries = []
            for day, summary in db.execute("SELECT day, summary FROM days ORDER BY day"):
                start, end = int(self.boundaries[day - 1]), int(self.boundaries[day])
                entries.append((day, start, end, files[day], json.loads(summary)))
            dropped = db.execute("SELECT COALESCE(SUM(out_of_range), 0) FROM commits").fetchone()[0]
            manifest = build_manifest(self.schema, "exfm-das", entries, dropped_out_of_range=dropped)
            if self._manifest_count == 0:  # schema.yaml once per process, then only the manifest
                write_manifest(self.root, self.schema, manifest)
            else:
                atomic_write_text(self.root / MANIFEST_NAME, manifest.model_dump_json(indent=2))
            self._manifest_count += 1
            self._manifest_written_at = time.monotonic()
            self._manifest_stale = False


def examples_table(examples: Sequence[JoinedExample], schema: Schema, arrow_schema: pa.Schema) -> pa.Table:
    """The examples, in order, as a table with the columns of ``arrow_schema``.

    ``arrow_schema`` is :func:`store_arrow_schema` (the store's rows) or
    :func:`~exfm.data.dataset.partition_arrow_schema` (features and labels only, e.g. FM input).
    Features are taken column-wise from the examples' impression batches (single impressions are
    assembled row by row); labels of tasks an example was not labelled for are 0.

    Raises:
        DatasetError: an impression lacks a feature column.
    """
    supervision = supervision_columns(schema.tasks)
    derived = {REQUEST_ID_COLUMN, *supervision, *schema.tasks}
    base = pa.schema([f for f in arrow_schema if f.name not in derived])
    pieces, positions = [], []
    singles: list[tuple[int, Impression]] = []
    for source, group in _by_source(examples):
        if isinstance(source, ImpressionBatch):
            missing = [name for name in base.names if name not in source.table.column_names]
            if missing:
                raise DatasetError(f"impression batch: no column(s) {missing}")
            pieces.append(source.table.select(base.names).take([examples[i].row for i in group]).cast(base))
        else:
            singles += [(i, examples[i].impression) for i in group]
            continue
        positions += group
    if singles:
        pieces.append(_impressions_table([impression for _, impression in singles], base))
        positions += [i for i, _ in singles]
    table = pa.concat_tables(pieces) if pieces else base.empty_table()
    if positions != sorted(positions):
        table = table.take(np.argsort(np.asarray(positions), kind="stable"))
    columns = {name: table.column(name) for name in base.names}
    columns[REQUEST_ID_COLUMN] = pa.array([e.request_id for e in examples], pa.string())
    for task in schema.tasks:
        columns[task] = pa.array([e.labels.get(task, 0) for e in examples], pa.int8())
    if supervision[0] in arrow_schema.names:
        given = [e.supervision for e in examples]
        for task, name in zip(schema.tasks, supervision, strict=False):
            columns[name] = pa.array([None if g is None else g.probabilities.get(task) for g in given], pa.float32())
        columns[supervision[-2]] = pa.array([None if g is None else g.snapshot_id for g in given], pa.string())
        columns[supervision[-1]] = pa.array([None if g is None else g.trained_through_us for g in given], pa.int64())
    return pa.table([columns[name].cast(arrow_schema.field(name).type) for name in arrow_schema.names], arrow_schema)


def _by_source(examples: Sequence[JoinedExample]) -> list[tuple[object, list[int]]]:
    """Example indices grouped by the batch (or single impression) they come from, in first-seen order."""
    groups: dict[int, tuple[object, list[int]]] = {}
    for index, example in enumerate(examples):
        key = id(example.source) if isinstance(example.source, ImpressionBatch) else -1
        groups.setdefault(key, (example.source, []))[1].append(index)
    return list(groups.values())


def _impressions_table(impressions: list[Impression], base: pa.Schema) -> pa.Table:
    """Single impressions as a table of the ``base`` columns (time, features, domain)."""
    columns: dict[str, list] = {name: [] for name in base.names}
    features = [name for name in base.names if name not in (TIME_COLUMN, DOMAIN_COLUMN)]
    for impression in impressions:
        columns[TIME_COLUMN].append(impression.time_us)
        if DOMAIN_COLUMN in columns:
            columns[DOMAIN_COLUMN].append(impression.domain or "")
        for name in features:
            if name not in impression.features:
                raise DatasetError(f"joined example {impression.request_id!r}: no value for column {name!r}")
            columns[name].append(impression.features[name])
    return pa.table({name: pa.array(values, base.field(name).type) for name, values in columns.items()}, schema=base)


def store_arrow_schema(schema: Schema) -> pa.Schema:
    """The dataset's partition schema plus ``_request_id`` and the supervision columns."""
    fields = [pa.field(REQUEST_ID_COLUMN, pa.string(), nullable=False)]
    fields += [pa.field(name, kind) for name, kind in supervision_fields(schema.tasks)]
    base = partition_arrow_schema(schema)
    return pa.schema(list(base) + fields)


def _merge(old: dict, new: dict) -> dict:
    """Combine two :func:`summarize_day` results of disjoint rows of the same day."""
    rows = old["rows"] + new["rows"]
    domains = dict(old["domains"])
    for name, count in new["domains"].items():
        domains[name] = domains.get(name, 0) + count
    rates = {
        task: (old["label_rates"][task] * old["rows"] + new["label_rates"][task] * new["rows"]) / max(rows, 1)
        for task in new["label_rates"]
    }
    moments = {}
    for name, moment in new["numeric_moments"].items():
        before = Moments.model_validate(old["numeric_moments"][name])
        moments[name] = Moments(
            count=before.count + moment.count, sum=before.sum + moment.sum, sumsq=before.sumsq + moment.sumsq
        )
    return {
        "rows": rows,
        "domains": dict(sorted(domains.items())),
        "label_rates": rates,
        "numeric_moments": moments,
    }


def _atomic_write_table(table: pa.Table, path: Path) -> None:
    """Write a Parquet file under a temporary name, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        pq.write_table(table, handle, row_group_size=65_536, compression="snappy")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
