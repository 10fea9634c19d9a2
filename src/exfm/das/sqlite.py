"""SQLite helpers of the embedded backends (event log, work queue, Zeus, shared store)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
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


@contextmanager
def connection(path: str | Path, timeout_s: float = 30.0) -> Iterator[sqlite3.Connection]:
    """A short-lived autocommit connection in WAL mode (one per call: connections are not shared
    between threads), closed afterwards; ``timeout_s`` is how long a writer waits for the lock."""
    db = sqlite3.connect(path, timeout=timeout_s, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        yield db
    finally:
        db.close()


@contextmanager
def write(path: str | Path, timeout_s: float = 30.0) -> Iterator[sqlite3.Connection]:
    """:func:`connection` inside a :func:`write_transaction`."""
    with connection(path, timeout_s) as db, write_transaction(db):
        yield db
