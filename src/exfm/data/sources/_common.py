"""Helpers shared by the dataset adapters (private).

* :func:`find_raw` locates an original file (plain or ``.gz``) in the raw folder.
* :func:`connect` opens a DuckDB database inside the adapter's work folder, with a memory limit
  and a temporary directory there, so every join and sort runs out of core.
* :func:`csv_source` reads a raw CSV file with DuckDB, typed, and :meth:`RawRejects.collect` turns
  DuckDB's rejected lines (wrong field count, a value that does not parse, an empty required
  value) into ``rejects.csv`` rows ``file, line, column, reason, raw`` — or, with
  ``on_bad_row="error"``, into an :class:`~exfm.data.ingest.IngestError` naming file, line and column.
* :func:`history_bounds` and :func:`gather_lists` build behaviour sequences by index arithmetic
  (no Python loop over rows): the events of each user sorted by time, each query's sequence is
  the slice of the at most ``max_len`` events just before its own time.
* :func:`write_dataset` runs the generic :func:`~exfm.data.ingest.ingest` on the adapter's clean
  intermediate Parquet and assembles the final directory (days, merged rejects, a manifest whose
  ``sources`` are the raw files, and ``source.json`` with the adapter's counts and decisions).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.csv as pv

from exfm.data.dataset import Manifest, atomic_write_text, write_manifest
from exfm.data.ingest import REJECTS_NAME, REJECTS_SCHEMA, IngestError, RejectLog, bad_row_message, ingest
from exfm.schema import Schema

SOURCE_INFO_NAME = "source.json"
"""The adapter's counts and decisions, written next to ``manifest.json``."""

_FIELD_COUNT_ERRORS = ("TOO MANY COLUMNS", "MISSING COLUMNS")


def find_raw(raw_dir: Path, name: str, dataset: str) -> Path:
    """``raw_dir/name`` or ``raw_dir/name.gz``; a clear error if neither exists."""
    if not raw_dir.is_dir():
        raise IngestError(f"{raw_dir}: not a directory (expected the folder holding the raw {dataset} files)")
    for candidate in (raw_dir / name, raw_dir / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise IngestError(f"{raw_dir}: {name} (or {name}.gz) not found: it is one of the original {dataset} files")


def open_text(path: Path) -> io.TextIOBase:
    """A raw text file (gzip-compressed if it ends in ``.gz``), UTF-8, byte-order mark dropped."""
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def connect(work: Path, memory_limit_mb: int, show_progress: bool) -> duckdb.DuckDBPyConnection:
    """A DuckDB database file in ``work``, limited to 3/4 of ``memory_limit_mb``, spilling there.

    (While DuckDB reads and joins, nothing else holds much memory; lower the limit with ``SET
    memory_limit`` before a phase that works in numpy beside it.)
    """
    threads = max(1, min(os.cpu_count() or 1, memory_limit_mb // 256))
    config = {
        "memory_limit": f"{max(memory_limit_mb * 3 // 4, 128)}MB",
        "temp_directory": str(work / "duckdb_tmp"),
        "threads": threads,
        "preserve_insertion_order": False,
    }
    con = duckdb.connect(str(work / "adapt.duckdb"), config=config)
    con.execute(f"SET enable_progress_bar = {'true' if show_progress else 'false'}")
    return con


def quote_sql(text: str) -> str:
    """A SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


# --- raw CSV files -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    """A raw CSV column: its name (header text without surrounding spaces), DuckDB type, whether an
    empty value is an error, and what a valid value looks like (for reject messages)."""

    name: str
    sql_type: str
    required: bool
    expected: str


@dataclass(frozen=True)
class CsvSource:
    """A raw CSV file to read with :func:`csv_source`: its path and the header it was checked against."""

    path: Path
    header: list[str]
    reject_name: str

    @property
    def fields(self) -> int:
        return len(self.header)


def read_header(path: Path) -> list[str]:
    """The header line's names, each stripped of surrounding spaces."""
    try:
        with open_text(path) as handle:
            header = next(csv.reader(handle), None)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise IngestError(f"{path}: cannot read the header line: {exc}") from None
    if not header:
        raise IngestError(f"{path}: empty file (expected a header line naming the columns)")
    return [name.strip() for name in header]


def csv_source(path: Path, columns: list[Column], reject_name: str) -> tuple[CsvSource, str]:
    """Check the header of a raw CSV file and build the DuckDB ``read_csv(...)`` expression.

    Header names are compared without surrounding spaces (TaobaoAd's ``"new_user_class_level "``);
    columns not listed are read as text and not validated (only the field count is). Empty values
    and the literal ``NULL`` are missing; a missing value of a required column, or a value that
    does not parse as the column's type, rejects the line.

    Returns:
        ``(source, sql)``: ``sql`` reads the file with clean column names; after running a query
        on it, pass ``source`` to :meth:`RawRejects.collect`.
    """
    header = read_header(path)
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise IngestError(f"{path}: repeated column name(s) {repeated} in the header {header}")
    missing = [c.name for c in columns if c.name not in header]
    if missing:
        raise IngestError(f"{path}: missing column(s) {missing}; the header is {header}")
    types = {c.name: c.sql_type for c in columns}
    spec = ", ".join(f"{quote_sql(name)}: {quote_sql(types.get(name, 'VARCHAR'))}" for name in header)
    required = ", ".join(quote_sql(c.name) for c in columns if c.required)
    sql = (
        f"read_csv({quote_sql(str(path))}, header = true, auto_detect = false, delim = ',', quote = '\"',"
        f" escape = '\"', columns = {{{spec}}}, nullstr = ['', 'NULL'], force_not_null = [{required}],"
        f" store_rejects = true, rejects_scan = {quote_sql(reject_name + '_scan')},"
        f" rejects_table = {quote_sql(reject_name + '_errors')})"
    )
    return CsvSource(path, header, reject_name), sql


def _split_line(text: str) -> list[str]:
    try:
        return next(csv.reader([text]), [])
    except csv.Error:
        return text.split(",")


class RawRejects:
    """The bad lines of the raw files: written to ``rejects.csv`` (``"skip"``) or raised (``"error"``).

    Attributes:
        count: lines rejected so far.
        per_file: rejected lines per raw file name.
    """

    def __init__(self, directory: Path, on_bad_row: Literal["error", "skip"]) -> None:
        if on_bad_row not in ("error", "skip"):
            raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
        self.on_bad_row = on_bad_row
        self.per_file: dict[str, int] = {}
        self._log = RejectLog(directory / REJECTS_NAME)

    @property
    def count(self) -> int:
        return self._log.count

    def add(self, file: Path, rows: list[tuple[int, str, str, str]]) -> None:
        """Record rejected lines ``(line, column, reason, raw)`` of one file (raises in error mode)."""
        if not rows:
            return
        rows = sorted(rows, key=lambda r: r[0])
        if self.on_bad_row == "error":
            line, column, reason, raw = rows[0]
            raise IngestError(bad_row_message(f"{file}:{line}", column, reason, raw))
        self._log.write([(str(file), *row) for row in rows])
        self.per_file[str(file)] = self.per_file.get(str(file), 0) + len(rows)

    def write(self, table: pa.Table) -> None:
        """Append rows of :data:`~exfm.data.ingest.REJECTS_SCHEMA` (already checked) to ``rejects.csv``."""
        self._log.write_table(table)

    def collect(self, con: duckdb.DuckDBPyConnection, source: CsvSource, columns: list[Column]) -> int:
        """Record DuckDB's rejected lines of one file (after a query that read it); returns their number.

        DuckDB lists a line once per bad field; the line is reported under its first bad field.
        """
        expected = {c.name: c.expected for c in columns}
        query = f"""
            SELECT line, column_idx, column_name, CAST(error_type AS VARCHAR), csv_line, error_message
            FROM {source.reject_name}_errors
            QUALIFY row_number() OVER (PARTITION BY line ORDER BY column_idx) = 1
            ORDER BY line
        """
        total = 0
        for batch in con.sql(query).to_arrow_reader(65_536):
            rows = []
            for line, index, column, kind, text, message in zip(*(c.to_pylist() for c in batch.columns), strict=True):
                text = text or ""
                fields = _split_line(text)
                if kind in _FIELD_COUNT_ERRORS:
                    rows.append((int(line), "", f"expected {source.fields} fields, got {len(fields)}", text))
                elif kind == "CAST" and column:
                    value = fields[index - 1] if 0 < index <= len(fields) else ""
                    rows.append(
                        (int(line), column, f"expected {expected.get(column, 'a value')}, got {value!r}", value)
                    )
                else:
                    rows.append((int(line), column or "", f"{kind}: {message}", text))
            self.add(source.path, rows)
            total += len(rows)
        return total

    def close(self) -> None:
        self._log.close()


# --- sequences ---------------------------------------------------------------------------------
def history_bounds(
    event_keys: np.ndarray, query_keys: np.ndarray, group_starts: np.ndarray, max_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Where each query's history lies among sorted events: ``(starts [Q], lengths [Q])``.

    Keys encode ``(group, time)`` so that their order is the order by group, then time
    (``group << 32 | time offset``). A query's history is its group's events with a key strictly
    below the query's, i.e. strictly earlier in time — at most the ``max_len`` latest of them.

    Args:
        event_keys: ``[E]`` sorted keys of the events.
        query_keys: ``[Q]`` keys of the queries (any order).
        group_starts: ``[Q]`` index of the first event of each query's group (``E`` if none).
        max_len: the longest history kept.
    """
    ends = np.searchsorted(event_keys, query_keys, side="left")
    starts = np.maximum(np.minimum(group_starts, ends), ends - max_len)
    return starts, ends - starts


def gather_lists(values: pa.Array, starts: np.ndarray, lengths: np.ndarray) -> pa.Array:
    """``[Q]`` lists ``values[starts[q] : starts[q] + lengths[q]]`` (oldest first) in one gather."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    index = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
    items = values.take(pa.array(index, pa.int64()))
    if offsets[-1] >= 2**31:
        return pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), items)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), items)


# --- the final dataset -------------------------------------------------------------------------
def write_dataset(
    staging: Path,
    work: Path,
    schema: Schema,
    inputs: list[Path],
    rejects: RawRejects,
    *,
    sources: list[Path],
    info: dict,
    on_bad_row: Literal["error", "skip"],
    memory_limit_mb: int,
    show_progress: bool,
) -> Manifest:
    """Ingest the intermediate files and assemble the dataset in ``staging`` (then ``work`` is removed).

    The days come from :func:`~exfm.data.ingest.ingest`; ``rejects.csv`` holds the raw files' bad
    lines followed by any the ingest itself rejected; the manifest counts both in
    ``rejected_rows`` and lists the raw files as its ``sources``; ``source.json`` holds ``info``.
    """
    inner = work / "dataset"
    manifest = ingest(
        schema,
        list(inputs),
        inner,
        on_bad_row=on_bad_row,
        memory_limit_mb=memory_limit_mb,
        show_progress=show_progress,
    )
    for day in manifest.days:
        for relative in day.files:
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(inner / relative, target)
    inner_rejects = inner / REJECTS_NAME
    if inner_rejects.exists():
        options = pv.ConvertOptions(column_types=REJECTS_SCHEMA, strings_can_be_null=False)
        rejects.write(pv.read_csv(inner_rejects, convert_options=options).cast(REJECTS_SCHEMA))
    rejects.close()
    manifest = manifest.model_copy(update={"rejected_rows": rejects.count, "sources": [str(p) for p in sources]})
    info = {**info, "rejected_rows": rejects.count, "rejected_per_file": rejects.per_file}
    atomic_write_text(staging / SOURCE_INFO_NAME, json.dumps(info, indent=2, sort_keys=False) + "\n")
    write_manifest(staging, schema, manifest)
    shutil.rmtree(work)
    return manifest
