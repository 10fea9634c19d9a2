"""DAS workers: replay end to end, supervision under a budget, kill -9, SIGSTOP, fencing, status."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import TINY_SCHEMA, make_tiny_dataset, train_config

from exfm.das.events import Impression, Label, replay_dataset, replay_into, watermarks
from exfm.das.joiner import JoinedExample
from exfm.das.loader import Updater
from exfm.das.snapshots import list_snapshots, load_weights, publish_snapshot
from exfm.das.store import REQUEST_ID_COLUMN, Fence, StaleClaimError
from exfm.das.supervisor import SnapshotFM, Supervisor
from exfm.das.worker import DASConfig, Worker, format_status, open_backends, read_status
from exfm.das.zeus import SQLiteZeus
from exfm.data.dataset import open_dataset
from exfm.data.reader import decode_table
from exfm.distill.supervision import FM_SNAPSHOT_COLUMN, FM_TRAINED_THROUGH_COLUMN
from exfm.train.config import parse_train_config
from exfm.train.trainer import train

WINDOWS = {"click": 900.0, "like": 3600.0}
CLOSE_US = 3601 * 10**6  # a watermark this far after the last impression closes every window


def write_config(root: Path, **changes) -> DASConfig:
    """A DAS deployment under ``root`` (schema, SPD and store beside the config)."""
    (root / "schema.yaml").write_text(yaml.safe_dump(TINY_SCHEMA))
    config = {
        "root": "das",
        "store": "shared",
        "spd": "spd",
        "schema": "schema.yaml",
        "windows_s": WINDOWS,
        "partitions": 4,
        "lease_s": 2.0,
        "renew_s": 0.25,
        "read_batch": 128,
    }
    config.update(changes)
    (root / "das.yaml").write_text(yaml.safe_dump(config))
    return DASConfig.load(root / "das.yaml")


def replay(log, data: Path, days: list[int], **options) -> int:
    """Replay days of a dataset as live batches: at most half the shortest window of event time each."""
    return replay_into(log, data, days, max_span_us=int(min(WINDOWS.values()) * 1e6) // 2, **options)


def read_store(root: Path) -> pa.Table:
    dataset = open_dataset(root)
    files = [f for info in dataset.manifest.days for f in dataset.day_files(info.day)]
    return pa.concat_tables(pq.read_table(f) for f in files) if files else pa.table({})


def run_workers(config: DASConfig, count: int, until_idle_s: float = 1.5) -> list[Worker]:
    workers = [Worker(config, f"w{i}") for i in range(count)]
    for worker in workers:  # all members from the start: each claims its share, no rebalancing
        worker.backends.queue.heartbeat(worker.worker_id, config.lease_s)
    threads = [threading.Thread(target=w.run, kwargs={"until_idle_s": until_idle_s}) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return workers


@pytest.fixture(scope="module")
def fm_world(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny dataset and an FM snapshot trained on its days 1-2 (shared by the tests of this module)."""
    root = tmp_path_factory.mktemp("fm_world")
    data = make_tiny_dataset(root / "tiny", rows_per_day=300)
    train(parse_train_config(train_config(data, train_days=[1, 2], eval_days=[3]), "test"), root / "run")
    return data, root / "run"


@pytest.mark.parametrize("events", ["single", "batched"])
def test_replay_through_two_workers_equals_the_dataset_plus_fm_predictions(tmp_path: Path, fm_world, events):
    data, run = fm_world
    config = write_config(tmp_path, fm="fm", read_batch=64, fm_latency_budget_s=60.0)  # every row supervised
    info = publish_snapshot(config.spd, run, "last", fm="fm")
    backends = open_backends(config)
    assert Updater(backends.zeus, config.spd, "fm", "deployer").step() == info.snapshot_id
    log = backends.log
    if events == "single":
        for impression, labels in replay_dataset(data, [1, 2, 3, 4]):
            log.append([*labels, impression])  # labels before their impression: held, then joined
        log.append(watermarks(10**17, config.partitions))
    else:  # impression batches of 100 rows, split by partition in the log
        replay(log, data, [1, 2, 3, 4], batch_rows=100, close_with_watermark_us=CLOSE_US)
    workers = run_workers(config, 2)

    source = read_store(data)
    joined = read_store(config.store)
    assert joined.num_rows == source.num_rows == 1200
    order = np.argsort(joined[REQUEST_ID_COLUMN].to_numpy(zero_copy_only=False), kind="stable")
    expected_ids = sorted(f"{d}:{r}" for d in (1, 2, 3, 4) for r in range(300))
    assert joined[REQUEST_ID_COLUMN].take(order).to_pylist() == expected_ids
    # same examples and labels as the direct ingest (files are in commit order: compare in time order)
    joined = joined.sort_by([("_time", "ascending"), (REQUEST_ID_COLUMN, "ascending")])
    assert joined.select(source.column_names).to_pylist() == source.sort_by("_time").to_pylist()
    # the FM's predictions: every row supervised by the snapshot, equal to the FM on the stored row
    assert joined[FM_SNAPSHOT_COLUMN].to_pylist() == [info.snapshot_id] * 1200
    assert set(joined[FM_TRAINED_THROUGH_COLUMN].to_pylist()) == {info.train_through_us}
    fm = SnapshotFM.build(info, load_weights(info))
    batch = decode_table(joined, fm.schema, fm.domains, fm.normalizer)
    with torch.no_grad():
        logits = fm.model(batch, heads=list(fm.tasks))
    for task in fm.tasks:
        np.testing.assert_allclose(joined[f"fm:{task}"].to_numpy(), torch.sigmoid(logits[task]).numpy(), rtol=1e-5)
    # one inference per stored example, shared by every VM that reads the store
    assert sum(w.supervisor.counters["fm_rows"] for w in workers) == 1200
    assert [w.status()["snapshot"] for w in workers] == [info.snapshot_id] * 2  # reported once stopped too
    assert sum(w.counters["committed"] for w in workers) == 1200
    assert all(w.counters["committed"] > 0 for w in workers)  # the partitions were shared


def test_duplicates_late_labels_and_a_whole_replayed_batch_leave_the_store_unchanged(tmp_path: Path, fm_world):
    data, _ = fm_world
    config = write_config(tmp_path)
    log = open_backends(config).log
    replay(log, data, [1, 2], close_with_watermark_us=CLOSE_US)
    run_workers(config, 1, until_idle_s=0.5)
    before = read_store(config.store)
    first_rid = before[REQUEST_ID_COLUMN][0].as_py()
    # the whole batch again (a producer that resends), a late label, a fresh worker
    assert replay(log, data, [1, 2], close_with_watermark_us=CLOSE_US) == 0  # resends absorbed by the log
    log.append([Label(first_rid, "like", 1, before["_time"][0].as_py() + 10)])  # arrives after emission
    workers = run_workers(config, 2, until_idle_s=0.5)
    assert read_store(config.store).to_pylist() == before.to_pylist()
    assert before.num_rows == 600 and sum(w.counters["committed"] for w in workers) == 0
    # a fresh joiner does not know the request was emitted: the label is held as an early label
    # (and would end as an orphan), never joined into a new example (counted once per worker that
    # read it: the partition may move from the first worker to start to the second)
    assert 1 <= sum(w.join_counters["early_labels"] for w in workers) <= 2


class StubFM:
    """An FM that sleeps ``delay_s`` per call, or raises; predicts 0.5 for click."""

    def __init__(self, delay_s: float = 0.0, fail: bool = False):
        self.delay_s, self.fail = delay_s, fail
        self.info = SimpleNamespace(snapshot_id="stub", train_through_us=0)

    def predict(self, impressions):
        if self.fail:
            raise RuntimeError("the FM is down")
        time.sleep(self.delay_s)
        return {"click": np.full(len(impressions), 0.5)}


@pytest.mark.parametrize(
    ("fm", "counter"),
    [(StubFM(delay_s=30.0), "unsupervised_timeout"), (StubFM(fail=True), "unsupervised_error"), (None, None)],
)
def test_a_slow_or_failing_fm_never_holds_back_the_window(tmp_path: Path, fm_world, fm, counter):
    data, _ = fm_world
    config = write_config(tmp_path, fm_latency_budget_s=0.2, fm_batch=10_000)
    replay(open_backends(config).log, data, [1], close_with_watermark_us=CLOSE_US)
    worker = Worker(config.model_copy(update={"fm": None if fm is None else "stub"}), "w")
    if fm is not None:
        worker.supervisor.current_fm = lambda: fm
    started = time.monotonic()
    worker.run(until_idle_s=0.3)
    took = time.monotonic() - started
    stored = read_store(config.store)
    assert stored.num_rows == 300  # everything emitted ...
    assert stored["fm:click"].null_count == 300  # ... without supervision
    counters = worker.supervisor.counters
    assert counters["emitted"] == 300
    if counter is None:
        assert counters["fm_calls"] == counters["unsupervised_no_snapshot"] == 0  # no FM configured: no calls
        return
    assert counters[counter] == 300 and counters["supervised"] == 0
    assert took < 10  # a 30 s FM call did not hold the windows back


def test_a_healthy_stub_fm_supervises_every_example(tmp_path: Path, fm_world):
    data, _ = fm_world
    config = write_config(tmp_path, fm_latency_budget_s=5.0)
    replay(open_backends(config).log, data, [1], close_with_watermark_us=CLOSE_US)
    worker = Worker(config.model_copy(update={"fm": "stub"}), "w")
    worker.supervisor.current_fm = StubFM
    worker.run(until_idle_s=0.3)
    stored = read_store(config.store)
    assert stored["fm:click"].to_pylist() == [0.5] * 300 and stored["fm:like"].null_count == 300
    assert stored[FM_SNAPSHOT_COLUMN].to_pylist() == ["stub"] * 300
    assert worker.status()["supervision_coverage"] == 1.0


def test_supervisor_waits_only_until_the_budget(tmp_path: Path):
    supervisor = Supervisor(lambda: StubFM(delay_s=0.5), latency_budget_s=2.0)
    impressions = [Impression(f"r{i}", i, {}, None) for i in range(3)]
    supervisor.submit([(impression, 0) for impression in impressions])
    examples = [JoinedExample(i.request_id, i.time_us, {"click": 0}, 0, i) for i in impressions]
    attached = supervisor.attach(examples)  # waits about 0.5 s for the running call, within the budget
    assert [e.supervision.probabilities for e in attached] == [{"click": 0.5}] * 3
    assert supervisor.counters["fm_calls"] == 1 and supervisor.counters["supervised"] == 3
    supervisor.close()


def test_a_paused_worker_cannot_commit_after_its_partition_was_taken_over(tmp_path: Path, fm_world):
    data, _ = fm_world
    config = write_config(tmp_path, partitions=1, lease_s=0.5, renew_s=0.1, read_batch=50)
    replay(open_backends(config).log, data, [1], close_with_watermark_us=CLOSE_US)
    paused = Worker(config, "paused")
    paused.maintain()
    paused.step()  # it owns the partition and has committed part of it
    first = paused.store.stored_rows()
    assert 0 < first < 300
    time.sleep(0.6)  # ... then it stops past its lease
    successor = Worker(config, "successor")
    successor.maintain()
    assert 0 in successor.partitions and successor.partitions[0].claim.token == 2
    with pytest.raises(StaleClaimError):
        paused.store.commit([], Fence(0, 1), "999")
    paused._process(0)  # it reads on and tries to commit under its stale token: refused, it lets go
    assert 0 not in paused.partitions
    assert paused.counters["partitions_fenced"] == 1 and paused.store.stored_rows() == first
    successor.run(until_idle_s=0.3)
    stored = read_store(config.store)
    assert stored.num_rows == 300 and len(set(stored[REQUEST_ID_COLUMN].to_pylist())) == 300


def _start_worker(config_path: Path, worker_id: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "exfm.cli", "das", "worker", "--config", str(config_path), "--worker-id", worker_id,
         "--until-idle", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def _wait(predicate, timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - started


def _tokens_never_go_back(commit_log) -> bool:
    newest: dict[int, int] = {}
    for _, _, partition, token in commit_log:
        if token < newest.get(partition, 0):
            return False
        newest[partition] = token
    return True


@pytest.fixture(scope="module")
def big_stream(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("big") / "data", rows_per_day=1500)


@pytest.fixture(params=["sqlite", "distributed"])
def backend(request, tmp_path: Path) -> dict:
    """Config settings of the embedded backend, or of Redis + ZooKeeper servers on loopback."""
    if request.param == "sqlite":
        return {}
    redis = request.getfixturevalue("redis_server")
    request.getfixturevalue("redis_client")  # empties the server
    zookeeper = request.getfixturevalue("zookeeper_server")
    return {"backend": "distributed", "redis_url": redis.url, "zookeeper_hosts": _chroot(zookeeper.hosts)}


def _chroot(hosts: str) -> str:
    """A fresh ZooKeeper root for one test, as a connection string (``host:port/root``)."""
    from kazoo.client import KazooClient

    root = f"/exfm-worker-test-{time.time_ns()}"
    client = KazooClient(hosts=hosts)
    client.start()
    client.ensure_path(root)
    client.stop()
    client.close()
    return hosts + root


def test_kill_9_a_worker_mid_batch_loses_and_duplicates_nothing(tmp_path: Path, big_stream, backend):
    config = write_config(tmp_path, lease_s=2.0, renew_s=0.2, read_batch=16, **backend)
    replay(open_backends(config).log, big_stream, [1, 2, 3, 4], close_with_watermark_us=CLOSE_US)
    victim, survivor = _start_worker(tmp_path / "das.yaml", "victim"), _start_worker(tmp_path / "das.yaml", "survivor")
    queue = open_backends(config).queue
    try:
        _wait(lambda: {c.worker_id for c in queue.holders().values()} == {"victim", "survivor"}, 60, "both workers")
        store = Worker(config, "observer", backends=open_backends(config)).store
        _wait(lambda: store.stored_rows() > 200, 60, "commits")
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        rows_at_kill = store.stored_rows()
        taken = {p: c.token for p, c in queue.holders().items() if c.worker_id == "victim"}
        takeover_s = _wait(
            lambda: all(c.worker_id == "survivor" for c in queue.holders().values()) and len(queue.holders()) == 4,
            30,
            "the takeover",
        )
        assert survivor.wait(timeout=120) == 0
    finally:
        for process in (victim, survivor):
            process.kill()
    assert rows_at_kill < 6000, "the victim was killed after the work was done: make the stream longer"
    assert takeover_s <= config.lease_s + 2 * config.renew_s + 1.0
    stored = read_store(config.store)
    ids = stored[REQUEST_ID_COLUMN].to_pylist()
    assert len(ids) == len(set(ids)) == 6000  # every impression exactly once
    commits = store.commit_log()
    assert _tokens_never_go_back(commits)
    redelivered = {p for _, _, p, token in commits if p in taken and token > taken[p]}
    assert redelivered == set(taken)  # the victim's partitions were committed again under newer tokens


def _stop_outside_sqlite_locks(process: subprocess.Popen, databases: list[Path]) -> None:
    """SIGSTOP the process at a moment it holds no SQLite write lock.

    A process stopped inside a write transaction blocks every other local writer until it
    resumes (the embedded backend's limit, docs/das.md); such a stop is undone and retried.
    """
    for _ in range(50):
        process.send_signal(signal.SIGSTOP)
        if not any(_write_locked(path) for path in databases):
            return
        process.send_signal(signal.SIGCONT)
        time.sleep(0.013)
    raise AssertionError("could not stop the worker outside a write transaction")


def _write_locked(path: Path) -> bool:
    db = sqlite3.connect(path, timeout=0.1, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        db.execute("ROLLBACK")
        return False
    except sqlite3.OperationalError:
        return True
    finally:
        db.close()


def test_sigstop_past_the_lease_then_sigcont_writes_nothing_stale(tmp_path: Path, big_stream, backend):
    config = write_config(tmp_path, lease_s=1.0, renew_s=0.1, read_batch=16, **backend)
    replay(open_backends(config).log, big_stream, [1, 2], close_with_watermark_us=CLOSE_US)
    paused = _start_worker(tmp_path / "das.yaml", "paused")
    queue = open_backends(config).queue
    store = Worker(config, "observer", backends=open_backends(config)).store
    successor = None
    try:
        _wait(lambda: store.stored_rows() > 100, 60, "commits")
        _stop_outside_sqlite_locks(paused, [config.store / "store.sqlite", *config.root.glob("*.sqlite")])
        assert queue.holders()
        successor = _start_worker(tmp_path / "das.yaml", "successor")
        _wait(
            lambda: all(c.worker_id == "successor" for c in queue.holders().values()) and queue.holders(),
            30,
            "takeover",
        )
        paused.send_signal(signal.SIGCONT)
        assert successor.wait(timeout=120) == 0 and paused.wait(timeout=60) == 0
    finally:
        for process in (paused, successor):
            if process is not None:
                process.send_signal(signal.SIGCONT)
                process.kill()
    ids = read_store(config.store)[REQUEST_ID_COLUMN].to_pylist()
    assert len(ids) == len(set(ids)) == 3000
    commits = store.commit_log()
    assert _tokens_never_go_back(commits)  # no commit under an old token after the successor's
    report = read_status(config)["workers"]["paused"]["counters"]
    assert report.get("partitions_lost", 0) + report.get("partitions_fenced", 0) >= 1


def test_status_command_reports_partitions_and_workers(tmp_path: Path, fm_world, capsys):
    data, _ = fm_world
    config = write_config(tmp_path)
    from exfm.cli import main

    config_path = str(tmp_path / "das.yaml")
    assert main(["das", "replay", "--config", config_path, "--data", str(data), "--days", "1", "--close"]) == 0
    assert "appended" in capsys.readouterr().out
    Worker(config, "w").run(until_idle_s=0.3)
    assert main(["das", "status", "--config", config_path]) == 0
    out = capsys.readouterr().out
    assert "stored rows: 300" in out and "w " in out
    status = read_status(config)
    assert sum(p["log_backlog"] for p in status["partitions"].values()) == 0
    assert status["workers"]["w"]["committed"] == 300
    assert "partition" in format_status(status)


@pytest.mark.parametrize("victim", ["redis", "zookeeper"])
def test_workers_resume_after_the_coordination_store_is_killed_and_restarted(
    tmp_path: Path, big_stream, fresh_redis_server, fresh_zookeeper_server, victim
):
    settings = {
        "backend": "distributed",
        "redis_url": fresh_redis_server.url,
        "zookeeper_hosts": _chroot(fresh_zookeeper_server.hosts),
    }
    config = write_config(tmp_path, lease_s=3.0, renew_s=0.2, read_batch=16, fm="fm", **settings)
    replay(open_backends(config).log, big_stream, [1, 2], close_with_watermark_us=CLOSE_US)
    workers = [_start_worker(tmp_path / "das.yaml", f"w{i}") for i in range(2)]
    store = Worker(config.model_copy(update={"fm": None}), "observer", backends=open_backends(config)).store
    server = fresh_redis_server if victim == "redis" else fresh_zookeeper_server
    try:
        _wait(lambda: store.stored_rows() > 300, 60, "commits")
        server.kill()  # kill -9, mid-stream
        rows_at_kill = store.stored_rows()
        time.sleep(1.0)
        server.restart()  # on the same data
        assert all(worker.wait(timeout=120) == 0 for worker in workers)
    finally:
        for worker in workers:
            worker.kill()
    assert rows_at_kill < 3000, "the server was killed after the work was done: make the stream longer"
    ids = read_store(config.store)[REQUEST_ID_COLUMN].to_pylist()
    assert len(ids) == len(set(ids)) == 3000  # nothing lost, nothing twice
    assert _tokens_never_go_back(store.commit_log())


def test_the_fm_trainer_publishes_a_snapshot_at_every_day_end(tmp_path: Path, fm_world):
    data, _ = fm_world
    publish = {"spd": str(tmp_path / "spd"), "fm": "fm"}
    train(parse_train_config(train_config(data, train_days=[1, 2], eval_days=[], publish=publish), "t"), tmp_path / "r")
    snapshots = list_snapshots(tmp_path / "spd", "fm")
    assert [s.manifest["source"]["checkpoint"] for s in snapshots] == ["day-01", "day-02"]
    assert snapshots[0].train_through_us < snapshots[1].train_through_us
    zeus = SQLiteZeus(tmp_path / "zeus.sqlite")
    assert Updater(zeus, tmp_path / "spd", "fm", "u").step() == snapshots[1].snapshot_id  # the newest


def test_a_stopped_worker_hands_the_snapshot_lease_to_the_next_one_at_once(tmp_path: Path, fm_world):
    data, _ = fm_world
    config = write_config(tmp_path, fm="fm", lease_s=600.0)  # a lapse would take 10 minutes
    publish = {"spd": str(config.spd), "fm": "fm"}
    train(parse_train_config(train_config(data, train_days=[1, 2], eval_days=[], publish=publish), "t"), tmp_path / "r")
    first, second = list_snapshots(config.spd, "fm")
    second.path.rename(second.path.with_name(".held-back"))  # only day 1's snapshot is published yet
    backends = open_backends(config)
    worker = Worker(config, "day-2-worker", backends)
    worker.maintain()
    assert worker.snapshot.snapshot_id == first.snapshot_id
    worker.close()
    second.path.with_name(".held-back").rename(second.path)
    successor = Worker(config, "day-3-worker", backends)
    successor.maintain()  # takes the lease the first worker gave up, points the FM at the newer snapshot
    assert successor.snapshot.snapshot_id == second.snapshot_id
    successor.close()


def test_a_running_worker_shortens_the_gil_switch_interval_and_restores_it(tmp_path: Path):
    config = write_config(tmp_path, gil_switch_interval_s=0.0002)
    worker = Worker(config, "w")
    seen = []
    step = worker.step
    worker.step = lambda: seen.append(sys.getswitchinterval()) or step()
    before = sys.getswitchinterval()
    worker.run(until_idle_s=0.1)
    assert seen and all(value == pytest.approx(0.0002) for value in seen)  # the FM thread waits 0.2 ms at most
    assert sys.getswitchinterval() == before


def test_supervisor_batches_impressions_while_the_fm_is_busy():
    sizes = []

    class RecordingFM(StubFM):
        def predict(self, impressions):
            sizes.append(len(impressions))
            return super().predict(impressions)

    supervisor = Supervisor(lambda: RecordingFM(delay_s=0.3), latency_budget_s=30.0, max_batch=250)
    impressions = [Impression(f"r{i}", i, {}, None) for i in range(500)]
    for start in range(0, 500, 100):
        assert supervisor.has_capacity()
        supervisor.submit([(impression, 0) for impression in impressions[start : start + 100]])
    assert not supervisor.has_capacity()  # 500 sent or buffered: the two batches flow control allows
    examples = [JoinedExample(i.request_id, i.time_us, {"click": 0}, 0, i) for i in impressions]
    attached = supervisor.attach(examples)
    # the first 100 go at once (the FM was idle); the next ones wait for a full batch of 250; the
    # last 150 are sent when their examples close
    assert sizes == [100, 250, 150]
    assert all(e.supervision is not None for e in attached) and supervisor.counters["supervised"] == 500
    supervisor.close()
