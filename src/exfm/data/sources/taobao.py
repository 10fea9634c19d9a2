"""TaobaoAd (Tianchi dataset 56, "Ad Display/Click Data on Taobao.com") -> an exfm dataset.

Raw files (``name`` or ``name.gz`` in the raw folder):

* ``raw_sample.csv`` — ``user,time_stamp,adgroup_id,pid,nonclk,clk``: one row per impression,
  unix seconds, 2017-05-06 .. 2017-05-13 in UTC+8;
* ``ad_feature.csv`` — ``adgroup_id,cate_id,campaign_id,customer,brand,price`` (``brand`` may be
  the literal ``NULL``);
* ``user_profile.csv`` — ``userid,cms_segid,cms_group_id,final_gender_code,age_level,
  pvalue_level,shopping_level,occupation,new_user_class_level `` (trailing space in the last
  header; empty values are common);
* ``behavior_log.csv`` — ``user,time_stamp,btag,cate,brand`` (723M rows, duplicates, some times
  outside 2017).

Output: one row per impression, label ``click`` (= ``clk``), the impression's, ad's and user's
categorical features, ``price``, and two behaviour sequences ``hist_cate`` / ``hist_brand``: the
categories and brands of the user's latest :data:`MAX_LEN` behaviour events *strictly before* the
impression (no look-ahead), oldest first. Domains: ``new_user_class_level`` merged into
:data:`DOMAINS`. Split: 8 calendar days from 2017-05-06 in Asia/Shanghai. Every decision is in
docs/datasets.md; the counts of a run are in ``OUT/source.json``.

How the behaviour join stays out of core (no Python loop over rows):

1. DuckDB reads the small files and ``raw_sample.csv`` into a database file in the work folder,
   joins the impressions with the ad and profile rows, and gives each impression user a bucket:
   users sorted by id are cut into ``K`` ranges of equal user count (``K`` from the log's size and
   ``memory_limit_mb``).
2. One streaming pass over ``behavior_log.csv`` writes each event with its user's bucket into a
   Parquet folder partitioned by bucket (events of other users and outside 2017 are counted, not used).
3. Bucket by bucket, the bucket's events (deduplicated and sorted by user and time in DuckDB) and
   impressions go to numpy; each impression's history is a ``searchsorted`` slice of its user's
   events and the sequences are one vectorised gather. Rows are written in (user, time, ...)
   order, bucket after bucket, so the output does not depend on ``K``.
4. The generic :func:`exfm.data.ingest.ingest` validates, hashes, splits into days and sorts.
"""

from __future__ import annotations

import math
import shutil
import time
from datetime import date
from pathlib import Path
from typing import Literal

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from exfm.data.dataset import Manifest
from exfm.data.ingest import IngestError, progress
from exfm.data.sources._common import (
    Column,
    CsvSource,
    RawRejects,
    adapter_output,
    connect,
    csv_source,
    duckdb_errors,
    find_raw,
    gather_lists,
    history_bounds,
    literal,
)
from exfm.schema import Schema, parse_schema

NAME = "taobao_ad"
RAW_SAMPLE = "raw_sample.csv"
AD_FEATURE = "ad_feature.csv"
USER_PROFILE = "user_profile.csv"
BEHAVIOR_LOG = "behavior_log.csv"

MAX_LEN = 50
"""The longest behaviour sequence kept (the latest events)."""
TIMEZONE = "Asia/Shanghai"
SPLIT_START = date(2017, 5, 6)
DAYS = 8
YEAR_START = 1_483_200_000  # 2017-01-01 00:00 in UTC+8
YEAR_END = 1_514_736_000  # 2018-01-01 00:00 in UTC+8
"""Behaviour events outside ``[YEAR_START, YEAR_END)`` (calendar year 2017 in UTC+8) are dropped."""

DOMAINS = {1: "level_1_2", 2: "level_1_2", 3: "level_3_4", 4: "level_3_4"}
"""``new_user_class_level`` -> domain; a missing (or any other) level, or a user without a profile,
is :data:`UNKNOWN_DOMAIN` — about a third of the users, so the three domains are of similar size."""
UNKNOWN_DOMAIN = "level_unknown"

EVENT_BYTES = 160
"""Working memory per behaviour event of a bucket (sizes the buckets; numpy + Arrow copies)."""
IMPRESSION_BYTES = 4096
"""Working memory per impression of a bucket (two sequences of up to 50 ids, features, copies)."""
LOG_LINE_BYTES = 24
"""A conservative bytes-per-line of ``behavior_log.csv`` (about 31 in the real file), to estimate its rows."""
_MB = 2**20

PROFILE_FIELDS = [
    "cms_segid",
    "cms_group_id",
    "final_gender_code",
    "age_level",
    "pvalue_level",
    "shopping_level",
    "occupation",
    "new_user_class_level",
]

_INT_ID = "an integer id"
RAW_SAMPLE_COLUMNS = [
    Column("user", "BIGINT", True, "an integer user id"),
    Column("time_stamp", "BIGINT", True, "a unix time in seconds (an integer)"),
    Column("adgroup_id", "BIGINT", True, "an integer ad group id"),
    Column("pid", "VARCHAR", False, "text"),
    Column("clk", "BOOLEAN", True, "0 or 1"),
]
AD_FEATURE_COLUMNS = [
    Column("adgroup_id", "BIGINT", True, "an integer ad group id"),
    Column("cate_id", "BIGINT", False, f"{_INT_ID} or an empty field"),
    Column("campaign_id", "BIGINT", False, f"{_INT_ID} or an empty field"),
    Column("customer", "BIGINT", False, f"{_INT_ID} or an empty field"),
    Column("brand", "BIGINT", False, f"{_INT_ID}, NULL or an empty field"),
    Column("price", "DOUBLE", False, "a number or an empty field"),
]
USER_PROFILE_COLUMNS = [
    Column("userid", "BIGINT", True, "an integer user id"),
    *(Column(name, "VARCHAR", False, "text") for name in PROFILE_FIELDS),
]
BEHAVIOR_COLUMNS = [
    Column("user", "BIGINT", True, "an integer user id"),
    Column("time_stamp", "BIGINT", True, "a unix time in seconds (an integer)"),
    Column("cate", "BIGINT", False, f"{_INT_ID} or an empty field"),
    Column("brand", "BIGINT", False, f"{_INT_ID}, NULL or an empty field"),
]

_BUCKETS = {
    "user": 1_200_000,
    "adgroup_id": 900_000,
    "pid": 16,
    "cate_id": 20_000,
    "campaign_id": 450_000,
    "customer": 270_000,
    "brand": 500_000,
    "cms_segid": 1_024,
    "cms_group_id": 256,
    "final_gender_code": 16,
    "age_level": 64,
    "pvalue_level": 16,
    "shopping_level": 16,
    "occupation": 16,
    "new_user_class_level": 16,
}


def schema() -> Schema:
    """The dataset's schema (bucket counts sized to the full data's vocabularies)."""
    features: list[dict] = [{"name": name, "type": "categorical", "buckets": b} for name, b in _BUCKETS.items()]
    features.append({"name": "price", "type": "numeric", "transform": "log1p_standardize", "clip": 10.0})
    for name, table in (("hist_cate", "cate_id"), ("hist_brand", "brand")):
        features.append({"name": name, "type": "sequence", "max_len": MAX_LEN, "embedding": table})
    spec = {
        "name": NAME,
        "features": features,
        "labels": [{"name": "click", "column": "clk"}],
        "time": {"column": "time_stamp", "unit": "s", "timezone": TIMEZONE},
        "domain": {"column": "domain"},
        "split": {
            "mode": "calendar",
            "days": DAYS,
            "timezone": TIMEZONE,
            "start": SPLIT_START.isoformat(),
            "out_of_range": "drop",
        },
    }
    return parse_schema(spec, "taobao adapter")


def adapt(
    raw_dir: Path,
    out: Path,
    *,
    overwrite: bool = False,
    show_progress: bool = True,
    memory_limit_mb: int = 2048,
    on_bad_row: Literal["error", "skip"] = "skip",
) -> Manifest:
    """Turn the original TaobaoAd files in ``raw_dir`` into an exfm dataset at ``out``.

    Args:
        raw_dir: folder with ``raw_sample.csv``, ``ad_feature.csv``, ``user_profile.csv`` and
            ``behavior_log.csv`` (each may be gzip-compressed, ``.csv.gz``).
        out: the dataset directory to create.
        overwrite: replace an existing ``out`` (only once the new dataset is complete).
        show_progress: progress bars on stderr.
        memory_limit_mb: working-memory budget: DuckDB's limit while it reads and joins is 3/4 of
            it; then buckets of users are sized to half of it, DuckDB keeping a quarter.
        on_bad_row: ``"skip"`` lists bad raw lines in ``out/rejects.csv`` (counted in the
            manifest's ``rejected_rows``); ``"error"`` stops at the first, naming file, line and column.

    Returns:
        The manifest written to ``out/manifest.json``.

    Raises:
        IngestError: a missing raw file or column, a bad line (``"error"``), no valid impression,
            or DuckDB running out of memory.
    """
    raw_dir, out = Path(raw_dir), Path(out)
    files = {name: find_raw(raw_dir, name, "TaobaoAd") for name in (RAW_SAMPLE, AD_FEATURE, USER_PROFILE, BEHAVIOR_LOG)}
    with adapter_output(
        out, overwrite=overwrite, on_bad_row=on_bad_row, memory_limit_mb=memory_limit_mb, show_progress=show_progress
    ) as run:
        with duckdb_errors(memory_limit_mb):
            joined, info = _join(files, run.work, run.rejects, memory_limit_mb, show_progress)
        return run.finish(schema(), [joined], sources=list(files.values()), info=info)


# --- the join ----------------------------------------------------------------------------------
def _scalar(con: duckdb.DuckDBPyConnection, sql: str) -> int:
    return int(con.execute(sql).fetchone()[0] or 0)


def _parquet_rows(folder: Path) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in folder.glob("*.parquet")) if folder.exists() else 0


def _join(
    files: dict[str, Path], work: Path, rejects: RawRejects, memory_limit_mb: int, show_progress: bool
) -> tuple[Path, dict]:
    """Build ``work/joined.parquet`` (impressions with features and sequences); returns it and the counts."""
    started = time.monotonic()
    timings: dict[str, float] = {}
    counts: dict[str, int] = {}
    # while DuckDB reads and joins, nothing else holds much memory: 3/4 of the budget
    con = connect(work, memory_limit_mb, show_progress, share=0.75, mb_per_thread=256, database="adapt.duckdb")

    def read(source: CsvSource, sql: str) -> None:
        """Run a statement that reads ``source``: its errors name the file."""
        with duckdb_errors(memory_limit_mb, source.path):
            con.execute(sql)

    try:
        # the ad and user tables: one row per key (the smallest by content if a key repeats)
        source, sql = csv_source(files[AD_FEATURE], AD_FEATURE_COLUMNS, "ad")
        read(
            source,
            f"""CREATE TABLE ad_raw AS SELECT adgroup_id, cate_id, campaign_id, customer, brand,
                CASE WHEN isfinite(price) THEN price END AS price FROM {sql}""",
        )
        rejects.collect(con, source, AD_FEATURE_COLUMNS)
        con.execute(
            """CREATE TABLE ad AS SELECT * FROM ad_raw QUALIFY row_number() OVER (PARTITION BY adgroup_id
               ORDER BY cate_id, campaign_id, customer, brand, price) = 1"""
        )
        counts["ad_feature_rows"] = _scalar(con, "SELECT count(*) FROM ad_raw")
        counts["ad_feature_repeated_keys_dropped"] = counts["ad_feature_rows"] - _scalar(con, "SELECT count(*) FROM ad")
        con.execute("DROP TABLE ad_raw")

        source, sql = csv_source(files[USER_PROFILE], USER_PROFILE_COLUMNS, "profile")
        fields = ", ".join(PROFILE_FIELDS)
        read(source, f"CREATE TABLE profile_raw AS SELECT userid, {fields} FROM {sql}")
        rejects.collect(con, source, USER_PROFILE_COLUMNS)
        con.execute(
            f"""CREATE TABLE profile AS SELECT * FROM profile_raw
                QUALIFY row_number() OVER (PARTITION BY userid ORDER BY {fields}) = 1"""
        )
        counts["user_profile_rows"] = _scalar(con, "SELECT count(*) FROM profile_raw")
        counts["user_profile_repeated_keys_dropped"] = counts["user_profile_rows"] - _scalar(
            con, "SELECT count(*) FROM profile"
        )
        con.execute("DROP TABLE profile_raw")

        # the impressions
        source, sql = csv_source(files[RAW_SAMPLE], RAW_SAMPLE_COLUMNS, "sample")
        read(
            source,
            # no cast in this SELECT: DuckDB would push it into the reader and read clk "2" as 2
            f'CREATE TABLE sample AS SELECT "user", time_stamp, adgroup_id, pid, clk FROM {sql}',
        )
        rejects.collect(con, source, RAW_SAMPLE_COLUMNS)
        counts["impressions"] = _scalar(con, "SELECT count(*) FROM sample")
        if not counts["impressions"]:
            raise IngestError(f"{source.path}: no valid impression")

        # user buckets: ranges of user ids with equal numbers of users
        users = _scalar(con, 'SELECT count(DISTINCT "user") FROM sample')
        budget = memory_limit_mb * _MB // 2
        log_bytes = files[BEHAVIOR_LOG].stat().st_size * (5 if files[BEHAVIOR_LOG].suffix == ".gz" else 1)
        estimated_events = log_bytes // LOG_LINE_BYTES
        buckets = max(
            1,
            math.ceil(estimated_events * EVENT_BYTES / budget),
            math.ceil(counts["impressions"] * IMPRESSION_BYTES / budget),
        )
        buckets = min(buckets, users)
        con.execute(
            f"""CREATE TABLE user_bucket AS SELECT "user",
                CAST((row_number() OVER (ORDER BY "user") - 1) * {buckets} // {users} AS INTEGER) AS bucket
                FROM (SELECT DISTINCT "user" FROM sample)"""
        )
        flush = max(8_192, budget // 4 // (buckets + 2) // 64)
        con.execute(f"SET partitioned_write_flush_threshold = {flush}")

        # the impressions joined with their ad and user, streamed to a folder partitioned by bucket
        imp_dir, event_dir = work / "impressions", work / "events"
        level = "TRY_CAST(trim(p.new_user_class_level) AS DOUBLE)"
        cases = " ".join(f"WHEN {level} = {value} THEN {literal(name)}" for value, name in DOMAINS.items())
        con.execute(
            f"""COPY (SELECT
                    s."user", s.time_stamp, s.adgroup_id, s.pid, CAST(s.clk AS TINYINT) AS clk,
                    a.cate_id, a.campaign_id, a.customer, a.brand, a.price,
                    {", ".join(f"p.{f}" for f in PROFILE_FIELDS)},
                    CASE {cases} ELSE {literal(UNKNOWN_DOMAIN)} END AS domain,
                    a.adgroup_id IS NULL AS no_ad, p.userid IS NULL AS no_profile, b.bucket
                FROM sample s
                JOIN user_bucket b ON b."user" = s."user"
                LEFT JOIN ad a ON a.adgroup_id = s.adgroup_id
                LEFT JOIN profile p ON p.userid = s."user")
                TO {literal(str(imp_dir))} (FORMAT parquet, PARTITION_BY (bucket))"""
        )
        con.execute("DROP TABLE sample")
        imp_glob = literal(str(imp_dir / "*" / "*.parquet"))
        no_ad, no_profile = con.execute(
            f"""SELECT count(*) FILTER (WHERE no_ad), count(*) FILTER (WHERE no_profile)
                FROM read_parquet({imp_glob}, hive_partitioning = false)"""
        ).fetchone()
        counts["impressions_without_ad_feature"] = int(no_ad)
        counts["impressions_without_user_profile"] = int(no_profile)
        domains = dict(
            con.execute(
                f"""SELECT domain, count(*) FROM read_parquet({imp_glob}, hive_partitioning = false)
                    GROUP BY domain ORDER BY domain"""
            ).fetchall()
        )
        timings["read_impressions_s"] = time.monotonic() - started

        # one pass over the behaviour log: each event to its user's bucket (-1: outside 2017, -2: no impression)
        step = time.monotonic()
        source, sql = csv_source(files[BEHAVIOR_LOG], BEHAVIOR_COLUMNS, "behavior")
        read(
            source,
            f"""COPY (SELECT e."user", e.time_stamp AS ts, e.cate, e.brand,
                    CASE WHEN e.time_stamp < {YEAR_START} OR e.time_stamp >= {YEAR_END} THEN -1
                         ELSE coalesce(b.bucket, -2) END AS bucket
                FROM (SELECT "user", time_stamp, cate, brand FROM {sql}) e
                LEFT JOIN user_bucket b ON b."user" = e."user")
                TO {literal(str(event_dir))} (FORMAT parquet, PARTITION_BY (bucket))""",
        )
        rejects.collect(con, source, BEHAVIOR_COLUMNS)
        counts["behavior_rows"] = sum(_parquet_rows(d) for d in event_dir.glob("bucket=*"))
        counts["behavior_outside_2017"] = _parquet_rows(event_dir / "bucket=-1")
        counts["behavior_users_without_impressions"] = _parquet_rows(event_dir / "bucket=-2")
        timings["read_behavior_s"] = time.monotonic() - step
        timings["read_behavior_rows_per_s"] = counts["behavior_rows"] / max(timings["read_behavior_s"], 1e-9)
        for junk in ("bucket=-1", "bucket=-2"):
            shutil.rmtree(event_dir / junk, ignore_errors=True)

        # bucket by bucket: dedup, sort, slice the histories (DuckDB sorts one bucket at a time: a
        # quarter of the budget is enough, and its cached blocks would otherwise crowd numpy's half)
        step = time.monotonic()
        con.execute(f"SET memory_limit = '{max(memory_limit_mb // 4, 64)}MB'")
        joined = work / "joined.parquet"
        stats = _Histories()
        with pq.ParquetWriter(joined, _joined_schema(con, imp_dir), compression="zstd") as writer:
            for bucket in progress(show_progress, "behaviour sequences", unit=" buckets", iterable=range(buckets)):
                table = _bucket_rows(con, imp_dir / f"bucket={bucket}", event_dir / f"bucket={bucket}", stats)
                if table is not None:
                    writer.write_table(table.cast(writer.schema), row_group_size=65_536)
                shutil.rmtree(imp_dir / f"bucket={bucket}", ignore_errors=True)
                shutil.rmtree(event_dir / f"bucket={bucket}", ignore_errors=True)
        timings["sequences_s"] = time.monotonic() - step
    finally:
        con.close()
    for leftover in ("adapt.duckdb", "adapt.duckdb.wal", "impressions", "events", "duckdb_tmp"):
        path = work / leftover
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    counts["behavior_duplicates_dropped"] = stats.duplicates
    counts["behavior_events_used"] = stats.events
    counts["impressions_with_empty_history"] = stats.empty
    timings["join_total_s"] = time.monotonic() - started
    info = {
        "source": "taobao",
        "buckets": buckets,
        "memory_limit_mb": memory_limit_mb,
        "counts": counts,
        "mean_history_length": stats.length_sum / max(counts["impressions"], 1),
        "impressions_per_domain": domains,
        "domain_mapping": {**{str(k): v for k, v in DOMAINS.items()}, "missing or other": UNKNOWN_DOMAIN},
        "timings": timings,
    }
    return joined, info


_NOT_WRITTEN = "EXCLUDE (no_ad, no_profile)"  # the join flags, counted but not part of the dataset


class _Histories:
    """Counters over the buckets."""

    def __init__(self) -> None:
        self.duplicates = 0
        self.events = 0
        self.empty = 0
        self.length_sum = 0


def _joined_schema(con: duckdb.DuckDBPyConnection, imp_dir: Path) -> pa.Schema:
    """The intermediate file's schema: the impression columns plus the two sequences."""
    first = next(imp_dir.glob("bucket=*/*.parquet"))
    base = con.sql(
        f"SELECT * {_NOT_WRITTEN} FROM read_parquet({literal(str(first))}, hive_partitioning = false) LIMIT 0"
    )
    fields = list(base.to_arrow_table().schema)
    return pa.schema(
        [*fields, pa.field("hist_cate", pa.list_(pa.int64())), pa.field("hist_brand", pa.list_(pa.int64()))]
    )


def _bucket_rows(con: duckdb.DuckDBPyConnection, imp_dir: Path, event_dir: Path, stats: _Histories) -> pa.Table | None:
    """One bucket's impressions with their sequences, in (user, time, ...) order (None if it has none)."""
    if not any(imp_dir.glob("*.parquet")):
        return None
    glob = literal(str(imp_dir / "*.parquet"))
    imps = con.sql(
        f"SELECT * {_NOT_WRITTEN} FROM read_parquet({glob}, hive_partitioning = false) ORDER BY ALL"
    ).to_arrow_table()
    if any(event_dir.glob("*.parquet")):
        glob = literal(str(event_dir / "*.parquet"))
        raw_events = _parquet_rows(event_dir)
        # duplicates: the same user, time, category and brand (the btag is not part of a sequence)
        events = con.sql(
            f"""SELECT "user", ts, cate, brand FROM read_parquet({glob}, hive_partitioning = false)
                GROUP BY ALL ORDER BY ALL"""
        ).to_arrow_table()
        stats.duplicates += raw_events - events.num_rows
    else:
        events = pa.table({name: pa.array([], pa.int64()) for name in ("user", "ts", "cate", "brand")})
    stats.events += events.num_rows
    ev_user = events["user"].to_numpy()
    im_user = imps["user"].to_numpy()
    users = np.unique(np.concatenate([ev_user, im_user]))
    ev_group = np.searchsorted(users, ev_user).astype(np.int64)
    im_group = np.searchsorted(users, im_user).astype(np.int64)
    # keys: user group << 32 | seconds since 2017-01-01 (events are all inside 2017)
    ev_key = (ev_group << 32) | (events["ts"].to_numpy() - YEAR_START)
    im_offset = np.clip(imps["time_stamp"].to_numpy() - YEAR_START, 0, 2**32 - 1)
    im_key = (im_group << 32) | im_offset
    group_starts = np.searchsorted(ev_key, im_group << 32, side="left")
    starts, lengths = history_bounds(ev_key, im_key, group_starts, MAX_LEN)
    stats.empty += int(np.sum(lengths == 0))
    stats.length_sum += int(lengths.sum())
    hist_cate = gather_lists(events["cate"].combine_chunks(), starts, lengths)
    hist_brand = gather_lists(events["brand"].combine_chunks(), starts, lengths)
    return imps.append_column("hist_cate", hist_cate).append_column("hist_brand", hist_brand)
