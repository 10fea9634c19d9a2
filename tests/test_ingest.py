"""Tests of ``exfm.data.ingest``: formats, day split, validation, atomicity, statistics."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
from datetime import UTC, date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import exfm.data.ingest as ingest_module
from exfm.data.dataset import open_dataset, partition_arrow_schema
from exfm.data.hashing import stable_hash
from exfm.data.ingest import IngestError, ingest
from exfm.schema import Schema, parse_schema

START = datetime(2026, 1, 1, tzinfo=UTC)
T0 = int(START.timestamp())  # 2026-01-01 00:00 UTC, the start of day 1
DAY = 86_400
HEADER = ["user", "ts", "item", "hist", "price", "clk", "dom", "p", "unused"]


def make_schema(**changes: object) -> Schema:
    spec = {
        "name": "test",
        "features": [
            {"name": "user", "type": "categorical", "buckets": 100},
            {"name": "item", "type": "categorical", "buckets": 100},
            {"name": "hist", "type": "sequence", "max_len": 3, "embedding": "item"},
            {"name": "price", "type": "numeric", "transform": "log1p"},
        ],
        "labels": [{"name": "clk"}],
        "time": {"column": "ts", "unit": "s"},
        "domain": {"column": "dom"},
        "passthrough": ["p"],
        "split": {"mode": "calendar", "days": 3, "start": "2026-01-01"},
    }
    spec.update(changes)
    return parse_schema(spec, "test")


def make_rows(n: int = 300, seed: int = 0) -> list[list[str]]:
    """Rows over days 1..3 in shuffled time order, with ties, missing prices and empty sequences."""
    rng = np.random.default_rng(seed)
    times = T0 + rng.integers(0, 3 * DAY, n) // 60 * 60  # whole minutes: many ties
    rows = []
    for i in range(n):
        hist = "|".join(str(v) for v in rng.integers(1, 20, rng.integers(0, 6)))
        price = "" if i % 7 == 0 else f"{rng.lognormal(2, 1):.3f}"
        row = [f"u{i}", str(times[i]), str(rng.integers(1, 20)), hist, price]
        row += [str(int(rng.random() < 0.3)), rng.choice(["a", "b"]), f"{rng.random():.4f}", "x"]
        rows.append(row)
    return rows


def write_csv(path: Path, rows: list[list[str]], header: list[str] = HEADER, delimiter: str = ",") -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", newline="") as handle:
        writer = csv.writer(handle, delimiter=delimiter, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def read_day(out: Path, day: int) -> pa.Table:
    dataset = open_dataset(out)
    return pa.concat_tables(pq.read_table(f) for f in dataset.day_files(day))


def read_all(out: Path) -> pa.Table:
    return pa.concat_tables(read_day(out, day) for day in range(1, open_dataset(out).num_days + 1))


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


# --- happy paths -------------------------------------------------------------------------------
def test_csv_to_sorted_day_partitions(tmp_path: Path) -> None:
    schema = make_schema()
    rows = make_rows()
    manifest = ingest(schema, write_csv(tmp_path / "data.csv", rows), tmp_path / "out", show_progress=False)

    dataset = open_dataset(tmp_path / "out")
    assert dataset.manifest == manifest
    assert manifest.created_by == "ingest" and manifest.rows == len(rows)
    assert manifest.sources == [str(tmp_path / "data.csv")]
    assert manifest.rejected_rows == 0 and manifest.dropped_out_of_range == 0
    assert not (tmp_path / "out" / "rejects.csv").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "day=01",
        "day=02",
        "day=03",
        "manifest.json",
        "schema.yaml",
    ]
    expected_schema = partition_arrow_schema(schema)
    for day in (1, 2, 3):
        info = dataset.day(day)
        assert (info.start_us, info.end_us) == ((T0 + (day - 1) * DAY) * 10**6, (T0 + day * DAY) * 10**6)
        table = read_day(tmp_path / "out", day)
        assert table.schema.names == expected_schema.names
        assert [f.type for f in table.schema] == [f.type for f in expected_schema]
        # expected: the input rows of this day, stably sorted by time (ties keep input order)
        mine = [r for r in rows if (int(r[1]) - T0) // DAY == day - 1]
        mine.sort(key=lambda r: int(r[1]))
        assert table.num_rows == info.rows == len(mine)
        assert table["_time"].to_pylist() == [int(r[1]) * 10**6 for r in mine]
        assert table["user"].to_pylist() == list(stable_hash([r[0] for r in mine]))
        assert info.label_rates["clk"] == pytest.approx(np.mean([int(r[5]) for r in mine]))
        assert info.domains == {d: sum(r[6] == d for r in mine) for d in ("a", "b")}
        prices = np.array([float(r[4]) for r in mine if r[4]], dtype=np.float32).astype(np.float64)
        moments = info.numeric_moments["price"]
        assert moments.count == len(prices)
        assert moments.sum == pytest.approx(prices.sum(), rel=1e-12)
        assert moments.sumsq == pytest.approx(np.square(prices).sum(), rel=1e-12)
        assert table["price"].null_count == sum(not r[4] for r in mine)
        assert table["p"].to_pylist() == pytest.approx([float(r[7]) for r in mine], rel=1e-6)


def test_formats_and_file_lists_agree(tmp_path: Path) -> None:
    schema = make_schema()
    rows = make_rows(200, seed=1)
    reference = ingest(schema, write_csv(tmp_path / "a.csv", rows), tmp_path / "ref", show_progress=False)
    expected = read_all(tmp_path / "ref")

    write_csv(tmp_path / "b.tsv", rows, delimiter="\t")
    write_csv(tmp_path / "c.csv.gz", rows)
    write_csv(tmp_path / "part-1.csv", rows[:120])
    write_csv(tmp_path / "part-2.csv", rows[120:])
    columns = list(zip(*rows, strict=True))
    native = {
        "user": pa.array(columns[0]),
        "ts": pa.array([int(v) for v in columns[1]], pa.int64()),
        "item": pa.array([int(v) for v in columns[2]], pa.int32()),
        "hist": pa.array([[int(x) for x in v.split("|")] if v else [] for v in columns[3]], pa.list_(pa.int64())),
        "price": pa.array([float(v) if v else None for v in columns[4]], pa.float64()),
        "clk": pa.array([int(v) for v in columns[5]], pa.int8()),
        "dom": pa.array(columns[6]).dictionary_encode(),
        "p": pa.array([float(v) for v in columns[7]], pa.float32()),
    }
    pq.write_table(pa.table(native), tmp_path / "d.parquet")
    for name, inputs in [
        ("tsv", tmp_path / "b.tsv"),
        ("gz", tmp_path / "c.csv.gz"),
        ("glob", str(tmp_path / "part-*.csv")),
        ("list", [tmp_path / "part-1.csv", tmp_path / "part-2.csv"]),
        ("parquet", tmp_path / "d.parquet"),
    ]:
        manifest = ingest(schema, inputs, tmp_path / name, show_progress=False)
        assert read_all(tmp_path / name).equals(expected), name
        assert [d.rows for d in manifest.days] == [d.rows for d in reference.days], name
    assert open_dataset(tmp_path / "glob").manifest.sources == [
        str(tmp_path / "part-1.csv"),
        str(tmp_path / "part-2.csv"),
    ]


def test_calendar_days_in_a_non_utc_zone(tmp_path: Path) -> None:
    zone = ZoneInfo("Asia/Shanghai")
    schema = make_schema(split={"mode": "calendar", "days": 2, "timezone": "Asia/Shanghai", "start": "2026-01-01"})

    def local(*args: int) -> int:
        return int(datetime(*args, tzinfo=zone).timestamp())

    times = [local(2026, 1, 1, 0, 0, 0), local(2026, 1, 1, 23, 59, 59), local(2026, 1, 2, 0, 0, 0)]
    rows = [[f"u{i}", str(t), "1", "", "1", "0", "a", "0", "x"] for i, t in enumerate(times)]
    manifest = ingest(schema, write_csv(tmp_path / "data.csv", rows), tmp_path / "out", show_progress=False)
    assert [d.rows for d in manifest.days] == [2, 1]
    assert manifest.days[0].start_us == local(2026, 1, 1) * 10**6
    assert read_day(tmp_path / "out", 2)["_time"].to_pylist() == [times[2] * 10**6]


def test_calendar_start_defaults_to_the_first_local_date(tmp_path: Path) -> None:
    schema = make_schema(split={"mode": "calendar", "days": 2, "timezone": "Asia/Shanghai"})
    # 2025-12-31 17:00 UTC is 2026-01-01 01:00 in Shanghai: day 1 is the local 2026-01-01
    first = T0 - 7 * 3600
    rows = [[f"u{i}", str(first + i * 3600 * 10), "1", "", "1", "0", "a", "0", "x"] for i in range(6)]
    manifest = ingest(schema, write_csv(tmp_path / "data.csv", rows), tmp_path / "out", show_progress=False)
    local_midnight = int(datetime(2026, 1, 1, tzinfo=ZoneInfo("Asia/Shanghai")).timestamp())
    assert manifest.days[0].start_us == local_midnight * 10**6
    assert [d.rows for d in manifest.days] == [3, 2]  # +0h, +10h, +20h | +30h, +40h | +50h dropped
    assert manifest.dropped_out_of_range == 1


def test_iso_times_naive_in_the_schema_zone_and_with_offsets(tmp_path: Path) -> None:
    schema = make_schema(
        time={"column": "ts", "unit": "iso", "timezone": "Asia/Shanghai"},
        split={"mode": "calendar", "days": 1, "timezone": "UTC", "start": "2026-01-01"},
    )
    texts = ["2026-01-01 09:00:00", "2026-01-01T12:00:00Z", "2026-01-01T20:30:00.5+08:00", "2026-01-02"]
    rows = [[f"u{i}", t, "1", "", "1", "0", "a", "0", "x"] for i, t in enumerate(texts)]
    ingest(schema, write_csv(tmp_path / "data.csv", rows), tmp_path / "out", show_progress=False)
    hours = [1, 12, 12.5, 16]  # UTC hours: 09:00 CST, 12:00Z, 20:30:00.5 CST, 2026-01-02 00:00 CST
    expected = sorted(int((T0 + h * 3600) * 10**6) for h in hours)
    expected[2] += 500_000  # the half second of 20:30:00.5
    assert read_day(tmp_path / "out", 1)["_time"].to_pylist() == expected


def test_equal_spans(tmp_path: Path) -> None:
    schema = make_schema(split={"mode": "equal_spans", "days": 4})
    times = [100, 180, 199, 200, 250, 299, 300, 350, 499, 500]  # spans of 100 s from 100 to 500
    rows = [[f"u{i}", str(t), "1", "", "1", "0", "a", "0", "x"] for i, t in enumerate(times)]
    manifest = ingest(schema, write_csv(tmp_path / "data.csv", rows), tmp_path / "out", show_progress=False)
    assert [d.rows for d in manifest.days] == [3, 3, 2, 2]
    assert manifest.days[0].start_us == 100 * 10**6 and manifest.days[-1].end_us == 500 * 10**6 + 1
    assert manifest.dropped_out_of_range == 0


# --- conversions ---------------------------------------------------------------------------------
def test_sequences_keep_the_most_recent_ids(tmp_path: Path) -> None:
    hists = ["1|2|3|4|5", "", "7", "8||9|", "a|b|c"]
    rows = [[f"u{i}", str(T0 + i), "1", h, "1", "0", "a", "0", "x"] for i, h in enumerate(hists)]
    ingest(make_schema(), write_csv(tmp_path / "data.csv", rows), tmp_path / "out", show_progress=False)
    got = read_day(tmp_path / "out", 1)["hist"].to_pylist()
    expected = [["3", "4", "5"], [], ["7"], ["8", "9"], ["a", "b", "c"]]
    assert got == [list(stable_hash(ids)) if ids else [] for ids in expected]


def test_categorical_hashes_equal_stable_hash_of_the_raw_text(tmp_path: Path) -> None:
    users = ["42", "", "alice", "ünïcode", "007", "42"]
    rows = [[u, str(T0 + i), "1", "", "1", "0", "a", "0", "x"] for i, u in enumerate(users)]
    ingest(make_schema(), write_csv(tmp_path / "data.csv", rows), tmp_path / "out", show_progress=False)
    got = read_day(tmp_path / "out", 1)["user"].to_pylist()
    assert got == list(stable_hash(users))
    assert got[1] == 0 and got[0] == got[5] != got[4]


def test_numeric_and_label_spellings(tmp_path: Path) -> None:
    cases = [("1.5", "1"), ("", "0"), ("NaN", "true"), ("-2e3", "False"), (".25", "TRUE")]
    rows = [[f"u{i}", str(T0 + i), "1", "", price, clk, "a", "", "x"] for i, (price, clk) in enumerate(cases)]
    ingest(make_schema(), write_csv(tmp_path / "data.csv", rows), tmp_path / "out", show_progress=False)
    table = read_day(tmp_path / "out", 1)
    assert table["price"].to_pylist() == [1.5, None, None, -2000.0, 0.25]
    assert table["clk"].to_pylist() == [1, 0, 1, 0, 1]
    assert table["p"].null_count == 5


def small_budget(monkeypatch: pytest.MonkeyPatch, **sizes: int) -> None:
    """Make ingest use tiny blocks / parts, to exercise block edges on small files."""
    original = ingest_module._Budget.from_limit
    monkeypatch.setattr(
        ingest_module._Budget, "from_limit", lambda limit: dataclasses.replace(original(limit), **sizes)
    )


def test_days_larger_than_a_part_are_split_into_sorted_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small_budget(monkeypatch, part_bytes=2000)
    monkeypatch.setattr(ingest_module, "SORTED_BATCH_ROWS", 100)
    rows = make_rows(3000, seed=2)
    ingest(make_schema(), write_csv(tmp_path / "data.csv", rows), tmp_path / "out", show_progress=False)
    dataset = open_dataset(tmp_path / "out")
    assert all(len(dataset.day(d).files) > 1 for d in (1, 2, 3))
    times = read_all(tmp_path / "out")["_time"].to_numpy()
    assert len(times) == 3000 and np.all(np.diff(times) >= 0)


def test_small_blocks_keep_data_and_line_numbers_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = make_rows(60, seed=6)
    rows[3][3] = "|".join(str(i) for i in range(100))  # a line longer than a block
    lines = [",".join(HEADER)] + [",".join(r) for r in rows]  # lines[i] is line i + 1
    lines[10] = "only,three,fields"
    lines[19] = ""
    lines[29] = lines[29] + ",extra"
    lines[44] = lines[44].replace(f",{rows[43][5]},", ",yes,", 1)
    path = tmp_path / "data.csv"
    path.write_bytes("\r\n".join(lines).encode())  # CRLF, no final line end
    reference = ingest(make_schema(), path, tmp_path / "ref", on_bad_row="skip", show_progress=False)
    small_budget(monkeypatch, block_bytes=64)
    manifest = ingest(make_schema(), path, tmp_path / "out", on_bad_row="skip", show_progress=False)
    assert read_all(tmp_path / "out").equals(read_all(tmp_path / "ref"))
    assert manifest.rows == reference.rows == 56 and manifest.rejected_rows == 3
    for out in ("ref", "out"):
        with open(tmp_path / out / "rejects.csv") as handle:
            assert [(r["line"], r["column"]) for r in csv.DictReader(handle)] == [("11", ""), ("30", ""), ("45", "clk")]


def test_millisecond_times_may_be_decimals(tmp_path: Path) -> None:
    schema = make_schema(time={"column": "ts", "unit": "ms"})
    texts = [str(T0 * 1000), f"{T0 * 1000 + 1}.5", f"{T0 * 1000 + 2}"]
    rows = [[f"u{i}", t, "1", "", "1", "0", "a", "0", "x"] for i, t in enumerate(texts)]
    ingest(schema, write_csv(tmp_path / "data.csv", rows), tmp_path / "out", show_progress=False)
    assert read_day(tmp_path / "out", 1)["_time"].to_pylist() == [T0 * 10**6, T0 * 10**6 + 1500, T0 * 10**6 + 2000]


def test_the_documented_example_schema_and_command(tmp_path: Path) -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "schema.md").read_text()
    schema = parse_schema(yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0]), "docs/schema.md")
    assert schema.split.start == date(2017, 5, 6) and schema.feature("hist_cate").embedding == "cate_id"
    header = ["user", "time_stamp", "adgroup_id", "cate_id", "brand", "pid", "price", "cate_history", "clk"]
    header.append("new_user_class_level")
    start = int(datetime(2017, 5, 6, tzinfo=ZoneInfo("Asia/Shanghai")).timestamp())
    rng = np.random.default_rng(7)
    rows = [
        [
            *(str(rng.integers(1, n)) for n in (50, 90, 9)),
            "NULL" if i % 5 == 0 else str(rng.integers(1, 30)),
            "430548_1007",
            f"{rng.lognormal(4, 1):.2f}",
            "|".join(str(c) for c in rng.integers(1, 9, 60)),
            str(int(rng.random() < 0.1)),
            str(i % 3 + 1),
        ]
        for i in range(64)
    ]
    for i, row in enumerate(rows):  # every 3 hours from 2017-05-06 00:00 in Shanghai
        row.insert(1, str(start + i * 3 * 3600))
    rows[9][8] = "clicked"
    manifest = ingest(
        schema, write_csv(tmp_path / "joined-1.csv", rows, header), tmp_path / "taobao", on_bad_row="skip"
    )
    assert [d.rows for d in manifest.days] == [8, 7, 8, 8, 8, 8, 8, 8]
    assert manifest.rejected_rows == 1 and manifest.domains == ["1", "2", "3"]
    assert {len(h) for h in read_all(tmp_path / "taobao")["hist_cate"].to_pylist()} == {50}


# --- bad input -----------------------------------------------------------------------------------
GOOD = "u1,{t},1,,1.5,0,a,0.5,x"


def _bad_file(tmp_path: Path, bad_line: str) -> Path:
    """A CSV whose line 4 is ``bad_line`` (line 3 is empty and ignored)."""
    return write_lines(
        tmp_path / "data.csv",
        [",".join(HEADER), GOOD.format(t=T0), "", bad_line, GOOD.format(t=T0 + 9)],
    )


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("u2,1767225600,1,,1.5,0,a", r"data\.csv:4: expected 9 fields, got 7"),
        (
            "u2,yesterday,1,,1.5,0,a,0.5,x",
            r"data\.csv:4: column 'ts': expected a unix time in seconds, got 'yesterday'",
        ),
        ("u2,,1,,1.5,0,a,0.5,x", r"data\.csv:4: column 'ts': expected a unix time in seconds, got ''"),
        ("u2,1767225600,1,,cheap,0,a,0.5,x", r"data\.csv:4: column 'price': expected a finite number.*got 'cheap'"),
        ("u2,1767225600,1,,inf,0,a,0.5,x", r"data\.csv:4: column 'price': expected a finite number.*got 'inf'"),
        ("u2,1767225600,1,,1.5,2,a,0.5,x", r"data\.csv:4: column 'clk': expected 0 or 1.*got '2'"),
        ("u2,1767225600,1,,1.5,,a,0.5,x", r"data\.csv:4: column 'clk': expected 0 or 1.*got ''"),
        ("u2,1767225600,1,,1.5,1,a,0.5.1,x", r"data\.csv:4: column 'p': expected a finite number.*got '0.5.1'"),
    ],
)
def test_bad_rows_raise_with_file_line_and_column(tmp_path: Path, bad_line: str, message: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(IngestError, match=message):
        ingest(make_schema(), _bad_file(tmp_path, bad_line), out, show_progress=False)
    assert siblings(out) == ["data.csv"]  # no output, no staging directory


def test_bad_parquet_rows_name_the_row(tmp_path: Path) -> None:
    rows = make_rows(5)
    table = pa.table({name: [r[i] for r in rows] for i, name in enumerate(HEADER)})
    table = table.set_column(5, "clk", pa.array([0, 1, 2, 0, 1], pa.int64()))
    pq.write_table(table, tmp_path / "d.parquet")
    with pytest.raises(IngestError, match=r"d\.parquet:row 3: column 'clk': expected 0 or 1.*got '2'"):
        ingest(make_schema(), tmp_path / "d.parquet", tmp_path / "out", show_progress=False)


def test_bad_rows_are_found_by_the_time_range_scan_too(tmp_path: Path) -> None:
    schema = make_schema(split={"mode": "equal_spans", "days": 2})
    path = _bad_file(tmp_path, "u2,soon,1,,1.5,0,a,0.5,x")
    with pytest.raises(IngestError, match=r"data\.csv:4: column 'ts'.*got 'soon'"):
        ingest(schema, path, tmp_path / "out", show_progress=False)
    assert siblings(tmp_path / "out") == ["data.csv"]


def test_line_numbers_count_malformed_and_empty_lines(tmp_path: Path) -> None:
    lines = [",".join(HEADER)] + [GOOD.format(t=T0 + i) for i in range(5)]
    lines[2] = "only,three,fields"
    lines[4] = ""
    lines.append("u9,1767225600,1,,1.5,7,a,0.5,x")  # line 7
    path = write_lines(tmp_path / "data.csv", lines)
    manifest = ingest(make_schema(), path, tmp_path / "out", on_bad_row="skip", show_progress=False)
    with open(tmp_path / "out" / "rejects.csv") as handle:
        rejects = list(csv.DictReader(handle))
    assert [(r["line"], r["column"]) for r in rejects] == [("3", ""), ("7", "clk")]
    assert rejects[0]["raw"] == "only,three,fields" and rejects[0]["reason"] == "expected 9 fields, got 3"
    assert rejects[1]["raw"] == "7" and rejects[1]["file"] == str(path)
    assert manifest.rejected_rows == 2 and manifest.rows == 3


def test_skip_mode_counts_and_lists_rejects(tmp_path: Path) -> None:
    rows = make_rows(50, seed=3)
    rows[10][5] = "maybe"
    rows[20][1] = "noon"
    rows[30][4] = "1,5"  # quoted by the writer: one field, not a number
    manifest = ingest(
        make_schema(), write_csv(tmp_path / "data.csv", rows), tmp_path / "out", on_bad_row="skip", show_progress=False
    )
    assert manifest.rejected_rows == 3 and manifest.rows == 47
    with open(tmp_path / "out" / "rejects.csv") as handle:
        rejects = list(csv.DictReader(handle))
    assert [(r["line"], r["column"], r["raw"]) for r in rejects] == [
        ("12", "clk", "maybe"),
        ("22", "ts", "noon"),
        ("32", "price", "1,5"),
    ]
    assert rejects[0]["reason"] == "expected 0 or 1 (or true/false), got 'maybe'"
    users = set(read_all(tmp_path / "out")["user"].to_pylist())
    assert int(stable_hash(["u10"])[0]) not in users and int(stable_hash(["u11"])[0]) in users


def test_a_failed_ingest_leaves_an_existing_output_untouched(tmp_path: Path) -> None:
    out = tmp_path / "out"
    ingest(make_schema(), write_csv(tmp_path / "good.csv", make_rows(30)), out, show_progress=False)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    bad = write_lines(tmp_path / "bad.csv", [",".join(HEADER), GOOD.format(t=T0), "u2,1767225600,1,,1.5,5,a,0,x"])
    with pytest.raises(IngestError, match=r"bad\.csv:3: column 'clk'"):
        ingest(make_schema(), bad, out, overwrite=True, show_progress=False)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert siblings(out) == ["bad.csv", "good.csv", "out"]


def test_missing_columns_are_named(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "data.csv", [r[:5] + r[6:] for r in make_rows(5)], [*HEADER[:5], *HEADER[6:]])
    with pytest.raises(IngestError, match=r"data\.csv: missing column\(s\) required by the schema: 'clk' \(label"):
        ingest(make_schema(), path, tmp_path / "out", show_progress=False)
    assert siblings(tmp_path / "out") == ["data.csv"]


def test_inputs_that_do_not_exist_or_are_not_supported(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="no input file matches"):
        ingest(make_schema(), str(tmp_path / "*.csv"), tmp_path / "out", show_progress=False)
    with pytest.raises(IngestError, match="input file not found"):
        ingest(make_schema(), tmp_path / "missing.csv", tmp_path / "out", show_progress=False)
    (tmp_path / "data.json").write_text("{}")
    with pytest.raises(IngestError, match="unsupported file type"):
        ingest(make_schema(), tmp_path / "data.json", tmp_path / "out", show_progress=False)


def test_out_of_range_rows_are_dropped_and_counted_or_an_error(tmp_path: Path) -> None:
    rows = make_rows(40, seed=4)
    rows[5][1] = str(T0 - 1)  # the last second before day 1
    rows[6][1] = str(T0 + 3 * DAY)  # the first second after day 3
    path = write_csv(tmp_path / "data.csv", rows)
    manifest = ingest(make_schema(), path, tmp_path / "out", show_progress=False)
    assert manifest.dropped_out_of_range == 2 and manifest.rows == 38

    schema = make_schema(split={"mode": "calendar", "days": 3, "start": "2026-01-01", "out_of_range": "error"})
    for mode in ("error", "skip"):
        with pytest.raises(IngestError, match=r"data\.csv:7: column 'ts': time 2025-12-31T23:59:59\+00:00 is outside"):
            ingest(schema, path, tmp_path / "strict", on_bad_row=mode, show_progress=False)
        assert not (tmp_path / "strict").exists()


# --- causality -----------------------------------------------------------------------------------
def test_a_days_statistics_do_not_depend_on_later_days(tmp_path: Path) -> None:
    rows = make_rows(400, seed=5)
    first = ingest(make_schema(), write_csv(tmp_path / "a.csv", rows), tmp_path / "a", show_progress=False)

    rng = np.random.default_rng(9)
    perturbed = [list(r) for r in rows]
    for row in perturbed:
        if (int(row[1]) - T0) // DAY == 2:  # day 3: new prices, labels and domains
            row[4] = f"{rng.lognormal(5, 2):.3f}"
            row[5] = str(1 - int(row[5]))
            row[6] = "c"
    extra = [[f"new{i}", str(T0 + 2 * DAY + i), "3", "1|2", "1e6", "1", "c", "1", "x"] for i in range(50)]
    second = ingest(
        make_schema(), write_csv(tmp_path / "b.csv", perturbed + extra), tmp_path / "b", show_progress=False
    )

    for day in (0, 1):
        assert first.days[day] == second.days[day]
    assert second.days[2].rows == first.days[2].rows + 50
    assert second.days[2].numeric_moments != first.days[2].numeric_moments
    assert second.days[2].label_rates != first.days[2].label_rates
    assert read_day(tmp_path / "a", 2).equals(read_day(tmp_path / "b", 2))
    summary = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert summary["domains"] == ["a", "b", "c"]


def test_sequence_list_columns_drop_null_and_empty_items():
    import pyarrow as pa

    from exfm.data.hashing import stable_hash
    from exfm.data.ingest import _to_sequence

    lists = pa.array([["a", None, "b"], [None], [], ["c", ""]], pa.list_(pa.string()))
    expected = [stable_hash(["a", "b"]).tolist(), [], [], stable_hash(["c"]).tolist()]
    assert _to_sequence(lists, "|", 5).to_pylist() == expected
