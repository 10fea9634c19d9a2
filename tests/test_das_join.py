"""DAS join: event log, joiner windows and watermarks, exactly-once shared store."""

from __future__ import annotations

import multiprocessing
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_tiny_dataset, tiny_schema

from exfm.das import Impression, Joiner, JoinerConfig, Label, SharedStore, SQLiteEventLog, replay_dataset
from exfm.das.joiner import US_PER_MINUTE
from exfm.das.store import REQUEST_ID_COLUMN
from exfm.data.dataset import TIME_COLUMN, open_dataset

MIN = US_PER_MINUTE
WINDOWS = {"click": 15 * MIN, "like": 60 * MIN}


def joiner(**changes) -> Joiner:
    return Joiner(JoinerConfig(windows_us=WINDOWS, **changes))


def imp(rid: str, minute: float, tasks: tuple[str, ...] = ()) -> Impression:
    return Impression(rid, int(minute * MIN), {"x": rid}, "a", tasks)


def lab(rid: str, task: str, minute: float, value: int = 1) -> Label:
    return Label(rid, task, value, int(minute * MIN))


def labels_of(examples) -> dict[str, dict[str, int]]:
    return {e.request_id: dict(e.labels) for e in examples}


# --- joiner ------------------------------------------------------------------------------------
def test_per_task_windows_and_boundary_label_inside():
    j = joiner()
    j.add([imp("r1", 0), lab("r1", "click", 15), lab("r1", "like", 60)])  # both exactly on the boundary
    j.add([imp("r2", 0), lab("r2", "click", 15.01), lab("r2", "like", 30)])  # click just outside
    assert j.advance(59 * MIN) == []  # the like window (1 h) is still open
    examples = j.advance(60 * MIN)
    assert labels_of(examples) == {"r1": {"click": 1, "like": 1}, "r2": {"click": 0, "like": 1}}
    assert examples[0].close_us == 60 * MIN
    assert j.counters["labels_after_window"] == 1


def test_impression_with_fewer_tasks_closes_at_its_own_longest_window():
    j = joiner()
    j.add([imp("c", 0, ("click",)), lab("c", "click", 5), lab("c", "like", 6)])
    assert labels_of(j.advance(15 * MIN)) == {"c": {"click": 1}}
    assert j.counters["ignored_labels"] == 1


def test_positive_label_wins_over_negative():
    j = joiner()
    j.add([imp("r", 0), lab("r", "click", 1, 0), lab("r", "click", 2, 1), lab("r", "click", 3, 0)])
    assert labels_of(j.advance(60 * MIN))["r"]["click"] == 1


def test_early_label_is_held_until_its_impression():
    j = joiner()
    j.add([lab("r", "click", 1)])
    assert j.advance(10 * MIN) == []
    j.add([imp("r", 0)])
    assert labels_of(j.advance(60 * MIN)) == {"r": {"click": 1, "like": 0}}
    assert j.counters["early_labels"] == 1
    assert j.counters["orphan_labels"] == 0


def test_early_label_without_impression_expires_after_horizon():
    j = joiner(early_label_horizon_us=30 * MIN)
    j.add([lab("ghost", "click", 0)])
    j.advance(30 * MIN)
    assert j.counters["orphan_labels"] == 0  # the horizon's end is still inside
    j.advance(31 * MIN)
    assert j.counters["orphan_labels"] == 1
    j.add([imp("ghost", 31)])  # too late for the label: it no longer counts
    assert labels_of(j.advance(100 * MIN)) == {"ghost": {"click": 0, "like": 0}}


def test_label_after_emission_is_counted_and_dropped():
    j = joiner()
    j.add([imp("r", 0)])
    assert labels_of(j.advance(60 * MIN)) == {"r": {"click": 0, "like": 0}}
    j.add([lab("r", "click", 5), lab("r", "like", 70, 0)])  # in-window but too late, and a late negative
    assert j.advance(120 * MIN) == []
    assert j.counters["late_labels"] == 2
    assert j.counters["late_positive_labels"] == 1
    assert j.late_labels_by_task == {"click": 1, "like": 1}
    assert j.counters["emitted"] == 1


def test_duplicates_change_nothing_and_are_counted():
    events = [imp("r1", 0), lab("r1", "click", 3), imp("r2", 1)]
    once, twice = joiner(), joiner()
    once.add(events)
    twice.add(events + events + [imp("r1", 0), lab("r1", "click", 3)])
    assert once.advance(100 * MIN) == twice.advance(100 * MIN)
    assert twice.counters["duplicate_impressions"] == 3
    assert twice.counters["duplicate_labels"] == 2
    twice.add([imp("r1", 0), lab("r1", "click", 3)])  # resent after emission: still nothing
    assert twice.advance(200 * MIN) == []
    assert twice.counters["emitted"] == 2
    assert twice.counters["late_labels"] == 0


def test_event_time_watermark_with_allowed_lateness():
    j = joiner(allowed_lateness_us=5 * MIN)
    j.add([imp("r", 0, ("click",)), imp("s", 18, ("click",))])
    assert j.advance() == []  # watermark = 18 - 5 = 13 < close 15
    j.add([lab("r", "click", 14)])  # late in arrival, still inside the lateness
    j.add([imp("t", 20, ("click",))])  # watermark = 15: r closes
    assert labels_of(j.advance()) == {"r": {"click": 1}}
    assert j.watermark_us == 15 * MIN
    assert j.advance(0) == [] and j.watermark_us == 15 * MIN  # never moves back


def test_output_does_not_depend_on_arrival_order():
    events = [imp(f"r{i}", i) for i in range(30)]
    events += [lab(f"r{i}", "click", i + (i % 20), i % 2) for i in range(30)]
    events += [lab(f"r{i}", "like", i + 3 * (i % 25)) for i in range(0, 30, 3)]
    events += [lab("nobody", "click", 2)]
    results = []
    for seed in range(3):
        shuffled = events[:]
        random.Random(seed).shuffle(shuffled)
        j = joiner()
        j.add(shuffled)
        results.append(j.advance(200 * MIN))
        assert j.counters["emitted"] == 30
    assert results[0] == results[1] == results[2]
    assert [e.request_id for e in results[0]] == [f"r{i}" for i in range(30)]


def test_each_impression_emitted_exactly_once_over_many_advances():
    j = joiner()
    emitted = []
    for minute in range(0, 300, 7):
        j.add([imp(f"r{minute}", minute), lab(f"r{minute}", "click", minute + 1)])
        emitted += j.advance(minute * MIN)
    emitted += j.advance(10_000 * MIN)
    ids = [e.request_id for e in emitted]
    assert len(ids) == len(set(ids)) == j.counters["impressions"] == j.counters["emitted"]
    assert j.pending == 0
    assert j.counters["positives:click"] == len(ids)


# --- event log ---------------------------------------------------------------------------------
def test_sqlite_log_dedups_and_reads_from_cursor(tmp_path: Path):
    log = SQLiteEventLog(tmp_path / "log.sqlite")
    first = [Impression("r1", 5, {"user": 7, "price": float("nan"), "hist": [1, 2]}, "a"), lab("r1", "click", 1)]
    assert log.append(first) == 2
    assert log.append([*first, lab("r1", "click", 1, 0)]) == 1  # resends ignored, a distinct label kept
    [(offset, event)] = log.read(0, limit=1)
    assert event == Impression("r1", 5, {"user": 7, "price": None, "hist": [1, 2]}, "a")
    rest = log.read(0, after=offset)
    assert [e for _, e in rest] == [lab("r1", "click", 1), lab("r1", "click", 1, 0)]
    assert log.read(0, after=rest[-1][0]) == [] and log.backlog(0, offset) == 2
    log.trim(0, offset)
    assert log.read(0) == rest and log.append(first) == 0  # trimmed, but its key still deduplicates
    assert SQLiteEventLog(tmp_path / "log.sqlite")._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(ValueError, match="value must be 0 or 1"):
        log.append([lab("r1", "click", 1, 2)])
    assert len(log) == 3


# --- end to end: replay a dataset through log, joiner and store ----------------------------------
def join_into_store(log: SQLiteEventLog, store: SharedStore, step_minutes: int = 120) -> Joiner:
    """Read the whole log, advancing an injected watermark in steps and committing each batch."""
    j = joiner()
    events = [event for _, event in log.read(0, limit=10**9)]
    end = max(e.time_us for e in events) + 2 * 60 * MIN
    watermark = min(e.time_us for e in events)
    j.add(events)
    while watermark < end:
        store.commit(j.advance(watermark))
        watermark += step_minutes * MIN
    store.commit(j.advance(end))
    return j


def read_rows(root: Path) -> pa.Table:
    dataset = open_dataset(root)
    files = [f for info in dataset.manifest.days for f in dataset.day_files(info.day)]
    return pa.concat_tables(pq.read_table(f) for f in files)


def test_replayed_dataset_joins_back_to_itself_exactly_once(tmp_path: Path):
    source = make_tiny_dataset(tmp_path / "src", rows_per_day=150, days=2)
    log = SQLiteEventLog(tmp_path / "log.sqlite")
    for impression, labels in replay_dataset(source, [1, 2]):
        log.append([*labels, impression])  # labels before their impression
    store = SharedStore(tmp_path / "shared", tiny_schema())
    j = join_into_store(log, store)
    assert j.counters["emitted"] == 300 and j.counters["early_labels"] == j.counters["labels"] > 0

    original = read_rows(source)
    joined = read_rows(tmp_path / "shared")
    assert joined[REQUEST_ID_COLUMN].to_pylist() == [f"{d}:{r}" for d in (1, 2) for r in range(150)]
    assert joined.column("fm_snapshot").null_count == joined.num_rows  # joined without supervision
    joined = joined.select(original.column_names)
    assert joined.schema == original.schema
    assert joined.to_pylist() == original.to_pylist()
    assert joined[TIME_COLUMN].to_pylist() == sorted(joined[TIME_COLUMN].to_pylist())

    manifest, expected = open_dataset(tmp_path / "shared").manifest, open_dataset(source).manifest
    assert manifest.rows == 300
    for got, want in zip(manifest.days, expected.days, strict=True):
        assert (got.day, got.rows, got.domains) == (want.day, want.rows, want.domains)
        assert got.label_rates == pytest.approx(want.label_rates)
        for name, moments in want.numeric_moments.items():
            assert got.numeric_moments[name].count == moments.count
            assert got.numeric_moments[name].sum == pytest.approx(moments.sum, rel=1e-6)

    # replay the whole batch: resent events, a fresh joiner, the same store -> nothing changes
    for impression, labels in replay_dataset(source, [1, 2]):
        log.append([impression, *labels])
    assert len(log) == j.counters["impressions"] + j.counters["labels"]
    join_into_store(log, store)
    assert read_rows(tmp_path / "shared").select(original.column_names).to_pylist() == original.to_pylist()
    assert open_dataset(tmp_path / "shared").manifest.rows == 300


def test_store_commit_is_idempotent_and_survives_reopen(tmp_path: Path):
    schema = tiny_schema()
    source = make_tiny_dataset(tmp_path / "src", rows_per_day=20, days=1)
    j = joiner()
    for impression, labels in replay_dataset(source, [1]):
        j.add([impression, *labels])
    examples = j.advance(10**18)
    store = SharedStore(tmp_path / "shared", schema)
    first = store.commit(examples[:12])
    assert (first.seq, first.rows, first.duplicates) == (1, 12, 0)
    again = store.commit(examples[:12])
    assert (again.seq, again.rows, again.duplicates) == (None, 0, 12)
    store.close()
    reopened = SharedStore(tmp_path / "shared", schema)
    mixed = reopened.commit(examples[6:] + examples[6:8])
    assert (mixed.seq, mixed.rows, mixed.duplicates) == (2, 8, 8)
    assert reopened.stored_rows() == 20
    assert read_rows(tmp_path / "shared").num_rows == 20
    assert sorted(p.name for p in (tmp_path / "shared" / "day=01").iterdir()) == [
        "part-00001.parquet",
        "part-00002.parquet",
    ]


def test_store_counts_out_of_range_rows_and_rejects_missing_columns(tmp_path: Path):
    store = SharedStore(tmp_path / "shared", tiny_schema())
    j = joiner()
    j.add([Impression("old", 0, {}, "a")])
    result = store.commit(j.advance(10**18))  # 1970: before day 1
    assert (result.rows, result.out_of_range) == (0, 1)
    assert open_dataset(tmp_path / "shared").manifest.dropped_out_of_range == 1
    start = int(store.boundaries[0])
    j.add([Impression("bad", start, {"user": 1}, "a")])
    with pytest.raises(ValueError, match="'bad': no value for column 'item'"):
        store.commit(j.advance(start + 10**12))
    assert store.stored_rows() == 0


def test_resend_after_retention_is_re_emitted_by_the_joiner_but_not_stored_twice(tmp_path: Path):
    source = make_tiny_dataset(tmp_path / "src", rows_per_day=3, days=1)
    impression, _ = next(replay_dataset(source, [1]))
    j = joiner(emitted_retention_us=10 * MIN)
    store = SharedStore(tmp_path / "shared", tiny_schema())
    j.add([impression])
    assert store.commit(j.advance(impression.time_us + 60 * MIN)).rows == 1
    j.advance(impression.time_us + 71 * MIN)  # the emitted id is forgotten
    j.add([Label(impression.request_id, "click", 1, impression.time_us), impression])
    assert j.counters["late_labels"] == 0 and j.counters["early_labels"] == 1
    again = j.advance(impression.time_us + 72 * MIN)
    assert [e.labels for e in again] == [{"click": 1, "like": 0}]  # the resend joined its held label
    assert store.commit(again).duplicates == 1
    assert store.stored_rows() == 1


def _append_range(path: Path, start: int) -> None:
    log = SQLiteEventLog(path)
    for i in range(start, start + 50):
        log.append([imp(f"r{i}", i), lab(f"r{i}", "click", i + 1)])
    log.close()


def test_sqlite_log_accepts_concurrent_writers(tmp_path: Path):
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_append_range, args=(tmp_path / "log.sqlite", s)) for s in (0, 25, 50)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
        assert writer.exitcode == 0
    assert len(SQLiteEventLog(tmp_path / "log.sqlite").read(0)) == 2 * 100  # overlapping ranges deduplicated


def test_hourly_partitions_hold_the_same_rows_as_daily_ones(tmp_path: Path):
    source = make_tiny_dataset(tmp_path / "src", rows_per_day=120, days=2)
    j = joiner()
    for impression, labels in replay_dataset(source, [1, 2]):
        j.add([impression, *labels])
    examples = j.advance(10**18)
    daily, hourly = (SharedStore(tmp_path / kind, tiny_schema(), partition_by=kind) for kind in ("day", "hour"))
    assert daily.commit(examples).rows == hourly.commit(examples).rows == 240
    files = sorted(p.relative_to(tmp_path / "hour").as_posix() for p in (tmp_path / "hour").rglob("*.parquet"))
    assert all(f.startswith(("day=01/hour=", "day=02/hour=")) and f.endswith("/part-00001.parquet") for f in files)
    assert len(files) > 2
    hours = {int(f.split("hour=")[1][:2]) for f in files}
    assert hours <= set(range(24))
    assert read_rows(tmp_path / "hour").to_pylist() == read_rows(tmp_path / "day").to_pylist()
    by_hour, by_day = (open_dataset(tmp_path / kind).manifest.days for kind in ("hour", "day"))
    assert [(d.day, d.rows, d.domains) for d in by_hour] == [(d.day, d.rows, d.domains) for d in by_day]
    for hour_info, day_info in zip(by_hour, by_day, strict=True):
        assert hour_info.label_rates == pytest.approx(day_info.label_rates)
