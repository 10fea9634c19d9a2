"""Snapshot distribution inside DAS: the updater, each task's loader, and garbage collection.

- :class:`Updater`: any task may run it. Under the FM's lease (extended at every poll, so at a
  fixed rate) it polls the SPD and, when it finds a complete, verified snapshot newer than the
  pointer, compare-and-sets the pointer: among many racing updaters exactly one changes it.
- :class:`SnapshotLoader`: one per task (worker). :meth:`~SnapshotLoader.refresh` loads the
  pointer's snapshot fully and verifies it, and only then swaps the reference that
  :meth:`~SnapshotLoader.current` returns; requests meanwhile get the previous snapshot. A corrupt
  snapshot is rejected (the old one stays and the failure is recorded). Each snapshot is tried at
  most once per loader. The new snapshot is pinned before loading; the old one is unpinned after
  the swap.
- :func:`collect_garbage`: deletes the snapshots of an FM older than its pointer that no task pins.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import torch

from exfm.das.snapshots import (
    SnapshotError,
    SnapshotInfo,
    build_served_model,
    list_snapshots,
    load_weights,
    read_snapshot,
    verify,
)
from exfm.das.zeus import MetadataStore

T = TypeVar("T")


class Updater:
    """Publishes the newest complete snapshot of one FM to its Zeus pointer.

    Args:
        zeus: the metadata store.
        spd_dir: the SPD root.
        fm: the FM name.
        owner: this task's id (the lease owner).
        lease_s: lease length; :meth:`run` extends it every ``poll_s`` (so ``lease_s > poll_s``).
        poll_s: seconds between polls in :meth:`run`.
    """

    def __init__(
        self, zeus: MetadataStore, spd_dir: str | Path, fm: str, owner: str, lease_s: float = 30.0, poll_s: float = 5.0
    ):
        if lease_s <= poll_s:
            raise ValueError(f"lease_s ({lease_s}) must exceed poll_s ({poll_s}), or the lease lapses between polls")
        self.zeus, self.spd_dir, self.fm, self.owner = zeus, Path(spd_dir), fm, owner
        self.lease_s, self.poll_s = lease_s, poll_s
        self.rejected: dict[str, str] = {}

    def step(self) -> str | None:
        """One poll: take or extend the lease, then publish a newer snapshot if there is one.

        Snapshots whose weights fail the checksum are skipped (and listed in ``rejected``).

        Returns:
            The snapshot id this call pointed the FM at, or None (no lease, nothing newer, or
            another updater changed the pointer first).
        """
        if not self.zeus.acquire_lease(self.fm, self.owner, self.lease_s):
            return None
        pointer = self.zeus.get_pointer(self.fm)
        snapshots = list_snapshots(self.spd_dir, self.fm)
        current = next((s for s in snapshots if s.snapshot_id == pointer.snapshot_id), None)
        for candidate in reversed(snapshots):
            if current is not None and candidate.order_key <= current.order_key:
                return None
            if candidate.snapshot_id in self.rejected:
                continue
            try:
                verify(candidate)
            except SnapshotError as exc:
                self.rejected[candidate.snapshot_id] = str(exc)
                continue
            won = self.zeus.compare_and_set(self.fm, pointer.version, candidate.snapshot_id, self.owner)
            return candidate.snapshot_id if won else None
        return None

    def run(self, stop: threading.Event) -> None:
        """Poll every ``poll_s`` seconds until ``stop`` is set, then release the lease."""
        while not stop.is_set():
            self.step()
            stop.wait(self.poll_s)
        self.release()

    def release(self) -> None:
        """Give the lease up (if held), so another task's updater takes over at once, not after ``lease_s``."""
        self.zeus.release_lease(self.fm, self.owner)


@dataclass(frozen=True)
class LoadedSnapshot(Generic[T]):
    """A fully loaded and verified snapshot: what a request is answered with."""

    info: SnapshotInfo
    model: T


@dataclass(frozen=True)
class LoadFailure:
    """A snapshot a loader rejected, and why."""

    snapshot_id: str
    reason: str


class SnapshotLoader(Generic[T]):
    """One worker's view of an FM: the snapshot it serves, replaced only by a fully loaded one.

    Args:
        zeus: the metadata store.
        spd_dir: the SPD root.
        fm: the FM name.
        worker_id: this worker's id (its pins carry it).
        build: turns a snapshot and its verified weights into what is served (default: the
            served :class:`~exfm.models.base.RecModel`, in eval mode).
    """

    def __init__(
        self,
        zeus: MetadataStore,
        spd_dir: str | Path,
        fm: str,
        worker_id: str,
        build: Callable[[SnapshotInfo, dict[str, torch.Tensor]], T] = build_served_model,
    ):
        self.zeus, self.spd_dir, self.fm, self.worker_id = zeus, Path(spd_dir), fm, worker_id
        self.build = build
        self.failures: list[LoadFailure] = []
        self.attempted: set[str] = set()
        self._current: LoadedSnapshot[T] | None = None
        self._lock = threading.Lock()

    def current(self) -> LoadedSnapshot[T] | None:
        """The snapshot being served (None before the first successful load)."""
        return self._current

    def refresh(self) -> bool:
        """Load the pointer's snapshot if it is one this loader has not tried yet.

        The snapshot is pinned, read, checksum-verified and built while :meth:`current` still
        returns the previous one; then the reference is swapped and the previous one unpinned.
        On any failure the previous snapshot stays, the new one is unpinned, and the failure is
        appended to ``failures``. Concurrent calls are serialized.

        Returns:
            True if the served snapshot changed.
        """
        with self._lock:
            snapshot_id = self.zeus.get_pointer(self.fm).snapshot_id
            if snapshot_id is None or snapshot_id in self.attempted:
                return False
            self.attempted.add(snapshot_id)
            if not self.zeus.pin(self.worker_id, snapshot_id):
                self.failures.append(LoadFailure(snapshot_id, "claimed for garbage collection before it was pinned"))
                return False
            try:
                info = read_snapshot(self.spd_dir / snapshot_id)
                loaded = LoadedSnapshot(info, self.build(info, load_weights(info)))
            except Exception as exc:  # a bad snapshot must never take the worker down
                self.zeus.unpin(self.worker_id, snapshot_id)
                self.failures.append(LoadFailure(snapshot_id, f"{type(exc).__name__}: {exc}"))
                return False
            previous, self._current = self._current, loaded
            if previous is not None:
                self.zeus.unpin(self.worker_id, previous.info.snapshot_id)
            return True

    def close(self) -> None:
        """Drop this worker's pin on the served snapshot (it stops serving)."""
        with self._lock:
            if self._current is not None:
                self.zeus.unpin(self.worker_id, self._current.info.snapshot_id)
                self._current = None


def collect_garbage(zeus: MetadataStore, spd_dir: str | Path, fm: str) -> list[str]:
    """Delete the complete snapshots of ``fm`` older than its pointer that no worker pins.

    Snapshots newer than the pointer (not yet published to Zeus) are kept. A claimed snapshot is
    first renamed to a hidden name (so it disappears from :func:`list_snapshots` at once), then
    removed.

    Returns:
        The deleted snapshot ids.
    """
    spd_dir = Path(spd_dir)
    pointer = zeus.get_pointer(fm)
    snapshots = list_snapshots(spd_dir, fm)
    current = next((s for s in snapshots if s.snapshot_id == pointer.snapshot_id), None)
    if current is None:
        return []
    older = [s.snapshot_id for s in snapshots if s.order_key < current.order_key]
    deleted = []
    for snapshot_id in zeus.claim_for_collection(older):
        trash = spd_dir / f".{snapshot_id}.deleting-{time.time_ns()}"
        try:
            (spd_dir / snapshot_id).rename(trash)
        except FileNotFoundError:  # another task's collector got there first
            continue
        shutil.rmtree(trash)
        deleted.append(snapshot_id)
    return deleted
