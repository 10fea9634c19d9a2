"""Zeus: the strongly consistent metadata store of DAS (latest-snapshot pointers, lease, pins).

Per FM there is one pointer ``(snapshot_id, version, lease_owner, lease_expires)``:

- ``version`` counts pointer changes and is the fencing token: :meth:`compare_and_set` changes
  the pointer only if the version is still the one the caller read, so when many equal tasks run
  the updater, exactly one of them publishes each change;
- the updater lease (``lease_owner`` until ``lease_expires``) says which task runs the updater;
  its holder extends it at a fixed rate, and another task takes over once it has expired;
- pins ``(worker_id, snapshot_id)`` say which snapshots tasks serve or are loading; a snapshot is
  claimed for garbage collection only while nobody pins it and no pointer names it, and a claimed
  snapshot can no longer be pinned (so a loader never starts on a snapshot being deleted).

:class:`SQLiteZeus` is the embedded backend (one SQLite file in WAL mode; every write is one
``BEGIN IMMEDIATE`` transaction, so it is atomic across threads and processes of one machine).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from exfm.das.sqlite import connection, write

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pointers (
    fm TEXT PRIMARY KEY,
    snapshot_id TEXT,
    version INTEGER NOT NULL,
    lease_owner TEXT,
    lease_expires REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS pins (
    worker_id TEXT NOT NULL,
    snapshot_id TEXT NOT NULL,
    PRIMARY KEY (worker_id, snapshot_id)
);
CREATE TABLE IF NOT EXISTS collected (snapshot_id TEXT PRIMARY KEY);
"""


@dataclass(frozen=True)
class Pointer:
    """The latest-snapshot pointer of one FM (``snapshot_id`` None and ``version`` 0: none yet)."""

    fm: str
    snapshot_id: str | None
    version: int
    lease_owner: str | None
    lease_expires: float


class MetadataStore(Protocol):
    """What DAS needs from Zeus; implemented by :class:`SQLiteZeus` (and later ZooKeeper)."""

    def get_pointer(self, fm: str) -> Pointer:
        """The FM's pointer (version 0 and no snapshot if none was ever set)."""
        ...

    def compare_and_set(self, fm: str, expected_version: int, snapshot_id: str, owner: str | None = None) -> bool:
        """Point ``fm`` at ``snapshot_id`` if its version is ``expected_version`` (and ``owner``
        holds the unexpired lease, if given); the version then grows by one."""
        ...

    def acquire_lease(self, fm: str, owner: str, ttl_s: float) -> bool:
        """Take or extend the updater lease of ``fm`` for ``ttl_s`` seconds; False if another holds it."""
        ...

    def release_lease(self, fm: str, owner: str) -> None:
        """Give the lease up early (no-op unless ``owner`` holds it)."""
        ...

    def pin(self, worker_id: str, snapshot_id: str) -> bool:
        """Record that a worker serves or loads a snapshot; False if it was claimed for collection."""
        ...

    def unpin(self, worker_id: str, snapshot_id: str) -> None:
        """Drop a worker's pin (no-op if absent)."""
        ...

    def pins(self) -> dict[str, set[str]]:
        """``{snapshot_id: {worker_id, ...}}`` of every pinned snapshot."""
        ...

    def claim_for_collection(self, snapshot_ids: Iterable[str]) -> list[str]:
        """Atomically claim those of ``snapshot_ids`` that no worker pins and no pointer names."""
        ...


class SQLiteZeus:
    """Zeus in one SQLite file: safe to share between threads and processes of one machine.

    Args:
        path: the database file (created with its tables if missing).
        clock: seconds since some epoch, for leases (injectable for tests).
        busy_timeout_s: how long a writer waits for another writer's transaction.
    """

    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time, busy_timeout_s: float = 30.0):
        self.path = Path(path)
        self.clock = clock
        self.busy_timeout_s = busy_timeout_s
        with self._connect() as conn:
            conn.executescript(_SCHEMA)

    def _connect(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return connection(self.path, self.busy_timeout_s)

    def _write(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """A ``BEGIN IMMEDIATE`` transaction: it holds the write lock from its first statement."""
        return write(self.path, self.busy_timeout_s)

    def get_pointer(self, fm: str) -> Pointer:
        """The FM's pointer (version 0 and no snapshot if none was ever set)."""
        with self._connect() as conn:
            row = conn.execute(
                "SELECT snapshot_id, version, lease_owner, lease_expires FROM pointers WHERE fm = ?", (fm,)
            ).fetchone()
        return Pointer(fm, *row) if row else Pointer(fm, None, 0, None, 0.0)

    def compare_and_set(self, fm: str, expected_version: int, snapshot_id: str, owner: str | None = None) -> bool:
        """Point ``fm`` at ``snapshot_id`` if its version is still ``expected_version``.

        Args:
            fm: the FM name.
            expected_version: the version the caller read (0: no pointer yet).
            snapshot_id: the new target.
            owner: if given, the change also requires ``owner`` to hold the unexpired lease.

        Returns:
            True if this call changed the pointer (its version is now ``expected_version + 1``).
        """
        with self._write() as conn:
            row = conn.execute(
                "SELECT version, lease_owner, lease_expires FROM pointers WHERE fm = ?", (fm,)
            ).fetchone()
            version, lease_owner, lease_expires = row or (0, None, 0.0)
            if version != expected_version:
                return False
            if owner is not None and (lease_owner != owner or lease_expires <= self.clock()):
                return False
            conn.execute(
                "INSERT INTO pointers (fm, snapshot_id, version) VALUES (?, ?, ?) "
                "ON CONFLICT (fm) DO UPDATE SET snapshot_id = excluded.snapshot_id, version = excluded.version",
                (fm, snapshot_id, version + 1),
            )
            return True

    def acquire_lease(self, fm: str, owner: str, ttl_s: float) -> bool:
        """Take the updater lease of ``fm`` (free, expired, or already ``owner``'s) until now + ``ttl_s``.

        Returns:
            True if ``owner`` holds the lease now; False if another task holds an unexpired one.
        """
        with self._write() as conn:
            now = self.clock()
            row = conn.execute("SELECT lease_owner, lease_expires FROM pointers WHERE fm = ?", (fm,)).fetchone()
            if row and row[0] not in (None, owner) and row[1] > now:
                return False
            conn.execute(
                "INSERT INTO pointers (fm, snapshot_id, version, lease_owner, lease_expires) VALUES (?, NULL, 0, ?, ?) "
                "ON CONFLICT (fm) DO UPDATE SET lease_owner = excluded.lease_owner, "
                "lease_expires = excluded.lease_expires",
                (fm, owner, now + ttl_s),
            )
            return True

    def release_lease(self, fm: str, owner: str) -> None:
        """Give the lease up early (no-op unless ``owner`` holds it)."""
        with self._write() as conn:
            conn.execute(
                "UPDATE pointers SET lease_owner = NULL, lease_expires = 0 WHERE fm = ? AND lease_owner = ?",
                (fm, owner),
            )

    def pin(self, worker_id: str, snapshot_id: str) -> bool:
        """Record that ``worker_id`` serves or loads ``snapshot_id``.

        Returns:
            False (and no pin) if the snapshot was already claimed for collection.
        """
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM collected WHERE snapshot_id = ?", (snapshot_id,)).fetchone():
                return False
            conn.execute("INSERT OR IGNORE INTO pins (worker_id, snapshot_id) VALUES (?, ?)", (worker_id, snapshot_id))
            return True

    def unpin(self, worker_id: str, snapshot_id: str) -> None:
        """Drop a worker's pin (no-op if absent)."""
        with self._write() as conn:
            conn.execute("DELETE FROM pins WHERE worker_id = ? AND snapshot_id = ?", (worker_id, snapshot_id))

    def pins(self) -> dict[str, set[str]]:
        """``{snapshot_id: {worker_id, ...}}`` of every pinned snapshot."""
        with self._connect() as conn:
            rows = conn.execute("SELECT snapshot_id, worker_id FROM pins").fetchall()
        pinned: dict[str, set[str]] = {}
        for snapshot_id, worker_id in rows:
            pinned.setdefault(snapshot_id, set()).add(worker_id)
        return pinned

    def claim_for_collection(self, snapshot_ids: Iterable[str]) -> list[str]:
        """Claim for deletion those of ``snapshot_ids`` that no worker pins and no pointer names.

        The claim and the checks are one transaction, and a claimed snapshot can never be pinned
        again, so a snapshot is deleted only after its last pin is gone and no loader starts on it.

        Returns:
            The claimed ids (already claimed ones included, so an interrupted deletion is redone).
        """
        claimed = []
        with self._write() as conn:
            for snapshot_id in snapshot_ids:
                busy = conn.execute(
                    "SELECT 1 FROM pins WHERE snapshot_id = ? UNION ALL SELECT 1 FROM pointers WHERE snapshot_id = ?",
                    (snapshot_id, snapshot_id),
                ).fetchone()
                if busy is None:
                    conn.execute("INSERT OR IGNORE INTO collected (snapshot_id) VALUES (?)", (snapshot_id,))
                    claimed.append(snapshot_id)
        return claimed
