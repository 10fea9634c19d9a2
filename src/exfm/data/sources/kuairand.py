"""KuaiRand (Kuaishou short videos, random exposure): ``log_random_*.csv`` -> an exfm dataset.

The nearest real, freely available analogue of KuaiVideo's multi-task setting (Gao et al., CIKM
2022; CC BY-SA 4.0). Raw input (``raw_dir``): the log file(s) matching ``pattern``, CSV with the
header ``user_id, video_id, date, hourmin, time_ms, is_click, is_like, is_follow, is_comment,
is_forward, is_hate, long_view, play_time_ms, duration_ms, profile_stay_time, comment_stay_time,
is_profile_enter, is_rand, tab``.

Output (decisions documented in ``docs/datasets.md``, section "kuairand"):

* features: ``user_id``, ``video_id``, ``tab`` (categorical), ``duration_ms`` (numeric,
  ``log1p``) and ``click_history`` (the user's last ``history_len`` clicked videos strictly
  before the impression, oldest first, sharing ``video_id``'s table);
* labels: ``tasks`` (default click, long_view, like; follow has 8 positives in KuaiRand-1K);
* never features: ``play_time_ms``, ``long_view``, ``profile_stay_time``, ``comment_stay_time``,
  ``is_profile_enter`` and the other ``is_*`` outcomes are observed after the impression;
  ``date`` / ``hourmin`` are a coarse copy of the time; ``is_rand`` is constant;
* time: ``time_ms`` (unix milliseconds); split: calendar days in Asia/Shanghai from 2022-04-22,
  17 days (the random log's span).
"""

from __future__ import annotations

import glob
from datetime import date
from pathlib import Path
from typing import Literal

import duckdb

from exfm.data.dataset import Manifest
from exfm.data.ingest import IngestError
from exfm.data.sources._common import (
    Check,
    RawFile,
    RawTable,
    categorical_features,
    distinct_counts,
    join_click_history,
    run_adapter,
)
from exfm.schema import Schema, parse_schema

PATTERN = "log_random_4_22_to_5_08_*.csv"
TASK_COLUMNS = {
    "click": "is_click",
    "long_view": "long_view",
    "like": "is_like",
    "follow": "is_follow",
    "comment": "is_comment",
    "forward": "is_forward",
    "hate": "is_hate",
}
TABLE = "log"
HISTORY = "click_history"


def adapt(
    raw_dir: Path,
    out: Path,
    *,
    overwrite: bool = False,
    show_progress: bool = True,
    memory_limit_mb: int = 2048,
    on_bad_row: Literal["error", "skip"] = "skip",
    pattern: str = PATTERN,
    tasks: tuple[str, ...] = ("click", "long_view", "like"),
    timezone: str = "Asia/Shanghai",
    start: date = date(2022, 4, 22),
    days: int = 17,
    history_len: int = 50,
    max_buckets: int = 1 << 22,
) -> Manifest:
    """Turn KuaiRand log file(s) in ``raw_dir`` into a dataset at ``out``.

    Args:
        raw_dir: the folder holding the logs (e.g. ``KuaiRand-1K/data``).
        out: the dataset directory to create.
        overwrite: replace an existing ``out`` (once the new dataset is complete).
        show_progress: progress bars on stderr.
        memory_limit_mb: the working-memory budget (at least 256); DuckDB spills beyond half of it.
        on_bad_row: ``"error"``: stop at the first bad line (file, line and field named);
            ``"skip"``: leave bad lines out, list them in ``out/rejects.csv``, count them.
        pattern: glob of the log files inside ``raw_dir`` (read in name order); the default takes
            the random-exposure log of KuaiRand-1K / -27K / -Pure.
        tasks: labels, from ``click, long_view, like, follow, comment, forward, hate``.
        timezone: the zone whose midnights cut days.
        start: the local date of day 1.
        days: the number of days.
        history_len: the most recent clicks kept in ``click_history``.
        max_buckets: the largest embedding table (buckets are sized from the distinct ids).

    Returns:
        The dataset's manifest.
    """
    unknown = [t for t in tasks if t not in TASK_COLUMNS]
    if unknown or not tasks:
        raise ValueError(f"unknown or no task(s) {unknown}; choose from {sorted(TASK_COLUMNS)}")
    paths = sorted(Path(p) for p in glob.glob(str(Path(raw_dir) / pattern)))
    if not paths:
        raise IngestError(f"{raw_dir}: no KuaiRand log file matches {pattern!r}")
    label_columns = [TASK_COLUMNS[t] for t in tasks]
    columns = ("user_id", "video_id", "time_ms", "is_click", *label_columns, "duration_ms", "tab")
    raw = [RawFile(path, columns) for path in paths]
    checks = [
        Check("user_id", "text"),
        Check("video_id", "text"),
        Check("time_ms", "int"),
        Check("is_click", "label", name="_clicked"),  # the history's clicks, whatever the tasks
        *(Check(column, "label", name=task) for task, column in zip(tasks, label_columns, strict=True)),
        Check("duration_ms", "number", required=False),
        Check("tab", "text", required=False),
    ]

    def derive(con: duckdb.DuckDBPyConnection, work: Path) -> tuple[Schema, str]:
        if not con.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0]:
            raise IngestError(f"no valid impression in {[str(p) for p in paths]}")
        distinct = distinct_counts(con, TABLE, ["user_id", "video_id", "tab"])
        spec = {
            "name": "kuairand",
            "features": [
                *categorical_features(["user_id", "video_id", "tab"], distinct, max_buckets),
                {"name": "duration_ms", "type": "numeric", "transform": "log1p"},
                {"name": HISTORY, "type": "sequence", "max_len": history_len, "embedding": "video_id"},
            ],
            "labels": [{"name": task} for task in tasks],
            "time": {"column": "time_ms", "unit": "ms", "timezone": timezone},
            "split": {"mode": "calendar", "days": days, "timezone": timezone, "start": start},
        }
        schema = parse_schema(spec, "kuairand")
        sql = join_click_history(
            con,
            work,
            TABLE,
            ["time_ms", "user_id", "video_id", "tab", "duration_ms", *tasks],
            user="user_id",
            item="video_id",
            time="time_ms",
            clicked="_clicked = 1",
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
