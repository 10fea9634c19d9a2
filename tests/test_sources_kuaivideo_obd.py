"""Tests of the KuaiVideo, KuaiRand and Open Bandit Dataset adapters (``exfm.data.sources``).

Small raw-format fixtures are written here; the real samples in ``../shared/data`` (OBD, KuaiRand-1K)
are used when present and skipped cleanly otherwise.
"""

from __future__ import annotations

import csv
import re
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from exfm.data.dataset import open_dataset
from exfm.data.hashing import stable_hash
from exfm.data.ingest import IngestError
from exfm.data.sources import SOURCES, adapt, kuairand, kuaivideo, obd

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
SHANGHAI = ZoneInfo("Asia/Shanghai")


def read_all(out: Path) -> pa.Table:
    dataset = open_dataset(out)
    days = range(1, dataset.num_days + 1)
    return pa.concat_tables(pq.read_table(f) for day in days for f in dataset.day_files(day))


def read_rejects(out: Path) -> list[dict[str, str]]:
    with open(out / "rejects.csv") as handle:
        return list(csv.DictReader(handle))


def hashes(values: list[str]) -> list[int]:
    return [int(h) for h in stable_hash(values)]


# --- KuaiVideo ---------------------------------------------------------------------------------
def local_ms(*args: int, millis: int = 0) -> int:
    return int(datetime(*args, tzinfo=SHANGHAI).timestamp()) * 1000 + millis


def kuai_rows(n: int = 240, seed: int = 0) -> list[list[str]]:
    """Impressions of 4 users over local 2026-01-01..03, whole minutes (many ties in time)."""
    rng = np.random.default_rng(seed)
    t0 = local_ms(2026, 1, 1)
    rows = []
    for _ in range(n):
        time = t0 + int(rng.integers(0, 3 * 24 * 60)) * 60_000
        click = int(rng.random() < 0.5)
        like, follow = int(click and rng.random() < 0.3), int(click and rng.random() < 0.1)
        playing = int(rng.integers(1, 30_000)) if click else 0
        rows.append(
            [
                *(f"u{rng.integers(0, 4)}", f"p{rng.integers(0, 15)}"),
                *(str(click), str(like), str(follow), str(time), str(playing)),
                str(int(rng.integers(1_000, 60_000))),
            ]
        )
    return rows


def write_tsv(path: Path, rows: list[list[str]] | list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else "\t".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def expected_history(rows: list[list[str]], max_len: int) -> list[list[str]]:
    """For each row, the photos its user clicked strictly earlier, ordered by (time, line)."""
    history = []
    for row in rows:
        earlier = [
            (int(r[5]), j, r[1])
            for j, r in enumerate(rows)
            if r[0] == row[0] and r[2] == "1" and int(r[5]) < int(row[5])
        ]
        history.append([photo for _, _, photo in sorted(earlier)][-max_len:])
    return history


def test_kuaivideo_columns_labels_and_history_without_look_ahead(tmp_path: Path) -> None:
    rows = kuai_rows()
    # a tie: u9 clicks p1 and sees p2 in the same millisecond, then sees p3 one ms later
    tie = local_ms(2026, 1, 2, 12)
    rows += [["u9", "p1", "1", "0", "0", str(tie), "5", "100"], ["u9", "p2", "0", "0", "0", str(tie), "0", "100"]]
    rows += [["u9", "p3", "0", "0", "0", str(tie + 1), "0", "100"]]
    write_tsv(tmp_path / "raw" / "train_interaction.txt", rows)
    manifest = kuaivideo.adapt(
        tmp_path / "raw", tmp_path / "out", show_progress=False, history_len=3, start=date(2026, 1, 1), days=3
    )
    dataset = open_dataset(tmp_path / "out")
    schema = dataset.schema
    assert [f.name for f in schema.features] == ["user_id", "photo_id", "duration_time", "click_history"]
    assert schema.tasks == ["click", "like", "follow"]
    assert schema.time.unit == "ms" and schema.split.timezone == "Asia/Shanghai"
    assert "playing_time" not in schema.to_json()  # an outcome: never a feature
    assert manifest.rows == len(rows) and manifest.rejected_rows == 0 and manifest.dropped_out_of_range == 0
    assert manifest.sources == [str(tmp_path / "raw" / "train_interaction.txt")]
    assert [d.rows for d in manifest.days] == [
        sum((int(r[5]) - local_ms(2026, 1, 1)) // 86_400_000 == d for r in rows) for d in range(3)
    ]

    order = sorted(range(len(rows)), key=lambda i: (int(rows[i][5]), i))  # by time, ties in input order
    table = read_all(tmp_path / "out")
    ordered = [rows[i] for i in order]
    assert table["_time"].to_pylist() == [int(r[5]) * 1000 for r in ordered]
    assert table["user_id"].to_pylist() == hashes([r[0] for r in ordered])
    assert table["photo_id"].to_pylist() == hashes([r[1] for r in ordered])
    for k, task in enumerate(("click", "like", "follow")):
        assert table[task].to_pylist() == [int(r[2 + k]) for r in ordered]
    assert table["duration_time"].to_pylist() == [float(r[7]) for r in ordered]
    history = expected_history(rows, 3)
    assert table["click_history"].to_pylist() == [hashes(history[i]) for i in order]
    # the tie: neither row at `tie` sees u9's click at `tie`; the row one millisecond later does
    u9 = [i for i, r in enumerate(ordered) if r[0] == "u9"]
    assert [table["click_history"][i].as_py() for i in u9] == [[], [], hashes(["p1"])]


def test_kuaivideo_time_unit_is_detected_or_given(tmp_path: Path) -> None:
    rows = [[*r[:5], str(int(r[5]) // 1000 * 1000), *r[6:]] for r in kuai_rows(60, seed=1)]
    seconds = [[*r[:5], str(int(r[5]) // 1000), *r[6:]] for r in rows]
    write_tsv(tmp_path / "ms" / "train_interaction.txt", rows)
    write_tsv(tmp_path / "s" / "train_interaction.txt", seconds)
    common = {"show_progress": False, "start": date(2026, 1, 1), "days": 3}
    kuaivideo.adapt(tmp_path / "ms", tmp_path / "out_ms", **common)
    kuaivideo.adapt(tmp_path / "s", tmp_path / "out_s", **common)
    kuaivideo.adapt(tmp_path / "s", tmp_path / "out_given", time_unit="s", **common)
    assert open_dataset(tmp_path / "out_s").schema.time.unit == "s"
    reference = read_all(tmp_path / "out_ms")
    assert read_all(tmp_path / "out_s").equals(reference)
    assert read_all(tmp_path / "out_given").equals(reference)


def test_kuaivideo_split_takes_the_busiest_days_and_cuts_at_local_midnight(tmp_path: Path) -> None:
    def row(user: str, time: int) -> list[str]:
        return [user, "p", "0", "0", "0", str(time), "0", "10"]

    rows = [row("early", local_ms(2025, 12, 28, 12))]  # a sparse head day: outside the days, but read
    for day in (30, 31):
        rows += [row(f"u{i}", local_ms(2025, 12, day, 8, i)) for i in range(5)]
    rows += [row(f"u{i}", local_ms(2026, 1, 1, 8, i)) for i in range(5)]
    rows += [row("last-of-day-2", local_ms(2025, 12, 31, 23, 59, 59, millis=999))]
    rows += [row("first-of-day-3", local_ms(2026, 1, 1))]
    rows += [row("late", local_ms(2026, 1, 5, 12))]  # a sparse tail day
    write_tsv(tmp_path / "raw" / "train_interaction.txt", rows)
    manifest = kuaivideo.adapt(tmp_path / "raw", tmp_path / "out", show_progress=False, days=3)
    assert manifest.days[0].start_us == local_ms(2025, 12, 30) * 1000
    assert [d.rows for d in manifest.days] == [5, 6, 6]
    assert manifest.dropped_out_of_range == 2
    day2 = pq.read_table(open_dataset(tmp_path / "out").day_files(2)[0])
    day3 = pq.read_table(open_dataset(tmp_path / "out").day_files(3)[0])
    assert day2["user_id"][-1].as_py() == hashes(["last-of-day-2"])[0]
    assert day3["user_id"][0].as_py() == hashes(["first-of-day-3"])[0]


def test_kuaivideo_bad_lines_are_skipped_and_listed_or_an_error(tmp_path: Path) -> None:
    good = kuai_rows(20, seed=2)
    lines = ["\t".join(r) for r in good[:5]]
    lines += [
        "u1\tp1\t2\t0\t0\t" + good[0][5] + "\t0\t10",  # line 6: click 2
        "u1\tp1\t0\t0\t0\tnoon\t0\t10",  # line 7: time not an integer
        "u1\tp1\t0\t0\t0",  # line 8: 5 fields
        "",  # line 9: an empty line is ignored
        "\tp1\t0\t0\t0\t" + good[0][5] + "\t0\t10",  # line 10: no user
        "u1\tp1\t0\t0\t0\t" + good[0][5] + "\tlong\tx",  # line 11: bad duration (playing_time is not read)
    ]
    lines += ["\t".join(r) for r in good[5:]]
    path = write_tsv(tmp_path / "raw" / "train_interaction.txt", lines)
    manifest = kuaivideo.adapt(
        tmp_path / "raw", tmp_path / "out", show_progress=False, on_bad_row="skip", start=date(2026, 1, 1), days=3
    )
    assert manifest.rejected_rows == 5 and manifest.rows == len(good)
    rejects = read_rejects(tmp_path / "out")
    assert [(r["file"], r["line"], r["column"]) for r in rejects] == [
        (str(path), "6", "click"),
        (str(path), "7", "time"),
        (str(path), "8", ""),
        (str(path), "10", "user_id"),
        (str(path), "11", "duration_time"),
    ]
    assert rejects[0]["reason"] == "expected 0 or 1 (or true/false), got '2'"
    assert rejects[2]["reason"] == "expected 8 fields, got 5"

    with pytest.raises(
        IngestError, match=rf"^{re.escape(str(path))}:6: column 'click': expected 0 or 1 \(or true/false\), got '2'$"
    ):
        kuaivideo.adapt(tmp_path / "raw", tmp_path / "err", show_progress=False, on_bad_row="error")
    write_tsv(path, lines[:5] + lines[7:])  # now the first bad line is the short one (line 6)
    with pytest.raises(
        IngestError, match=rf"^{re.escape(str(path))}:6: expected 8 fields, got 5: 'u1\\tp1\\t0\\t0\\t0'$"
    ):
        kuaivideo.adapt(tmp_path / "raw", tmp_path / "err", show_progress=False, on_bad_row="error")
    assert not (tmp_path / "err").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]  # nothing half-written


def test_kuaivideo_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    with pytest.raises(IngestError, match=r"train_interaction\.txt: input file not found"):
        adapt("kuaivideo", tmp_path / "raw", tmp_path / "out", show_progress=False)


# --- Open Bandit Dataset -----------------------------------------------------------------------
WIDTHS = {"all": 4, "men": 2, "women": 3}
OBD_START = datetime(2019, 11, 24, tzinfo=UTC)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def iso(moment: datetime) -> str:
    return moment.isoformat(sep=" ")  # '2019-11-24 00:00:34.762830+00:00', as in the real files


def write_obd(root: Path, rows_per_file: int = 40, extra: dict[tuple[str, str], list[str]] | None = None) -> list[dict]:
    """An OBD-like tree; returns the expected rows (with their file index and line) in file order."""
    expected = []
    file_index = 0
    for p, policy in enumerate(obd.POLICIES):
        for c, (campaign, width) in enumerate(WIDTHS.items()):
            folder = root / policy / campaign
            folder.mkdir(parents=True)
            header = ["", "timestamp", "item_id", "position", "click", "propensity_score"]
            header += [f"user_feature_{k}" for k in range(4)] + [f"user-item_affinity_{k}" for k in range(width)]
            lines = [",".join(header)]
            for i in range(rows_per_file):
                seconds = i * 7 * 86_400 // rows_per_file + 977 * p + 131 * c
                moment = OBD_START + timedelta(seconds=seconds, microseconds=123_457 * (i % 2))
                item, affinities = (i + p) % width, [str((i + k) % 3) for k in range(width)]
                fields = [str(i), iso(moment), str(item), str(1 + i % 3), str(int(i % 7 == 0)), str(1 / width)]
                fields += [f"uf{k}-{(i + k) % 3}" for k in range(4)] + [f"{float(a)}" for a in affinities]
                lines.append(",".join(fields))
                expected.append(
                    {
                        "time": moment,
                        "order": (file_index, i + 2),
                        "policy": policy,
                        "campaign": campaign,
                        "item": item,
                        "click": int(i % 7 == 0),
                        "propensity": 1 / width,
                        "affinity_item": float(affinities[item]),
                        "affinities": [float(a) for a in affinities],
                    }
                )
            lines += (extra or {}).get((policy, campaign), [])
            (folder / f"{campaign}.csv").write_text("\n".join(lines) + "\n")
            items = [",item_id,item_feature_0,item_feature_1,item_feature_2,item_feature_3"]
            # like the real files: the same items in both policies, categories hashed per policy
            items += [f"{k},{k},{k / 2},{policy}-a{k % 2},{policy}-b,{policy}-c{k}" for k in range(width)]
            (folder / "item_context.csv").write_text("\n".join(items) + "\n")
            file_index += 1
    return expected


def test_obd_columns_domains_items_and_passthrough(tmp_path: Path) -> None:
    expected = write_obd(tmp_path / "obd")
    manifest = obd.adapt(tmp_path / "obd", tmp_path / "out", show_progress=False)
    dataset = open_dataset(tmp_path / "out")
    schema = dataset.schema
    assert manifest.rows == len(expected) == 240
    assert manifest.domains == ["all_items", "men", "women"] and schema.domain.column == "campaign"
    assert len(manifest.days) == 7 and manifest.days[0].start_us == int(OBD_START.timestamp()) * 10**6
    assert schema.tasks == ["click"] and schema.passthrough == ["propensity_score", "policy_bts"]
    names = [f.name for f in schema.features]
    assert "propensity_score" not in names and "policy_bts" not in names
    assert names[:9] == ["item_id", "position", *obd.USER_FEATURES, *obd.ITEM_CATEGORIES]
    assert names[9:] == ["item_feature_0", "affinity_item", "affinity_total"] + [f"affinity_{k}" for k in range(4)]

    table = read_all(tmp_path / "out")
    rows = sorted(expected, key=lambda r: (r["time"], r["order"]))
    assert table["_time"].to_pylist() == [(r["time"] - EPOCH) // timedelta(microseconds=1) for r in rows]
    domain_of = {"all": obd.ALL_CAMPAIGN_DOMAIN, "men": "men", "women": "women"}
    assert table["_domain"].to_pylist() == [domain_of[r["campaign"]] for r in rows]
    assert table["item_id"].to_pylist() == hashes([f"{r['campaign']}/{r['item']}" for r in rows])
    assert table["click"].to_pylist() == [r["click"] for r in rows]
    assert table["policy_bts"].to_pylist() == [float(r["policy"] == "bts") for r in rows]
    assert table["propensity_score"].to_pylist() == pytest.approx([r["propensity"] for r in rows])
    assert table["affinity_item"].to_pylist() == [r["affinity_item"] for r in rows]
    assert table["affinity_total"].to_pylist() == [sum(r["affinities"]) for r in rows]
    for k in range(4):  # null beyond the campaign's item count
        want = [r["affinities"][k] if k < WIDTHS[r["campaign"]] else None for r in rows]
        assert table[f"affinity_{k}"].to_pylist() == want
    # item features: joined by (campaign, item_id), from the first policy's context for both policies
    assert table["item_feature_0"].to_pylist() == [r["item"] / 2 for r in rows]
    assert table["item_feature_1"].to_pylist() == hashes([f"random-a{r['item'] % 2}" for r in rows])
    assert manifest.days[0].domains == {
        domain_of[c]: sum(r["campaign"] == c and r["time"] < datetime(2019, 11, 25, tzinfo=UTC) for r in rows)
        for c in WIDTHS
    }


def test_obd_day_boundaries_and_out_of_range(tmp_path: Path) -> None:
    header_width = 10 + WIDTHS["men"]
    boundary = [
        "2019-11-24 23:59:59.999999+00:00",  # day 1
        "2019-11-25 00:00:00.000000+00:00",  # day 2
        "2019-11-23 23:59:59.999999+00:00",  # before day 1: dropped
        "2019-12-01 00:00:00+00:00",  # after day 7: dropped
    ]
    extra = [f"9,{t},0,1,0,0.5,a,b,c,d" + ",0.0" * (header_width - 10) for t in boundary]
    write_obd(tmp_path / "obd", rows_per_file=7, extra={("random", "men"): extra})
    manifest = obd.adapt(tmp_path / "obd", tmp_path / "out", show_progress=False)
    assert manifest.dropped_out_of_range == 2
    base = [6] * 7  # 6 files x 7 rows, one per day each
    assert [d.rows for d in manifest.days] == [base[0] + 1, base[1] + 1, *base[2:]]
    table = pq.read_table(open_dataset(tmp_path / "out").day_files(1)[0])
    assert table["_time"][-1].as_py() == int(datetime(2019, 11, 25, tzinfo=UTC).timestamp()) * 10**6 - 1


def test_obd_policies_and_campaigns_are_selectable(tmp_path: Path) -> None:
    write_obd(tmp_path / "obd", rows_per_file=10)
    manifest = obd.adapt(
        tmp_path / "obd",
        tmp_path / "out",
        show_progress=False,
        policies=("bts",),
        campaigns=("men", "women"),
        affinity_columns=False,
    )
    assert manifest.rows == 20 and manifest.domains == ["men", "women"]
    schema = open_dataset(tmp_path / "out").schema
    assert not [f.name for f in schema.features if f.name.startswith("affinity_") and f.name[-1].isdigit()]
    table = read_all(tmp_path / "out")
    assert set(table["policy_bts"].to_pylist()) == {1.0}
    assert set(table["item_feature_2"].to_pylist()) == set(hashes(["bts-b"]))


def test_obd_bad_rows_are_skipped_and_listed_or_an_error(tmp_path: Path) -> None:
    width = 10 + WIDTHS["women"]
    bad = [
        "90,yesterday,0,1,0,0.5,a,b,c,d" + ",0.0" * (width - 10),  # a bad timestamp
        "91,2019-11-26 10:00:00+00:00,0,1,,0.5,a,b,c,d" + ",0.0" * (width - 10),  # no click
        "92,2019-11-26 10:00:00+00:00,0,1,0",  # too few fields
        "93,2019-11-26 10:00:00+00:00,0,1,0,0.5,a,b,c,d" + ",inf" * (width - 10),  # an infinite affinity
    ]
    expected = write_obd(tmp_path / "obd", rows_per_file=5, extra={("bts", "women"): bad})
    path = tmp_path / "obd" / "bts" / "women" / "women.csv"
    manifest = obd.adapt(tmp_path / "obd", tmp_path / "out", show_progress=False, on_bad_row="skip")
    assert manifest.rows == len(expected) and manifest.rejected_rows == 4
    rejects = read_rejects(tmp_path / "out")
    assert [(r["file"], r["line"], r["column"]) for r in rejects] == [
        (str(path), "7", "timestamp"),
        (str(path), "8", "click"),
        (str(path), "9", ""),
        (str(path), "10", "user-item_affinity_0"),
    ]
    assert rejects[0]["reason"] == "expected an ISO-8601 date-time, got 'yesterday'"
    with pytest.raises(
        IngestError, match=rf"^{re.escape(str(path))}:7: column 'timestamp': expected an ISO-8601 date-time"
    ):
        obd.adapt(tmp_path / "obd", tmp_path / "err", show_progress=False, on_bad_row="error")


def test_obd_missing_campaign_file_is_a_clear_error(tmp_path: Path) -> None:
    write_obd(tmp_path / "obd", rows_per_file=3)
    (tmp_path / "obd" / "bts" / "men" / "men.csv").unlink()
    with pytest.raises(IngestError, match=r"men\.csv: input file not found \(the bts/men log\)"):
        obd.adapt(tmp_path / "obd", tmp_path / "out", show_progress=False)


# --- real samples ------------------------------------------------------------------------------
def data_rows(path: Path) -> int:
    with open(path) as handle:
        return sum(1 for line in handle if line.strip()) - 1


@pytest.mark.skipif(not (SHARED / "obd").is_dir(), reason="../shared/data/obd is absent")
def test_real_open_bandit_sample(tmp_path: Path) -> None:
    manifest = adapt("obd", SHARED / "obd", tmp_path / "obd", show_progress=False, on_bad_row="error")
    files = [SHARED / "obd" / p / c / f"{c}.csv" for p in obd.POLICIES for c in obd.CAMPAIGNS]
    assert manifest.rows == sum(data_rows(f) for f in files) == 60_000
    assert manifest.rejected_rows == 0 and manifest.dropped_out_of_range == 0
    assert len(manifest.days) == 7 and all(d.rows > 0 for d in manifest.days)
    assert manifest.domains == ["all_items", "men", "women"]
    assert sum(manifest.days[0].domains.values()) == manifest.days[0].rows
    clicks = sum(d.label_rates["click"] * d.rows for d in manifest.days)
    assert 0.002 < clicks / manifest.rows < 0.008  # about 0.4-0.5 %
    table = read_all(tmp_path / "obd")
    assert table["item_feature_1"].null_count == 0  # every shown item has a context
    assert table["affinity_item"].null_count == 0


@pytest.mark.skipif(not (SHARED / "kuairand1k").is_dir(), reason="../shared/data/kuairand1k is absent")
def test_real_kuairand_sample(tmp_path: Path) -> None:
    assert SOURCES["kuairand"] == "exfm.data.sources.kuairand"
    manifest = adapt("kuairand", SHARED / "kuairand1k", tmp_path / "kr", show_progress=False, on_bad_row="error")
    assert manifest.rows + manifest.dropped_out_of_range == 43_028
    assert manifest.dropped_out_of_range == 0 and manifest.rejected_rows == 0
    assert len(manifest.days) == 17 and all(d.rows > 0 for d in manifest.days)
    schema = open_dataset(tmp_path / "kr").schema
    assert schema.tasks == ["click", "long_view", "like"]
    assert not {"play_time_ms", "is_follow", "profile_stay_time"} & {f.name for f in schema.features}
    rates = {t: sum(d.label_rates[t] * d.rows for d in manifest.days) / manifest.rows for t in schema.tasks}
    assert rates["click"] == pytest.approx(0.1741, abs=0.001)
    assert rates["long_view"] == pytest.approx(0.0842, abs=0.001)
    assert rates["like"] == pytest.approx(0.0056, abs=0.0005)
    table = read_all(tmp_path / "kr")
    lengths = np.array([len(h) for h in table["click_history"].to_pylist()])
    assert 0 < lengths.max() <= 50 and (lengths == 0).any()


def test_kuairand_history_uses_clicks_strictly_before(tmp_path: Path) -> None:
    header = "user_id,video_id,date,hourmin,time_ms,is_click,is_like,is_follow,is_comment,is_forward,is_hate,"
    header += "long_view,play_time_ms,duration_ms,profile_stay_time,comment_stay_time,is_profile_enter,is_rand,tab"
    t = local_ms(2022, 4, 23, 10)

    def line(video: int, time: int, click: int) -> str:
        return f"1,{video},20220423,1000,{time},{click},0,0,0,0,0,{click},500,9000,0,0,0,1,1"

    rows = [line(10, t, 1), line(11, t, 0), line(12, t + 5, 1), line(13, t + 9, 0)]
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "log_random_4_22_to_5_08_1k.csv").write_text("\n".join([header, *rows]) + "\n")
    kuairand.adapt(tmp_path / "raw", tmp_path / "out", show_progress=False, history_len=5)
    table = read_all(tmp_path / "out")
    assert table["video_id"].to_pylist() == hashes(["10", "11", "12", "13"])
    assert table["click_history"].to_pylist() == [[], [], hashes(["10"]), hashes(["10", "12"])]
    assert table["long_view"].to_pylist() == [1, 0, 1, 0]


@pytest.mark.parametrize(
    ("options", "message"),
    [({"memory_limit_mb": 100}, "memory_limit_mb must be at least 256"), ({"on_bad_row": "warn"}, "on_bad_row")],
)
def test_staged_adapters_check_their_options_and_write_nothing(tmp_path: Path, options: dict, message: str) -> None:
    write_tsv(tmp_path / "raw" / "train_interaction.txt", kuai_rows(10))
    write_obd(tmp_path / "obd", rows_per_file=3)
    with pytest.raises(ValueError, match=message):
        kuaivideo.adapt(tmp_path / "raw", tmp_path / "out", show_progress=False, **options)
    with pytest.raises(ValueError, match=message):
        obd.adapt(tmp_path / "obd", tmp_path / "out", show_progress=False, **options)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["obd", "raw"]


def test_kuaivideo_gzipped_file_reads_like_the_plain_one(tmp_path: Path) -> None:
    import gzip

    rows = kuai_rows(80, seed=4)
    plain = write_tsv(tmp_path / "plain" / "train_interaction.txt", rows)
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "train_interaction.txt.gz").write_bytes(gzip.compress(plain.read_bytes()))
    common = {"show_progress": False, "start": date(2026, 1, 1), "days": 3}
    kuaivideo.adapt(tmp_path / "plain", tmp_path / "out_plain", **common)
    kuaivideo.adapt(tmp_path / "gz", tmp_path / "out_gz", files=("train_interaction.txt.gz",), **common)
    assert read_all(tmp_path / "out_gz").equals(read_all(tmp_path / "out_plain"))
