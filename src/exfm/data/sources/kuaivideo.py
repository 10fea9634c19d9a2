"""KuaiVideo (Kuaishou micro-videos): ``train_interaction.txt`` -> an exfm dataset.

Raw input (``raw_dir``): ``train_interaction.txt``, tab separated, no header, one impression per
line: ``user_id, photo_id, click, like, follow, time, playing_time, duration_time``.

Output (decisions documented in ``docs/datasets.md``, section "kuaivideo"):

* features: ``user_id``, ``photo_id`` (categorical), ``duration_time`` (numeric, ``log1p``) and
  ``click_history`` (sequence: the user's last ``history_len`` clicked photos strictly before the
  impression, oldest first, sharing ``photo_id``'s table);
* labels (tasks): ``click``, ``like``, ``follow``;
* ``playing_time`` is **not** used: it is how long the video was watched, observed after the
  impression (and 0 without a click), so as a feature it would leak the labels;
* time: ``time``, unit detected from the magnitude (``time_unit="auto"``) or given;
* split: calendar days in ``timezone`` (Asia/Shanghai: Kuaishou's users are in China); by default
  the ``days`` (8) consecutive days with the most impressions, or from ``start``. Earlier events
  still feed the histories; events outside the days are dropped and counted.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Literal

import duckdb

from exfm.data.dataset import Manifest
from exfm.data.ingest import IngestError
from exfm.data.sources._common import (
    UNIT_US,
    Check,
    RawFile,
    RawTable,
    busiest_days,
    categorical_features,
    detect_unit,
    distinct_counts,
    join_click_history,
    quote,
    run_adapter,
)
from exfm.schema import Schema, parse_schema

RAW_FILE = "train_interaction.txt"
FIELDS = ("user_id", "photo_id", "click", "like", "follow", "time", "playing_time", "duration_time")
TASKS = ("click", "like", "follow")
TABLE = "interactions"
HISTORY = "click_history"


def adapt(
    raw_dir: Path,
    out: Path,
    *,
    overwrite: bool = False,
    show_progress: bool = True,
    memory_limit_mb: int = 2048,
    on_bad_row: Literal["error", "skip"] = "skip",
    files: tuple[str, ...] = (RAW_FILE,),
    time_unit: Literal["auto", "s", "ms", "us"] = "auto",
    timezone: str = "Asia/Shanghai",
    days: int = 8,
    start: date | None = None,
    history_len: int = 50,
    max_buckets: int = 1 << 22,
) -> Manifest:
    """Turn KuaiVideo's raw interaction file(s) in ``raw_dir`` into a dataset at ``out``.

    Args:
        raw_dir: the folder holding ``files``.
        out: the dataset directory to create.
        overwrite: replace an existing ``out`` (once the new dataset is complete).
        show_progress: progress bars on stderr.
        memory_limit_mb: the working-memory budget (at least 256); DuckDB spills beyond half of it.
        on_bad_row: ``"error"``: stop at the first bad line (the message names file, line and
            field); ``"skip"``: leave bad lines out, list them in ``out/rejects.csv`` and count
            them in the manifest's ``rejected_rows``.
        files: the raw files in the same format, read in this order (it breaks ties in time).
            The release's ``test_interaction.txt`` has no labels (``user_id, photo_id, time,
            duration_time``) and cannot be used.
        time_unit: the unit of ``time``; ``"auto"`` detects it from the largest value.
        timezone: the zone whose midnights cut days.
        days: the number of days.
        start: the local date of day 1; None: the first of the ``days`` consecutive days with the
            most impressions.
        history_len: the most recent clicks kept in ``click_history``.
        max_buckets: the largest embedding table (buckets are sized from the distinct ids).

    Returns:
        The dataset's manifest.

    Raises:
        exfm.data.ingest.IngestError: a missing file, a bad line (``on_bad_row="error"``), or no
            valid impression.
    """
    raw = [RawFile(Path(raw_dir) / name, FIELDS[:6] + FIELDS[7:], names=FIELDS, delimiter="\t") for name in files]
    checks = [
        Check("user_id", "text"),
        Check("photo_id", "text"),
        *(Check(task, "label") for task in TASKS),
        Check("time", "int"),
        Check("duration_time", "number", required=False),
    ]

    def derive(con: duckdb.DuckDBPyConnection, work: Path) -> tuple[Schema, str]:
        row = con.execute(f"SELECT count(*), max(abs({quote('time')})) FROM {TABLE}").fetchone()
        if not row[0]:
            raise IngestError(f"no valid impression in {[str(f.path) for f in raw]}")
        unit = detect_unit(row[1]) if time_unit == "auto" else time_unit
        first = start or busiest_days(con, TABLE, f"{quote('time')} * {UNIT_US[unit]}", days, timezone)
        distinct = distinct_counts(con, TABLE, ["user_id", "photo_id"])
        schema = build_schema(unit, timezone, days, first, history_len, distinct, max_buckets)
        sql = join_click_history(
            con,
            work,
            TABLE,
            ["time", "user_id", "photo_id", "duration_time", *TASKS],
            user="user_id",
            item="photo_id",
            time="time",
            clicked="click = 1",
            max_len=history_len,
            name=HISTORY,
        )
        return schema, sql

    return run_adapter(
        [RawTable(TABLE, raw, checks)],
        derive,
        Path(out),
        overwrite=overwrite,
        show_progress=show_progress,
        memory_limit_mb=memory_limit_mb,
        on_bad_row=on_bad_row,
    )


def build_schema(
    unit: str,
    timezone: str,
    days: int,
    start: date | None,
    history_len: int,
    distinct: dict[str, int],
    max_buckets: int,
) -> Schema:
    """The schema of the joined KuaiVideo events."""
    spec = {
        "name": "kuaivideo",
        "features": [
            *categorical_features(["user_id", "photo_id"], distinct, max_buckets),
            {"name": "duration_time", "type": "numeric", "transform": "log1p"},
            {"name": HISTORY, "type": "sequence", "max_len": history_len, "embedding": "photo_id"},
        ],
        "labels": [{"name": task} for task in TASKS],
        "time": {"column": "time", "unit": unit, "timezone": timezone},
        "split": {"mode": "calendar", "days": days, "timezone": timezone, "start": start},
    }
    return parse_schema(spec, "kuaivideo")
