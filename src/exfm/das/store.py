"""The shared store: joined examples land exactly once in a day-partitioned exfm dataset.

The store's root *is* an exfm dataset (see :mod:`exfm.data.dataset`) that grows by commits::

    ROOT/store.sqlite                   commit records and the ids of every stored request
    ROOT/day=03/part-00007.parquet      rows of commit 7 that fall on day 3, sorted by time
    ROOT/manifest.json, schema.yaml     rewritten atomically after every commit

A commit (:meth:`SharedStore.commit`) runs under SQLite's write lock, in one transaction:

1. drop the examples whose request id is already stored (counted as ``duplicates``),
2. write the new rows, one file per day, named after the commit's sequence number
   (each file written under a temporary name, then renamed),
3. record the request ids, the files and the updated day summaries, and commit.

Writing the same batch twice therefore adds nothing, and a crash before step 3 leaves only
files that no record names: the next commit reuses the same sequence number and overwrites them.
The manifest lists recorded files only, so a reader never sees uncommitted rows; it is rewritten
after each commit and when the store is opened.

Days come from the schema's split, which must be ``calendar`` with a ``start`` date (a stream
has no known end); rows outside days 1..N are counted in the manifest's ``dropped_out_of_range``.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from exfm.das.events import write_transaction
from exfm.das.joiner import JoinedExample
from exfm.data.dataset import (
    DOMAIN_COLUMN,
    TIME_COLUMN,
    DatasetError,
    Moments,
    assign_days,
    build_manifest,
    day_boundaries,
    day_dir_name,
    partition_arrow_schema,
    summarize_day,
    write_manifest,
)
from exfm.schema import Schema

DB_NAME = "store.sqlite"


@dataclass(frozen=True)
class CommitResult:
    """What one commit did: its sequence number (None if nothing new), rows written, duplicates."""

    seq: int | None
    rows: int
    duplicates: int
    out_of_range: int


class SharedStore:
    """A day-partitioned exfm dataset that joined examples are committed to exactly once.

    Args:
        root: the dataset directory (created if missing).
        schema: the feature schema; its split must be ``calendar`` with a ``start`` date.
        timeout_s: how long a commit waits for another process's write lock.
    """

    def __init__(self, root: str | Path, schema: Schema, timeout_s: float = 30.0):
        if schema.split.mode != "calendar" or schema.split.start is None:
            raise DatasetError(f"schema {schema.name!r}: a shared store needs split.mode calendar with a start date")
        self.root = Path(root)
        self.schema = schema
        self.arrow_schema = partition_arrow_schema(schema)
        self.boundaries = day_boundaries(schema.split, 0, 0)
        self.root.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.root / DB_NAME, timeout=timeout_s, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(
            "CREATE TABLE IF NOT EXISTS stored (request_id TEXT PRIMARY KEY, seq INTEGER NOT NULL);"
            "CREATE TABLE IF NOT EXISTS commits (seq INTEGER PRIMARY KEY, rows INTEGER NOT NULL,"
            " duplicates INTEGER NOT NULL, out_of_range INTEGER NOT NULL);"
            "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, day INTEGER NOT NULL, seq INTEGER NOT NULL);"
            "CREATE TABLE IF NOT EXISTS days (day INTEGER PRIMARY KEY, summary TEXT NOT NULL);"
        )
        self._write_manifest()

    def commit(self, examples: Sequence[JoinedExample]) -> CommitResult:
        """Store the examples whose request id is not stored yet, atomically and exactly once."""
        if not examples:
            return CommitResult(None, 0, 0, 0)
        with write_transaction(self._db) as db:
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM commits").fetchone()[0]
            fresh: dict[str, JoinedExample] = {}
            for example in examples:
                if example.request_id not in fresh and not self._stored(example.request_id):
                    fresh[example.request_id] = example
            duplicates = len(examples) - len(fresh)
            if not fresh:
                return CommitResult(None, 0, duplicates, 0)
            rows = sorted(fresh.values(), key=lambda e: (e.time_us, e.request_id))
            days = assign_days(np.array([e.time_us for e in rows], dtype=np.int64), self.boundaries)
            out_of_range = int((days == 0).sum())
            for day in np.unique(days[days > 0]).tolist():
                day_table = self._table([e for e, d in zip(rows, days, strict=True) if d == day])
                relative = f"{day_dir_name(day)}/part-{seq:05d}.parquet"
                _atomic_write_table(day_table, self.root / relative)
                db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?)", (relative, day, seq))
                self._merge_summary(day, summarize_day(day_table, self.schema))
            db.executemany("INSERT INTO stored VALUES (?, ?)", [(rid, seq) for rid in fresh])
            db.execute(
                "INSERT INTO commits VALUES (?, ?, ?, ?)", (seq, len(fresh) - out_of_range, duplicates, out_of_range)
            )
        self._write_manifest()
        return CommitResult(seq, len(fresh) - out_of_range, duplicates, out_of_range)

    def stored_rows(self) -> int:
        """Rows committed so far (out-of-range rows excluded)."""
        return self._db.execute("SELECT COALESCE(SUM(rows), 0) FROM commits").fetchone()[0]

    def close(self) -> None:
        self._db.close()

    # --- internals ------------------------------------------------------------------------------
    def _stored(self, request_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM stored WHERE request_id = ?", (request_id,)).fetchone() is not None

    def _table(self, examples: list[JoinedExample]) -> pa.Table:
        """The examples as one partition table (labels of tasks not joined are 0)."""
        columns: dict[str, list] = {name: [] for name in self.arrow_schema.names}
        features = [name for name in self.arrow_schema.names if name not in (TIME_COLUMN, DOMAIN_COLUMN)]
        tasks = set(self.schema.tasks)
        for example in examples:
            columns[TIME_COLUMN].append(example.time_us)
            if DOMAIN_COLUMN in columns:
                columns[DOMAIN_COLUMN].append(example.domain or "")
            for name in features:
                if name in tasks:
                    columns[name].append(example.labels.get(name, 0))
                elif name in example.features:
                    columns[name].append(example.features[name])
                else:
                    raise DatasetError(f"joined example {example.request_id!r}: no value for column {name!r}")
        return pa.table(
            {name: pa.array(values, self.arrow_schema.field(name).type) for name, values in columns.items()},
            schema=self.arrow_schema,
        )

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
            for path, day in db.execute("SELECT path, day FROM files ORDER BY day, seq"):
                files.setdefault(day, []).append(path)
            entries = []
            for day, summary in db.execute("SELECT day, summary FROM days ORDER BY day"):
                start, end = int(self.boundaries[day - 1]), int(self.boundaries[day])
                entries.append((day, start, end, files[day], json.loads(summary)))
            dropped = db.execute("SELECT COALESCE(SUM(out_of_range), 0) FROM commits").fetchone()[0]
            manifest = build_manifest(self.schema, "exfm-das", entries, dropped_out_of_range=dropped)
            write_manifest(self.root, self.schema, manifest)


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
