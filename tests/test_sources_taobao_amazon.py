"""Tests of the TaobaoAd and Amazon Electronics adapters (``exfm.data.sources.taobao`` / ``.amazon``).

Small files in the original raw formats are written here; they exercise the joins, sequences
without look-ahead, missing values, duplicates, out-of-range times, bad lines in both
``on_bad_row`` modes, the domain mapping, the negatives, and the bucketed (bounded-memory) join.
"""

from __future__ import annotations

import csv
import gzip
import json
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from exfm.cli import main
from exfm.data.dataset import DOMAIN_COLUMN, TIME_COLUMN, open_dataset
from exfm.data.hashing import hash_text, stable_hash
from exfm.data.ingest import REJECTS_NAME, IngestError
from exfm.data.sources import adapt, taobao
from exfm.data.sources._common import SOURCE_INFO_NAME

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
T0 = 1_494_000_000  # 2017-05-06 00:00 in UTC+8: the start of day 1
DAY = 86_400
PROFILE_HEADER = (
    "userid,cms_segid,cms_group_id,final_gender_code,age_level,pvalue_level,shopping_level,occupation,"
    "new_user_class_level "
)


def h(value: object) -> int:
    return hash_text(str(value))


def hashes(values: list) -> list[int]:
    return [h(v) for v in values]


def read_all(out: Path) -> pa.Table:
    dataset = open_dataset(out)
    tables = [pq.read_table(f) for day in range(1, dataset.num_days + 1) for f in dataset.day_files(day)]
    return pa.concat_tables(tables)


def write_text(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def read_rejects(out: Path) -> list[dict]:
    with open(out / REJECTS_NAME, newline="") as handle:
        return list(csv.DictReader(handle))


# --- TaobaoAd ----------------------------------------------------------------------------------
def write_taobao(
    raw: Path,
    *,
    sample_extra: list[str] = (),
    behavior_extra: list[str] = (),
    ad_extra: list[str] = (),
) -> Path:
    """A tiny TaobaoAd in the raw format; ``*_extra`` lines are appended to the files."""
    raw.mkdir(parents=True, exist_ok=True)
    write_text(
        raw / "raw_sample.csv",
        [
            "user,time_stamp,adgroup_id,pid,nonclk,clk",
            f"1,{T0 + 3600},10,430548_1007,1,0",  # line 2
            f"1,{T0 + 7200},20,430539_1007,0,1",
            f"2,{T0 + DAY + 100},10,430548_1007,1,0",
            f"3,{T0 + 2 * DAY},30,430548_1007,1,0",  # ad 30 has no ad_feature row
            f"4,{T0 + 3 * DAY},20,430548_1007,1,0",  # user 4 has no profile
            f"5,{T0 + 4 * DAY},20,430548_1007,0,1",
            f"6,{T0 + 7 * DAY + 10},10,430548_1007,1,0",
            f"6,{T0 - 100},10,430548_1007,1,0",  # before day 1: dropped as out of range
            *sample_extra,
        ],
    )
    write_text(
        raw / "ad_feature.csv",
        [
            "adgroup_id,cate_id,campaign_id,customer,brand,price",
            "10,100,1000,5,NULL,12.5",  # brand NULL -> missing
            "20,200,2000,6,7,",  # price empty -> missing
            *ad_extra,
        ],
    )
    write_text(
        raw / "user_profile.csv",
        [
            PROFILE_HEADER,
            "1,0,3,2,3,1,3,0,2",
            "2,5,4,1,4,2,2,1,3",
            "3,,,2,,,3,0,",  # empty values, no class level
            "5,1,1,1,1,1,1,0,4",
            "6,1,1,1,1,1,1,0,1",
        ],
    )
    write_text(
        raw / "behavior_log.csv",
        [
            "user,time_stamp,btag,cate,brand",
            f"1,{T0 - 1000},pv,100,7",
            f"1,{T0 - 1000},pv,100,7",  # exact duplicate
            f"1,{T0 - 1000},cart,100,7",  # the same event under another btag: a duplicate too
            f"1,{T0 + 3600},pv,555,55",  # the same second as the first impression: not before it
            f"1,{T0 + 5000},pv,300,30",  # between the two impressions of user 1
            f"1,{T0 + 9000},pv,999,99",  # after every impression of user 1
            "1,1300000000,pv,888,88",  # 2011: outside 2017, dropped
            "1,1900000000,pv,777,77",  # 2030: outside 2017, dropped
            f"2,{T0 - 50},fav,100,NULL",  # brand NULL
            f"9,{T0 - 50},pv,100,7",  # a user without impressions
            *behavior_extra,
        ],
    )
    return raw


def rows_by_user(table: pa.Table) -> dict[int, list[dict]]:
    found: dict[int, list[dict]] = {}
    for row in table.to_pylist():
        found.setdefault(row["user"], []).append(row)
    return found


def test_taobao_joins_sequences_and_domains(tmp_path: Path) -> None:
    raw = write_taobao(tmp_path / "raw")
    manifest = adapt("taobao", raw, tmp_path / "out", show_progress=False, memory_limit_mb=256)
    dataset = open_dataset(tmp_path / "out")
    assert dataset.schema.split.timezone == "Asia/Shanghai"
    assert dataset.num_days == 8 and manifest.days[0].start_us == T0 * 1_000_000
    assert manifest.rows == 7 and manifest.dropped_out_of_range == 1 and manifest.rejected_rows == 0
    assert manifest.sources == [
        str(raw / name) for name in ("raw_sample.csv", "ad_feature.csv", "user_profile.csv", "behavior_log.csv")
    ]
    assert not (tmp_path / "out" / REJECTS_NAME).exists()
    table = read_all(tmp_path / "out")
    users = rows_by_user(table)

    first, second = sorted(users[h(1)], key=lambda r: r[TIME_COLUMN])
    # no look-ahead: only events strictly before each impression, oldest first, deduplicated
    assert first["hist_cate"] == hashes([100]) and first["hist_brand"] == hashes([7])
    assert second["hist_cate"] == hashes([100, 555, 300]) and second["hist_brand"] == hashes([7, 55, 30])
    assert first["click"] == 0 and second["click"] == 1
    # the ad join: ad 10 has brand NULL (missing) and a price; ad 20 a brand and no price
    assert first["adgroup_id"] == h(10) and first["cate_id"] == h(100) and first["brand"] == 0
    assert first["price"] == pytest.approx(12.5)
    assert second["brand"] == h(7) and second["price"] is None and second["campaign_id"] == h(2000)
    (ad30,) = users[h(3)]
    assert ad30["cate_id"] == 0 and ad30["brand"] == 0 and ad30["price"] is None and ad30["hist_cate"] == []
    # user 2: a NULL brand in the log is left out of the brand sequence only
    (user2,) = users[h(2)]
    assert user2["hist_cate"] == hashes([100]) and user2["hist_brand"] == []
    # profiles: empty values are missing; the trailing-space header column is read
    assert users[h(1)][0]["new_user_class_level"] == h(2) and users[h(1)][0]["age_level"] == h(3)
    assert ad30["cms_segid"] == 0 and ad30["age_level"] == 0 and ad30["final_gender_code"] == h(2)
    (user4,) = users[h(4)]
    assert user4["cms_segid"] == 0 and user4["new_user_class_level"] == 0
    # domains: levels 1-2, 3-4, and missing (empty level or no profile row)
    domain = {user: rows[0][DOMAIN_COLUMN] for user, rows in users.items()}
    assert domain == {
        h(1): "level_1_2",
        h(6): "level_1_2",
        h(2): "level_3_4",
        h(5): "level_3_4",
        h(3): "level_unknown",
        h(4): "level_unknown",
    }
    assert manifest.domains == ["level_1_2", "level_3_4", "level_unknown"]
    # day 8 (2017-05-13 local) holds user 6's impression at 00:00:10 local
    assert manifest.days[7].rows == 1
    info = json.loads((tmp_path / "out" / SOURCE_INFO_NAME).read_text())
    counts = info["counts"]
    assert counts["behavior_rows"] == 10
    assert counts["behavior_outside_2017"] == 2
    assert counts["behavior_users_without_impressions"] == 1
    assert counts["behavior_duplicates_dropped"] == 2
    assert counts["impressions_without_ad_feature"] == 1 and counts["impressions_without_user_profile"] == 1
    assert info["impressions_per_domain"] == {"level_1_2": 4, "level_3_4": 2, "level_unknown": 2}


def test_taobao_skip_mode_lists_bad_lines_of_every_file(tmp_path: Path) -> None:
    raw = write_taobao(
        tmp_path / "raw",
        sample_extra=[
            f"7,{T0},10,430548_1007,1,0,extra",  # line 10: too many fields
            "7,abc,10,430548_1007,1,0",  # line 11: time not a number
            f"7,{T0},10,430548_1007,1,2",  # line 12: clk 2
            "7,,10,430548_1007,1,0",  # line 13: empty time
        ],
        behavior_extra=["1,xyz,pv,1,2", "1,2,3"],  # lines 12, 13
        ad_extra=["30,abc,1,1,1,1.0"],  # line 4: cate not an integer -> ad 30 stays unknown
    )
    manifest = adapt("taobao", raw, tmp_path / "out", show_progress=False, memory_limit_mb=256, on_bad_row="skip")
    assert manifest.rows == 7 and manifest.rejected_rows == 7
    found = {(Path(r["file"]).name, int(r["line"]), r["column"]) for r in read_rejects(tmp_path / "out")}
    assert found == {
        ("raw_sample.csv", 10, ""),
        ("raw_sample.csv", 11, "time_stamp"),
        ("raw_sample.csv", 12, "clk"),
        ("raw_sample.csv", 13, "time_stamp"),
        ("behavior_log.csv", 12, "time_stamp"),
        ("behavior_log.csv", 13, ""),
        ("ad_feature.csv", 4, "cate_id"),
    }
    reasons = {(Path(r["file"]).name, int(r["line"])): (r["reason"], r["raw"]) for r in read_rejects(tmp_path / "out")}
    assert reasons[("raw_sample.csv", 10)][0] == "expected 6 fields, got 7"
    assert reasons[("raw_sample.csv", 11)] == ("expected a unix time in seconds (an integer), got 'abc'", "abc")
    assert reasons[("raw_sample.csv", 12)] == ("expected 0 or 1, got '2'", "2")
    assert reasons[("raw_sample.csv", 13)] == ("expected a unix time in seconds (an integer), got ''", "")
    info = json.loads((tmp_path / "out" / SOURCE_INFO_NAME).read_text())
    assert info["rejected_per_file"][str(raw / "raw_sample.csv")] == 4


@pytest.mark.parametrize(
    ("file", "extra", "message"),
    [
        ("raw_sample.csv", f"7,{T0},10,p,1,0,extra", "raw_sample.csv:10: expected 6 fields, got 7"),
        ("raw_sample.csv", "7,abc,10,p,1,0", "raw_sample.csv:10: column 'time_stamp': expected a unix time"),
        ("behavior_log.csv", "1,14940x,pv,1,2", "behavior_log.csv:12: column 'time_stamp'"),
        ("behavior_log.csv", "1,2", "behavior_log.csv:12: expected 5 fields, got 2"),
        ("ad_feature.csv", "30,1,1,1,1,cheap", "ad_feature.csv:4: column 'price': expected a number"),
    ],
)
def test_taobao_error_mode_names_file_line_and_column(tmp_path: Path, file: str, extra: str, message: str) -> None:
    key = {"raw_sample.csv": "sample_extra", "behavior_log.csv": "behavior_extra", "ad_feature.csv": "ad_extra"}[file]
    raw = write_taobao(tmp_path / "raw", **{key: [extra]})
    with pytest.raises(IngestError, match=message.replace(".", r"\.")):
        adapt("taobao", raw, tmp_path / "out", show_progress=False, memory_limit_mb=256, on_bad_row="error")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))


def test_taobao_missing_file_or_column_is_a_clear_error(tmp_path: Path) -> None:
    raw = write_taobao(tmp_path / "raw")
    (raw / "behavior_log.csv").unlink()
    with pytest.raises(IngestError, match=r"behavior_log\.csv \(or behavior_log\.csv\.gz\) not found"):
        adapt("taobao", raw, tmp_path / "out", show_progress=False)
    raw = write_taobao(tmp_path / "raw2")
    write_text(raw / "ad_feature.csv", ["adgroup_id,cate_id,campaign_id,customer,price", "10,1,1,1,1.0"])
    with pytest.raises(IngestError, match=r"ad_feature\.csv: missing column\(s\) \['brand'\]"):
        adapt("taobao", raw, tmp_path / "out", show_progress=False)


def test_taobao_gzipped_raw_files_and_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    raw = write_taobao(tmp_path / "raw")
    adapt("taobao", raw, tmp_path / "plain", show_progress=False, memory_limit_mb=256)
    for name in ("raw_sample.csv", "behavior_log.csv", "user_profile.csv"):
        (raw / f"{name}.gz").write_bytes(gzip.compress((raw / name).read_bytes()))
        (raw / name).unlink()
    argv = ["ingest", "--source", "taobao", "--raw", str(raw), "--out", str(tmp_path / "gz"), "--memory-mb", "256"]
    assert main(argv) == 0
    assert "wrote 7 rows over 8 days" in capsys.readouterr().out
    assert read_all(tmp_path / "gz").equals(read_all(tmp_path / "plain"))
    assert main(argv) == 2  # the output exists: an error, not a silent overwrite
    assert "already exists" in capsys.readouterr().err


def reference_histories(events: list[tuple[int, int, int, int]], user: int, at: int) -> tuple[list, list]:
    """What the adapter must produce: distinct (time, cate, brand) events of ``user`` strictly
    before ``at``, sorted, the latest 50."""
    mine = sorted({(t, c, b) for u, t, c, b in events if u == user and t < at and t >= taobao.YEAR_START})
    mine = mine[-taobao.MAX_LEN :]
    return hashes([c for _, c, _ in mine]), hashes([b for _, _, b in mine])


def write_random_taobao(raw: Path, seed: int, users: int, impressions: int, events: int) -> list[tuple]:
    rng = np.random.default_rng(seed)
    raw.mkdir(parents=True)
    sample = ["user,time_stamp,adgroup_id,pid,nonclk,clk"]
    for _ in range(impressions):
        clk = int(rng.random() < 0.1)
        sample.append(
            f"{rng.integers(1, users + 1)},{T0 + rng.integers(0, 8 * DAY)},{rng.integers(1, 30)},p1,{1 - clk},{clk}"
        )
    write_text(raw / "raw_sample.csv", sample)
    write_text(
        raw / "ad_feature.csv",
        ["adgroup_id,cate_id,campaign_id,customer,brand,price"]
        + [f"{a},{a % 7},{a},{a % 5},{a % 11},{a * 1.5}" for a in range(1, 30)],
    )
    write_text(raw / "user_profile.csv", [PROFILE_HEADER] + [f"{u},1,1,1,1,1,1,0,{u % 5}" for u in range(1, users + 1)])
    log = []
    for _ in range(events):
        # times cluster on few seconds, so that ties and duplicates are common
        log.append(
            (
                int(rng.integers(1, users + 2)),
                int(T0 - 5 * DAY + rng.integers(0, 13 * DAY) // 600 * 600),
                int(rng.integers(1, 40)),
                int(rng.integers(1, 6)),
            )
        )
    log += log[: events // 10]  # 10% exact duplicates
    write_text(
        raw / "behavior_log.csv", ["user,time_stamp,btag,cate,brand"] + [f"{u},{t},pv,{c},{b}" for u, t, c, b in log]
    )
    return log


def test_taobao_bucketed_join_matches_a_reference_and_does_not_depend_on_buckets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = write_random_taobao(tmp_path / "raw", seed=3, users=40, impressions=400, events=4000)
    adapt("taobao", tmp_path / "raw", tmp_path / "one", show_progress=False, memory_limit_mb=256)
    one = json.loads((tmp_path / "one" / SOURCE_INFO_NAME).read_text())
    assert one["buckets"] == 1
    monkeypatch.setattr(taobao, "EVENT_BYTES", 10**6)  # many small buckets under the 256 MB budget
    manifest = adapt("taobao", tmp_path / "raw", tmp_path / "many", show_progress=False, memory_limit_mb=256)
    many = json.loads((tmp_path / "many" / SOURCE_INFO_NAME).read_text())
    assert many["buckets"] > 5
    assert manifest.rows == 400
    left, right = read_all(tmp_path / "one"), read_all(tmp_path / "many")
    assert left.equals(right)
    users = {h(u): u for u in range(1, 42)}
    checked = 0
    for row in right.to_pylist():
        cate, brand = reference_histories(log, users[row["user"]], row[TIME_COLUMN] // 1_000_000)
        assert row["hist_cate"] == cate and row["hist_brand"] == brand
        checked += bool(cate)
    assert checked > 300
    assert max(len(r) for r in right["hist_cate"].to_pylist()) == taobao.MAX_LEN
    kept = [event for event in log if event[0] <= 40]  # user 41 has no impression
    assert many["counts"]["behavior_duplicates_dropped"] == len(kept) - len(set(kept)) >= 350


def test_taobao_x1_sample_rows_land_on_day_one(tmp_path: Path) -> None:
    """The real FuxiCTR TaobaoAd sample, written back in the raw layout (its times are local)."""
    folder = SHARED / "taobao_x1_tiny"
    if not folder.exists():
        pytest.skip("../shared/data is not available")
    with open(folder / "train_sample.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    zone = ZoneInfo("Asia/Shanghai")
    raw = tmp_path / "raw"
    raw.mkdir()
    sample, ads, profiles = ["user,time_stamp,adgroup_id,pid,nonclk,clk"], {}, {}
    for r in rows:
        local = datetime.strptime(r["time_stamp"], "%Y-%m-%d %H:%M:%S").replace(tzinfo=zone)
        sample.append(
            f"{r['userid']},{int(local.timestamp())},{r['adgroup_id']},{r['pid']},{1 - int(r['clk'])},{r['clk']}"
        )
        ads.setdefault(
            r["adgroup_id"],
            ",".join(r[c] for c in ("adgroup_id", "cate_id", "campaign_id", "customer", "brand", "price")),
        )
        profiles[r["userid"]] = ",".join(r[c] for c in ["userid", *taobao.PROFILE_FIELDS])
    write_text(raw / "raw_sample.csv", sample)
    write_text(raw / "ad_feature.csv", ["adgroup_id,cate_id,campaign_id,customer,brand,price", *ads.values()])
    write_text(raw / "user_profile.csv", [PROFILE_HEADER, *profiles.values()])
    write_text(raw / "behavior_log.csv", ["user,time_stamp,btag,cate,brand"])
    manifest = adapt("taobao", raw, tmp_path / "out", show_progress=False, memory_limit_mb=256)
    assert manifest.rows == len(rows) and manifest.days[0].rows == len(rows) and manifest.rejected_rows == 0
    assert manifest.days[0].label_rates["click"] == pytest.approx(np.mean([int(r["clk"]) for r in rows]))
    table = read_all(tmp_path / "out")
    # the sample repeats some ad groups with other features: the adapter keeps one row per ad group
    cate_of_ad = {ad: line.split(",")[1] for ad, line in ads.items()}
    assert set(table["cate_id"].to_pylist()) == set(stable_hash([cate_of_ad[r["adgroup_id"]] for r in rows]).tolist())
    assert set(table[DOMAIN_COLUMN].to_pylist()) <= {"level_1_2", "level_3_4", "level_unknown"}


# --- Amazon Electronics ------------------------------------------------------------------------
END = int(datetime(2014, 7, 20, tzinfo=UTC).timestamp())  # the last review date of the fixtures


def review(user: str, item: str, when: int, **extra: object) -> str:
    return json.dumps({"reviewerID": user, "asin": item, "overall": 5.0, "unixReviewTime": when, **extra})


def meta(item: str, categories: list[list[str]] | None) -> str:
    record: dict = {"asin": item, "title": f"it's {item}", "price": 9.99, "related": {"also_bought": ["X1"]}}
    if categories is not None:
        record["categories"] = categories
    return repr(record)  # a Python literal: single quotes, not JSON


def write_amazon(raw: Path, reviews: list[str], metas: list[str]) -> Path:
    raw.mkdir(parents=True, exist_ok=True)
    write_text(raw / "reviews_Electronics_5.json", reviews)
    write_text(raw / "meta_Electronics.json", metas)
    return raw


def small_amazon(raw: Path, extra_reviews: list[str] = (), extra_meta: list[str] = ()) -> Path:
    items = [f"I{k}" for k in range(1, 7)]
    reviews = [
        review("A", "I1", END - 10 * DAY),  # line 1
        review("A", "I3", END - 5 * DAY),
        review("A", "I2", END - 5 * DAY),  # the same time as I3: not in each other's history
        review("A", "I4", END),
        review("B", "I1", END - 3 * DAY),
        review("B", "I1", END - 2 * DAY),  # a repeat of (B, I1): dropped
        review("C", "I5", END - 200 * DAY),  # before the window: history only
        review("C", "I6", END - DAY),
        *extra_reviews,
    ]
    metas = [
        meta("I1", [["Electronics", "Computers", "Laptops"]]),
        meta("I2", [["Electronics", "Camera"], ["Electronics", "Camera", "Lenses"]]),  # the last path's leaf
        meta("I3", []),  # no category
        meta("I4", None),
        meta("UNREVIEWED", [["Electronics", "Other"]]),
        *(meta(item, [["Electronics", f"cat-{item}"]]) for item in items[4:6]),
        *extra_meta,
    ]
    return write_amazon(raw, reviews, metas)


def test_amazon_histories_negatives_and_categories(tmp_path: Path) -> None:
    raw = small_amazon(tmp_path / "raw")
    manifest = adapt("amazon", raw, tmp_path / "out", show_progress=False, memory_limit_mb=256)
    schema = open_dataset(tmp_path / "out").schema
    assert schema.split.mode == "equal_spans" and schema.split.days == 8
    table = read_all(tmp_path / "out")
    rows = table.to_pylist()
    positives = [r for r in rows if r["click"] == 1]
    negatives = [r for r in rows if r["click"] == 0]
    # 8 reviews - 1 repeat - 1 before the window = 6 positives, each with one negative
    assert len(positives) == 6 and len(negatives) == 6 and manifest.rows == 12
    by_item = {(r["user"], r["item"]): r for r in positives}
    a4 = by_item[(h("A"), h("I4"))]
    assert a4["hist_item"] == hashes(["I1", "I2", "I3"])  # earlier reviews, ties ordered by item
    assert a4["hist_cate"] == hashes(["Laptops", "Lenses"])  # I3 has no category
    assert by_item[(h("A"), h("I2"))]["hist_item"] == hashes(["I1"])
    assert by_item[(h("A"), h("I3"))]["hist_item"] == hashes(["I1"])
    assert by_item[(h("A"), h("I1"))]["hist_item"] == []
    assert by_item[(h("C"), h("I6"))]["hist_item"] == hashes(["I5"])  # an old review as history
    assert by_item[(h("A"), h("I2"))]["category"] == h("Lenses")
    assert by_item[(h("A"), h("I3"))]["category"] == 0 and a4["category"] == 0
    # a negative: same user, time and history, an item the user never reviewed, with its category
    reviewed = {("A", i) for i in ("I1", "I2", "I3", "I4")} | {("B", "I1"), ("C", "I5"), ("C", "I6")}
    reviewed_hashes = {(h(u), h(i)) for u, i in reviewed}
    categories = {h(f"I{k}"): h(f"cat-I{k}") for k in range(5, 7)} | {h("I1"): h("Laptops"), h("I2"): h("Lenses")}
    for negative in negatives:
        assert (negative["user"], negative["item"]) not in reviewed_hashes
        assert negative["item"] in {h(f"I{k}") for k in range(1, 7)}  # drawn from reviewed items
        assert negative["category"] == categories.get(negative["item"], 0)
        twin = [p for p in positives if p["user"] == negative["user"] and p[TIME_COLUMN] == negative[TIME_COLUMN]]
        assert twin and twin[0]["hist_item"] == negative["hist_item"]
    info = json.loads((tmp_path / "out" / SOURCE_INFO_NAME).read_text())
    assert info["counts"]["repeated_user_item_dropped"] == 1
    assert info["counts"]["reviews_before_window_history_only"] == 1
    assert info["counts"]["meta_lines_skipped_unreviewed"] == 1
    assert info["counts"]["items_without_category"] == 2
    assert info["window"]["last_day_utc"] == "2014-07-20"
    # deterministic: a second run writes the same rows
    adapt("amazon", raw, tmp_path / "again", show_progress=False, memory_limit_mb=256)
    assert read_all(tmp_path / "again").equals(table)


def test_amazon_negatives_avoid_every_reviewed_item(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    items = [f"P{k:02d}" for k in range(12)]
    reviews = [review("ALL", item, END - k * DAY) for k, item in enumerate(items)]  # reviewed every item
    pairs = set()
    for u in range(30):
        for item in rng.choice(items, size=rng.integers(3, 11), replace=False):
            pairs.add((f"U{u}", str(item)))
            reviews.append(review(f"U{u}", str(item), END - int(rng.integers(0, 70)) * DAY))
    write_amazon(tmp_path / "raw", reviews, [meta(i, [["E", f"c{i}"]]) for i in items])
    adapt("amazon", tmp_path / "raw", tmp_path / "out", show_progress=False, memory_limit_mb=256)
    rows = read_all(tmp_path / "out").to_pylist()
    reviewed = {(h(u), h(i)) for u, i in pairs}
    negatives = [r for r in rows if r["click"] == 0]
    assert negatives and all((r["user"], r["item"]) not in reviewed for r in negatives)
    assert all(r["user"] != h("ALL") for r in negatives)  # nothing left to draw for this user
    info = json.loads((tmp_path / "out" / SOURCE_INFO_NAME).read_text())
    positives = sum(r["click"] for r in rows)
    assert info["counts"]["positives_without_negative"] == sum(1 for r in rows if r["user"] == h("ALL"))
    assert len(negatives) == positives - info["counts"]["positives_without_negative"]
    for row in rows:  # histories only hold strictly earlier reviews
        assert row["item"] not in row["hist_item"] or row["click"] == 0


def test_amazon_bad_lines_skip_and_error(tmp_path: Path) -> None:
    bad_reviews = [
        "{not json",  # line 9
        json.dumps({"reviewerID": "D", "unixReviewTime": END}),  # line 10: no asin
        json.dumps({"reviewerID": "D", "asin": "I1", "unixReviewTime": "yesterday"}),  # line 11
    ]
    bad_meta = ["{'asin': 'I6', 'categories': [['Electronics', 'Cut"]  # line 8: a broken literal
    raw = small_amazon(tmp_path / "raw", bad_reviews, bad_meta)
    manifest = adapt("amazon", raw, tmp_path / "out", show_progress=False, memory_limit_mb=256, on_bad_row="skip")
    assert manifest.rejected_rows == 4
    found = {(Path(r["file"]).name, int(r["line"]), r["column"]) for r in read_rejects(tmp_path / "out")}
    assert found == {
        ("reviews_Electronics_5.json", 9, ""),
        ("reviews_Electronics_5.json", 10, "asin"),
        ("reviews_Electronics_5.json", 11, "unixReviewTime"),
        ("meta_Electronics.json", 8, ""),
    }
    with pytest.raises(IngestError, match=r"reviews_Electronics_5\.json:9: not valid JSON"):
        adapt("amazon", raw, tmp_path / "err", show_progress=False, on_bad_row="error")
    raw = small_amazon(tmp_path / "raw2", bad_reviews[2:])
    with pytest.raises(IngestError, match=r"reviews_Electronics_5\.json:9: column 'unixReviewTime'"):
        adapt("amazon", raw, tmp_path / "err", show_progress=False, on_bad_row="error")
    raw = small_amazon(tmp_path / "raw3", extra_meta=bad_meta)
    with pytest.raises(IngestError, match=r"meta_Electronics\.json:8: not a Python dict literal"):
        adapt("amazon", raw, tmp_path / "err", show_progress=False, on_bad_row="error")
    assert not (tmp_path / "err").exists()


def test_amazon_weekly_spans_over_the_last_56_days(tmp_path: Path) -> None:
    reviews = [review(f"U{d % 7}", f"I{d}", END - d * DAY) for d in range(0, 60)]
    write_amazon(tmp_path / "raw", reviews, [meta(f"I{d}", [["E", "x"]]) for d in range(60)])
    manifest = adapt("amazon", tmp_path / "raw", tmp_path / "out", show_progress=False, memory_limit_mb=256)
    table = read_all(tmp_path / "out")
    assert table[TIME_COLUMN].to_numpy().min() == (END - 55 * DAY) * 1_000_000
    positives_per_day = [round(day.rows * day.label_rates["click"]) for day in manifest.days]
    assert positives_per_day == [7] * 8


def test_amazon_real_sample_round_trip(tmp_path: Path) -> None:
    """The real torch-rechub Amazon Electronics sample, written back in the raw formats."""
    path = SHARED / "amazon_electronics_sample" / "amazon_electronics_sample.csv"
    if not path.exists():
        pytest.skip("../shared/data is not available")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    reviews = [review(f"U{r['user_id']}", f"B{r['item_id']}", int(r["time"])) for r in rows]
    categories = {f"B{r['item_id']}": r["cate_id"] for r in rows}
    metas = [meta(item, [["Electronics", f"c{cate}"]]) for item, cate in categories.items()]
    manifest = adapt(
        "amazon",
        write_amazon(tmp_path / "raw", reviews, metas),
        tmp_path / "out",
        show_progress=False,
        memory_limit_mb=256,
    )
    info = json.loads((tmp_path / "out" / SOURCE_INFO_NAME).read_text())
    counts = info["counts"]
    assert counts["reviews_valid"] == len(rows) and manifest.rejected_rows == 0
    assert manifest.rows == counts["positives"] + counts["negatives"] > 0
    times = read_all(tmp_path / "out")[TIME_COLUMN].to_numpy() // 1_000_000
    assert times.max() == max(int(r["time"]) for r in rows)
    assert times.min() >= times.max() - 55 * DAY
    assert "2014" in info["window"]["last_day_utc"]


# --- the shared adapter frame (exfm.data.sources._common) -----------------------------------------
@pytest.mark.parametrize("source", ["taobao", "amazon"])
@pytest.mark.parametrize(
    ("options", "message"),
    [({"memory_limit_mb": 100}, "memory_limit_mb must be at least 256"), ({"on_bad_row": "warn"}, "on_bad_row")],
)
def test_adapters_check_their_options_and_write_nothing(
    tmp_path: Path, source: str, options: dict, message: str
) -> None:
    raw = write_taobao(tmp_path / "raw") if source == "taobao" else small_amazon(tmp_path / "raw")
    with pytest.raises(ValueError, match=message):
        adapt(source, raw, tmp_path / "out", show_progress=False, **options)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_duckdb_errors_become_ingest_errors_naming_the_file_or_the_budget(tmp_path: Path) -> None:
    import duckdb

    from exfm.data.sources._common import duckdb_errors

    oom = duckdb.OutOfMemoryException("could not allocate")
    expected = r"^raw/x\.csv: DuckDB ran out of memory .*raise memory_limit_mb$"
    with pytest.raises(IngestError, match=expected), duckdb_errors(512, "raw/x.csv"):
        raise oom
    with pytest.raises(IngestError, match=r"^DuckDB ran out of memory \(.*memory_limit_mb=512\)"), duckdb_errors(512):
        raise oom
    missing = tmp_path / "absent.csv"
    with pytest.raises(IngestError, match=rf"^{missing}: cannot read: "), duckdb_errors(512, missing):
        duckdb.connect().execute(f"SELECT * FROM read_csv('{missing}')")
    with pytest.raises(duckdb.Error), duckdb_errors(512):  # without a file, other errors are DuckDB's own
        duckdb.connect().execute("SELECT * FROM no_such_table")
