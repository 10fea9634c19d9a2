"""The Data Augmentation Service (DAS), embedded backend (work in progress, see the issue tracker).

Built so far:

* events and join: impressions and labels are appended to an :class:`~exfm.das.events.EventLog`;
  the :class:`~exfm.das.joiner.Joiner` emits one example per impression when its label windows
  close; the :class:`~exfm.das.store.SharedStore` commits them exactly once to a day-partitioned
  exfm dataset that the VMs read;
* snapshots: the FM trainer publishes snapshots to the SPD (:mod:`exfm.das.snapshots`); the
  :class:`~exfm.das.loader.Updater` moves the latest-snapshot pointer in Zeus
  (:class:`~exfm.das.zeus.SQLiteZeus`, compare-and-set under a lease); each worker's
  :class:`~exfm.das.loader.SnapshotLoader` hot-swaps verified snapshots and pins what it serves.

Not yet: FM supervision inside the join window, workers and the work queue, ZooKeeper and Redis.
"""

from exfm.das.events import EventLog, Impression, Label, SQLiteEventLog, replay_dataset
from exfm.das.joiner import JoinedExample, Joiner, JoinerConfig
from exfm.das.loader import LoadedSnapshot, LoadFailure, SnapshotLoader, Updater, collect_garbage
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
from exfm.das.store import CommitResult, SharedStore
from exfm.das.zeus import MetadataStore, Pointer, SQLiteZeus

__all__ = [
    "CommitResult",
    "EventLog",
    "Impression",
    "JoinedExample",
    "Joiner",
    "JoinerConfig",
    "Label",
    "LoadFailure",
    "LoadedSnapshot",
    "MetadataStore",
    "Pointer",
    "SQLiteEventLog",
    "SQLiteZeus",
    "SharedStore",
    "SnapshotError",
    "SnapshotInfo",
    "SnapshotLoader",
    "Updater",
    "build_served_model",
    "collect_garbage",
    "list_snapshots",
    "load_weights",
    "publish_snapshot",
    "read_snapshot",
    "replay_dataset",
    "verify",
    "write_snapshot",
]
