"""Machinery shared by the dataset adapters (private): each step of an adapter is written once here.

Every adapter turns a public dataset's original files into an exfm dataset in bounded memory,
inside the same frame:

* :func:`adapter_output` checks the options and opens an :class:`AdapterRun`: the atomic staging
  directory of the output (renamed into place at the end, deleted on any error: a failed run
  leaves nothing behind), a work folder inside it, and the :class:`RawRejects` of the raw files;
* the adapter reads its raw files and derives one clean intermediate Parquet file in the work
  folder (with the tools below);
* :meth:`AdapterRun.finish` hands that file to the generic :func:`~exfm.data.ingest.ingest` with a
  schema built in code — validation, day assignment, sorting, statistics and the streamed
  day-partitioned writing are ``exfm ingest``'s — and assembles the dataset: the days,
  ``rejects.csv`` (the raw files' bad lines), a manifest whose ``sources`` are the raw files, and
  optionally ``source.json`` with the adapter's counts.

:func:`run_adapter` is that frame for adapters whose raw files are staged and validated here
(kuaivideo, kuairand, obd); taobao and amazon use the frame directly around their own joins.

The tools:

* files: :func:`find_raw` (plain or ``.gz``), :func:`require_file`, and the ingest's
  :func:`~exfm.data.ingest.read_header`;
* DuckDB: :func:`connect` (memory limit, threads and a spill folder in the work folder; its
  progress bar), :func:`duckdb_errors` (its errors as :class:`~exfm.data.ingest.IngestError`),
  :func:`materialize`, :func:`quote` / :func:`literal`;
* bad rows: :class:`RawRejects` lists them in ``rejects.csv`` (``file, line, column, reason,
  raw``, the raw file's own 1-based line) with ``on_bad_row="skip"``, or raises an error naming
  file, line and column with ``"error"`` — exactly as ``exfm ingest`` does;
* two readers of raw text, for two kinds of input:

  - :func:`csv_source` + :meth:`RawRejects.collect`: DuckDB's own CSV reader, typed by DuckDB's
    parser, its rejected lines collected after the query. The fastest path, for large
    well-formed CSV files with a header (TaobaoAd's 723M-row behaviour log);
  - :func:`stage_and_validate` (:class:`RawFile`, :class:`Check`, :class:`RawTable`): the text is
    staged with the ingest's block reader (:func:`~exfm.data.ingest.read_text_blocks`: exact line
    numbers, header-less TSV, constants per file), then every value is checked and converted in
    DuckDB by exfm's rules (integers, finite float32 numbers, 0/1 labels, ISO-8601 times);

* behaviour sequences: :func:`history_bounds` + :func:`gather_lists` (numpy: each query's
  history is a slice of events sorted by user and time; taobao, amazon) and
  :func:`join_click_history` (SQL: a table's own clicks strictly before each row; kuaivideo,
  kuairand);
* schema: :func:`categorical_features` (bucket counts from :func:`distinct_counts` through
  :func:`bucket_count`), :func:`detect_unit`, :func:`busiest_days`;
* progress bars: the ingest's :func:`~exfm.data.ingest.progress`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from itertools import groupby
from pathlib import Path
from typing import Literal, NamedTuple
from zoneinfo import ZoneInfo

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.csv as pv
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from exfm.data.dataset import Manifest, atomic_output_dir, atomic_write_text, write_manifest
from exfm.data.ingest import (
    REJECTS_NAME,
    REJECTS_SCHEMA,
    IngestError,
    RejectLog,
    bad_row_message,
    blank_rows,
    check_options,
    duckdb_threads,
    ingest,
    progress,
    read_header,
    read_text_blocks,
)
from exfm.schema import Schema

SOURCE_INFO_NAME = "source.json"
"""The adapter's counts and decisions, written next to ``manifest.json``."""
WORK_NAME = "_work"
"""The work folder inside the staging directory (removed before the dataset is complete)."""
FILE_COLUMN = "_file"
LINE_COLUMN = "_line"
UNIT_US = {"s": 1_000_000, "ms": 1_000, "us": 1}

_MB = 2**20
_FLOAT32_MAX = 3.4028234663852886e38
_ZONE_SUFFIX = r"[T ].*([zZ]|[+-][0-9][0-9]:?[0-9][0-9])$"
_FIELD_COUNT_ERRORS = ("TOO MANY COLUMNS", "MISSING COLUMNS")


# --- files -------------------------------------------------------------------------------------
def find_raw(raw_dir: Path, name: str, dataset: str) -> Path:
    """``raw_dir/name`` or ``raw_dir/name.gz``; a clear error if neither exists."""
    if not raw_dir.is_dir():
        raise IngestError(f"{raw_dir}: not a directory (expected the folder holding the raw {dataset} files)")
    for candidate in (raw_dir / name, raw_dir / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise IngestError(f"{raw_dir}: {name} (or {name}.gz) not found: it is one of the original {dataset} files")


def require_file(path: Path, what: str) -> Path:
    """``path`` if it is a file, else an :class:`IngestError` saying what was expected there."""
    if not path.is_file():
        raise IngestError(f"{path}: input file not found ({what})")
    return path


# --- SQL and DuckDB ----------------------------------------------------------------------------
def quote(name: str) -> str:
    """A SQL identifier, double-quoted (raw names contain '-' and words such as ``time``)."""
    return '"' + name.replace('"', '""') + '"'


def literal(text: str) -> str:
    """A SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def connect(
    work: Path,
    memory_limit_mb: int,
    show_progress: bool,
    *,
    share: float,
    mb_per_thread: int,
    database: str | None = None,
) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection for an adapter: out of core, inside the work folder.

    Args:
        work: the work folder; DuckDB spills sorts, joins and windows to ``work/duckdb_tmp``.
        memory_limit_mb: the adapter's working-memory budget.
        show_progress: DuckDB's own progress bar for long queries.
        share: DuckDB's memory limit as a share of ``memory_limit_mb`` (the rest is for what
            works beside it: numpy, Arrow, the writers).
        mb_per_thread: one thread per this many MB of ``memory_limit_mb`` (each thread of a sort
            or window holds its own buffers), at least one, at most the CPU count.
        database: a database file in ``work`` (its tables may then outgrow memory), or None: in memory.
    """
    config = {
        "memory_limit": f"{int(memory_limit_mb * share)}MB",
        "temp_directory": str(work / "duckdb_tmp"),
        "threads": duckdb_threads(memory_limit_mb, mb_per_thread),
        "preserve_insertion_order": False,
    }
    con = duckdb.connect(str(work / database) if database else ":memory:", config=config)
    con.execute(f"SET enable_progress_bar = {str(show_progress).lower()}")
    return con


@contextmanager
def duckdb_errors(memory_limit_mb: int, where: Path | str | None = None) -> Iterator[None]:
    """DuckDB's errors in the block as :class:`IngestError`.

    Running out of memory says to raise ``memory_limit_mb``; with ``where`` (a raw file being
    read), any other DuckDB error says that this file cannot be read.
    """
    prefix = "" if where is None else f"{where}: "
    try:
        yield
    except duckdb.OutOfMemoryException as exc:
        raise IngestError(
            f"{prefix}DuckDB ran out of memory (its limit is a share of memory_limit_mb={memory_limit_mb}):"
            " raise memory_limit_mb"
        ) from exc
    except duckdb.Error as exc:
        if where is None:
            raise
        raise IngestError(f"{prefix}cannot read: {exc}") from None


def materialize(con: duckdb.DuckDBPyConnection, work: Path, name: str, sql: str) -> None:
    """Write the result of ``sql`` to a Parquet file in ``work`` and make it the view ``name``.

    Running a big query in stages keeps each within DuckDB's memory limit (a window, an ASOF
    join and a sort in one plan hold their buffers at the same time)."""
    path = work / f"{name}.parquet"
    con.execute(f"COPY ({sql}) TO {literal(str(path))} (FORMAT parquet)")
    con.execute(f"CREATE VIEW {quote(name)} AS SELECT * FROM read_parquet({literal(str(path))})")


# --- bad rows ----------------------------------------------------------------------------------
class RawRejects:
    """The bad lines of the raw files: written to ``rejects.csv`` (``"skip"``) or raised (``"error"``).

    Attributes:
        on_bad_row: ``"skip"`` or ``"error"``.
        per_file: rejected lines per raw file name.
    """

    def __init__(self, directory: Path, on_bad_row: Literal["error", "skip"]) -> None:
        if on_bad_row not in ("error", "skip"):
            raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
        self.on_bad_row = on_bad_row
        self.per_file: dict[str, int] = {}
        self._log = RejectLog(directory / REJECTS_NAME)

    def __enter__(self) -> RawRejects:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def count(self) -> int:
        """Lines rejected so far."""
        return self._log.count

    def add(self, file: Path | str, rows: list[tuple[int, str, str, str]]) -> None:
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


# --- reader 1: DuckDB's CSV reader, typed ------------------------------------------------------
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
    header = [name.strip() for name in read_header(path)]
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise IngestError(f"{path}: repeated column name(s) {repeated} in the header {header}")
    missing = [c.name for c in columns if c.name not in header]
    if missing:
        raise IngestError(f"{path}: missing column(s) {missing}; the header is {header}")
    types = {c.name: c.sql_type for c in columns}
    spec = ", ".join(f"{literal(name)}: {literal(types.get(name, 'VARCHAR'))}" for name in header)
    required = ", ".join(literal(c.name) for c in columns if c.required)
    sql = (
        f"read_csv({literal(str(path))}, header = true, auto_detect = false, delim = ',', quote = '\"',"
        f" escape = '\"', columns = {{{spec}}}, nullstr = ['', 'NULL'], force_not_null = [{required}],"
        f" store_rejects = true, rejects_scan = {literal(reject_name + '_scan')},"
        f" rejects_table = {literal(reject_name + '_errors')})"
    )
    return CsvSource(path, header, reject_name), sql


def _split_line(text: str) -> list[str]:
    try:
        return next(csv.reader([text]), [])
    except csv.Error:
        return text.split(",")


# --- reader 2: staged text, validated by exfm's rules -------------------------------------------
@dataclass(frozen=True)
class RawFile:
    """One raw text file of a table.

    Attributes:
        path: the file (``.gz`` is read as gzip).
        columns: the fields to stage; each must be a field of the file.
        names: the field names of a file without a header line; None: line 1 is a header.
        delimiter: ``","`` (CSV with ``"`` quoting) or ``"\\t"`` (TSV, no quoting).
        constants: extra text columns with the same value on every row (e.g. the campaign).
    """

    path: Path
    columns: tuple[str, ...]
    names: tuple[str, ...] | None = None
    delimiter: str = ","
    constants: dict[str, str] = field(default_factory=dict)


Kind = Literal["text", "int", "number", "label", "iso"]


@dataclass(frozen=True)
class Check:
    """How one staged raw column is validated and converted.

    Kinds: ``text`` (kept as text; if required, an empty field is bad), ``int`` (a decimal
    integer of at most 18 digits -> BIGINT), ``number`` (a finite float within float32, ``NaN`` =
    missing -> DOUBLE), ``label`` (0/1/true/false, any case -> TINYINT), ``iso`` (ISO-8601
    date-time; a naive one is UTC whatever DuckDB's session time zone -> BIGINT µs since the
    epoch). ``name`` is the validated column's name (default: the raw column's). Optional columns
    accept empty fields (null).
    """

    column: str
    kind: Kind
    required: bool = True
    name: str | None = None

    @property
    def output(self) -> str:
        return self.name or self.column

    def expected(self) -> str:
        text = {
            "text": "a non-empty value",
            "int": "an integer",
            "number": "a finite number",
            "label": "0 or 1 (or true/false)",
            "iso": "an ISO-8601 date-time",
        }[self.kind]
        return text if self.required or self.kind in ("text", "label") else f"{text} or an empty field"

    def bad_sql(self) -> str:
        """A SQL condition that is true for a bad value."""
        c = quote(self.column)
        missing = f"{c} IS NULL" if self.required or self.kind == "label" else "FALSE"
        if self.kind == "text":
            wrong = "FALSE"
        elif self.kind == "int":
            wrong = f"NOT regexp_full_match({c}, '[+-]?[0-9]{{1,18}}')"
        elif self.kind == "number":
            value = f"TRY_CAST({c} AS DOUBLE)"
            wrong = f"(lower({c}) <> 'nan' AND coalesce(NOT (abs({value}) <= {_FLOAT32_MAX!r}), TRUE))"
        elif self.kind == "label":
            wrong = f"lower({c}) NOT IN ('0', '1', 'true', 'false')"
        else:
            wrong = f"{_iso_us(c, 'TRY_CAST')} IS NULL"
        return f"({missing} OR ({c} IS NOT NULL AND {wrong}))"

    def value_sql(self) -> str:
        """The SQL expression of the converted value (for a row that passed :meth:`bad_sql`)."""
        c = quote(self.column)
        value = {
            "text": c,
            "int": f"CAST({c} AS BIGINT)",
            "number": f"CASE WHEN lower({c}) = 'nan' THEN NULL ELSE CAST({c} AS DOUBLE) END",
            "label": f"CAST(lower({c}) IN ('1', 'true') AS TINYINT)",
            "iso": _iso_us(c, "CAST"),
        }[self.kind]
        return f"{value} AS {quote(self.output)}"


def _iso_us(column: str, cast: str) -> str:
    """SQL: ISO-8601 text -> µs since the epoch, independent of the session's time zone: a time
    with an offset (``Z``, ``+08:00``) keeps it, a naive one is UTC."""
    zoned = f"regexp_matches({column}, {literal(_ZONE_SUFFIX)})"
    return (
        f"CASE WHEN {zoned} THEN epoch_us({cast}({column} AS TIMESTAMPTZ))"
        f" ELSE epoch_us({cast}({column} AS TIMESTAMP)) END"
    )


@dataclass(frozen=True)
class RawTable:
    """A logical raw table read from one or more files of the same kind.

    Its validated rows become the DuckDB view ``name``: ``_file`` (index into the list of all raw
    files of :func:`stage_and_validate`), ``_line``, one converted column per check, and the
    files' constants.
    """

    name: str
    files: list[RawFile]
    checks: list[Check]


class _BadRow(NamedTuple):
    """One bad raw row: which file (its index), line and column (empty for a wrong field count), why, its text."""

    file_index: int
    line: int
    column: str
    reason: str
    raw: str


_MALFORMED_SCHEMA = pa.schema(
    [(FILE_COLUMN, pa.int32()), (LINE_COLUMN, pa.int64()), ("_reason", pa.string()), ("_raw", pa.string())]
)


def _record(rejects: RawRejects, paths: list[Path], rows: list[_BadRow]) -> None:
    """Hand bad rows, in (file, line) order, to ``rejects`` (which raises at the first in error mode)."""
    for file_index, group in groupby(rows, key=lambda b: b.file_index):
        rejects.add(paths[file_index], [(b.line, b.column, b.reason, b.raw) for b in group])


def _stage_file(
    index: int, raw: RawFile, target: Path, block_bytes: int, malformed: pq.ParquetWriter, strict: bool, bar: tqdm
) -> _BadRow | None:
    """Stage one raw file: the fields to stage as text, with ``_file`` and ``_line``, to ``target``.

    Returns its first malformed line in strict mode (reading stops there), else None (malformed
    lines go to ``malformed``, :data:`_MALFORMED_SCHEMA`). An empty line is no row.
    """
    names = list(raw.names) if raw.names is not None else read_header(raw.path, raw.delimiter)
    missing = [c for c in raw.columns if c not in names]
    if missing:
        raise IngestError(f"{raw.path}: missing column(s) {missing}; the file has {names}")
    columns = list(dict.fromkeys(raw.columns))
    arrow_schema = pa.schema(
        [(FILE_COLUMN, pa.int32()), (LINE_COLUMN, pa.int64())]
        + [(c, pa.string()) for c in columns]
        + [(k, pa.string()) for k in raw.constants]
    )
    # every field is read, so that a row is blank (an empty line) only if all of its fields are empty
    blocks = read_text_blocks(
        raw.path,
        names,
        list(dict.fromkeys(names)),
        delimiter=raw.delimiter,
        skip_header=raw.names is None,
        block_bytes=block_bytes,
    )
    with pq.ParquetWriter(target, arrow_schema, compression="lz4") as writer:
        for block in blocks:
            rows, lines = block.batch.num_rows, block.lines
            bad = [_BadRow(index, m.line, "", m.reason(), m.text) for m in block.malformed if m.text.strip()]
            keep = ~blank_rows(block.batch)
            arrays = [pa.array(np.full(rows, index, np.int32)), pa.array(lines)]
            arrays += [block.batch.column(c) for c in columns]
            arrays += [pa.array([v] * rows, pa.string()) for v in raw.constants.values()]
            batch = pa.RecordBatch.from_arrays(arrays, schema=arrow_schema)
            if strict and bad:
                first = min(bad, key=lambda b: b.line)
                writer.write_batch(batch.filter(pa.array(keep & (lines < first.line))))
                return first
            writer.write_batch(batch.filter(pa.array(keep)))
            if bad:
                columns_of_bad = [
                    [index] * len(bad),
                    [b.line for b in bad],
                    [b.reason for b in bad],
                    [b.raw for b in bad],
                ]
                malformed.write_table(pa.table(columns_of_bad, schema=_MALFORMED_SCHEMA))
            bar.update(rows + len(bad))
    return None


def _validate(
    con: duckdb.DuckDBPyConnection,
    table: RawTable,
    staged: list[Path],
    malformed_path: Path,
    paths: list[Path],
    work: Path,
    rejects: RawRejects,
    first_malformed: _BadRow | None,
) -> None:
    """Check and convert the staged rows of ``table`` into the view ``table.name``; hand its bad
    rows, malformed lines included, to ``rejects`` in (file, line) order (in error mode: the first)."""
    checks = table.checks
    source = f"read_parquet([{', '.join(literal(str(p)) for p in staged)}], union_by_name = true)"
    bad = " ".join(f"WHEN {c.bad_sql()} THEN {i}" for i, c in enumerate(checks))
    raw = " ".join(f"WHEN {i} THEN {quote(c.column)}" for i, c in enumerate(checks))
    checked = f"SELECT *, CASE {bad} END AS _bad FROM {source}"
    query = (
        f"SELECT {FILE_COLUMN}, {LINE_COLUMN}, _bad, CASE _bad {raw} END AS _raw, NULL::VARCHAR AS _reason"
        f" FROM ({checked}) WHERE _bad IS NOT NULL"
    )

    def bad_rows(records: list[tuple]) -> list[_BadRow]:
        found = []
        for file_index, line, which, value, reason in records:
            text = "" if value is None else value
            if which is None:  # a malformed line
                found.append(_BadRow(file_index, line, "", reason, text))
            else:
                check = checks[which]
                found.append(
                    _BadRow(file_index, line, check.column, f"expected {check.expected()}, got {text!r}", text)
                )
        return found

    if rejects.on_bad_row == "error":
        first = bad_rows(con.execute(f"{query} ORDER BY {FILE_COLUMN}, {LINE_COLUMN} LIMIT 1").fetchall())
        if first_malformed is not None:
            first.append(first_malformed)
        if first:
            _record(rejects, paths, [min(first, key=lambda b: (b.file_index, b.line))])
    else:
        malformed = (
            f"SELECT _file, _line, NULL::INTEGER, _raw, _reason FROM read_parquet({literal(str(malformed_path))})"
        )
        ordered = f"{query} UNION ALL {malformed} ORDER BY 1, 2"
        for batch in con.sql(ordered).to_arrow_reader(batch_size=65_536):
            _record(rejects, paths, bad_rows(list(zip(*(batch.column(i).to_pylist() for i in range(5)), strict=True))))
    constants = list(dict.fromkeys(k for f in table.files for k in f.constants))
    selected = [FILE_COLUMN, LINE_COLUMN, *(c.value_sql() for c in checks), *(quote(k) for k in constants)]
    target = work / f"valid-{table.name}.parquet"
    con.execute(f"COPY (SELECT {', '.join(selected)} FROM ({checked}) WHERE _bad IS NULL) TO {literal(str(target))}")
    con.execute(f"CREATE VIEW {quote(table.name)} AS SELECT * FROM read_parquet({literal(str(target))})")


def stage_and_validate(
    con: duckdb.DuckDBPyConnection,
    tables: list[RawTable],
    work: Path,
    rejects: RawRejects,
    block_bytes: int,
    show_progress: bool,
) -> None:
    """Read every raw file of ``tables`` and make each table a DuckDB view of its valid rows.

    1. **Stage**: each file is read in blocks of whole lines of at most ``block_bytes`` (pyarrow);
       the fields the table needs are written, still as text, with the file's index (over all
       tables' files, in order) and each row's 1-based line number (``_file``, ``_line``), to a
       Parquet file in ``work/stage``. A line with the wrong number of fields is a bad row; empty
       lines are ignored. In error mode a table's staging stops at its first malformed line.
    2. **Validate**: DuckDB checks every staged value (:class:`Check`) and converts it; bad rows
       go to ``rejects`` in (file, line) order, or the first one raises.
    """
    paths = [f.path for t in tables for f in t.files]
    strict = rejects.on_bad_row == "error"
    stage = work / "stage"
    stage.mkdir(exist_ok=True)
    index = 0
    with progress(show_progress, "read raw files") as bar:
        for table in tables:
            staged, first_malformed = [], None
            malformed_path = stage / f"malformed-{table.name}.parquet"
            with pq.ParquetWriter(malformed_path, _MALFORMED_SCHEMA) as malformed:
                for raw in table.files:
                    if first_malformed is None:  # in strict mode, stop staging a table at its first malformed line
                        staged.append(stage / f"{index:04d}.parquet")
                        first_malformed = _stage_file(index, raw, staged[-1], block_bytes, malformed, strict, bar)
                    index += 1
            _validate(con, table, staged, malformed_path, paths, work, rejects, first_malformed)


# --- behaviour sequences -----------------------------------------------------------------------
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


def join_click_history(
    con: duckdb.DuckDBPyConnection,
    work: Path,
    table: str,
    columns: Sequence[str],
    *,
    user: str,
    item: str,
    time: str,
    clicked: str,
    max_len: int,
    name: str,
) -> str:
    """SQL of ``columns`` (with ``_file``, ``_line``) of every row of ``table``, plus ``name``: the
    last ``max_len`` items its user clicked *strictly before* the row's time, oldest first.

    The user's click history after each time with a click (rows where ``clicked`` holds, ordered by
    time, file, line; a window with a bounded frame of ``max_len`` rows) is written to
    ``work/clicks.parquet`` first; of several clicks at the same time only the state after the last
    one is kept, so an ``ASOF LEFT JOIN ... ON user AND row.time > click.time`` gives each row the
    clicks strictly before it — nothing at its own time (no look-ahead). DuckDB spills its sorts.
    """
    u, t, i, h = quote(user), quote(time), quote(item), quote(name)
    order = f"ORDER BY {t}, {FILE_COLUMN}, {LINE_COLUMN}"
    states = (
        f"SELECT {u}, {t}, {h} FROM ("
        f"SELECT {u}, {t}, list({i}) OVER (PARTITION BY {u} {order}"
        f" ROWS BETWEEN {max_len - 1} PRECEDING AND CURRENT ROW) AS {h},"
        f" lead({t}) OVER (PARTITION BY {u} {order}) AS _next"
        f" FROM {quote(table)} WHERE {clicked}"
        f") WHERE _next IS NULL OR _next <> {t}"
    )
    materialize(con, work, "clicks", states)
    selected = ", ".join(f"v.{quote(c)}" for c in [*columns, FILE_COLUMN, LINE_COLUMN])
    return (
        f"SELECT {selected}, coalesce(c.{h}, []::VARCHAR[]) AS {h}"
        f" FROM {quote(table)} v ASOF LEFT JOIN clicks c ON v.{u} = c.{u} AND v.{t} > c.{t}"
    )


# --- schema ------------------------------------------------------------------------------------
def detect_unit(max_abs: int) -> Literal["s", "ms", "us"]:
    """The unit of unix times from the magnitude of the largest one.

    Any date from 1973 to 5138 is below 1e11 in seconds and at least 1e11 in milliseconds (and
    the same with 1e14 between milliseconds and microseconds).
    """
    if max_abs < 10**11:
        return "s"
    if max_abs < 10**14:
        return "ms"
    if max_abs < 10**17:
        return "us"
    raise IngestError(f"time values up to {max_abs} are not unix seconds, milliseconds or microseconds")


def busiest_days(con: duckdb.DuckDBPyConnection, table: str, time_us: str, days: int, timezone: str) -> date | None:
    """The first local date of the ``days`` consecutive calendar days (in ``timezone``) with the
    most rows of ``table`` (ties: the latest window); None if the table is empty.

    Rows are counted per 15 minutes in SQL (every UTC offset is a multiple of 15 minutes), and the
    few thousand bins are mapped to local dates here.
    """
    bins = con.execute(
        f"SELECT {time_us} // 900000000 AS b, count(*) FROM {quote(table)} GROUP BY b ORDER BY b"
    ).fetchall()
    if not bins:
        return None
    zone = ZoneInfo(timezone)
    per_date: dict[date, int] = {}
    for bin_index, count in bins:
        local = datetime.fromtimestamp(bin_index * 900, UTC).astimezone(zone).date()
        per_date[local] = per_date.get(local, 0) + count
    first, last = min(per_date), max(per_date)
    best, best_rows = first, -1
    start = first
    while start + timedelta(days=days - 1) <= last or start == first:
        rows = sum(per_date.get(start + timedelta(days=d), 0) for d in range(days))
        if rows >= best_rows:
            best, best_rows = start, rows
        start += timedelta(days=1)
    return best


def bucket_count(distinct: int, max_buckets: int) -> int:
    """Embedding rows for a feature with about ``distinct`` ids: the next power of two of twice
    that (few collisions), at least 16, at most ``max_buckets``."""
    wanted = 1 << max(4, math.ceil(math.log2(max(2 * distinct, 2))))
    return int(min(wanted, max_buckets))


def distinct_counts(
    con: duckdb.DuckDBPyConnection, table: str, columns: Sequence[str], where: str = "TRUE"
) -> dict[str, int]:
    """Approximate distinct non-null values of each column over the rows ``where`` holds
    (HyperLogLog: one pass, small memory)."""
    parts = ", ".join(f"approx_count_distinct({quote(c)})" for c in columns)
    values = con.execute(f"SELECT {parts} FROM {quote(table)} WHERE {where}").fetchone()
    return dict(zip(columns, (int(v or 0) for v in values), strict=True))


def categorical_features(names: Sequence[str], distinct: dict[str, int], max_buckets: int) -> list[dict]:
    """Schema entries of categorical features ``names``, buckets sized by :func:`bucket_count`."""
    return [
        {"name": name, "type": "categorical", "buckets": bucket_count(distinct[name], max_buckets)} for name in names
    ]


# --- the frame and the final dataset ------------------------------------------------------------
@dataclass
class AdapterRun:
    """One adapter run, opened by :func:`adapter_output`.

    Attributes:
        staging: the temporary sibling of the output directory, renamed into place at the end.
        work: the work folder inside ``staging`` (intermediate files; removed by :meth:`finish`).
        rejects: the raw files' bad lines (``staging/rejects.csv``).
        on_bad_row, memory_limit_mb, show_progress: the run's options.
    """

    staging: Path
    work: Path
    rejects: RawRejects
    on_bad_row: Literal["error", "skip"]
    memory_limit_mb: int
    show_progress: bool

    def finish(
        self,
        schema: Schema,
        inputs: list[Path],
        *,
        sources: list[Path],
        info: dict | None,
        ingest_on_bad_row: Literal["error", "skip"] | None = None,
    ) -> Manifest:
        """Ingest the intermediate files and assemble the dataset in ``staging``; returns its manifest.

        The days come from :func:`~exfm.data.ingest.ingest` (in mode ``ingest_on_bad_row``,
        default: the run's); ``rejects.csv`` holds the raw files' bad lines followed by any the
        ingest itself rejected; the manifest counts both in ``rejected_rows`` and lists the raw
        files as its ``sources``; ``source.json`` holds ``info`` (if given) with the rejected counts.
        """
        inner = self.work / "dataset"
        manifest = ingest(
            schema,
            list(inputs),
            inner,
            on_bad_row=ingest_on_bad_row or self.on_bad_row,
            memory_limit_mb=self.memory_limit_mb,
            show_progress=self.show_progress,
        )
        for day in manifest.days:
            for relative in day.files:
                target = self.staging / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(inner / relative, target)
        rejects = self.rejects
        inner_rejects = inner / REJECTS_NAME
        if inner_rejects.exists():
            options = pv.ConvertOptions(column_types=REJECTS_SCHEMA, strings_can_be_null=False)
            rejects.write(pv.read_csv(inner_rejects, convert_options=options).cast(REJECTS_SCHEMA))
        rejects.close()
        manifest = manifest.model_copy(update={"rejected_rows": rejects.count, "sources": [str(p) for p in sources]})
        if info is not None:
            info = {**info, "rejected_rows": rejects.count, "rejected_per_file": rejects.per_file}
            atomic_write_text(self.staging / SOURCE_INFO_NAME, json.dumps(info, indent=2, sort_keys=False) + "\n")
        write_manifest(self.staging, schema, manifest)
        shutil.rmtree(self.work)
        return manifest


@contextmanager
def adapter_output(
    out: Path,
    *,
    overwrite: bool,
    on_bad_row: Literal["error", "skip"],
    memory_limit_mb: int,
    show_progress: bool,
) -> Iterator[AdapterRun]:
    """Check the options and open the frame of one adapter run (:class:`AdapterRun`).

    Its staging directory is :func:`~exfm.data.dataset.atomic_output_dir`'s: renamed to ``out``
    when the block ends, deleted if it raises, so a failed or interrupted run leaves nothing.

    Raises:
        ValueError: an unknown ``on_bad_row`` or a ``memory_limit_mb`` below 256.
        exfm.data.dataset.DatasetError: ``out`` exists and ``overwrite`` is false.
    """
    check_options(on_bad_row, memory_limit_mb)
    with atomic_output_dir(out, overwrite) as staging:
        work = staging / WORK_NAME
        work.mkdir()
        with RawRejects(staging, on_bad_row) as rejects:
            yield AdapterRun(staging, work, rejects, on_bad_row, memory_limit_mb, show_progress)


Derive = Callable[[duckdb.DuckDBPyConnection, Path], tuple[Schema, str]]
"""Given the connection, with one view per raw table, and the work folder (for intermediate
files, see :func:`materialize`), return the schema and the SQL query of the events: the schema's
columns plus ``_file`` and ``_line``, in any order."""


def _write_events(con: duckdb.DuckDBPyConnection, events_sql: str, time: str, work: Path) -> Path:
    """The events, ordered by (time, file, line), as ``work/events.parquet`` (two stages: the
    derived rows, then an external sort)."""
    materialize(con, work, "_events_unordered", events_sql)
    events = work / "events.parquet"
    ordered = (
        f"SELECT * EXCLUDE ({FILE_COLUMN}, {LINE_COLUMN}) FROM _events_unordered"
        f" ORDER BY {quote(time)}, {FILE_COLUMN}, {LINE_COLUMN}"
    )
    con.execute(f"COPY ({ordered}) TO {literal(str(events))} (FORMAT parquet, ROW_GROUP_SIZE 65536)")
    return events


def run_adapter(
    tables: list[RawTable],
    derive: Derive,
    out: Path,
    *,
    overwrite: bool,
    show_progress: bool,
    memory_limit_mb: int,
    on_bad_row: Literal["error", "skip"],
) -> Manifest:
    """Stage and validate ``tables`` (:func:`stage_and_validate`), ``derive`` the events, write them
    ordered by (time, file, line) and ingest them; returns the manifest of the dataset at ``out``.

    ``memory_limit_mb`` bounds each step: staging reads blocks of at most 1/64 of it, DuckDB gets
    half of it (one thread per 512 MB of the limit) and spills beyond, and the final ingest gets
    all of it.
    """
    files = [f for t in tables for f in t.files]
    for raw in files:
        require_file(raw.path, "raw data")
    block_bytes = min(16 * _MB, memory_limit_mb * _MB // 64)
    with adapter_output(
        out, overwrite=overwrite, on_bad_row=on_bad_row, memory_limit_mb=memory_limit_mb, show_progress=show_progress
    ) as run:
        # the sorts carry history lists: about 256 MB of DuckDB memory per thread
        con = connect(run.work, memory_limit_mb, show_progress, share=0.5, mb_per_thread=512)
        with con, duckdb_errors(memory_limit_mb):
            stage_and_validate(con, tables, run.work, run.rejects, block_bytes, show_progress)
            schema, events_sql = derive(con, run.work)
            events = _write_events(con, events_sql, schema.time.column, run.work)
        # the events are valid: a row rejected by the ingest would be a bug
        return run.finish(schema, [events], sources=[f.path for f in files], info=None, ingest_on_bad_row="error")
