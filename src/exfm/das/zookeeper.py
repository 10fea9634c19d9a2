"""Zeus on Apache ZooKeeper (client: kazoo): the distributed :class:`~exfm.das.zeus.MetadataStore`.

Same semantics as :class:`~exfm.das.zeus.SQLiteZeus` (the same tests run on both), with one
difference that is the point of it: leases and pins belong to a ZooKeeper **session**, so those of
a crashed task expire with its session. Znodes, under ``root`` (default ``/exfm/das``)::

    {root}/pointers/{fm}           data: the snapshot id; created by the first compare_and_set
    {root}/leases/{fm}             data: the last lease owner; its data version counts acquisitions
    {root}/leases/{fm}/holder      ephemeral, data: the owner; exists while the lease is held
    {root}/pins/{snapshot}         the snapshot's state node, data: empty, or ``collected``
    {root}/pins/{snapshot}/{worker}  ephemeral: the worker's pin

Names are URL-quoted (``/`` and other characters ZooKeeper reserves are escaped).

**Pointer and fencing.** :attr:`Pointer.version <exfm.das.zeus.Pointer.version>` is the number of
pointer changes: 0 while the pointer znode does not exist, else its znode data version + 1.
:meth:`ZooKeeperZeus.compare_and_set` creates the znode (expected version 0) or sets it with
``version=expected - 1``, so the znode version is the fencing token and exactly one of racing
updaters wins each change. With ``owner``, the same transaction checks that the lease holder
node exists and the lease node's version is the one read while ``owner`` held it through this
client's session (the lease version changes with every acquisition, so a lease lost and taken
again in between cannot pass).

**Lease = session.** :meth:`~ZooKeeperZeus.acquire_lease` creates the ephemeral holder node (and
bumps the lease node's version in the same transaction), or finds that it already holds it (same
owner, same session). The lease then lasts as long as this client's session: ZooKeeper's session
expiry is the lease expiry, so ``ttl_s`` is not used and the effective TTL is the session timeout
(``session_timeout_s``, within the server's bounds). kazoo's heartbeats keep the session alive
while the process runs; a crashed or partitioned task loses it once the session times out. The
pointer's ``lease_expires`` is reported as now + the session timeout while the lease is held (the
latest the lease can end if its owner stopped now).

**Pins and collection.** A pin is an ephemeral node, so a crashed worker's pins vanish with its
session (the embedded backend keeps them forever). Every pin bumps its snapshot's state node
version in the same transaction that creates the pin node, and so does a compare-and-set that
points at the snapshot. :meth:`~ZooKeeperZeus.claim_for_collection` reads the state node, then
the pointers and the pins, and sets the state node to ``collected`` with the version it read: a
pin or pointer change that committed after that read makes the set fail (the claim is then
re-checked), and a pin on a collected snapshot returns False. A live client whose session expired
(a long pause) re-creates its pins on its new session, unless the snapshot was collected meanwhile.

**Restarts.** Every call goes through kazoo's retry (``KazooRetry``): connection loss (a
ZooKeeper restart, a leader election) is retried for up to ``retry_s`` seconds. A write whose
reply was lost is re-run from its reads, so it is not applied twice; a compare-and-set whose
success reply was lost reports False (safe: the pointer did change, and only once).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar
from urllib.parse import quote, unquote

from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import NodeExistsError, NoNodeError, RolledBackError, RuntimeInconsistency

from exfm.das.zeus import Pointer

COLLECTED = b"collected"
T = TypeVar("T")


def _name(value: str) -> str:
    """A znode name for an FM, snapshot or worker id."""
    if value in ("", ".", ".."):
        raise ValueError(f"invalid name {value!r}")
    return quote(value, safe="")


def _failure(results: list[Any]) -> tuple[int, Exception] | None:
    """The failed operation of a transaction's results ``(index, error)``, or None if it committed."""
    errors = [(i, r) for i, r in enumerate(results) if isinstance(r, Exception)]
    if not errors:
        return None
    real = [(i, r) for i, r in errors if not isinstance(r, RolledBackError | RuntimeInconsistency)]
    return (real or errors)[0]


class ZooKeeperZeus:
    """Zeus in ZooKeeper: pointers with versioned compare-and-set, session leases, ephemeral pins.

    Args:
        hosts: ZooKeeper connection string (``host:port,host:port``; a ``/chroot`` suffix is allowed).
        root: the znode under which everything lives (created if missing).
        session_timeout_s: requested session timeout; it is the updater lease's and the pins'
            expiry after a crash.
        retry_s: how long one call keeps retrying through connection loss.
        connect_timeout_s: how long the constructor waits for the first connection.
    """

    def __init__(
        self,
        hosts: str,
        root: str = "/exfm/das",
        session_timeout_s: float = 10.0,
        retry_s: float = 30.0,
        connect_timeout_s: float = 15.0,
    ):
        if not root.startswith("/") or root.rstrip("/") == "":
            raise ValueError(f"root must be an absolute znode path other than '/', got {root!r}")
        self.hosts = hosts
        self.root = root.rstrip("/")
        self.session_timeout_s = session_timeout_s
        backoff = {"delay": 0.05, "backoff": 2, "max_delay": 1.0, "max_jitter": 0.1}
        self.client = KazooClient(
            hosts=hosts,
            timeout=session_timeout_s,
            connection_retry={"max_tries": -1, **backoff},
            command_retry={"max_tries": -1, "deadline": retry_s, **backoff},
        )
        self._mine: set[tuple[str, str]] = set()  # this client's pins, re-created on a new session
        self._lock = threading.Lock()
        self._lost = False
        self.client.add_listener(self._on_state)
        self.client.start(timeout=connect_timeout_s)
        for child in ("pointers", "leases", "pins"):
            self._retry(self.client.ensure_path, f"{self.root}/{child}")

    # paths
    def _pointer(self, fm: str) -> str:
        return f"{self.root}/pointers/{_name(fm)}"

    def _lease(self, fm: str) -> str:
        return f"{self.root}/leases/{_name(fm)}"

    def _holder(self, fm: str) -> str:
        return f"{self._lease(fm)}/holder"

    def _state(self, snapshot_id: str) -> str:
        return f"{self.root}/pins/{_name(snapshot_id)}"

    def _pin_path(self, worker_id: str, snapshot_id: str) -> str:
        return f"{self._state(snapshot_id)}/{_name(worker_id)}"

    def _retry(self, fn: Callable[..., T], *args: Any) -> T:
        return self.client.retry(fn, *args)

    def _session_id(self) -> int | None:
        client_id = self.client.client_id
        return None if client_id is None else client_id[0]

    def _get(self, path: str) -> tuple[bytes, Any] | None:
        try:
            return self.client.get(path)
        except NoNodeError:
            return None

    # pointer and lease
    def get_pointer(self, fm: str) -> Pointer:
        """The FM's pointer (version 0 and no snapshot if none was ever set)."""
        return self._retry(self._get_pointer, fm)

    def _get_pointer(self, fm: str) -> Pointer:
        pointer = self._get(self._pointer(fm))
        snapshot_id, version = (None, 0) if pointer is None else (pointer[0].decode(), pointer[1].version + 1)
        holder = self._get(self._holder(fm))
        if holder is None:
            return Pointer(fm, snapshot_id, version, None, 0.0)
        return Pointer(fm, snapshot_id, version, holder[0].decode(), time.time() + self.session_timeout_s)

    def compare_and_set(self, fm: str, expected_version: int, snapshot_id: str, owner: str | None = None) -> bool:
        """Point ``fm`` at ``snapshot_id`` if its version is still ``expected_version``.

        Args:
            fm: the FM name.
            expected_version: the version the caller read (0: no pointer yet).
            snapshot_id: the new target.
            owner: if given, the change also requires ``owner`` to hold the lease through this
                client's session (checked in the same transaction).

        Returns:
            True if this call changed the pointer (its version is now ``expected_version + 1``).
        """
        if expected_version < 0:
            return False
        return self._retry(self._compare_and_set, fm, expected_version, snapshot_id, owner)

    def _compare_and_set(self, fm: str, expected_version: int, snapshot_id: str, owner: str | None) -> bool:
        while True:
            tx = self.client.transaction()
            if owner is not None:
                held = self._lease_versions(fm, owner)
                if held is None:
                    return False
                tx.check(self._lease(fm), held[0])
                tx.check(self._holder(fm), held[1])
            state_op = len(tx.operations)
            if not self._touch_state(tx, snapshot_id):
                state_op = None
            if expected_version == 0:
                tx.create(self._pointer(fm), snapshot_id.encode())
            else:
                tx.set_data(self._pointer(fm), snapshot_id.encode(), version=expected_version - 1)
            failed = _failure(tx.commit())
            if failed is None:
                return True
            if failed[0] != state_op:
                return False  # the version moved, or the lease is no longer held
            # a concurrent pin or collection touched the snapshot's state node: read it again

    def _touch_state(self, tx: Any, snapshot_id: str) -> bool:
        """Add to ``tx`` a bump of the snapshot's state node version (creating it if missing).

        Returns False (nothing added) if the snapshot is already collected.
        """
        path = self._state(snapshot_id)
        state = self._get(path)
        if state is None:
            tx.create(path, b"")
            return True
        if state[0] == COLLECTED:
            return False
        tx.set_data(path, state[0], version=state[1].version)
        return True

    def _lease_versions(self, fm: str, owner: str) -> tuple[int, int] | None:
        """``(lease node version, holder node version)`` if ``owner`` holds the lease through this session.

        The lease node is read before the holder: a holder that is ours then belongs to the
        acquisition at that lease version or a later one of ours, never to another's.
        """
        lease = self._get(self._lease(fm))
        holder = self._get(self._holder(fm))
        if lease is None or holder is None:
            return None
        if holder[0].decode() != owner or holder[1].ephemeralOwner != self._session_id():
            return None
        return lease[1].version, holder[1].version

    def acquire_lease(self, fm: str, owner: str, ttl_s: float) -> bool:
        """Take the updater lease of ``fm`` for this client's session, or confirm ``owner`` holds it.

        ``ttl_s`` is not used: the lease lasts while this client's session lives (it expires
        ``session_timeout_s`` after the client stops heartbeating). Another owner can take it only
        once this session has ended (:meth:`close`, a crash, or session expiry) or after
        :meth:`release_lease`.

        Returns:
            True if ``owner`` holds the lease now (through this session); False if another holds it.
        """
        return self._retry(self._acquire_lease, fm, owner)

    def _acquire_lease(self, fm: str, owner: str) -> bool:
        lease_path, holder_path = self._lease(fm), self._holder(fm)
        while True:
            holder = self._get(holder_path)
            if holder is not None:
                return holder[0].decode() == owner and holder[1].ephemeralOwner == self._session_id()
            lease = self._get(lease_path)
            tx = self.client.transaction()
            if lease is None:
                tx.create(lease_path, owner.encode())
            else:
                tx.set_data(lease_path, owner.encode(), version=lease[1].version)
            tx.create(holder_path, owner.encode(), ephemeral=True)
            if _failure(tx.commit()) is None:
                return True
            # another acquisition raced this one: look again

    def release_lease(self, fm: str, owner: str) -> None:
        """Give the lease up early (no-op unless ``owner`` holds it through this session)."""
        self._retry(self._release_lease, fm, owner)

    def _release_lease(self, fm: str, owner: str) -> None:
        held = self._lease_versions(fm, owner)
        if held is None:
            return
        tx = self.client.transaction()
        tx.check(self._lease(fm), held[0])
        tx.delete(self._holder(fm), version=held[1])
        tx.commit()  # a failure means the lease was lost meanwhile: nothing to release

    # pins and collection
    def pin(self, worker_id: str, snapshot_id: str) -> bool:
        """Record that ``worker_id`` serves or loads ``snapshot_id`` (an ephemeral node of this session).

        Returns:
            False (and no pin) if the snapshot was already claimed for collection.
        """
        pinned = self._retry(self._pin, worker_id, snapshot_id)
        if pinned:
            with self._lock:
                self._mine.add((worker_id, snapshot_id))
        return pinned

    def _pin(self, worker_id: str, snapshot_id: str) -> bool:
        state_path, pin_path = self._state(snapshot_id), self._pin_path(worker_id, snapshot_id)
        while True:
            state = self._get(state_path)
            if state is None:
                with contextlib.suppress(NodeExistsError):
                    self.client.create(state_path, b"")
                continue
            if state[0] == COLLECTED:
                return False
            existing = self.client.exists(pin_path)
            if existing is not None and existing.ephemeralOwner == self._session_id():
                return True
            tx = self.client.transaction()
            tx.set_data(state_path, state[0], version=state[1].version)
            if existing is not None:  # the same worker id pinned through another (older) session
                tx.delete(pin_path, version=existing.version)
            tx.create(pin_path, b"", ephemeral=True)
            if _failure(tx.commit()) is None:
                return True

    def unpin(self, worker_id: str, snapshot_id: str) -> None:
        """Drop a worker's pin (no-op if absent)."""
        with self._lock:
            self._mine.discard((worker_id, snapshot_id))
        self._retry(self._unpin, self._pin_path(worker_id, snapshot_id))

    def _unpin(self, path: str) -> None:
        with contextlib.suppress(NoNodeError):
            self.client.delete(path)

    def pins(self) -> dict[str, set[str]]:
        """``{snapshot_id: {worker_id, ...}}`` of every pinned snapshot."""
        return self._retry(self._pins)

    def _pins(self) -> dict[str, set[str]]:
        names = self.client.get_children(f"{self.root}/pins")
        pending = [(name, self.client.get_children_async(f"{self.root}/pins/{name}")) for name in names]
        pinned: dict[str, set[str]] = {}
        for name, result in pending:
            try:
                workers = result.get()
            except NoNodeError:
                continue
            if workers:
                pinned[unquote(name)] = {unquote(worker) for worker in workers}
        return pinned

    def claim_for_collection(self, snapshot_ids: Iterable[str]) -> list[str]:
        """Claim for deletion those of ``snapshot_ids`` that no worker pins and no pointer names.

        Each claim is a versioned set of the snapshot's state node to ``collected``, so it fails
        (and is re-checked) if a pin or a pointer change touched the snapshot after it was read.
        A collected snapshot can never be pinned again.

        Returns:
            The claimed ids (already claimed ones included, so an interrupted deletion is redone).
        """
        return [s for s in dict.fromkeys(snapshot_ids) if self._retry(self._claim, s)]

    def _claim(self, snapshot_id: str) -> bool:
        path = self._state(snapshot_id)
        while True:
            state = self._get(path)
            if state is not None and state[0] == COLLECTED:
                return True
            if snapshot_id in self._named_snapshots():
                return False
            if state is not None and self.client.get_children(path):
                return False
            tx = self.client.transaction()
            if state is None:
                tx.create(path, COLLECTED)
            else:
                tx.set_data(path, COLLECTED, version=state[1].version)
            if _failure(tx.commit()) is None:
                return True

    def _named_snapshots(self) -> set[str]:
        base = f"{self.root}/pointers"
        pending = [self.client.get_async(f"{base}/{name}") for name in self.client.get_children(base)]
        named = set()
        for result in pending:
            with contextlib.suppress(NoNodeError):
                named.add(result.get()[0].decode())
        return named

    # session
    def _on_state(self, state: str) -> None:
        """kazoo's state listener (its event thread: must not block)."""
        if state == KazooState.LOST:
            self._lost = True
        elif state == KazooState.CONNECTED and self._lost:
            self._lost = False
            threading.Thread(target=self._restore_pins, name="zeus-restore-pins", daemon=True).start()

    def _restore_pins(self) -> None:
        """After a session expired, pin again what this client pinned (its ephemeral pins are gone)."""
        with self._lock:
            mine = sorted(self._mine)
        for worker_id, snapshot_id in mine:
            try:
                pinned = self._retry(self._pin, worker_id, snapshot_id)
                with self._lock:
                    if not pinned:
                        self._mine.discard((worker_id, snapshot_id))
                    unpinned = (worker_id, snapshot_id) not in self._mine
                if pinned and unpinned:  # unpinned while this was re-pinning
                    self._retry(self._unpin, self._pin_path(worker_id, snapshot_id))
            except Exception:  # closed meanwhile, or ZooKeeper gone for longer than retry_s
                return

    def close(self) -> None:
        """End the session (its lease and pins go at once) and release the client."""
        self.client.stop()
        self.client.close()
