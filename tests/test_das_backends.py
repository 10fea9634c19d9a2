"""The DAS backends against each other: one test body per behaviour, run on every backend.

Event log and work queue: SQLite (embedded) and Redis; Zeus: SQLite and ZooKeeper. The Redis and
ZooKeeper servers are real ones started by the fixtures in ``conftest.py`` (skipped if missing,
unless ``EXFM_REQUIRE_SERVICES=1``). The last tests kill -9 and restart the servers.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import TINY_SCHEMA, make_tiny_dataset
from services import expire_session, unique, wait_for

from exfm.das.events import (
    Impression,
    ImpressionBatch,
    Label,
    SQLiteEventLog,
    Watermark,
    partition_of,
    replay_into,
    watermarks,
)
from exfm.das.queue import SQLiteWorkQueue, fair_share

FM = "fm"
T = TypeVar("T")


def race(n: int, fn: Callable[[int], T]) -> list[T]:
    """Run ``fn(0), ..., fn(n - 1)`` on n threads released together; their results, by i."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def racer(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    if errors:
        raise errors[0]
    return results


@pytest.fixture(params=["sqlite", "redis"])
def make_log(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[int], Any]]:
    """Opens the test's event log (each call another connection to the same log)."""
    opened: list[Any] = []
    if request.param == "sqlite":

        def make(partitions: int) -> Any:
            opened.append(SQLiteEventLog(tmp_path / "log.db", partitions))
            return opened[-1]

    else:
        from exfm.das.redis_backend import RedisEventLog

        client, prefix = request.getfixturevalue("redis_client"), unique("test:")

        def make(partitions: int) -> Any:
            opened.append(RedisEventLog(client, partitions, prefix=prefix))
            return opened[-1]

    yield make
    for log in opened:
        log.close()


@pytest.fixture(params=["sqlite", "redis"])
def make_queue(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[int], Any]:
    """Opens the test's work queue (each call another handle on the same queue)."""
    if request.param == "sqlite":
        return lambda partitions: SQLiteWorkQueue(tmp_path / "queue.db", partitions)
    from exfm.das.redis_backend import RedisWorkQueue

    client, prefix = request.getfixturevalue("redis_client"), unique("test:")
    return lambda partitions: RedisWorkQueue(client, partitions, prefix=prefix)


# --- event log ---------------------------------------------------------------------------------


def test_log_absorbs_resent_impressions_and_labels(make_log):
    log = make_log(3)
    first = Impression("r1", 100, {"user": 7, "price": 1.5, "hist": [1, 2], "gap": None}, "a", ("click", "like"))
    resent = Impression("r1", 100, {"user": 8}, "b")  # same request id: the first one is kept
    labels = [
        Label("r1", "click", 1, 150),
        Label("r1", "click", 1, 150),  # an exact resend
        Label("r1", "click", 0, 160),  # a distinct label of the same task: kept
        Label("r1", "like", 1, 150),
    ]
    other = Impression("r2", 90)
    assert log.append([first, resent, *labels, other]) == 5
    assert log.append([other, first, *labels]) == 0
    assert make_log(3).append([resent]) == 0  # another connection sees the same keys
    entries = log.read(partition_of("r1", 3))
    assert [e for _, e in entries if e.request_id == "r1"] == [first, labels[0], labels[2], labels[3]]
    assert [e for _, e in log.read(partition_of("r2", 3)) if e.request_id == "r2"] == [other]
    with pytest.raises(ValueError, match="0 or 1"):
        log.append([Label("r3", "click", 2, 1)])
    assert sum(log.backlog(p) for p in range(3)) == 5


def test_log_routes_each_request_to_its_partition(make_log):
    log = make_log(4)
    labels = [Label(f"r{i}", "click", 1, 100 + i) for i in range(0, 40, 3)]
    events = [Impression(f"r{i}", i) for i in range(40)] + labels
    assert log.append(events) == len(events)
    assert len({partition_of(f"r{i}", 4) for i in range(40)}) == 4
    seen = []
    for partition in range(4):
        entries = log.read(partition)
        assert entries and all(partition_of(e.request_id, 4) == partition for _, e in entries)
        assert log.backlog(partition) == len(entries)
        seen += [e for _, e in entries]
    assert sorted(seen, key=repr) == sorted(events, key=repr)
    assert log.read(7) == [] and log.backlog(7) == 0  # no such partition: nothing there


def test_log_splits_impression_batches_and_routes_watermarks(make_log):
    log = make_log(3)
    ids = [f"r{i}" for i in range(12)]
    batch = ImpressionBatch(pa.table({"_request_id": ids, "_time": list(range(12)), "user": list(range(12))}))
    touched = {partition_of(rid, 3) for rid in ids}
    assert log.append([batch, *watermarks(500, 3)]) == len(touched) + 3
    assert log.append([batch, Watermark(1, 500)]) == 0  # exact resends
    for partition in range(3):
        entries = [event for _, event in log.read(partition)]
        batches = [e for e in entries if isinstance(e, ImpressionBatch)]
        assert [rid for b in batches for rid in b.request_ids] == [r for r in ids if partition_of(r, 3) == partition]
        assert all(b.table.column("user").to_pylist() == [int(r[1:]) for r in b.request_ids] for b in batches)
        assert entries[-1] == Watermark(partition, 500)
    with pytest.raises(ValueError, match="watermark for partition 3"):
        log.append([Watermark(3, 1)])


def test_log_reads_after_an_offset_in_append_order(make_log):
    log = make_log(1)
    events = [Impression(f"r{i}", 1000 - i) for i in range(25)]  # later appends, earlier event times
    log.append(events[:10])
    log.append(events[10:])
    pages, after = [], None
    while batch := log.read(0, after, limit=7):
        pages.append(batch)
        after = batch[-1][0]
    assert [len(page) for page in pages] == [7, 7, 7, 4]
    entries = [entry for page in pages for entry in page]
    assert [e for _, e in entries] == events  # append order, not event time
    assert len({offset for offset, _ in entries}) == 25
    assert log.read(0) == entries
    assert log.read(0, entries[4][0], limit=2) == entries[5:7]
    assert log.read(0, entries[-1][0]) == []
    assert log.backlog(0) == 25
    assert log.backlog(0, entries[9][0]) == 15
    assert log.backlog(0, entries[-1][0]) == 0


def test_trim_drops_committed_entries_but_keeps_deduplication(make_log):
    log = make_log(1)
    events = [Impression(f"r{i}", i) for i in range(10)] + [Label("r3", "click", 1, 50)]
    assert log.append(events) == 11
    entries = log.read(0)
    log.trim(0, entries[5][0])
    assert log.read(0) == entries[6:]
    assert log.backlog(0) == 5
    assert log.read(0, entries[2][0]) == entries[6:]  # reading from an offset already trimmed
    assert log.backlog(0, entries[2][0]) == 5
    assert log.append(events) == 0  # resends of trimmed and of kept events alike
    assert log.read(0) == entries[6:]
    log.trim(0, entries[-1][0])
    assert log.read(0) == [] and log.backlog(0) == 0
    new = Impression("r99", 99)
    assert log.append([new, *events]) == 1
    assert [e for _, e in log.read(0, entries[-1][0])] == [new]
    assert log.backlog(0, entries[-1][0]) == 1
    assert len(log) == 12  # every event ever appended


def test_log_partition_count_is_fixed(make_log):
    make_log(4).append([Impression("r", 1)])
    assert [e for _, e in make_log(4).read(partition_of("r", 4))] == [Impression("r", 1)]
    with pytest.raises(ValueError, match="has 4 partitions, not 2"):
        make_log(2)
    with pytest.raises(ValueError, match=">= 1"):
        make_log(0)


# --- work queue --------------------------------------------------------------------------------


def test_claim_renew_release(make_queue):
    queue = make_queue(4)
    a = queue.claim("w1", 0, 30)
    assert a is not None and (a.partition, a.worker_id, a.token) == (0, "w1", 1)
    assert queue.claim("w2", 0, 30) is None
    assert queue.claim("w1", 0, 30) is None  # not even its holder claims it twice
    b = queue.claim("w2", 1, 30)
    assert b is not None and b.token == 1  # tokens count per partition
    renewed = queue.renew(a, 60)
    assert renewed is not None and renewed.token == a.token and renewed.expires_at > a.expires_at
    holders = queue.holders()
    assert {p: (c.worker_id, c.token) for p, c in holders.items()} == {0: ("w1", 1), 1: ("w2", 1)}
    assert holders[0].expires_at > time.time() + 50
    queue.release(b)
    assert 1 not in queue.holders()
    assert queue.renew(b, 30) is None  # a released claim does not come back
    c = queue.claim("w3", 1, 30)
    assert c is not None and c.token > b.token
    queue.release(b)  # a lost claim: no-op
    assert queue.holders()[1].worker_id == "w3"
    with pytest.raises(ValueError, match="out of range"):
        queue.claim("w1", 4, 30)


def test_an_expired_claim_is_taken_over_with_a_larger_token(make_queue):
    queue = make_queue(2)
    old = queue.claim("w1", 0, 0.2)
    time.sleep(0.3)  # w1 paused past its lease
    assert queue.holders() == {}
    new = queue.claim("w2", 0, 30)
    assert new is not None and new.token > old.token
    assert queue.renew(old, 30) is None  # fenced: the partition was taken with a newer token
    queue.release(old)
    assert (queue.holders()[0].worker_id, queue.holders()[0].token) == ("w2", new.token)


def test_an_expired_claim_nobody_took_can_be_renewed(make_queue):
    queue = make_queue(1)
    claim = queue.claim("w1", 0, 0.2)
    time.sleep(0.3)
    renewed = queue.renew(claim, 30)
    assert renewed is not None and renewed.token == claim.token
    assert (queue.holders()[0].worker_id, queue.holders()[0].token) == ("w1", claim.token)
    assert queue.claim("w2", 0, 30) is None


def test_racing_claims_have_one_winner(make_queue):
    queues = [make_queue(1) for _ in range(8)]
    tokens = [0]
    for _ in range(3):
        claims = race(8, lambda i: queues[i].claim(f"w{i}", 0, 30))
        winners = [c for c in claims if c is not None]
        assert len(winners) == 1 and winners[0].token > tokens[-1]
        tokens.append(winners[0].token)
        queues[0].release(winners[0])


def test_heartbeats_give_the_live_workers_and_their_fair_share(make_queue):
    queue = make_queue(8)
    for worker in ("w2", "w1", "w3"):
        queue.heartbeat(worker, 30)
    queue.heartbeat("w4", 0.5)
    assert queue.live_workers() == ["w1", "w2", "w3", "w4"]
    time.sleep(0.6)
    assert queue.live_workers() == ["w1", "w2", "w3"]  # w4 stopped heartbeating
    assert fair_share(queue.partitions, len(queue.live_workers())) == 3
    queue.leave("w2")
    assert queue.live_workers() == ["w1", "w3"]
    queue.heartbeat("w4", 30)
    workers = queue.live_workers()
    assert workers == ["w1", "w3", "w4"]
    share = fair_share(queue.partitions, len(workers))
    held: dict[str, list[int]] = {w: [] for w in workers}
    for worker in workers:  # each claims free partitions up to its share
        for partition in range(queue.partitions):
            if len(held[worker]) < share and queue.claim(worker, partition, 30):
                held[worker].append(partition)
    assert sorted(p for ps in held.values() for p in ps) == list(range(8))
    assert {p: c.worker_id for p, c in queue.holders().items()} == {p: w for w, ps in held.items() for p in ps}


# --- Zeus --------------------------------------------------------------------------------------


def test_zeus_racing_compare_and_set_from_separate_connections(zeus_harness):
    stores = [zeus_harness.open() for _ in range(8)]
    assert stores[0].get_pointer(FM).version == 0
    for expected in range(4):
        wins = race(8, lambda i, v=expected: stores[i].compare_and_set(FM, v, f"s{v}-from-{i}"))
        assert wins.count(True) == 1
        pointer = stores[-1].get_pointer(FM)
        assert pointer.version == expected + 1
        assert pointer.snapshot_id == f"s{expected}-from-{wins.index(True)}"
    assert stores[1].compare_and_set(FM, 2, "stale") is False
    assert stores[1].get_pointer("other-fm").version == 0


def test_zeus_lease_is_exclusive_and_guards_compare_and_set(zeus_harness):
    stores = [zeus_harness.open() for _ in range(6)]
    wins = race(6, lambda i: stores[i].acquire_lease(FM, f"o{i}", 30))
    assert wins.count(True) == 1
    a, owner = stores[wins.index(True)], f"o{wins.index(True)}"
    b = stores[(wins.index(True) + 1) % 6]
    assert a.acquire_lease(FM, owner, 30)  # the holder extends it
    assert not b.acquire_lease(FM, "b", 30)
    assert b.get_pointer(FM).lease_owner == owner
    assert not b.compare_and_set(FM, 0, "s1", owner="b")
    assert a.compare_and_set(FM, 0, "s1", owner=owner)
    assert not a.compare_and_set(FM, 0, "s2", owner=owner)  # the version moved on
    b.release_lease(FM, "b")  # not the holder: no-op
    assert b.get_pointer(FM).lease_owner == owner
    a.release_lease(FM, owner)
    assert b.get_pointer(FM).lease_owner is None
    assert not a.compare_and_set(FM, 1, "s2", owner=owner)  # released: no longer the holder
    assert b.acquire_lease(FM, "b", 30)
    assert b.compare_and_set(FM, 1, "s2", owner="b")
    pointer = a.get_pointer(FM)
    assert (pointer.snapshot_id, pointer.version, pointer.lease_owner) == ("s2", 2, "b")


def test_zeus_lease_lapse_lets_another_owner_take_over(zeus_harness):
    a, b = zeus_harness.open(), zeus_harness.open()
    assert a.acquire_lease(FM, "a", 10)
    assert a.compare_and_set(FM, 0, "s1", owner="a")
    assert not b.acquire_lease(FM, "b", 10)
    zeus_harness.lapse(a)  # a stops heartbeating (SQLite: the clock passes; ZooKeeper: its session expires)
    assert b.acquire_lease(FM, "b", 10)
    assert not a.acquire_lease(FM, "a", 10)
    assert not a.compare_and_set(FM, 1, "s2", owner="a")
    assert b.compare_and_set(FM, 1, "s2", owner="b")
    assert a.get_pointer(FM).snapshot_id == "s2"


def test_zeus_pins_and_collection(zeus_harness):
    z, other = zeus_harness.open(), zeus_harness.open()
    assert z.pin("w1", "s1") and z.pin("w1", "s1") and z.pin("w2", "s1")
    assert other.pin("w3", "s2")
    assert z.pins() == other.pins() == {"s1": {"w1", "w2"}, "s2": {"w3"}}
    assert z.compare_and_set(FM, 0, "s3")
    assert z.claim_for_collection(["s1", "s2", "s3", "s4"]) == ["s4"]  # pinned, pinned, pointed at, free
    z.unpin("w1", "s1")
    z.unpin("w9", "s1")  # not pinned: no-op
    assert other.claim_for_collection(["s1"]) == []
    other.unpin("w2", "s1")  # another connection may drop a worker's pin
    assert other.claim_for_collection(["s1", "s3"]) == ["s1"]
    assert not z.pin("w1", "s1")  # a collected snapshot is never pinned again
    assert z.claim_for_collection(["s1", "s4"]) == ["s1", "s4"]  # already claimed: reported again
    assert z.pins() == {"s2": {"w3"}}
    assert z.compare_and_set(FM, 1, "s2")
    other.unpin("w3", "s2")
    assert z.claim_for_collection(["s2", "s3"]) == ["s3"]  # the pointer moved off s3 and onto s2


def test_zeus_claim_for_collection_and_pin_race_safely(zeus_harness):
    pinner, collector = zeus_harness.open(), zeus_harness.open()
    for round_ in range(24):  # which one wins a round is up to the scheduler (both happen)
        snapshot = f"s{round_}"
        if round_ % 3 == 0:
            assert pinner.pin("old", snapshot)  # an earlier pin that is dropped during the race
        calls = [lambda s=snapshot: pinner.pin("w", s), lambda s=snapshot: collector.claim_for_collection([s])]
        if round_ % 3 == 0:
            calls.append(lambda s=snapshot: pinner.unpin("old", s))
        results = race(len(calls), lambda i, calls=calls: calls[i]())
        pinned, claimed = results[0], results[1] == [snapshot]
        assert pinned != claimed, (snapshot, pinned, claimed)  # exactly one of them wins
        assert (snapshot in collector.pins()) == pinned


def test_zookeeper_pins_and_lease_end_with_the_session(zookeeper_server, zookeeper_root):
    from exfm.das.zookeeper import ZooKeeperZeus

    worker = ZooKeeperZeus(zookeeper_server.hosts, root=zookeeper_root)
    gc = ZooKeeperZeus(zookeeper_server.hosts, root=zookeeper_root)
    try:
        assert worker.pin("w1", "s1") and worker.acquire_lease(FM, "w1", 10)
        assert gc.claim_for_collection(["s1"]) == []
        worker.close()  # the session ends: its ephemeral pin and lease go at once
        assert gc.pins() == {}
        assert gc.get_pointer(FM).lease_owner is None
        assert gc.claim_for_collection(["s1"]) == ["s1"]
        assert gc.acquire_lease(FM, "gc", 10)
    finally:
        gc.close()


def test_zookeeper_pins_of_a_killed_process_expire(zookeeper_server, zookeeper_root):
    code = (
        "import sys, time\n"
        "from exfm.das.zookeeper import ZooKeeperZeus\n"
        "zeus = ZooKeeperZeus(sys.argv[1], root=sys.argv[2], session_timeout_s=1.0)\n"
        "assert zeus.pin('crashed', 's1') and zeus.acquire_lease('fm', 'crashed', 1)\n"
        "print('pinned', flush=True)\n"
        "time.sleep(120)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code, zookeeper_server.hosts, zookeeper_root], stdout=subprocess.PIPE
    )
    from exfm.das.zookeeper import ZooKeeperZeus

    gc = ZooKeeperZeus(zookeeper_server.hosts, root=zookeeper_root)
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == b"pinned"
        assert gc.pins() == {"s1": {"crashed"}}
        assert gc.get_pointer(FM).lease_owner == "crashed"
        process.kill()  # no goodbye: the session expires after its timeout (1 s)
        process.wait(10)
        assert wait_for(lambda: gc.pins() == {}, timeout_s=15)
        assert wait_for(lambda: gc.get_pointer(FM).lease_owner is None, timeout_s=15)
        assert gc.claim_for_collection(["s1"]) == ["s1"]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        gc.close()


def test_zookeeper_pins_come_back_after_a_session_expiry(zookeeper_server, zookeeper_root):
    """A live client whose session expired (a long pause) re-creates its pins, not its lease."""
    from exfm.das.zookeeper import ZooKeeperZeus

    z = ZooKeeperZeus(zookeeper_server.hosts, root=zookeeper_root)
    other = ZooKeeperZeus(zookeeper_server.hosts, root=zookeeper_root)
    try:
        assert z.pin("w1", "s1") and z.pin("w1", "s2") and z.pin("w2", "s3")
        z.unpin("w1", "s2")
        assert z.acquire_lease(FM, "w1", 10)
        assert other.claim_for_collection(["s3"]) == []
        other.unpin("w2", "s3")
        assert other.claim_for_collection(["s3"]) == ["s3"]
        expire_session(z.client, zookeeper_server.hosts)
        assert wait_for(lambda: other.pins() == {"s1": {"w1"}})
        assert other.get_pointer(FM).lease_owner is None  # the updater takes it again at its next step
        assert z.acquire_lease(FM, "w1", 10)
    finally:
        z.close()
        other.close()


# --- server restarts ---------------------------------------------------------------------------


def _while_down(server: Any, call: Callable[[], T]) -> T:
    """Kill ``server``, start ``call`` (which must wait and retry), restart the server, return its result."""
    server.kill()
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = call()
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.3)
    assert thread.is_alive(), result  # still retrying: the server is down
    server.restart()  # from the main thread (the server dies with the thread that started it)
    thread.join(30)
    assert not thread.is_alive()
    if "error" in result:
        raise result["error"]
    return result["value"]


def test_redis_kill_and_restart_keeps_the_log_and_the_tokens(fresh_redis_server):
    from exfm.das.redis_backend import RedisEventLog, RedisWorkQueue, connect_redis

    client = connect_redis(fresh_redis_server.url)
    log, queue = RedisEventLog(client, 2, prefix="r"), RedisWorkQueue(client, 2, prefix="r")
    events = [Impression(f"r{i}", i) for i in range(20)] + [Label("r1", "click", 1, 5)]
    assert log.append(events) == 21
    before = {p: log.read(p) for p in range(2)}
    first = queue.claim("w1", 0, 30)
    queue.release(first)
    second = queue.claim("w1", 0, 30)
    assert second is not None and second.token > first.token

    new = Impression("new", 99)
    assert _while_down(fresh_redis_server, lambda: log.append([*events, new])) == 1  # waited for the restart

    after = {p: log.read(p) for p in range(2)}
    assert after[partition_of("new", 2)][-1][1] == new
    assert {p: entries[: len(before[p])] for p, entries in after.items()} == before
    assert {p: (c.worker_id, c.token) for p, c in queue.holders().items()} == {0: ("w1", second.token)}
    queue.release(second)
    third = queue.claim("w2", 0, 30)
    assert third is not None and third.token > second.token
    with pytest.raises(ValueError, match="partitions"):
        RedisEventLog(client, 3, prefix="r")
    client.close()


def test_zookeeper_kill_and_restart_keeps_pointer_version_and_session(fresh_zookeeper_server):
    from exfm.das.zookeeper import ZooKeeperZeus

    hosts = fresh_zookeeper_server.hosts
    z = ZooKeeperZeus(hosts, root="/restart")
    try:
        assert z.compare_and_set(FM, 0, "s1") and z.compare_and_set(FM, 1, "s2")
        assert z.acquire_lease(FM, "u", 10) and z.pin("w", "s2")

        pointer = _while_down(fresh_zookeeper_server, lambda: z.get_pointer(FM))

        assert (pointer.snapshot_id, pointer.version, pointer.lease_owner) == ("s2", 2, "u")
        assert z.compare_and_set(FM, 2, "s3", owner="u")  # the session survived: the lease is still held
        assert z.pins() == {"s2": {"w"}}
        fresh = ZooKeeperZeus(hosts, root="/restart")
        assert fresh.get_pointer(FM).version == 3
        fresh.close()
    finally:
        z.close()


# --- end to end --------------------------------------------------------------------------------


def test_workers_replay_a_dataset_on_the_distributed_backend(
    tmp_path, redis_server, redis_client, zookeeper_server, zookeeper_root
):
    """Two workers on Redis + ZooKeeper join a replayed dataset into the store, exactly once."""
    from kazoo.client import KazooClient

    from exfm.das.worker import DASConfig, Worker, open_backends
    from exfm.data.dataset import REQUEST_ID_COLUMN, open_dataset

    chroot = KazooClient(hosts=zookeeper_server.hosts)
    chroot.start()
    chroot.ensure_path(zookeeper_root)
    chroot.stop()
    chroot.close()
    data = make_tiny_dataset(tmp_path / "tiny", rows_per_day=150, days=2)
    (tmp_path / "schema.yaml").write_text(yaml.safe_dump(TINY_SCHEMA))
    settings = {
        "backend": "distributed",
        "redis_url": redis_server.url,
        "zookeeper_hosts": zookeeper_server.hosts + zookeeper_root,
        "root": "das",
        "store": "shared",
        "spd": "spd",
        "schema": "schema.yaml",
        "windows_s": {"click": 900.0, "like": 3600.0},
        "partitions": 4,
        "lease_s": 2.0,
        "renew_s": 0.25,
        "read_batch": 64,
    }
    (tmp_path / "das.yaml").write_text(yaml.safe_dump(settings))
    config = DASConfig.load(tmp_path / "das.yaml")
    backends = [open_backends(config) for _ in range(3)]  # a producer and two workers
    try:
        assert replay_into(backends[0].log, data, [1, 2], close_with_watermark_us=3601 * 10**6) > 0
        workers = [Worker(config, f"w{i}", backends[i + 1]) for i in range(2)]
        threads = [threading.Thread(target=w.run, kwargs={"until_idle_s": 1.0}) for w in workers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert sum(w.counters["committed"] for w in workers) == 300
    finally:
        for backend in backends:
            backend.zeus.close()
            backend.log.close()

    def read(root: Path) -> pa.Table:
        dataset = open_dataset(root)
        files = [f for info in dataset.manifest.days for f in dataset.day_files(info.day)]
        return pa.concat_tables(pq.read_table(f) for f in files)

    source, joined = read(data), read(config.store)
    assert joined.num_rows == source.num_rows == 300
    ids = joined[REQUEST_ID_COLUMN].to_numpy(zero_copy_only=False)
    assert sorted(ids) == sorted(f"{d}:{r}" for d in (1, 2) for r in range(150)) and len(np.unique(ids)) == 300
    joined = joined.sort_by([("_time", "ascending"), (REQUEST_ID_COLUMN, "ascending")])
    assert joined.select(source.column_names).to_pylist() == source.sort_by("_time").to_pylist()
