"""Amazon Electronics (McAuley et al., 5-core reviews) -> an exfm CTR dataset, as in DIN.

Raw files (``name`` or ``name.gz`` in the raw folder):

* ``reviews_Electronics_5.json`` — one JSON object per line: ``reviewerID, asin, overall,
  unixReviewTime, ...`` (``unixReviewTime`` is the review's date at 00:00 UTC);
* ``meta_Electronics.json`` — one *Python dict literal* per line (not JSON), read line by line with
  :func:`ast.literal_eval`; an item's category is ``categories[-1][-1]``.

Samples (DIN's protocol): every review is a positive (``click = 1``) for its user and item at the
review's time; its history is the user's items reviewed *strictly earlier* (ordered by time, then
by item id; the latest :data:`MAX_LEN`), with their categories. Each positive gets one negative
(``click = 0``): the same user, time and history with an item the user never reviewed, drawn
uniformly from all reviewed items with a fixed seed (:data:`NEGATIVE_SEED`), so a run is
deterministic. Only the positives of the last :data:`WINDOW_DAYS` days (and their negatives) are
written; all earlier reviews serve as history. The split cuts that window into :data:`DAYS` equal
spans (``equal_spans``: 7 calendar days each when every date has reviews, as in the real file).
Every decision is in docs/datasets.md; the counts of a run are in ``OUT/source.json``.

Memory: the reviews (1.7M lines) are held as Arrow / numpy columns (about 100 bytes a review);
the meta file is streamed and only the categories of reviewed items are kept; samples are
written in chunks of :data:`CHUNK_ROWS` positives; the final sort is the generic ingest's.
"""

from __future__ import annotations

import ast
import gzip
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from exfm.data.dataset import Manifest
from exfm.data.ingest import IngestError, progress
from exfm.data.sources._common import (
    RawRejects,
    adapter_output,
    find_raw,
    gather_lists,
    history_bounds,
)
from exfm.schema import Schema, parse_schema

NAME = "amazon_electronics"
REVIEWS = "reviews_Electronics_5.json"
META = "meta_Electronics.json"

MAX_LEN = 50
"""The longest history kept (the latest reviews)."""
DAYS = 8
WINDOW_DAYS = 56
"""Positives of the last 56 calendar days (UTC) are written: 8 spans of 7 days."""
NEGATIVE_SEED = 20_240_101
"""Seed of the negative sampler (numpy's default generator)."""
MAX_REDRAWS = 100
"""Rounds of redrawing negatives that hit an item the user reviewed (each round redraws only those)."""
CHUNK_ROWS = 100_000
"""Positives per written chunk (bounds the memory of the sequences)."""
_DAY_S = 86_400
_READ_CHUNK = 200_000
_META_ASIN = re.compile(r"""\s*\{\s*['"]asin['"]\s*:\s*['"]([^'"\\]+)['"]""")


def schema() -> Schema:
    """The dataset's schema (bucket counts sized to the 5-core file's 192K users and 63K items)."""
    spec = {
        "name": NAME,
        "features": [
            {"name": "user", "type": "categorical", "buckets": 200_000},
            {"name": "item", "type": "categorical", "buckets": 80_000},
            {"name": "category", "type": "categorical", "buckets": 4_096},
            {"name": "hist_item", "type": "sequence", "max_len": MAX_LEN, "embedding": "item"},
            {"name": "hist_cate", "type": "sequence", "max_len": MAX_LEN, "embedding": "category"},
        ],
        "labels": [{"name": "click"}],
        "time": {"column": "time", "unit": "s", "timezone": "UTC"},
        "split": {"mode": "equal_spans", "days": DAYS, "timezone": "UTC"},
    }
    return parse_schema(spec, "amazon adapter")


def adapt(
    raw_dir: Path,
    out: Path,
    *,
    overwrite: bool = False,
    show_progress: bool = True,
    memory_limit_mb: int = 2048,
    on_bad_row: Literal["error", "skip"] = "skip",
) -> Manifest:
    """Turn the original Amazon Electronics files in ``raw_dir`` into an exfm dataset at ``out``.

    Args:
        raw_dir: folder with ``reviews_Electronics_5.json`` and ``meta_Electronics.json`` (either
            may be gzip-compressed, ``.json.gz``).
        out: the dataset directory to create.
        overwrite: replace an existing ``out`` (only once the new dataset is complete).
        show_progress: progress bars on stderr.
        memory_limit_mb: working-memory budget of the final ingest (sort and part files).
        on_bad_row: ``"skip"`` lists bad raw lines in ``out/rejects.csv`` (counted in the
            manifest's ``rejected_rows``); ``"error"`` stops at the first, naming file, line and field.

    Returns:
        The manifest written to ``out/manifest.json``.

    Raises:
        IngestError: a missing raw file, a bad line (``"error"``) or no valid review.
    """
    raw_dir, out = Path(raw_dir), Path(out)
    reviews_path = find_raw(raw_dir, REVIEWS, "Amazon Electronics")
    meta_path = find_raw(raw_dir, META, "Amazon Electronics")
    with adapter_output(
        out, overwrite=overwrite, on_bad_row=on_bad_row, memory_limit_mb=memory_limit_mb, show_progress=show_progress
    ) as run:
        samples, info = _samples(reviews_path, meta_path, run.work, run.rejects, show_progress)
        return run.finish(schema(), [samples], sources=[reviews_path, meta_path], info=info)


# --- raw files ---------------------------------------------------------------------------------
def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a text file (gzip if ``.gz``), 1-based, without the line end."""
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8", newline="\n") as handle:
            for number, text in enumerate(handle, start=1):
                yield number, text.rstrip("\r\n")
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise IngestError(f"{path}: cannot read: {exc}") from None


def _review_problem(review: object) -> tuple[str, str, str] | None:
    """``(field, reason, raw)`` of the first problem of a parsed review line, or None if it is fine."""
    if not isinstance(review, dict):
        return "", "expected a JSON object", json.dumps(review)[:200]
    for field in ("reviewerID", "asin"):
        value = review.get(field)
        if not isinstance(value, str) or not value:
            return field, "expected a non-empty string", "" if value is None else str(value)
    value = review.get("unixReviewTime")
    valid = isinstance(value, int) and not isinstance(value, bool)
    if not valid or not 0 <= value < 2**32:
        return "unixReviewTime", "expected a unix time in seconds (an integer)", "" if value is None else str(value)
    return None


def _read_reviews(path: Path, rejects: RawRejects, show_progress: bool) -> tuple[pa.Table, int]:
    """The valid reviews as columns ``user, item, time, line``; also the number of non-empty lines."""
    chunks: list[pa.Table] = []
    users: list[str] = []
    items: list[str] = []
    times: list[int] = []
    numbers: list[int] = []
    bad: list[tuple[int, str, str, str]] = []
    total = 0

    def flush() -> None:
        if users:
            chunks.append(
                pa.table(
                    {
                        "user": pa.array(users, pa.string()),
                        "item": pa.array(items, pa.string()),
                        "time": pa.array(times, pa.int64()),
                        "line": pa.array(numbers, pa.int64()),
                    }
                )
            )
        rejects.add(path, bad)
        for buffer in (users, items, times, numbers, bad):
            buffer.clear()

    def reject(row: tuple[int, str, str, str]) -> None:
        bad.append(row)
        if rejects.on_bad_row == "error":
            rejects.add(path, bad)  # raises at once

    for number, text in progress(show_progress, "read reviews", unit=" lines", iterable=_lines(path)):
        if not text.strip():
            continue
        total += 1
        try:
            review = json.loads(text)
        except json.JSONDecodeError as exc:
            reject((number, "", f"not valid JSON ({exc.msg} at column {exc.colno})", text))
            continue
        problem = _review_problem(review)
        if problem is not None:
            reject((number, *problem))
            continue
        users.append(review["reviewerID"])
        items.append(review["asin"])
        times.append(review["unixReviewTime"])
        numbers.append(number)
        if len(users) >= _READ_CHUNK:
            flush()
    flush()
    if not chunks:
        raise IngestError(f"{path}: no valid review")
    return pa.concat_tables(chunks), total


def _category(categories: object) -> tuple[str | None, bool]:
    """``(categories[-1][-1] or None, well formed)`` of a meta record's ``categories`` value."""
    if categories is None:
        return None, True
    if not isinstance(categories, list) or not all(isinstance(path, list) for path in categories):
        return None, False
    if not categories or not categories[-1]:
        return None, True
    leaf = categories[-1][-1]
    return (leaf, True) if isinstance(leaf, str) and leaf else (None, isinstance(leaf, str))


def _read_meta(path: Path, wanted: set[str], rejects: RawRejects, show_progress: bool) -> tuple[dict, dict]:
    """``asin -> category`` of the wanted items, streamed; a line whose leading ``'asin'`` is not
    wanted is skipped without parsing. Returns the map and counts."""
    found: dict[str, str | None] = {}
    counts = {"meta_lines": 0, "meta_lines_skipped_unreviewed": 0, "meta_repeated_asin": 0}
    bad: list[tuple[int, str, str, str]] = []
    for number, text in progress(show_progress, "read meta", unit=" lines", iterable=_lines(path)):
        if bad and (rejects.on_bad_row == "error" or len(bad) >= _READ_CHUNK):
            rejects.add(path, bad)  # raises in error mode
            bad.clear()
        if not text.strip():
            continue
        counts["meta_lines"] += 1
        match = _META_ASIN.match(text)
        if match is not None and match.group(1) not in wanted:
            counts["meta_lines_skipped_unreviewed"] += 1
            continue
        try:
            record = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
            bad.append((number, "", f"not a Python dict literal ({type(exc).__name__}: {exc})", text))
            continue
        asin = record.get("asin") if isinstance(record, dict) else None
        if not isinstance(asin, str) or not asin:
            reason = "expected a non-empty string" if isinstance(record, dict) else "expected a dict literal"
            bad.append((number, "asin" if isinstance(record, dict) else "", reason, text))
            continue
        category, well_formed = _category(record.get("categories"))
        if not well_formed:
            reason = "expected a list of category paths (lists of strings)"
            bad.append((number, "categories", reason, str(record.get("categories"))[:200]))
            continue
        if asin in found:
            counts["meta_repeated_asin"] += 1
        elif asin in wanted:
            found[asin] = category
    rejects.add(path, bad)
    return found, counts


# --- samples -----------------------------------------------------------------------------------
def _sorted_codes(values: pa.ChunkedArray) -> tuple[pa.Array, np.ndarray]:
    """``(distinct values sorted, code of each value [N])``: codes follow the sorted order."""
    distinct = pc.unique(values)
    distinct = distinct.take(pc.sort_indices(distinct))
    return distinct, pc.index_in(values, value_set=distinct).to_numpy().astype(np.int64)


def _negatives(
    users: np.ndarray, reviewed: np.ndarray, n_items: int, user_counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int]:
    """One item per query user that this user never reviewed, uniform over items, seeded.

    Args:
        users: ``[Q]`` user codes, in the (deterministic) order of the positives.
        reviewed: sorted ``user * n_items + item`` of every review.
        n_items: number of distinct items.
        user_counts: ``[U]`` distinct items reviewed per user.

    Returns:
        ``(items [Q], valid [Q], rounds)``: ``valid`` is false where no item could be drawn (a user
        who reviewed every item, or still a collision after :data:`MAX_REDRAWS` rounds).
    """
    rng = np.random.default_rng(NEGATIVE_SEED)
    items = rng.integers(0, n_items, len(users))
    valid = user_counts[users] < n_items
    pending = np.flatnonzero(valid)
    rounds = 0
    while len(pending):
        pairs = users[pending] * n_items + items[pending]
        at = np.searchsorted(reviewed, pairs)
        hit = reviewed[np.minimum(at, len(reviewed) - 1)] == pairs
        pending = pending[hit]
        if not len(pending):
            break
        if rounds == MAX_REDRAWS:
            valid[pending] = False
            break
        rounds += 1
        items[pending] = rng.integers(0, n_items, len(pending))
    return items, valid, rounds


def _samples(
    reviews_path: Path, meta_path: Path, work: Path, rejects: RawRejects, show_progress: bool
) -> tuple[Path, dict]:
    """Write ``work/samples.parquet`` (positives and negatives with histories); returns it and the counts."""
    started = time.monotonic()
    reviews, lines = _read_reviews(reviews_path, rejects, show_progress)
    timings = {"read_reviews_s": time.monotonic() - started}
    counts: dict[str, int] = {"review_lines": lines, "reviews_valid": reviews.num_rows}

    user_values, user = _sorted_codes(reviews["user"])
    item_values, item = _sorted_codes(reviews["item"])
    when = reviews["time"].to_numpy()
    line = reviews["line"].to_numpy()
    # a user who reviewed an item twice: the earliest review (then the first line) is kept
    order = np.lexsort((line, when, item, user))
    first = np.ones(len(order), dtype=bool)
    first[1:] = (user[order][1:] != user[order][:-1]) | (item[order][1:] != item[order][:-1])
    keep = order[first]
    counts["repeated_user_item_dropped"] = len(order) - len(keep)
    user, item, when = user[keep], item[keep], when[keep]
    # every review sorted by (user, time, item): a history is a slice of this order
    order = np.lexsort((item, when, user))
    user, item, when = user[order], item[order], when[order]
    n_users, n_items = len(user_values), len(item_values)
    counts.update(users=n_users, items=n_items)

    step = time.monotonic()
    categories, meta_counts = _read_meta(meta_path, set(item_values.to_pylist()), rejects, show_progress)
    timings["read_meta_s"] = time.monotonic() - step
    counts.update(meta_counts)
    item_category = pa.array([categories.get(asin) for asin in item_values.to_pylist()], pa.string())
    counts["items_without_category"] = item_category.null_count

    key = (user << 32) | (when - when.min())
    group_starts = np.searchsorted(key, user << 32, side="left")
    last_day = int(when.max()) // _DAY_S * _DAY_S
    window_start = last_day - (WINDOW_DAYS - 1) * _DAY_S
    emit = np.flatnonzero(when >= window_start)
    emit = emit[np.lexsort((item[emit], user[emit], when[emit]))]  # positives in (time, user, item) order
    counts["reviews_before_window_history_only"] = len(user) - len(emit)
    counts["positives"] = len(emit)

    reviewed = np.unique(user * n_items + item)
    negatives, valid, rounds = _negatives(user[emit], reviewed, n_items, np.bincount(user, minlength=n_users))
    counts["negatives"] = int(valid.sum())
    counts["positives_without_negative"] = int((~valid).sum())

    step = time.monotonic()
    row_item = item_values.take(pa.array(item))
    # a missing category is an empty item (dropped by the ingest) rather than a null one
    row_category = pc.fill_null(item_category, "").take(pa.array(item))
    samples = work / "samples.parquet"
    history_sum = 0
    with pq.ParquetWriter(samples, _SAMPLE_SCHEMA, compression="zstd") as writer:
        for begin in range(0, len(emit), CHUNK_ROWS):
            rows = emit[begin : begin + CHUNK_ROWS]
            starts, lengths = history_bounds(key, key[rows], group_starts[rows], MAX_LEN)
            history_sum += int(lengths.sum())
            hist_item = gather_lists(row_item, starts, lengths)
            hist_cate = gather_lists(row_category, starts, lengths)
            chosen = valid[begin : begin + CHUNK_ROWS]
            mask = pa.array(chosen)
            negative = negatives[begin : begin + CHUNK_ROWS][chosen]
            row_user = user_values.take(pa.array(user[rows]))
            positives = _sample_table(
                when[rows], row_user, item[rows], hist_item, hist_cate, 1, item_values, item_category
            )
            negs = _sample_table(
                when[rows][chosen],
                row_user.filter(mask),
                negative,
                hist_item.filter(mask),
                hist_cate.filter(mask),
                0,
                item_values,
                item_category,
            )
            # each negative right after its positive (ties in time keep this order in the dataset)
            position = np.concatenate([np.arange(len(rows)) * 2, np.flatnonzero(chosen) * 2 + 1])
            table = pa.concat_tables([positives, negs])
            writer.write_table(table.take(pa.array(np.argsort(position, kind="stable"))))
    timings["samples_s"] = time.monotonic() - step
    timings["total_s"] = time.monotonic() - started
    info = {
        "source": "amazon",
        "counts": counts,
        "window": {
            "first_day_utc": _date(window_start),
            "last_day_utc": _date(last_day),
            "days": WINDOW_DAYS,
        },
        "negative_seed": NEGATIVE_SEED,
        "negative_redraw_rounds": rounds,
        "mean_history_length": history_sum / max(len(emit), 1),
        "timings": timings,
    }
    return samples, info


def _sample_table(
    when: np.ndarray,
    users: pa.Array,
    items: np.ndarray,
    hist_item: pa.Array,
    hist_cate: pa.Array,
    label: int,
    item_values: pa.Array,
    item_category: pa.Array,
) -> pa.Table:
    """Rows of one label: item codes become asins and categories, the histories are given."""
    codes = pa.array(items, pa.int64())
    columns = [
        pa.array(when, pa.int64()),
        users,
        item_values.take(codes),
        item_category.take(codes),
        hist_item.cast(_SAMPLE_SCHEMA.field("hist_item").type),
        hist_cate.cast(_SAMPLE_SCHEMA.field("hist_cate").type),
        pa.array(np.full(len(items), label, np.int8)),
    ]
    return pa.Table.from_arrays(columns, schema=_SAMPLE_SCHEMA)


def _date(seconds: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(seconds))


_SAMPLE_SCHEMA = pa.schema(
    [
        ("time", pa.int64()),
        ("user", pa.string()),
        ("item", pa.string()),
        ("category", pa.string()),
        ("hist_item", pa.list_(pa.string())),
        ("hist_cate", pa.list_(pa.string())),
        ("click", pa.int8()),
    ]
)
