"""Shared machinery of the dataset adapters (used by ``kuaivideo``, ``kuairand`` and ``obd``).

An adapter turns a public dataset's original text files into an exfm dataset in four steps, each
in bounded memory whatever the input size:

1. **stage** (:func:`_stage_file`): every raw file is read in blocks of whole lines with pyarrow;
   the fields the adapter needs are written, still as text, with the file's index and each row's
   1-based line number (``_file``, ``_line``) to a Parquet file in the work directory. A line with
   the wrong number of fields is a bad row; empty lines are ignored.
2. **validate** (:func:`_validate`): DuckDB checks every staged value (:class:`Check`: integers,
   numbers, 0/1 labels, ISO-8601 times, required ids) and converts it. A bad row stops the run
   with an :class:`~exfm.data.ingest.IngestError` naming the file, line and column
   (``on_bad_row="error"``; the first bad row in file order is reported), or is left out, counted
   in the manifest's ``rejected_rows`` and listed in ``rejects.csv`` (``"skip"``), exactly as
   :func:`exfm.data.ingest.ingest` does for its own inputs.
3. **derive**: the adapter's SQL joins side tables and builds behaviour sequences over the
   validated rows (:func:`click_history_sql`); DuckDB spills its sorts, windows and joins to disk
   beyond its memory limit. The result, one row per event with clean column names, ordered by
   time and then raw input order, is written to one Parquet file.
4. **ingest**: :func:`exfm.data.ingest.ingest` writes the day partitions with the adapter's
   schema, so validation, day assignment, sorting and statistics are shared with ``exfm ingest``.

Everything happens inside :func:`exfm.data.dataset.atomic_output_dir`: a failed or interrupted
run leaves nothing behind. Temporary files (staged text, validated rows, DuckDB's spill files,
the joined events) live in ``_work`` inside the staging directory: plan for a few times the raw
size in free disk space next to the output.
"""

from __future__ import annotations

import csv
import gzip
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.csv as pv
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from exfm.data.dataset import Manifest, atomic_output_dir, write_manifest
from exfm.data.ingest import MIN_MEMORY_MB, REJECTS_NAME, IngestError, RejectLog, bad_row_message, ingest
from exfm.schema import Schema

_MB = 2**20
_FLOAT32_MAX = 3.4028234663852886e38
_ZONE_SUFFIX = r"[T ].*([zZ]|[+-][0-9][0-9]:?[0-9][0-9])$"
FILE_COLUMN = "_file"
_MALFORMED_SCHEMA = pa.schema(
    [("_file", pa.int32()), ("_line", pa.int64()), ("_reason", pa.string()), ("_raw", pa.string())]
)
LINE_COLUMN = "_line"
UNIT_US = {"s": 1_000_000, "ms": 1_000, "us": 1}

Kind = Literal["text", "int", "number", "label", "iso"]


def quote(name: str) -> str:
    """A SQL identifier, double-quoted (raw names contain '-' and words such as ``time``)."""
    return '"' + name.replace('"', '""') + '"'


def literal(text: str) -> str:
    """A SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


# --- raw files and checks ----------------------------------------------------------------------
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

    Its validated rows become the DuckDB view ``name``: ``_file`` (index into the adapter's list of
    all raw files), ``_line``, one converted column per check, and the files' constants.
    """

    name: str
    files: list[RawFile]
    checks: list[Check]


def read_header(path: Path, delimiter: str = ",") -> list[str]:
    """The field names on line 1 of a text file, raising :class:`IngestError` if it has none."""
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    try:
        with opener(path, "rt", encoding="utf-8-sig", newline="") as handle:
            header = next(csv.reader(handle, delimiter=delimiter, quoting=quoting), None)
    except FileNotFoundError:
        raise IngestError(f"{path}: input file not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise IngestError(f"{path}: cannot read the header line: {exc}") from None
    if not header:
        raise IngestError(f"{path}: empty file (expected a header line naming the columns)")
    return header


def require_file(path: Path, what: str) -> Path:
    """``path`` if it is a file, else an :class:`IngestError` saying what was expected there."""
    if not path.is_file():
        raise IngestError(f"{path}: input file not found ({what})")
    return path


# --- rejects -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class BadRow:
    """One bad raw row: where, which column (empty for a wrong field count), why, its raw text."""

    file: str
    file_index: int
    line: int
    column: str
    reason: str
    raw: str

    def message(self) -> str:
        return bad_row_message(f"{self.file}:{self.line}", self.column, self.reason, self.raw)


# --- step 1: staging ---------------------------------------------------------------------------
def _row_lines(first: int, rows: int, skipped: list[int]) -> np.ndarray:
    """Line numbers ``[rows]`` of a block's rows, the block starting at line ``first`` and the
    (sorted) lines ``skipped`` having produced no row."""
    index = np.arange(rows, dtype=np.int64)
    if not skipped:
        return index + first
    rows_before = np.array(skipped, dtype=np.int64) - first - np.arange(len(skipped))
    return index + first + np.searchsorted(rows_before, index, side="right")


def _line_blocks(raw: RawFile, block_bytes: int) -> Iterator[tuple[int, bytes]]:
    """``(number of its first line, bytes)`` of blocks of whole lines of a file, header dropped."""
    compression = "gzip" if raw.path.suffix.lower() == ".gz" else None
    line = 1
    with pa.input_stream(raw.path, compression=compression) as stream:
        carry = b""
        while True:
            data = stream.read(block_bytes)
            buffer = carry + data
            cut = buffer.rfind(b"\n") + 1 if data else len(buffer)
            if data and cut == 0:  # a line longer than a block: read on
                carry = buffer
                continue
            block, carry = buffer[:cut], buffer[cut:]
            if line == 1 and raw.names is None:  # drop the header line
                block = block[block.find(b"\n") + 1 :] if b"\n" in block else b""
                line = 2
            if block:
                yield line, block
                line += block.count(b"\n")
            if not data:
                return


def _stage_file(
    index: int,
    raw: RawFile,
    target: Path,
    block_bytes: int,
    malformed: pq.ParquetWriter,
    strict: bool,
    bar: tqdm,
) -> BadRow | None:
    """Stage one raw file (step 1); returns its first malformed line in strict mode (reading stops
    there), else None (malformed lines go to ``malformed``, :data:`_MALFORMED_SCHEMA`)."""
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
    invalid: list[pv.InvalidRow] = []

    def handler(row: pv.InvalidRow) -> str:
        invalid.append(row)
        return "skip"

    tsv = raw.delimiter == "\t"
    parse_options = pv.ParseOptions(
        delimiter=raw.delimiter, quote_char=False if tsv else '"', ignore_empty_lines=False, invalid_row_handler=handler
    )
    convert_options = pv.ConvertOptions(
        column_types={n: pa.string() for n in names},
        strings_can_be_null=True,
        quoted_strings_can_be_null=True,
        null_values=[""],
    )
    with pq.ParquetWriter(target, arrow_schema, compression="lz4") as writer:
        for line, block in _line_blocks(raw, block_bytes):
            invalid.clear()
            # one pyarrow block per block, parsed serially: the handler then gets line numbers
            read_options = pv.ReadOptions(column_names=names, use_threads=False, block_size=len(block) + 1)
            try:
                table = pv.read_csv(pa.BufferReader(block), read_options, parse_options, convert_options)
            except pa.ArrowInvalid as exc:
                last = line + block.count(b"\n") - 1
                raise IngestError(f"{raw.path}:{line}-{last}: cannot parse these lines: {exc}") from None
            skipped = sorted(line + m.number - 1 for m in invalid)
            bad = [
                BadRow(
                    str(raw.path),
                    index,
                    line + m.number - 1,
                    "",
                    f"expected {m.expected_columns} fields, got {m.actual_columns}",
                    m.text,
                )
                for m in invalid
                if m.text.strip()  # an empty line is no row
            ]
            lines = _row_lines(line, table.num_rows, skipped)
            blank = np.ones(table.num_rows, dtype=bool)
            for array in table.columns:
                blank &= array.is_null().to_numpy(zero_copy_only=False)
            arrays = [pa.array(np.full(table.num_rows, index, np.int32)), pa.array(lines)]
            arrays += [table.column(c).combine_chunks() for c in columns]
            arrays += [pa.array([v] * table.num_rows, pa.string()) for v in raw.constants.values()]
            batch = pa.RecordBatch.from_arrays(arrays, schema=arrow_schema)
            if strict and bad:
                first = min(bad, key=lambda b: b.line)
                writer.write_batch(batch.filter(pa.array(~blank & (lines < first.line))))
                return first
            writer.write_batch(batch.filter(pa.array(~blank)))
            if bad:
                columns_of_bad = [
                    [index] * len(bad),
                    [b.line for b in bad],
                    [b.reason for b in bad],
                    [b.raw for b in bad],
                ]
                malformed.write_table(pa.table(columns_of_bad, schema=_MALFORMED_SCHEMA))
            bar.update(table.num_rows + len(bad))
    return None


# --- step 2: validation ------------------------------------------------------------------------
def _validate(
    con: duckdb.DuckDBPyConnection,
    table: RawTable,
    staged: list[Path],
    malformed_path: Path,
    names: list[str],
    work: Path,
    rejects: RejectLog,
    strict: bool,
    first_malformed: BadRow | None,
) -> None:
    """Check and convert the staged rows of ``table`` (step 2) into the view ``table.name``; list
    its bad rows, malformed lines included, in ``rejects`` in (file, line) order, or raise at the
    first one."""
    checks = table.checks
    source = f"read_parquet([{', '.join(literal(str(p)) for p in staged)}], union_by_name = true)"
    bad = " ".join(f"WHEN {c.bad_sql()} THEN {i}" for i, c in enumerate(checks))
    raw = " ".join(f"WHEN {i} THEN {quote(c.column)}" for i, c in enumerate(checks))
    checked = f"SELECT *, CASE {bad} END AS _bad FROM {source}"
    query = (
        f"SELECT {FILE_COLUMN}, {LINE_COLUMN}, _bad, CASE _bad {raw} END AS _raw, NULL::VARCHAR AS _reason"
        f" FROM ({checked}) WHERE _bad IS NOT NULL"
    )

    def bad_rows(records: list[tuple]) -> list[BadRow]:
        found = []
        for file_index, line, which, value, reason in records:
            text = "" if value is None else value
            if which is None:  # a malformed line
                found.append(BadRow(names[file_index], file_index, line, "", reason, text))
            else:
                check = checks[which]
                reason = f"expected {check.expected()}, got {text!r}"
                found.append(BadRow(names[file_index], file_index, line, check.column, reason, text))
        return found

    if strict:
        first = bad_rows(con.execute(f"{query} ORDER BY {FILE_COLUMN}, {LINE_COLUMN} LIMIT 1").fetchall())
        if first_malformed is not None:
            first.append(first_malformed)
        if first:
            raise IngestError(min(first, key=lambda b: (b.file_index, b.line)).message())
    else:
        malformed = (
            f"SELECT _file, _line, NULL::INTEGER, _raw, _reason FROM read_parquet({literal(str(malformed_path))})"
        )
        ordered = f"{query} UNION ALL {malformed} ORDER BY 1, 2"
        for batch in con.sql(ordered).to_arrow_reader(batch_size=65_536):
            rows = bad_rows(list(zip(*(batch.column(i).to_pylist() for i in range(5)), strict=True)))
            rejects.write([(b.file, b.line, b.column, b.reason, b.raw) for b in rows])
    constants = list(dict.fromkeys(k for f in table.files for k in f.constants))
    selected = [FILE_COLUMN, LINE_COLUMN, *(c.value_sql() for c in checks), *(quote(k) for k in constants)]
    target = work / f"valid-{table.name}.parquet"
    con.execute(f"COPY (SELECT {', '.join(selected)} FROM ({checked}) WHERE _bad IS NULL) TO {literal(str(target))}")
    con.execute(f"CREATE VIEW {quote(table.name)} AS SELECT * FROM read_parquet({literal(str(target))})")


# --- helpers for the derive step ---------------------------------------------------------------
def click_history_sql(
    table: str, *, user: str, item: str, time: str, clicked: str, max_len: int, name: str = "history"
) -> str:
    """SQL of the user's click history after each time with a click: ``(user, time, name)``.

    ``name`` is the list of the last ``max_len`` clicked items, oldest first, over all rows of
    ``table`` with ``clicked`` true, ordered by (time, file, line). Of several clicks at the same
    time only the state after the last one is kept, so that::

        FROM t ASOF LEFT JOIN (<this>) h ON t.user = h.user AND t.time > h.time

    gives each row the clicks *strictly before* it (nothing at its own time: no look-ahead). The
    window's frame is bounded (``max_len`` rows), and DuckDB spills its sorts to disk.
    """
    u, t, i = quote(user), quote(time), quote(item)
    order = f"ORDER BY {t}, {FILE_COLUMN}, {LINE_COLUMN}"
    return (
        f"SELECT {u}, {t}, {quote(name)} FROM ("
        f"SELECT {u}, {t}, list({i}) OVER (PARTITION BY {u} {order}"
        f" ROWS BETWEEN {max_len - 1} PRECEDING AND CURRENT ROW) AS {quote(name)},"
        f" lead({t}) OVER (PARTITION BY {u} {order}) AS _next"
        f" FROM {quote(table)} WHERE {clicked}"
        f") WHERE _next IS NULL OR _next <> {t}"
    )


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


def _stage_and_validate(
    con: duckdb.DuckDBPyConnection,
    tables: list[RawTable],
    work: Path,
    rejects: RejectLog,
    strict: bool,
    block_bytes: int,
    show_progress: bool,
) -> None:
    """Steps 1 and 2 for every table; file indices run over all tables' files in order."""
    names = [str(f.path) for t in tables for f in t.files]
    index = 0
    with tqdm(desc="read raw files", unit=" rows", unit_scale=True, disable=not show_progress) as bar:
        for table in tables:
            staged, first_malformed = [], None
            malformed_path = work / "stage" / f"malformed-{table.name}.parquet"
            with pq.ParquetWriter(malformed_path, _MALFORMED_SCHEMA) as malformed:
                for raw in table.files:
                    if first_malformed is None:  # in strict mode, stop staging a table at its first malformed line
                        staged.append(work / "stage" / f"{index:04d}.parquet")
                        first_malformed = _stage_file(index, raw, staged[-1], block_bytes, malformed, strict, bar)
                    index += 1
            _validate(con, table, staged, malformed_path, names, work, rejects, strict, first_malformed)


# --- the whole run -----------------------------------------------------------------------------
Derive = Callable[[duckdb.DuckDBPyConnection, Path], tuple[Schema, str]]
"""Step 3: given the connection, with one view per raw table, and the work folder (for
intermediate files, see :func:`materialize`), return the schema and the SQL query of the events:
the schema's columns plus ``_file`` and ``_line``, in any order."""


def materialize(con: duckdb.DuckDBPyConnection, work: Path, name: str, sql: str) -> None:
    """Write the result of ``sql`` to a Parquet file in ``work`` and make it the view ``name``.

    Running a big query in stages keeps each within DuckDB's memory limit (a window, an ASOF
    join and a sort in one plan hold their buffers at the same time)."""
    path = work / f"{name}.parquet"
    con.execute(f"COPY ({sql}) TO {literal(str(path))} (FORMAT parquet)")
    con.execute(f"CREATE VIEW {quote(name)} AS SELECT * FROM read_parquet({literal(str(path))})")


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
    """Run steps 1-4 and return the manifest of the dataset written at ``out``.

    ``memory_limit_mb`` bounds each step: staging reads blocks of at most 1/64 of it, DuckDB gets
    half of it (one thread per 512 MB of the limit) and spills beyond, and the final ingest gets
    all of it.
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if memory_limit_mb < MIN_MEMORY_MB:
        raise ValueError(f"memory_limit_mb must be at least {MIN_MEMORY_MB}, got {memory_limit_mb}")
    files = [f for t in tables for f in t.files]
    for raw in files:
        require_file(raw.path, "raw data")
    strict = on_bad_row == "error"
    block_bytes = min(16 * _MB, memory_limit_mb * _MB // 64)
    config = {
        "memory_limit": f"{memory_limit_mb // 2}MB",
        # the sorts carry history lists: about 256 MB of DuckDB memory per thread
        "threads": max(1, min(os.cpu_count() or 1, memory_limit_mb // 512)),
        "preserve_insertion_order": False,
    }
    with atomic_output_dir(out, overwrite) as staging:
        work = staging / "_work"
        (work / "stage").mkdir(parents=True)
        database = duckdb.connect(config={**config, "temp_directory": str(work / "duckdb")})
        with RejectLog(staging / REJECTS_NAME) as rejects, database as con:
            con.execute(f"SET enable_progress_bar = {str(show_progress).lower()}")
            try:
                _stage_and_validate(con, tables, work, rejects, strict, block_bytes, show_progress)
                schema, events_sql = derive(con, work)
                events = _write_events(con, events_sql, schema.time.column, work)
            except duckdb.OutOfMemoryException as exc:
                raise IngestError(
                    f"DuckDB ran out of memory (limit {config['memory_limit']} with {config['threads']} thread(s),"
                    f" half of memory_limit_mb={memory_limit_mb}): raise memory_limit_mb"
                ) from exc
        manifest = ingest(
            schema,
            events,
            work / "dataset",
            on_bad_row="error",
            memory_limit_mb=memory_limit_mb,
            show_progress=show_progress,
        )
        for child in (work / "dataset").iterdir():
            os.replace(child, staging / child.name)
        shutil.rmtree(work)
        manifest = manifest.model_copy(
            update={"rejected_rows": manifest.rejected_rows + rejects.count, "sources": [str(f.path) for f in files]}
        )
        write_manifest(staging, schema, manifest)
    return manifest
