"""DAS snapshots: atomic SPD publish, Zeus pointer (CAS, lease, pins), loaders and GC.

The Zeus tests run on every backend (``zeus_harness``: SQLite, and ZooKeeper on a real server).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pyarrow.parquet as pq
import pytest
import torch
from conftest import train_config

from exfm.das.loader import SnapshotLoader, Updater, collect_garbage
from exfm.das.snapshots import (
    DONE_NAME,
    SnapshotError,
    SnapshotInfo,
    list_snapshots,
    load_weights,
    publish_snapshot,
    read_snapshot,
    verify,
    write_snapshot,
)
from exfm.data.dataset import TIME_COLUMN, open_dataset
from exfm.train.config import parse_train_config
from exfm.train.run_dir import open_run
from exfm.train.trainer import train

FM = "fm"
T = TypeVar("T")


def _publish(spd: Path, value: float, train_through_us: int) -> SnapshotInfo:
    return write_snapshot(
        spd, FM, {"w": torch.full((8,), value)}, config={}, schema={}, tasks=[], train_through_us=train_through_us
    )


def _corrupt(info: SnapshotInfo) -> None:
    data = bytearray(info.weights_path.read_bytes())
    data[-4:] = bytes(b ^ 0xFF for b in data[-4:])
    info.weights_path.write_bytes(bytes(data))


class Gate:
    """A ``build`` for loaders that counts calls per snapshot and can hold a load in progress."""

    def __init__(self):
        self.calls: dict[str, int] = {}
        self.started = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self.lock = threading.Lock()

    def __call__(self, info: SnapshotInfo, state: dict[str, torch.Tensor]) -> dict:
        with self.lock:
            self.calls[info.snapshot_id] = self.calls.get(info.snapshot_id, 0) + 1
        self.started.set()
        self.release.wait(10)
        return {"value": float(state["w"][0]), "complete": True}


@pytest.fixture
def spd(tmp_path: Path) -> Path:
    return tmp_path / "spd"


@pytest.fixture
def zeus(zeus_harness):
    """A Zeus store of each backend in turn."""
    return zeus_harness.open()


def test_publish_is_atomic_and_verified(spd):
    first = _publish(spd, 1.0, 100)
    second = _publish(spd, 2.0, 200)
    (spd / "half-written").mkdir()  # no DONE marker: never listed
    (spd / "half-written" / "weights.safetensors").write_bytes(b"partial")
    assert [s.snapshot_id for s in list_snapshots(spd)] == [first.snapshot_id, second.snapshot_id]
    assert read_snapshot(second.path) == second
    assert sorted(p.name for p in second.path.iterdir()) == [DONE_NAME, "manifest.json", "weights.safetensors"]
    verify(second)
    assert torch.equal(load_weights(second)["w"], torch.full((8,), 2.0))
    with pytest.raises(SnapshotError, match="incomplete"):
        read_snapshot(spd / "half-written")
    _corrupt(second)
    with pytest.raises(SnapshotError, match="checksum"):
        verify(second)
    with pytest.raises(SnapshotError, match="checksum"):
        load_weights(second)


def test_publish_from_a_run_rebuilds_the_served_model(tiny_dataset, tmp_path, zeus):
    config = parse_train_config(train_config(tiny_dataset, train_days=[1, 1], eval_days=[]))
    train(config, tmp_path / "run", show_progress=False)
    info = publish_snapshot(tmp_path / "spd", tmp_path / "run", "last", fm=FM)
    dataset = open_dataset(tiny_dataset)
    day_max = max(
        max(pq.read_table(p, columns=[TIME_COLUMN]).column(TIME_COLUMN).to_pylist()) for p in dataset.day_files(1)
    )
    assert info.train_through_us == day_max
    assert zeus.compare_and_set(FM, 0, info.snapshot_id)
    loader = SnapshotLoader(zeus, tmp_path / "spd", FM, "w0")  # default build: the served RecModel
    assert loader.refresh()
    expected, _ = open_run(tmp_path / "run").served_model()
    served = loader.current().model
    assert not served.training
    for key, value in expected.state_dict().items():
        assert torch.equal(served.state_dict()[key], value), key


def test_publish_during_a_load_and_two_in_quick_succession(spd, zeus):
    """Requests only ever see fully loaded snapshots; each is loaded once per worker; GC after the last pin."""
    s1 = _publish(spd, 1.0, 100)
    assert zeus.compare_and_set(FM, 0, s1.snapshot_id)
    gates = [Gate() for _ in range(3)]
    loaders = [SnapshotLoader(zeus, spd, FM, f"w{i}", build=gate) for i, gate in enumerate(gates)]
    for loader in loaders:
        assert loader.refresh()
    assert zeus.pins() == {s1.snapshot_id: {"w0", "w1", "w2"}}

    # s2 is published; worker 0's load of it is held in progress while requests are served
    s2 = _publish(spd, 2.0, 200)
    assert zeus.compare_and_set(FM, 1, s2.snapshot_id)
    gates[0].release.clear()
    gates[0].started.clear()
    background = threading.Thread(target=loaders[0].refresh)
    background.start()
    assert gates[0].started.wait(10)
    answered = {loaders[0].current().model["value"] for _ in range(1000)}
    assert answered == {1.0}  # the old snapshot, never a half-loaded one
    concurrent = threading.Thread(target=loaders[0].refresh)  # waits for the load in progress
    concurrent.start()
    # s3 follows right away, while worker 0 is still loading s2
    s3 = _publish(spd, 3.0, 300)
    assert zeus.compare_and_set(FM, 2, s3.snapshot_id)
    assert collect_garbage(zeus, spd, FM) == []  # s1 and s2 are pinned
    gates[0].release.set()
    background.join(10)
    concurrent.join(10)
    assert loaders[0].current().info.snapshot_id in (s2.snapshot_id, s3.snapshot_id)
    for loader in loaders:
        loader.refresh()
        loader.refresh()
    for loader in loaders:
        assert loader.current().model == {"value": 3.0, "complete": True}
    assert all(count == 1 for gate in gates for count in gate.calls.values())
    assert zeus.pins() == {s3.snapshot_id: {"w0", "w1", "w2"}}
    assert set(collect_garbage(zeus, spd, FM)) == {s1.snapshot_id, s2.snapshot_id}
    assert [s.snapshot_id for s in list_snapshots(spd)] == [s3.snapshot_id]
    assert zeus.pin("w9", s1.snapshot_id) is False  # a collected snapshot can never be pinned again


def test_gc_waits_for_the_last_pin(spd, zeus):
    s1, s2 = _publish(spd, 1.0, 100), _publish(spd, 2.0, 200)
    assert zeus.compare_and_set(FM, 0, s1.snapshot_id)
    fast, slow = (SnapshotLoader(zeus, spd, FM, w, build=Gate()) for w in ("fast", "slow"))
    assert fast.refresh() and slow.refresh()
    assert zeus.compare_and_set(FM, 1, s2.snapshot_id)
    assert fast.refresh()
    assert collect_garbage(zeus, spd, FM) == []  # "slow" still serves s1
    assert slow.refresh()
    assert collect_garbage(zeus, spd, FM) == [s1.snapshot_id]
    assert not s1.path.exists() and s2.path.exists()
    s3 = _publish(spd, 3.0, 300)  # newer than the pointer: not published yet, so never collected
    assert collect_garbage(zeus, spd, FM) == []
    assert s3.path.exists()


def test_a_corrupt_snapshot_is_rejected_and_the_old_one_kept(spd, zeus):
    s1 = _publish(spd, 1.0, 100)
    assert zeus.compare_and_set(FM, 0, s1.snapshot_id)
    gate = Gate()
    loader = SnapshotLoader(zeus, spd, FM, "w0", build=gate)
    assert loader.refresh()
    s2 = _publish(spd, 2.0, 200)
    assert zeus.compare_and_set(FM, 1, s2.snapshot_id)
    _corrupt(s2)  # bit rot after the pointer moved
    assert loader.refresh() is False
    assert loader.current().info.snapshot_id == s1.snapshot_id
    assert [f.snapshot_id for f in loader.failures] == [s2.snapshot_id]
    assert "checksum" in loader.failures[0].reason
    assert s2.snapshot_id not in gate.calls  # never built
    assert zeus.pins() == {s1.snapshot_id: {"w0"}}  # the rejected snapshot is not left pinned
    assert loader.refresh() is False  # tried once only
    # the updater refuses to point at a corrupt snapshot in the first place
    s3 = _publish(spd, 3.0, 300)
    _corrupt(s3)
    updater = Updater(zeus, spd, FM, "u0", lease_s=30, poll_s=1)
    assert updater.step() is None
    assert s3.snapshot_id in updater.rejected
    assert zeus.get_pointer(FM).snapshot_id == s2.snapshot_id


def _race(n: int, fn: Callable[[int], T]) -> list[T]:
    """Run ``fn(0), ..., fn(n - 1)`` on n threads released together; their results."""
    barrier = threading.Barrier(n)
    results: list[T] = []

    def racer(i: int) -> None:
        barrier.wait()
        results.append(fn(i))

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(results) == n
    return results


def test_racing_compare_and_set_has_one_winner(zeus):
    """8 racers read the same version; exactly one CAS succeeds per change."""
    for expected in range(5):
        wins = _race(8, lambda i, v=expected: zeus.compare_and_set(FM, v, f"s{v}-from-{i}"))
        assert wins.count(True) == 1
        assert zeus.get_pointer(FM).version == expected + 1


def test_racing_updaters_change_the_pointer_once_per_snapshot(spd, zeus_harness):
    """8 updater threads share one store (SQLite: a connection per call; ZooKeeper: one session)."""
    zeus = zeus_harness.open()
    updaters = [Updater(zeus, spd, FM, f"u{i}", lease_s=30, poll_s=1) for i in range(8)]
    published = []
    for value in range(1, 4):
        published.append(_publish(spd, float(value), 100 * value).snapshot_id)
        changes = [r for _ in range(3) for r in _race(len(updaters), lambda i: updaters[i].step()) if r]
        assert changes == [published[-1]]
        assert zeus.get_pointer(FM).snapshot_id == published[-1]
        zeus_harness.lapse(zeus, 40)  # the lease lapses: next round any updater may take over
    assert zeus.get_pointer(FM).version == len(published)


def test_lease_expiry_lets_another_updater_take_over(spd, zeus_harness):
    """Two tasks, each its own store (ZooKeeper: its own session, whose expiry ends its lease)."""
    clock = zeus_harness.clock  # SQLite's lease clock (ZooKeeper leases last as long as the session)
    zeus, other = zeus_harness.open(), zeus_harness.open()
    first = Updater(zeus, spd, FM, "a", lease_s=10, poll_s=2)
    second = Updater(other, spd, FM, "b", lease_s=10, poll_s=2)
    s1 = _publish(spd, 1.0, 100)
    assert first.step() == s1.snapshot_id
    clock.now += 8
    assert first.step() is None  # nothing newer; the lease is extended to now + 10
    clock.now += 8
    s2 = _publish(spd, 2.0, 200)
    assert second.step() is None  # "a" still holds the lease
    assert zeus.get_pointer(FM).snapshot_id == s1.snapshot_id
    zeus_harness.lapse(zeus, 3)  # "a" stopped polling: its lease has expired
    assert second.step() == s2.snapshot_id
    assert zeus.get_pointer(FM).lease_owner == "b"
    # a stale updater that read the old version cannot overwrite (version fences it)
    assert zeus.compare_and_set(FM, 1, s1.snapshot_id) is False
    assert first.step() is None
    assert zeus.get_pointer(FM).snapshot_id == s2.snapshot_id


def test_updater_run_extends_the_lease_until_stopped(spd, zeus):
    s1 = _publish(spd, 1.0, 100)
    updater = Updater(zeus, spd, FM, "a", lease_s=1.0, poll_s=0.01)
    stop = threading.Event()
    thread = threading.Thread(target=updater.run, args=(stop,))
    thread.start()
    for _ in range(500):
        if zeus.get_pointer(FM).snapshot_id == s1.snapshot_id:
            break
        stop.wait(0.01)
    assert zeus.get_pointer(FM).lease_owner == "a"
    stop.set()
    thread.join(10)
    pointer = zeus.get_pointer(FM)
    assert (pointer.snapshot_id, pointer.lease_owner) == (s1.snapshot_id, None)
    with pytest.raises(ValueError, match="lease_s"):
        Updater(zeus, spd, FM, "b", lease_s=1, poll_s=1)
