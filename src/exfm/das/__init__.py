"""The Data Augmentation Service (DAS): the system half of ExFM (DESIGN.md §4, docs/das.md).

* events (:mod:`exfm.das.events`): impressions (single or in batches), labels and producer
  watermarks are appended to a partitioned :class:`~exfm.das.events.EventLog` (SQLite, or
  Redis Streams in :mod:`exfm.das.redis_backend`); :func:`~exfm.das.events.replay_into` turns a
  dataset into events;
* join (:mod:`exfm.das.joiner`): per-task event-time label windows, one example per impression;
* supervision (:mod:`exfm.das.supervisor`): the FM snapshot a worker serves predicts every new
  impression once, in a background thread, under a latency budget;
* store (:mod:`exfm.das.store`): examples land exactly once in a day (or hour) partitioned exfm
  dataset, fenced by the committing worker's claim; each VM reads its own view of it;
* snapshots (:mod:`exfm.das.snapshots`, :mod:`exfm.das.loader`, :mod:`exfm.das.zeus`,
  :mod:`exfm.das.zookeeper`): the SPD, the Zeus pointer under a lease, hot swap, pins and GC;
* workers (:mod:`exfm.das.worker`, :mod:`exfm.das.queue`): equal tasks sharing the log's
  partitions through leased, fenced claims (``exfm das worker``, ``exfm das status``).
"""

from exfm.das.events import (
    EventLog,
    Impression,
    ImpressionBatch,
    Label,
    SQLiteEventLog,
    Watermark,
    replay_batches,
    replay_dataset,
    replay_into,
    watermarks,
)
from exfm.das.joiner import JoinedExample, Joiner, JoinerConfig, Supervision
from exfm.das.loader import LoadedSnapshot, LoadFailure, SnapshotLoader, Updater, collect_garbage
from exfm.das.queue import Claim, SQLiteWorkQueue, WorkQueue
from exfm.das.snapshots import (
    SnapshotError,
    SnapshotInfo,
    build_served_model,
    list_snapshots,
    load_weights,
    publish_snapshot,
    read_snapshot,
    verify,
    write_snapshot,
)
from exfm.das.store import CommitResult, Fence, SharedStore, StaleClaimError
from exfm.das.supervisor import SnapshotFM, Supervisor
from exfm.das.worker import DASConfig, Worker, open_backends, read_status
from exfm.das.zeus import MetadataStore, Pointer, SQLiteZeus

__all__ = [
    "Claim",
    "CommitResult",
    "DASConfig",
    "EventLog",
    "Fence",
    "Impression",
    "ImpressionBatch",
    "JoinedExample",
    "Joiner",
    "JoinerConfig",
    "Label",
    "LoadFailure",
    "LoadedSnapshot",
    "MetadataStore",
    "Pointer",
    "SQLiteEventLog",
    "SQLiteWorkQueue",
    "SQLiteZeus",
    "SharedStore",
    "SnapshotError",
    "SnapshotFM",
    "SnapshotInfo",
    "SnapshotLoader",
    "StaleClaimError",
    "Supervision",
    "Supervisor",
    "Updater",
    "Watermark",
    "WorkQueue",
    "Worker",
    "build_served_model",
    "collect_garbage",
    "list_snapshots",
    "load_weights",
    "open_backends",
    "publish_snapshot",
    "read_snapshot",
    "read_status",
    "replay_batches",
    "replay_dataset",
    "replay_into",
    "verify",
    "watermarks",
    "write_snapshot",
]
