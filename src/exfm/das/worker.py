"""A DAS worker: one equal task that joins, supervises, commits, and keeps its FM snapshot fresh.

Every worker runs the same loop (``exfm das worker --config C.yaml``):

1. **Membership and claims** (every ``renew_s``): heartbeat; renew its claims; claim free
   partitions up to its fair share ``ceil(P / live workers)`` and release the rest. A newly
   claimed partition is opened in the shared store under the claim's token (which fences out
   the previous owner) and its joiner state is rebuilt by re-reading the log from the
   partition's committed **checkpoint**.
2. **Snapshots** (every ``renew_s``): run the :class:`~exfm.das.loader.Updater` (whichever worker
   holds the FM's lease moves the pointer) and refresh its
   :class:`~exfm.das.loader.SnapshotLoader` (hot swap).
3. **Per owned partition**: read the next entries of the log, join them, send new impressions
   to the FM (:class:`~exfm.das.supervisor.Supervisor`), emit the examples whose windows have
   closed with their supervision, and commit them together with the new checkpoint, fenced by
   the claim (:meth:`~exfm.das.store.SharedStore.commit`). Then trim the log to the checkpoint.

**Checkpoint.** The offset of the longest prefix of the partition's entries that no waiting
impression or held label needs any more: everything up to it is in the store. A worker killed at
any moment leaves the last committed checkpoint; its successor re-reads from there, re-emits the
examples committed after it, and the store drops them by request id, so nothing is lost or
duplicated. The joiner's state is therefore never saved: it *is* the log after the checkpoint.

A worker paused past its lease (SIGSTOP) loses its claim; the successor's ``open_partition``
raises the store's token, so the paused worker's next commit fails with
:class:`~exfm.das.store.StaleClaimError`, and it drops the partition.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from exfm.das.events import Event, EventLog, ImpressionBatch, SQLiteEventLog, Watermark
from exfm.das.joiner import JoinedExample, Joiner, JoinerConfig
from exfm.das.loader import SnapshotLoader, Updater
from exfm.das.queue import Claim, SQLiteWorkQueue, WorkQueue, fair_share
from exfm.das.snapshots import SnapshotInfo
from exfm.das.store import Fence, SharedStore, StaleClaimError
from exfm.das.supervisor import SnapshotFM, Supervisor
from exfm.das.zeus import MetadataStore, SQLiteZeus
from exfm.data.dataset import atomic_write_text
from exfm.schema import Schema, load_schema, read_yaml
from exfm.train.config import ConfigError, format_validation_error

US_PER_S = 1_000_000


class DASConfig(BaseModel):
    """A DAS deployment: where its parts live and how it joins (YAML of ``exfm das worker``).

    Relative paths are resolved against the config file's directory.
    """

    model_config = ConfigDict(extra="forbid")

    backend: Literal["sqlite", "distributed"] = Field(
        "sqlite", description="sqlite: log, queue and Zeus in SQLite files under root; distributed: Redis + ZooKeeper"
    )
    root: Path = Field(description="directory of the SQLite backend files and of the workers' status reports")
    store: Path = Field(description="the shared store (an exfm dataset the VMs read)")
    spd: Path = Field(description="the snapshot publishing directory")
    schema_path: Path = Field(alias="schema", description="the feature schema YAML (calendar split with a start)")
    fm: str | None = Field(None, description="the FM whose snapshots supervise the examples; None: no supervision")
    windows_s: dict[str, float] = Field(description="label window per task, seconds")
    allowed_lateness_s: float = 0.0
    early_label_horizon_s: float = 3600.0
    partitions: int = Field(8, ge=1)
    lease_s: float = Field(10.0, gt=0, description="claim lease; a dead worker's partitions move after it")
    renew_s: float = Field(2.0, gt=0, description="how often claims are renewed and snapshots polled")
    read_batch: int = Field(4096, ge=1, description="log entries read per partition and step")
    min_workers: int = Field(
        1, ge=1, description="a starting worker claims nothing until this many are live (or startup_wait_s passed)"
    )
    startup_wait_s: float = Field(30.0, ge=0, description="the longest a starting worker waits for min_workers")
    manifest_interval_s: float = Field(1.0, ge=0, description="rewrite the store's manifest at most this often")
    partition_by: Literal["day", "hour"] = Field("day", description="the store's Parquet partitions")
    fm_latency_budget_s: float = Field(5.0, ge=0, description="how long a closed example waits for its FM prediction")
    fm_batch: int = Field(4096, ge=1)
    gil_switch_interval_s: float = Field(
        0.0005,
        gt=0,
        description="Python's thread switch interval while the worker runs (sys.setswitchinterval; Python's "
        "default is 0.005): the FM thread takes the GIL back after each torch op, and waits up to this long "
        "for the joining thread to give it up",
    )
    redis_url: str | None = None
    zookeeper_hosts: str | None = None

    @classmethod
    def load(cls, path: str | Path) -> DASConfig:
        path = Path(path)
        try:
            config = cls.model_validate(read_yaml(path, ConfigError))
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, str(path))) from None
        base = path.parent
        updates = {name: base / getattr(config, name) for name in ("root", "store", "spd", "schema_path")}
        return config.model_copy(update={k: v if v.is_absolute() else v.resolve() for k, v in updates.items()})

    def schema(self) -> Schema:
        return load_schema(self.schema_path)

    def joiner_config(self) -> JoinerConfig:
        return JoinerConfig(
            {task: int(seconds * US_PER_S) for task, seconds in self.windows_s.items()},
            allowed_lateness_us=int(self.allowed_lateness_s * US_PER_S),
            early_label_horizon_us=int(self.early_label_horizon_s * US_PER_S),
        )


@dataclass
class Backends:
    """The three shared services a worker talks to."""

    log: EventLog
    queue: WorkQueue
    zeus: MetadataStore


def open_backends(config: DASConfig) -> Backends:
    """Connect to the configured backend (embedded SQLite files, or Redis + ZooKeeper)."""
    if config.backend == "sqlite":
        root = config.root
        return Backends(
            SQLiteEventLog(root / "log.sqlite", config.partitions),
            SQLiteWorkQueue(root / "queue.sqlite", config.partitions),
            SQLiteZeus(root / "zeus.sqlite"),
        )
    if not config.redis_url or not config.zookeeper_hosts:
        raise ValueError("backend distributed: set redis_url and zookeeper_hosts")
    from exfm.das.redis_backend import RedisEventLog, RedisWorkQueue, connect_redis
    from exfm.das.zookeeper import ZooKeeperZeus

    client = connect_redis(config.redis_url)
    return Backends(
        RedisEventLog(client, config.partitions),
        RedisWorkQueue(client, config.partitions),
        ZooKeeperZeus(config.zookeeper_hosts),
    )


@dataclass
class _Entry:
    """A log entry read after the checkpoint: its offset and the requests whose events it holds."""

    offset: str
    request_ids: list[str]
    first_waiting: int = 0  # request_ids[:first_waiting] are known to need nothing any more

    def done(self, joiner: Joiner, held: set[str]) -> bool:
        """Whether no request of the entry still waits in the joiner or for its supervision (then the
        entry is not needed any more)."""
        while self.first_waiting < len(self.request_ids):
            request_id = self.request_ids[self.first_waiting]
            if joiner.is_waiting(request_id) or request_id in held:
                return False
            self.first_waiting += 1
        return True


def _request_ids(event: Event) -> list[str]:
    if isinstance(event, ImpressionBatch):
        return event.request_ids
    return [] if isinstance(event, Watermark) else [event.request_id]


@dataclass
class _Partition:
    """What a worker holds for one claimed partition."""

    claim: Claim
    joiner: Joiner
    cursor: str | None
    checkpoint: str | None
    since_checkpoint: deque[_Entry] = field(default_factory=deque)  # entries read after the checkpoint
    held: list[JoinedExample] = field(default_factory=list)  # closed, waiting for their FM inference


class Worker:
    """One equal DAS task; see the module docstring.

    Args:
        config: the deployment.
        worker_id: unique id (default: host, pid and a time stamp).
        backends: already opened backends (default: :func:`open_backends`).
    """

    def __init__(self, config: DASConfig, worker_id: str | None = None, backends: Backends | None = None):
        self.config = config
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{time.time_ns() % 10**9}"
        self.backends = backends or open_backends(config)
        self.store = SharedStore(
            config.store,
            config.schema(),
            manifest_interval_s=config.manifest_interval_s,
            partition_by=config.partition_by,
        )
        self.counters: Counter[str] = Counter()
        self.join_counters: Counter[str] = Counter()  # of the joiners of partitions this worker dropped
        self.partitions: dict[int, _Partition] = {}
        self.loader: SnapshotLoader[SnapshotFM] | None = None
        self.updater: Updater | None = None
        if config.fm is not None:
            zeus = self.backends.zeus
            self.loader = SnapshotLoader(zeus, config.spd, config.fm, self.worker_id, build=SnapshotFM.build)
            self.updater = Updater(
                zeus, config.spd, config.fm, self.worker_id, lease_s=config.lease_s, poll_s=config.renew_s
            )
        self.snapshot: SnapshotInfo | None = None  # the snapshot in use (the last one, once stopped)
        self.supervisor = Supervisor(self._current_fm, config.fm_latency_budget_s, config.fm_batch)
        self._next_maintenance = 0.0
        self._started = time.monotonic()

    # --- the loop ------------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None, until_idle_s: float | None = None) -> None:
        """Work until ``stop`` is set (or, with ``until_idle_s``, until nothing was read for that long)."""
        stop = stop or threading.Event()
        idle_since = time.monotonic()
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(self.config.gil_switch_interval_s)
        try:
            while not stop.is_set():
                self.supervisor.dispatch()  # feed an idle FM with what is buffered
                held = [e for state in self.partitions.values() for e in state.held]
                if self.step():
                    idle_since = time.monotonic()
                elif held:
                    self.supervisor.wait(held, timeout_s=0.05)
                elif not self.supervisor.has_capacity():  # entries wait to be read: not idle
                    stop.wait(0.005)
                elif until_idle_s is not None and time.monotonic() - idle_since > until_idle_s:
                    break
                else:
                    stop.wait(0.05)
        finally:
            sys.setswitchinterval(switch_interval)
            self.close()

    def step(self) -> int:
        """Maintenance when due, then one read-join-commit round over the owned partitions.

        Returns:
            Log entries read in this round.
        """
        if time.monotonic() >= self._next_maintenance:
            self.maintain()
            self._next_maintenance = time.monotonic() + self.config.renew_s
        read = 0
        for number in list(self.partitions):
            read += self._process(number)
        return read

    def maintain(self) -> None:
        """Heartbeat, renew and rebalance claims, poll snapshots, write the status report."""
        queue, config = self.backends.queue, self.config
        if self.updater is not None:  # first, so that a new worker supervises from its first example
            self.updater.step()
            self.loader.refresh()
            loaded = self.loader.current()
            self.snapshot = loaded.info if loaded is not None else self.snapshot
        queue.heartbeat(self.worker_id, config.lease_s)
        for number, state in list(self.partitions.items()):
            renewed = queue.renew(state.claim, config.lease_s)
            if renewed is None:
                self._drop(number, "lost")
            else:
                state.claim = renewed
        live = len(queue.live_workers())
        if live < config.min_workers and time.monotonic() - self._started < config.startup_wait_s:
            self._report()  # an initial rebalance delay: wait for the planned workers before claiming
            return
        share = fair_share(queue.partitions, live)
        held = queue.holders()
        for number in range(queue.partitions):
            if len(self.partitions) >= share:
                break
            if number not in self.partitions and number not in held:
                claim = queue.claim(self.worker_id, number, config.lease_s)
                if claim is not None:
                    self._open(claim)
        while len(self.partitions) > share:
            number = max(self.partitions)
            queue.release(self.partitions[number].claim)
            self._drop(number, "released")
        self._report()

    def close(self) -> None:
        """Release claims, pins and the updater's lease, leave the membership, stop the FM thread."""
        for number, state in list(self.partitions.items()):
            self.backends.queue.release(state.claim)
            self._drop(number, "released")
        self.backends.queue.leave(self.worker_id)
        if self.loader is not None:
            self.updater.release()
            self.loader.close()
        self.supervisor.close()
        self.store.flush()
        self._report()

    # --- one partition -------------------------------------------------------------------------
    def _open(self, claim: Claim) -> None:
        try:
            checkpoint = self.store.open_partition(Fence(claim.partition, claim.token))
        except StaleClaimError:
            self.backends.queue.release(claim)
            return
        self.partitions[claim.partition] = _Partition(
            claim, Joiner(self.config.joiner_config()), checkpoint, checkpoint
        )
        self.counters["partitions_opened"] += 1

    def _drop(self, number: int, why: str) -> None:
        state = self.partitions.pop(number)
        self.join_counters.update(state.joiner.counters)
        self.supervisor.forget([rid for entry in state.since_checkpoint for rid in entry.request_ids])
        self.counters["dropped_unsupervised_wait"] += len(state.held)
        self.counters[f"partitions_{why}"] += 1

    def _process(self, number: int) -> int:
        state = self.partitions[number]
        can_read = self.loader is None or self.supervisor.has_capacity()
        entries = self.backends.log.read(number, state.cursor, self.config.read_batch) if can_read else []
        if entries:
            state.cursor = entries[-1][0]
            accepted = state.joiner.add(event for _, event in entries)
            if self.loader is not None:
                self.supervisor.submit(accepted)
            state.since_checkpoint.extend(_Entry(offset, _request_ids(event)) for offset, event in entries)
        examples, state.held = self.supervisor.take_ready(state.held + state.joiner.advance())
        held = {e.request_id for e in state.held}
        checkpoint = state.checkpoint
        while state.since_checkpoint and state.since_checkpoint[0].done(state.joiner, held):
            checkpoint = state.since_checkpoint.popleft().offset
        if not examples and checkpoint == state.checkpoint:
            return len(entries)
        try:
            result = self.store.commit(examples, Fence(number, state.claim.token), checkpoint)
        except StaleClaimError:
            self._drop(number, "fenced")
            return len(entries)
        self.counters["committed"] += result.rows
        self.counters["duplicates"] += result.duplicates
        if checkpoint is not None and checkpoint != state.checkpoint:
            self.backends.log.trim(number, checkpoint)
        state.checkpoint = checkpoint
        return len(entries)

    def _current_fm(self) -> SnapshotFM | None:
        loaded = self.loader.current() if self.loader is not None else None
        return None if loaded is None else loaded.model

    # --- status --------------------------------------------------------------------------------
    def status(self) -> dict:
        """This worker's view: partitions, throughput, window backlog, snapshot, supervision, staleness."""
        joined = Counter(self.join_counters)
        for state in self.partitions.values():
            joined.update(state.joiner.counters)
        supervision = self.supervisor.counters
        elapsed = max(time.monotonic() - self._started, 1e-9)
        return {
            "worker_id": self.worker_id,
            "time": time.time(),
            "partitions": {
                str(n): {"token": s.claim.token, "checkpoint": s.checkpoint, "pending": s.joiner.pending}
                for n, s in sorted(self.partitions.items())
            },
            "window_backlog": sum(s.joiner.pending for s in self.partitions.values()),
            "committed": self.counters["committed"],
            "committed_per_s": self.counters["committed"] / elapsed,
            "counters": dict(self.counters),
            "joiner": dict(joined),
            "supervision": dict(supervision),
            "supervision_coverage": supervision["supervised"] / max(supervision["emitted"], 1),
            "fm_rows_per_emitted": supervision["fm_rows"] / max(supervision["emitted"], 1),
            "fm_rows_per_busy_s": supervision["fm_rows"] / max(supervision["fm_seconds"], 1e-9),
            "fm_busy_fraction": supervision["fm_seconds"] / elapsed,
            "snapshot": None if self.snapshot is None else self.snapshot.snapshot_id,
            "snapshot_staleness_s": None
            if self.snapshot is None
            else time.time() - self.snapshot.train_through_us / US_PER_S,
        }

    def _report(self) -> None:
        path = self.config.root / "status" / f"{self.worker_id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(self.status(), indent=2) + "\n")


def read_status(config: DASConfig) -> dict:
    """The deployment's status: claims and backlog per partition, and every worker's last report."""
    backends = open_backends(config)
    store = SharedStore(config.store, config.schema())
    holders = backends.queue.holders()
    checkpoints = store.checkpoints()
    partitions = {}
    for number in range(config.partitions):
        token, checkpoint = checkpoints.get(number, (0, None))
        holder = holders.get(number)
        partitions[number] = {
            "worker": None if holder is None else holder.worker_id,
            "token": token,
            "checkpoint": checkpoint,
            "log_backlog": backends.log.backlog(number, checkpoint),
        }
    reports = {}
    for path in sorted((config.root / "status").glob("*.json")):
        reports[path.stem] = json.loads(path.read_text())
    return {
        "live_workers": backends.queue.live_workers(),
        "stored_rows": store.stored_rows(),
        "partitions": partitions,
        "workers": reports,
    }


def format_status(status: dict) -> str:
    """A human-readable table of :func:`read_status`."""
    lines = [f"live workers: {', '.join(status['live_workers']) or 'none'}; stored rows: {status['stored_rows']:,}"]
    lines.append(f"{'partition':>9}  {'worker':<28} {'token':>5}  {'checkpoint':>14}  {'log backlog':>11}")
    for number, p in status["partitions"].items():
        lines.append(
            f"{number:>9}  {p['worker'] or '-':<28} {p['token']:>5}  {p['checkpoint'] or '-':>14}  "
            f"{p['log_backlog']:>11,}"
        )
    lines.append(f"{'worker':<28} {'committed/s':>11} {'window':>7} {'coverage':>8} {'staleness':>10}  snapshot")
    for worker_id, report in status["workers"].items():
        staleness = report["snapshot_staleness_s"]
        lines.append(
            f"{worker_id:<28} {report['committed_per_s']:>11,.0f} {report['window_backlog']:>7,} "
            f"{report['supervision_coverage']:>8.3f} {'-' if staleness is None else f'{staleness:,.0f} s':>10}  "
            f"{report['snapshot'] or '-'}"
        )
    return "\n".join(lines)
