"""The work queue: equal DAS workers share the log's partitions through leased claims.

A **claim** gives one worker the right to process one partition until ``expires_at``; the worker
renews it at a fixed rate (well inside the lease). Every claim of a partition gets a **token**
larger than any token that partition had before, and the shared store accepts a commit for the
partition only with the newest token it has seen (:meth:`exfm.das.store.SharedStore.open_partition`).
So a worker that was paused past its lease and resumes cannot write: its token is stale.

Workers also **heartbeat** their membership, so each can compute its fair share of partitions,
``ceil(partitions / live workers)``, claim free ones up to that share and release the rest.

Backends: :class:`SQLiteWorkQueue` (embedded, one SQLite file in WAL mode) and
:class:`exfm.das.redis_backend.RedisWorkQueue` (distributed).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from exfm.das.sqlite import connection, write


@dataclass(frozen=True)
class Claim:
    """A worker's leased right to process one partition; ``token`` fences its writes."""

    partition: int
    worker_id: str
    token: int
    expires_at: float


class WorkQueue(Protocol):
    """Partition claims with fencing tokens, and worker membership."""

    partitions: int

    def heartbeat(self, worker_id: str, ttl_s: float) -> None:
        """Mark ``worker_id`` alive for ``ttl_s`` seconds."""
        ...

    def leave(self, worker_id: str) -> None:
        """Remove ``worker_id`` from the live workers (a clean shutdown)."""
        ...

    def live_workers(self) -> list[str]:
        """Workers whose heartbeat has not expired, sorted."""
        ...

    def claim(self, worker_id: str, partition: int, ttl_s: float) -> Claim | None:
        """Claim a free (or expired) partition with a new, larger token; None if another holds it."""
        ...

    def renew(self, claim: Claim, ttl_s: float) -> Claim | None:
        """Extend a claim still held with its token; None if it was lost (taken with a newer token)."""
        ...

    def release(self, claim: Claim) -> None:
        """Give a claim up (no-op if it was lost)."""
        ...

    def holders(self) -> dict[int, Claim]:
        """The unexpired claims by partition."""
        ...


def fair_share(partitions: int, live_workers: int) -> int:
    """How many partitions one of ``live_workers`` workers should hold: ``ceil(P / N)``."""
    return -(-partitions // max(live_workers, 1))


class SQLiteWorkQueue:
    """The embedded work queue: one SQLite file in WAL mode, shared by the workers of one machine.

    Args:
        path: the database file (created if missing).
        partitions: number of partitions (fixed when created).
        clock: seconds since some epoch (injectable for tests).
    """

    def __init__(self, path: str | Path, partitions: int, clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self.partitions = partitions
        self.clock = clock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._write() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS claims (partition INTEGER PRIMARY KEY, worker_id TEXT,"
                " token INTEGER NOT NULL, expires_at REAL NOT NULL)"
            )
            conn.execute("CREATE TABLE IF NOT EXISTS workers (worker_id TEXT PRIMARY KEY, expires_at REAL NOT NULL)")

    def _connect(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return connection(self.path, 30.0)

    def _write(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """A ``BEGIN IMMEDIATE`` transaction: it holds the write lock from its first statement."""
        return write(self.path, 30.0)

    def heartbeat(self, worker_id: str, ttl_s: float) -> None:
        with self._write() as conn:
            conn.execute("INSERT OR REPLACE INTO workers VALUES (?, ?)", (worker_id, self.clock() + ttl_s))

    def leave(self, worker_id: str) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM workers WHERE worker_id = ?", (worker_id,))

    def live_workers(self) -> list[str]:
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT worker_id FROM workers WHERE expires_at > ? ORDER BY worker_id", (self.clock(),)
            ).fetchall()
        return [row[0] for row in rows]

    def claim(self, worker_id: str, partition: int, ttl_s: float) -> Claim | None:
        self._check(partition)
        with self._write() as conn:
            now = self.clock()
            row = conn.execute("SELECT worker_id, token, expires_at FROM claims WHERE partition = ?", (partition,))
            holder, token, expires_at = row.fetchone() or (None, 0, 0.0)
            if holder is not None and expires_at > now:
                return None
            claim = Claim(partition, worker_id, token + 1, now + ttl_s)
            conn.execute(
                "INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?)",
                (partition, worker_id, claim.token, claim.expires_at),
            )
            return claim

    def renew(self, claim: Claim, ttl_s: float) -> Claim | None:
        with self._write() as conn:
            expires_at = self.clock() + ttl_s
            cursor = conn.execute(
                "UPDATE claims SET expires_at = ? WHERE partition = ? AND worker_id = ? AND token = ?",
                (expires_at, claim.partition, claim.worker_id, claim.token),
            )
            return Claim(claim.partition, claim.worker_id, claim.token, expires_at) if cursor.rowcount else None

    def release(self, claim: Claim) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE claims SET worker_id = NULL, expires_at = 0"
                " WHERE partition = ? AND worker_id = ? AND token = ?",
                (claim.partition, claim.worker_id, claim.token),
            )

    def holders(self) -> dict[int, Claim]:
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT partition, worker_id, token, expires_at FROM claims WHERE worker_id IS NOT NULL"
                " AND expires_at > ?",
                (self.clock(),),
            ).fetchall()
        return {row[0]: Claim(*row) for row in rows}

    def _check(self, partition: int) -> None:
        if not 0 <= partition < self.partitions:
            raise ValueError(f"partition {partition} out of range 0..{self.partitions - 1}")
