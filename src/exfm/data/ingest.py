"""Ingest raw event files into a day-partitioned exfm dataset (``exfm ingest``).

Input files are CSV (``.csv``, comma separated), TSV (``.tsv`` / ``.txt``, tab separated, no
quoting), either optionally gzip-compressed (``.gz``), or Parquet (``.parquet``). CSV and TSV files
have a header line; only the columns the schema names are read, every one as text, and parsed
here, so that every problem is reported as ``FILE:LINE: column 'c': expected ..., got '...'``
(line 1 is the header; for Parquet the number is the 1-based row, ``FILE:row N``).

The ingest streams in bounded memory at any input size:

1. (only when the day boundaries depend on the data: ``calendar`` without ``start``, or
   ``equal_spans``) a first pass reads the time column alone to find the time range;
2. the main pass reads blocks of rows, validates and converts them (hashes, floats, µs times),
   assigns each row its day and appends it, with its input sequence number, to a per-day spill
   file in the staging directory, while accumulating each day's statistics for the manifest;
3. each day is sorted by ``(time, input sequence)`` with DuckDB (which spills to disk beyond its
   memory limit) and streamed into ``day=NN/part-KKKKK.parquet`` files with
   :func:`exfm.data.dataset.write_day`.

Everything is written inside :func:`exfm.data.dataset.atomic_output_dir`: on any error or
interrupt no output directory is left behind and a pre-existing one is untouched.
"""

from __future__ import annotations

import csv
import glob
import gzip
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pv
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from exfm.data.dataset import (
    DOMAIN_COLUMN,
    TIME_COLUMN,
    Manifest,
    Moments,
    assign_days,
    atomic_output_dir,
    build_manifest,
    day_boundaries,
    partition_arrow_schema,
    write_day,
    write_manifest,
)
from exfm.data.hashing import stable_hash
from exfm.schema import Schema

REJECTS_NAME = "rejects.csv"
SORTED_BATCH_ROWS = 65_536  # rows per batch read back from the sort (the part files' row group size)
SEQ_COLUMN = "_seq"
MIN_MEMORY_MB = 256
_MB = 2**20
_UNIT_US = {"s": 1_000_000, "ms": 1_000, "us": 1}
_UNIT_TEXT = {
    "s": "a unix time in seconds",
    "ms": "a unix time in milliseconds",
    "us": "a unix time in microseconds",
    "iso": "an ISO-8601 date-time",
}
_LABEL_WORDS = {"0": 0, "1": 1, "false": 0, "true": 1}
_ZONE_SUFFIX = r"[T ].*(?:[zZ]|[+-]\d\d:?\d\d)$"
REJECTS_SCHEMA = pa.schema(
    [
        ("file", pa.string()),
        ("line", pa.int64()),
        ("column", pa.string()),
        ("reason", pa.string()),
        ("raw", pa.string()),
    ]
)


class IngestError(ValueError):
    """Bad input: the message names the file, the line (or row) and the column where known."""


def check_options(on_bad_row: str, memory_limit_mb: int) -> None:
    """:class:`ValueError` for an unknown ``on_bad_row`` or a ``memory_limit_mb`` below :data:`MIN_MEMORY_MB`
    (the checks of :func:`ingest` and of every dataset adapter)."""
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if memory_limit_mb < MIN_MEMORY_MB:
        raise ValueError(f"memory_limit_mb must be at least {MIN_MEMORY_MB}, got {memory_limit_mb}")


def duckdb_threads(memory_limit_mb: int, mb_per_thread: int) -> int:
    """DuckDB threads for a budget: one per ``mb_per_thread`` of ``memory_limit_mb``, at least 1, at
    most the CPU count (each thread of a sort or window holds its own buffers)."""
    return max(1, min(os.cpu_count() or 1, memory_limit_mb // mb_per_thread))


def ingest(
    schema: Schema,
    inputs: str | Path | list[str | Path],
    out: str | Path,
    *,
    on_bad_row: Literal["error", "skip"] = "error",
    overwrite: bool = False,
    memory_limit_mb: int = 1024,
    show_progress: bool = True,
) -> Manifest:
    """Validate raw event files and write them as a day-partitioned dataset at ``out``.

    Args:
        schema: the feature schema; every column it names must exist in every input file.
        inputs: a path, a glob pattern (``"raw/*.csv.gz"``) or a list of either. Files are read in
            the given order (glob matches sorted by name); that order breaks ties in time.
        out: the dataset directory to create (see :mod:`exfm.data.dataset` for the layout).
        on_bad_row: ``"error"`` raises :class:`IngestError` at the first bad row; ``"skip"`` leaves
            bad rows out, counts them in ``Manifest.rejected_rows`` and lists them in
            ``out/rejects.csv`` (``file, line, column, reason, raw``).
        overwrite: replace an existing ``out`` (only once the new dataset is complete).
        memory_limit_mb: the working-memory budget; it sizes the read blocks, the sort's memory
            limit (half of it) and the part files (a new one each eighth of it); at least 256.
        show_progress: show tqdm progress bars (rows/s) on stderr.

    Returns:
        The manifest written to ``out/manifest.json``.

    Raises:
        IngestError: a missing input file or column, an unsupported file type, a bad row (in
            ``"error"`` mode), a row outside days 1..N (with ``split.out_of_range: error``), no
            valid row from which to derive the day boundaries, or a sort that ran out of memory.
        exfm.data.dataset.DatasetError: ``out`` exists and ``overwrite`` is false.
        ValueError: an unknown ``on_bad_row`` or a ``memory_limit_mb`` below 256.
    """
    check_options(on_bad_row, memory_limit_mb)
    sources = _resolve_inputs(inputs)
    columns = _required_columns(schema)
    for source in sources:
        _check_columns(source, columns)
    budget = _Budget.from_limit(memory_limit_mb)
    with atomic_output_dir(out, overwrite) as staging:
        work = staging / "_work"
        work.mkdir()
        if schema.split.mode == "calendar" and schema.split.start is not None:
            boundaries = day_boundaries(schema.split, 0, 0)
        else:
            time_range = _scan_time_range(schema, sources, on_bad_row, budget, show_progress)
            if time_range is None:
                raise IngestError("no row with a valid time in the input(s): cannot place the days")
            boundaries = day_boundaries(schema.split, *time_range)
        with (
            _DaySpill(schema, work / "spill", len(boundaries) - 1) as spill,
            RejectLog(staging / REJECTS_NAME) as rejects,
        ):
            dropped = _split_into_days(schema, sources, boundaries, spill, rejects, on_bad_row, budget, show_progress)
        days = _sort_and_write_days(schema, spill, boundaries, staging, work, budget, show_progress)
        shutil.rmtree(work)
        manifest = build_manifest(
            schema,
            "ingest",
            days,
            sources=[source.name for source in sources],
            dropped_out_of_range=dropped,
            rejected_rows=rejects.count,
        )
        write_manifest(staging, schema, manifest)
    return manifest


# --- inputs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Source:
    """One input file and how to read it."""

    path: Path
    kind: Literal["csv", "tsv", "parquet"]

    @property
    def name(self) -> str:
        return str(self.path)

    def where(self, line: int) -> str:
        return f"{self.name}:row {line}" if self.kind == "parquet" else f"{self.name}:{line}"


def _file_kind(path: Path) -> Literal["csv", "tsv", "parquet"]:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
        if suffixes and suffixes[-1] == ".parquet":
            suffixes = []  # a gzipped Parquet file is not readable as such
    last = suffixes[-1] if suffixes else ""
    if last == ".csv":
        return "csv"
    if last in (".tsv", ".txt"):
        return "tsv"
    if last == ".parquet" and path.suffix.lower() == ".parquet":
        return "parquet"
    raise IngestError(f"{path}: unsupported file type (expected .csv, .tsv or .txt, optionally .gz, or .parquet)")


def _resolve_inputs(inputs: str | Path | list[str | Path]) -> list[_Source]:
    """Expand globs, check that every file exists, drop repeats (first occurrence wins)."""
    items = inputs if isinstance(inputs, list) else [inputs]
    if not items:
        raise IngestError("no input files given")
    paths: list[Path] = []
    for item in items:
        text = str(item)
        if isinstance(item, str) and glob.has_magic(text):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise IngestError(f"no input file matches {text!r}")
            paths.extend(Path(m) for m in matches)
        else:
            path = Path(item)
            if not path.exists():
                raise IngestError(f"{path}: input file not found")
            paths.append(path)
    sources: list[_Source] = []
    seen: set[Path] = set()
    for path in paths:
        if path.is_dir():
            raise IngestError(f"{path}: is a directory, expected a file (use a glob such as 'dir/*.csv')")
        if path.resolve() not in seen:
            seen.add(path.resolve())
            sources.append(_Source(path, _file_kind(path)))
    return sources


def _required_columns(schema: Schema) -> dict[str, str]:
    """Raw column -> the first schema entry that needs it (for error messages), in read order."""
    needs = [(schema.time.column, "time")]
    needs += [(f.source, f"{f.type} feature {f.name!r}") for f in schema.features]
    needs += [(label.source, f"label {label.name!r}") for label in schema.labels]
    if schema.domain is not None:
        needs.append((schema.domain.column, "domain"))
    needs += [(name, "passthrough") for name in schema.passthrough]
    columns: dict[str, str] = {}
    for column, role in needs:
        columns.setdefault(column, role)
    return columns


def _delimiter(source: _Source) -> str:
    return "\t" if source.kind == "tsv" else ","


def read_header(path: Path, delimiter: str = ",") -> list[str]:
    """The field names on line 1 of a text file (gzip if ``.gz``; byte-order mark dropped; a tab
    separated file has no quoting), as written; :class:`IngestError` if it has none."""
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


def _check_columns(source: _Source, columns: dict[str, str]) -> None:
    if source.kind == "parquet":
        try:
            names = pq.ParquetFile(source.path).schema_arrow.names
        except (pa.ArrowException, OSError) as exc:
            raise IngestError(f"{source.name}: not a readable Parquet file: {exc}") from None
    else:
        names = read_header(source.path, _delimiter(source))
    missing = [f"{column!r} ({role})" for column, role in columns.items() if column not in names]
    if missing:
        raise IngestError(
            f"{source.name}: missing column(s) required by the schema: {', '.join(missing)}; the file has {names}"
        )


# --- reading in blocks, with line numbers ------------------------------------------------------
@dataclass(frozen=True)
class _Budget:
    """Sizes derived from ``memory_limit_mb``.

    Attributes:
        block_bytes: bytes of CSV text parsed at a time.
        parquet_rows: rows of Parquet read at a time.
        sort_mb: DuckDB's memory limit (it spills to disk beyond it).
        sort_threads: DuckDB's threads; its external sort needs about 128 MB per thread.
        part_bytes: the in-memory size at which a day's output is cut into another part file.
    """

    block_bytes: int
    parquet_rows: int
    sort_mb: int
    sort_threads: int
    part_bytes: int

    @classmethod
    def from_limit(cls, memory_limit_mb: int) -> _Budget:
        limit = memory_limit_mb * _MB
        return cls(
            block_bytes=min(16 * _MB, limit // 64),
            parquet_rows=min(131_072, limit // 8192),
            sort_mb=memory_limit_mb // 2,
            sort_threads=duckdb_threads(memory_limit_mb, 256),
            part_bytes=limit // 8,
        )


@dataclass(frozen=True)
class MalformedLine:
    """A CSV line with the wrong number of fields (reported by pyarrow's invalid-row handler)."""

    line: int
    expected: int
    actual: int
    text: str

    def reason(self) -> str:
        return f"expected {self.expected} fields, got {self.actual}"


@dataclass
class RowBlock:
    """A block of rows of one file: the raw columns, each row's line (or row) number ``[N]``, and
    the malformed lines of the block (which pyarrow leaves out of ``batch``)."""

    batch: pa.RecordBatch
    lines: np.ndarray
    malformed: list[MalformedLine]


def _read_blocks(source: _Source, columns: list[str], budget: _Budget) -> Iterator[RowBlock]:
    """Yield the given columns of one file in blocks: text for CSV / TSV, stored types for Parquet."""
    try:
        if source.kind == "parquet":
            row = 1
            for batch in pq.ParquetFile(source.path).iter_batches(batch_size=budget.parquet_rows, columns=columns):
                arrays = [_empty_as_null(_decoded(a)) for a in batch.columns]
                batch = pa.RecordBatch.from_arrays(arrays, names=batch.schema.names)
                yield RowBlock(batch, np.arange(row, row + batch.num_rows, dtype=np.int64), [])
                row += batch.num_rows
        else:
            header = read_header(source.path, _delimiter(source))
            yield from read_text_blocks(
                source.path,
                header,
                columns,
                delimiter=_delimiter(source),
                skip_header=True,
                block_bytes=budget.block_bytes,
            )
    except pa.ArrowException as exc:
        raise IngestError(f"{source.name}: cannot read: {exc}") from None


def read_text_blocks(
    path: Path, names: list[str], columns: list[str], *, delimiter: str, skip_header: bool, block_bytes: int
) -> Iterator[RowBlock]:
    """Cut a CSV / TSV file into blocks of whole lines and parse each one with pyarrow.

    Args:
        path: the file (gzip if ``.gz``).
        names: the names of its fields, in order (those of the header line, or given).
        columns: the fields to read, each as text (an empty field is null).
        delimiter: ``","`` (CSV, ``"`` quoting) or ``"\\t"`` (TSV, no quoting).
        skip_header: line 1 is a header line (left out; rows are numbered from line 2).
        block_bytes: bytes of text parsed at a time (a longer line makes a longer block).

    Reading the bytes here (rather than with pyarrow's streaming reader, which reads ahead without
    bound when parsing is slower than the disk) keeps memory at about one block, and gives exact
    line numbers: a block's rows are its lines minus the malformed ones, which the invalid-row
    handler reports with their line within the block. Empty lines are kept as rows of nulls so
    that the count stays exact (they are dropped later).
    """
    malformed: list[pv.InvalidRow] = []

    def handler(row: pv.InvalidRow) -> str:
        malformed.append(row)
        return "skip"

    tsv = delimiter == "\t"
    parse_options = pv.ParseOptions(
        delimiter=delimiter,
        quote_char=False if tsv else '"',
        ignore_empty_lines=False,
        invalid_row_handler=handler,
    )
    convert_options = pv.ConvertOptions(
        column_types={c: pa.string() for c in columns},
        include_columns=columns,
        strings_can_be_null=True,
        quoted_strings_can_be_null=True,
        null_values=[""],
    )
    line = 1  # the number of the next block's first line
    compression = "gzip" if path.suffix.lower() == ".gz" else None
    with pa.input_stream(path, compression=compression) as stream:
        carry = b""
        while True:
            data = stream.read(block_bytes)
            buffer = carry + data
            cut = buffer.rfind(b"\n") + 1 if data else len(buffer)
            if data and cut == 0:  # no line end yet (a line longer than a block): read on
                carry = buffer
                continue
            block, carry = buffer[:cut], buffer[cut:]
            if line == 1 and skip_header:  # drop the header line (read_header's), byte-order mark included
                block = block[block.find(b"\n") + 1 :] if b"\n" in block else b""
                line = 2
            if block:
                malformed.clear()
                # one pyarrow block per block, parsed serially: the handler then gets line numbers
                read_options = pv.ReadOptions(column_names=names, use_threads=False, block_size=len(block) + 1)
                try:
                    table = pv.read_csv(pa.BufferReader(block), read_options, parse_options, convert_options)
                except pa.ArrowInvalid as exc:
                    last = line + block.count(b"\n") - 1
                    raise IngestError(f"{path}:{line}-{last}: cannot parse these lines: {exc}") from None
                bad = [
                    MalformedLine(line + m.number - 1, m.expected_columns, m.actual_columns, m.text) for m in malformed
                ]
                table = table.combine_chunks()
                batch = table.to_batches()[0] if table.num_rows else pa.RecordBatch.from_pylist([], schema=table.schema)
                yield RowBlock(batch, _row_lines(line, batch.num_rows, bad), bad)
                line += block.count(b"\n")
            if not data:
                return


def _row_lines(first: int, rows: int, malformed: list[MalformedLine]) -> np.ndarray:
    """Line numbers ``[rows]`` of a block's rows, the block starting at line ``first``.

    Row ``v`` is on line ``first + v + (malformed lines before it)``; the j-th malformed line
    (0-based) has ``line_j - first - j`` rows before it.
    """
    index = np.arange(rows, dtype=np.int64)
    if not malformed:
        return index + first
    rows_before = np.array([m.line for m in malformed], dtype=np.int64) - first - np.arange(len(malformed))
    return index + first + np.searchsorted(rows_before, index, side="right")


def _decoded(array: pa.Array) -> pa.Array:
    """A dictionary-encoded column (e.g. a pandas categorical) as plain values."""
    return array.dictionary_decode() if pa.types.is_dictionary(array.type) else array


def _empty_as_null(array: pa.Array) -> pa.Array:
    """Empty strings of a Parquet text column as nulls, as the CSV reader reads empty fields."""
    if not _is_text(array):
        return array
    return pc.if_else(pc.equal(array, ""), pa.scalar(None, array.type), array)


def blank_rows(batch: pa.RecordBatch) -> np.ndarray:
    """Rows ``[N]`` whose every column is null: the empty lines of a CSV file (ignored)."""
    blank = np.ones(batch.num_rows, dtype=bool)
    for array in batch.columns:
        blank &= array.is_null().to_numpy(zero_copy_only=False)
    return blank


# --- parsing and validation --------------------------------------------------------------------
class _BadValue(Exception):
    """Raised by a converter for values that parse but are not acceptable (e.g. infinities)."""


@dataclass
class _Problem:
    """Rows ``mask`` of a batch whose value of raw ``column`` is not what was ``expected``."""

    column: str
    mask: np.ndarray
    expected: str


def _with_bad_rows(
    array: pa.Array, convert: Callable[[pa.Array], pa.Array], required: bool
) -> tuple[pa.Array, np.ndarray | None]:
    """Apply a vectorised ``convert``; if it fails, find the failing values by bisection.

    The bisection runs over the distinct values, so a bad value repeated in many rows costs one
    search, and a block with k bad values about k·log(N) small conversions.

    Returns:
        ``(converted [N], bad [N] bool or None)``: bad rows (and nulls if ``required``) are null
        in the converted array.
    """
    try:
        result, bad = convert(array), None
    except (pa.ArrowInvalid, _BadValue):
        encoded = pc.dictionary_encode(array)
        bad_values = np.zeros(len(encoded.dictionary), dtype=bool)
        _bisect_bad(encoded.dictionary, convert, 0, bad_values)
        indices = encoded.indices
        bad = bad_values[pc.fill_null(indices, 0).to_numpy()] & indices.is_valid().to_numpy(zero_copy_only=False)
        result = convert(pc.if_else(pa.array(bad), pa.scalar(None, array.type), array))
    if required and result.null_count:
        missing = result.is_null().to_numpy(zero_copy_only=False)
        bad = missing if bad is None else bad | missing
    return result, bad


def _bisect_bad(array: pa.Array, convert: Callable[[pa.Array], pa.Array], offset: int, bad: np.ndarray) -> None:
    """Set ``bad[offset + i]`` for each value ``i`` of ``array`` that ``convert`` rejects."""
    try:
        convert(array)
    except (pa.ArrowInvalid, _BadValue):
        if len(array) == 1:
            bad[offset] = True
            return
        half = len(array) // 2
        _bisect_bad(array.slice(0, half), convert, offset, bad)
        _bisect_bad(array.slice(half), convert, offset + half, bad)


def _is_text(array: pa.Array) -> bool:
    return pa.types.is_string(array.type) or pa.types.is_large_string(array.type)


def _is_number(array: pa.Array) -> bool:
    kind = array.type
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)


def _to_float32(array: pa.Array) -> pa.Array:
    """Text or numbers -> float32; NaN becomes null; infinities (or float32 overflow) are bad."""
    if _is_number(array):
        values = pc.cast(array, pa.float32(), safe=False)
    else:
        values = pc.cast(array if _is_text(array) else pc.cast(array, pa.string()), pa.float32())
    if pc.any(pc.is_inf(values)).as_py():
        raise _BadValue
    if pc.any(pc.is_nan(values)).as_py():
        values = pc.if_else(pc.is_nan(values), pa.scalar(None, pa.float32()), values)
    return values


def _epoch_to_us(array: pa.Array, factor: int) -> pa.Array:
    """Integers or decimals in a unit -> int64 µs (rounded)."""
    if pa.types.is_integer(array.type):
        return pc.multiply_checked(pc.cast(array, pa.int64()), factor)
    if pa.types.is_floating(array.type):
        return pc.cast(pc.round(pc.multiply(pc.cast(array, pa.float64()), float(factor))), pa.int64())
    try:
        integers = pc.cast(array, pa.int64())
    except pa.ArrowInvalid:
        return _epoch_to_us(pc.cast(array, pa.float64()), factor)
    return pc.multiply_checked(integers, factor)


def _local_to_us(naive: pa.Array, zone: str) -> pa.Array:
    """Naive timestamps read in ``zone`` -> int64 µs UTC (DST gap: its end; ambiguous: earlier)."""
    aware = pc.assume_timezone(naive, timezone=zone, ambiguous="earliest", nonexistent="latest")
    return pc.cast(pc.cast(aware, pa.timestamp("us", "UTC"), safe=False), pa.int64())


def _iso_to_us(array: pa.Array, zone: str) -> pa.Array:
    """ISO-8601 text (with or without a zone offset; naive ones in ``zone``) -> int64 µs UTC."""
    try:
        return _local_to_us(pc.cast(array, pa.timestamp("us")), zone)
    except pa.ArrowInvalid:
        has_zone = pc.match_substring_regex(array, _ZONE_SUFFIX)
        null = pa.scalar(None, array.type)
        aware = pc.cast(pc.cast(pc.if_else(has_zone, array, null), pa.timestamp("us", "UTC")), pa.int64())
        naive = _local_to_us(pc.cast(pc.if_else(has_zone, null, array), pa.timestamp("us")), zone)
        return pc.if_else(has_zone, aware, naive)


def _time_converter(schema: Schema, array_type: pa.DataType) -> Callable[[pa.Array], pa.Array]:
    """The converter of the time column for one input type (text, or a Parquet file's type)."""
    unit, zone = schema.time.unit, schema.time.timezone
    if pa.types.is_timestamp(array_type):
        if array_type.tz is None:
            return lambda a: _local_to_us(a, zone)
        return lambda a: pc.cast(pc.cast(a, pa.timestamp("us", "UTC"), safe=False), pa.int64())
    if pa.types.is_date(array_type):
        return lambda a: _local_to_us(pc.cast(a, pa.timestamp("us")), zone)
    if unit == "iso":
        return lambda a: _iso_to_us(a if _is_text(a) else pc.cast(a, pa.string()), zone)
    return lambda a: _epoch_to_us(a, _UNIT_US[unit])


def _to_label(array: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """0/1/true/false (any case) -> ``(int8 [N], bad [N])``; nulls are bad."""
    if _is_number(array):
        values = pc.cast(array, pa.float64()).to_numpy(zero_copy_only=False)
        bad = ~((values == 0) | (values == 1))
        return np.where(bad, 0, values).astype(np.int8), bad
    encoded = pc.dictionary_encode(array if _is_text(array) else pc.cast(array, pa.string()))
    words = encoded.dictionary.to_pylist()
    table = np.array([_LABEL_WORDS.get(w.lower(), -1) for w in words] + [-1], dtype=np.int8)
    codes = table[pc.fill_null(encoded.indices, len(words)).to_numpy()]
    bad = codes < 0
    return np.where(bad, 0, codes).astype(np.int8), bad


def _to_sequence(array: pa.Array, separator: str, max_len: int) -> pa.Array:
    """Ids joined by ``separator`` (or a list column) -> ``list<int64>`` of hashes, last max_len.

    Empty items (``"a||b"``, an empty field) are dropped; the most recent (last) ``max_len``
    items are kept, oldest first.
    """
    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        lists = array
    else:
        lists = pc.split_pattern(array if _is_text(array) else pc.cast(array, pa.string()), pattern=separator)
    items = pc.list_flatten(lists)
    parents = pc.list_parent_indices(lists).to_numpy()
    keep = items.is_valid()
    if _is_text(items):
        keep = pc.and_kleene(keep, pc.fill_null(pc.greater(pc.utf8_length(items), 0), False))  # null items: dropped
    keep = keep.to_numpy(zero_copy_only=False)
    items, parents = items.filter(pa.array(keep)), parents[keep]
    counts = np.bincount(parents, minlength=len(array))
    starts = np.cumsum(counts) - counts
    rank_from_end = counts[parents] - (np.arange(len(parents)) - starts[parents])
    recent = rank_from_end <= max_len
    offsets = np.concatenate([[0], np.cumsum(np.minimum(counts, max_len))]).astype(np.int32)
    hashes = stable_hash(items.filter(pa.array(recent)))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(hashes, pa.int64()))


@dataclass
class _Converted:
    """One batch converted to the partition columns, plus what was wrong with it."""

    arrays: dict[str, pa.Array]
    time_us: np.ndarray
    problems: list[_Problem]

    def bad_rows(self, rows: int) -> np.ndarray:
        bad = np.zeros(rows, dtype=bool)
        for problem in self.problems:
            bad |= problem.mask
        return bad


def _convert(schema: Schema, batch: pa.RecordBatch) -> _Converted:
    """Parse and validate one batch of raw columns into partition columns ``[N]`` each."""
    arrays: dict[str, pa.Array] = {}
    problems: list[_Problem] = []

    def note(raw: str, bad: np.ndarray | None, expected: str) -> None:
        if bad is not None and bad.any():
            problems.append(_Problem(raw, bad, expected))

    raw_time = batch.column(schema.time.column)
    time_us, bad = _with_bad_rows(raw_time, _time_converter(schema, raw_time.type), required=True)
    note(schema.time.column, bad, _UNIT_TEXT[schema.time.unit])
    arrays[TIME_COLUMN] = pc.fill_null(time_us, 0)
    for feature in schema.features:
        raw = batch.column(feature.source)
        if feature.type == "categorical":
            arrays[feature.name] = pa.array(stable_hash(raw), pa.int64())
        elif feature.type == "sequence":
            arrays[feature.name] = _to_sequence(raw, feature.separator, feature.max_len)
        else:
            arrays[feature.name], bad = _with_bad_rows(raw, _to_float32, required=False)
            note(feature.source, bad, "a finite number or an empty field")
    for label in schema.labels:
        values, bad = _to_label(batch.column(label.source))
        arrays[label.name] = pa.array(values, pa.int8())
        note(label.source, bad, "0 or 1 (or true/false)")
    if schema.domain is not None:
        raw = batch.column(schema.domain.column)
        arrays[DOMAIN_COLUMN] = pc.fill_null(raw if _is_text(raw) else pc.cast(raw, pa.string()), "")
    for name in schema.passthrough:
        arrays[name], bad = _with_bad_rows(batch.column(name), _to_float32, required=False)
        note(name, bad, "a finite number or an empty field")
    return _Converted(arrays, arrays[TIME_COLUMN].to_numpy(), problems)


# --- rejected rows -----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Reject:
    """One rejected row: where, which column (empty for a malformed line), why, and its raw text."""

    line: int
    column: str
    reason: str
    raw: str

    def message(self, source: _Source) -> str:
        return bad_row_message(source.where(self.line), self.column, self.reason, self.raw)


def bad_row_message(where: str, column: str, reason: str, raw: str) -> str:
    """The error of one bad row: ``file:line: column 'c': reason``, or with its raw text if no column."""
    if not column:
        return f"{where}: {reason}: {raw[:200]!r}"
    return f"{where}: column {column!r}: {reason}"


def _value_rejects(
    batch: pa.RecordBatch, lines: np.ndarray, problems: list[_Problem], first_only: bool
) -> list[_Reject]:
    """The rejects of a batch's bad rows, each under its first bad column in schema order."""
    problems = [p for p in problems if p.mask.any()]
    if not problems:
        return []
    taken = np.zeros(batch.num_rows, dtype=bool)
    if first_only:
        first = min(int(np.argmax(p.mask)) for p in problems)
        taken[:] = True
        taken[first] = False
    found = []
    for problem in problems:
        rows = np.flatnonzero(problem.mask & ~taken)
        taken[rows] = True
        raw = batch.column(problem.column)
        for row in rows:
            text = _raw_text(raw[int(row)].as_py())
            reason = f"expected {problem.expected}, got {text!r}"
            found.append(_Reject(int(lines[row]), problem.column, reason, text))
    return found


def _malformed_rejects(malformed: list[MalformedLine]) -> list[_Reject]:
    return [_Reject(m.line, "", m.reason(), m.text) for m in malformed]


def _raw_text(value: object) -> str:
    return "" if value is None else str(value)


class RejectLog:
    """``rejects.csv`` (:data:`REJECTS_SCHEMA`: ``file, line, column, reason, raw``), created at the
    first rejected row; shared by ingest and the dataset adapters."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        self._writer: pv.CSVWriter | None = None

    def __enter__(self) -> RejectLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def write(self, rows: Sequence[tuple[str, int, str, str, str]]) -> None:
        """Append rows ``(file, line, column, reason, raw)``."""
        if rows:
            self.write_table(pa.table(list(zip(*rows, strict=True)), schema=REJECTS_SCHEMA))

    def write_table(self, table: pa.Table) -> None:
        """Append a table of :data:`REJECTS_SCHEMA`."""
        if not table.num_rows:
            return
        if self._writer is None:
            self._writer = pv.CSVWriter(self.path, REJECTS_SCHEMA)
        self._writer.write_table(table)
        self.count += table.num_rows

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# --- per-day spill and statistics --------------------------------------------------------------
class _DayStats:
    """A day's summary accumulated batch by batch (same meaning as ``summarize_day``)."""

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.rows = 0
        self.domains: dict[str, int] = {}
        self.label_sums = {label.name: 0 for label in schema.labels}
        self.moments = {f.name: [0, 0.0, 0.0] for f in schema.numeric}

    def add(self, batch: pa.RecordBatch) -> None:
        self.rows += batch.num_rows
        if self.schema.domain is not None:
            for item in pc.value_counts(batch.column(DOMAIN_COLUMN)).to_pylist():
                self.domains[item["values"]] = self.domains.get(item["values"], 0) + item["counts"]
        for name in self.label_sums:
            self.label_sums[name] += int(np.sum(batch.column(name).to_numpy(), dtype=np.int64))
        for name, moments in self.moments.items():
            values = batch.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
            values = values[~np.isnan(values)]
            moments[0] += len(values)
            moments[1] += float(values.sum())
            moments[2] += float(np.square(values).sum())

    def summary(self) -> dict:
        rows = self.rows
        return {
            "rows": rows,
            "domains": dict(sorted(self.domains.items())),
            "label_rates": {name: total / rows if rows else 0.0 for name, total in self.label_sums.items()},
            "numeric_moments": {
                name: Moments(count=count, sum=total, sumsq=squares)
                for name, (count, total, squares) in self.moments.items()
            },
        }


class _DaySpill:
    """Unsorted per-day Parquet files of validated rows, each with its input sequence number."""

    def __init__(self, schema: Schema, directory: Path, days: int) -> None:
        self.directory = directory
        self.days = days
        self.partition_schema = partition_arrow_schema(schema)
        self.spill_schema = self.partition_schema.append(pa.field(SEQ_COLUMN, pa.int64(), nullable=False))
        self.stats = {day: _DayStats(schema) for day in range(1, days + 1)}
        self._writers: dict[int, pq.ParquetWriter] = {}
        self._next_seq = 0
        directory.mkdir(parents=True)

    def __enter__(self) -> _DaySpill:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for writer in self._writers.values():
            writer.close()

    def path(self, day: int) -> Path:
        return self.directory / f"day-{day:04d}.parquet"

    def add(self, arrays: dict[str, pa.Array], keep: np.ndarray, days: np.ndarray) -> None:
        """Append the rows ``keep`` ``[N]`` of a converted batch to their days ``days [N]``."""
        batch = pa.RecordBatch.from_arrays(
            [arrays[name] for name in self.partition_schema.names], schema=self.partition_schema
        )
        if not keep.all():
            batch, days = batch.filter(pa.array(keep)), days[keep]
        seq = np.arange(self._next_seq, self._next_seq + batch.num_rows, dtype=np.int64)
        self._next_seq += batch.num_rows
        batch = pa.RecordBatch.from_arrays([*batch.columns, pa.array(seq)], schema=self.spill_schema)
        if len(days) > 1 and np.any(days[1:] < days[:-1]):
            order = np.argsort(days, kind="stable")
            batch, days = batch.take(pa.array(order)), days[order]
        starts = np.searchsorted(days, np.arange(1, self.days + 2))
        for day in range(1, self.days + 1):
            start, end = int(starts[day - 1]), int(starts[day])
            if end > start:
                part = batch.slice(start, end - start)
                self._writer(day).write_batch(part)
                self.stats[day].add(part)

    def _writer(self, day: int) -> pq.ParquetWriter:
        if day not in self._writers:
            self._writers[day] = pq.ParquetWriter(self.path(day), self.spill_schema, compression="lz4")
        return self._writers[day]


# --- the passes --------------------------------------------------------------------------------
def progress(
    show: bool, desc: str, total: int | None = None, *, unit: str = " rows", iterable: Iterable | None = None
) -> tqdm:
    """A progress bar on stderr (rate and, with ``total``, ETA) unless ``show`` is false; over
    ``iterable`` if given, else updated by hand. Shared by the ingest and the dataset adapters."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, unit_scale=True, disable=not show, dynamic_ncols=True)


def _raise_first(source: _Source, found: list[_Reject]) -> None:
    if found:
        raise IngestError(min(found, key=lambda r: r.line).message(source))


def _scan_time_range(
    schema: Schema, sources: list[_Source], on_bad_row: str, budget: _Budget, show_progress: bool
) -> tuple[int, int] | None:
    """First pass: ``(t_min, t_max)`` in µs over the rows whose time parses (None if none do).

    In ``"error"`` mode a malformed line or an unparsable non-empty time raises here already;
    empty times are left to the main pass (which tells empty lines from rows missing a time).
    """
    t_min, t_max = None, None
    column = schema.time.column
    with progress(show_progress, "scan time range") as bar:
        for source in sources:
            for block in _read_blocks(source, [column], budget):
                raw = block.batch.column(0)
                time_us, bad = _with_bad_rows(raw, _time_converter(schema, raw.type), required=False)
                if on_bad_row == "error":
                    problems = [] if bad is None else [_Problem(column, bad, _UNIT_TEXT[schema.time.unit])]
                    found = _value_rejects(block.batch, block.lines, problems, first_only=True)
                    _raise_first(source, found + _malformed_rejects(block.malformed))
                if time_us.null_count < len(time_us):
                    low, high = pc.min_max(time_us).values()
                    t_min = low.as_py() if t_min is None else min(t_min, low.as_py())
                    t_max = high.as_py() if t_max is None else max(t_max, high.as_py())
                bar.update(block.batch.num_rows)
    return None if t_min is None else (t_min, t_max)


def _format_us(time_us: int) -> str:
    return datetime.fromtimestamp(time_us / 1_000_000, UTC).isoformat()


def _split_into_days(
    schema: Schema,
    sources: list[_Source],
    boundaries: np.ndarray,
    spill: _DaySpill,
    rejects: RejectLog,
    on_bad_row: str,
    budget: _Budget,
    show_progress: bool,
) -> int:
    """Main pass: validate, convert and spill every row to its day.

    Returns:
        The number of valid rows dropped because they fall outside days 1..N.
    """
    columns = list(_required_columns(schema))
    strict = on_bad_row == "error"
    range_error = schema.split.out_of_range == "error"
    first, last = _format_us(int(boundaries[0])), _format_us(int(boundaries[-1]))
    days_text = f"days 1..{len(boundaries) - 1} = [{first}, {last})"
    dropped = 0
    with progress(show_progress, "ingest") as bar:
        for source in sources:
            for block in _read_blocks(source, columns, budget):
                batch, lines, rows = block.batch, block.lines, block.batch.num_rows
                converted = _convert(schema, batch)
                keep = ~converted.bad_rows(rows)
                if not keep.all() and source.kind != "parquet":
                    blank = blank_rows(batch)
                    keep &= ~blank
                    for problem in converted.problems:
                        problem.mask &= ~blank
                found = _value_rejects(batch, lines, converted.problems, first_only=strict)
                found += _malformed_rejects(block.malformed)
                days = assign_days(converted.time_us, boundaries)
                outside = keep & (days == 0)
                out_of_range = []  # with out_of_range: error, such a row stops the ingest in both modes
                if range_error and outside.any():
                    row = int(np.argmax(outside))
                    time_text = _format_us(int(converted.time_us[row]))
                    reason = f"time {time_text} is outside {days_text}"
                    out_of_range.append(_Reject(int(lines[row]), schema.time.column, reason, time_text))
                if strict:
                    _raise_first(source, found + out_of_range)
                rejects.write(
                    [(source.name, r.line, r.column, r.reason, r.raw) for r in sorted(found, key=lambda r: r.line)]
                )
                _raise_first(source, out_of_range)
                dropped += int(outside.sum())
                spill.add(converted.arrays, keep & ~outside, days)
                bar.update(rows)
    return dropped


def _quote_sql(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _sort_and_write_days(
    schema: Schema,
    spill: _DaySpill,
    boundaries: np.ndarray,
    staging: Path,
    work: Path,
    budget: _Budget,
    show_progress: bool,
) -> list[tuple[int, int, int, list[str], dict]]:
    """Sort each day's spill by (time, input order) out of core and write its part files.

    Returns:
        ``(day, start_us, end_us, files, summary)`` per day, as :func:`build_manifest` takes them.
    """
    target = spill.partition_schema
    config = {
        "memory_limit": f"{budget.sort_mb}MB",
        "temp_directory": str(work / "duckdb"),
        "preserve_insertion_order": False,
        "threads": budget.sort_threads,
    }
    total = sum(stats.rows for stats in spill.stats.values())
    entries = []
    query = 'SELECT * EXCLUDE ("{seq}") FROM read_parquet({path}) ORDER BY "{time}", "{seq}"'
    with duckdb.connect(config=config) as con, progress(show_progress, "sort days", total) as bar:
        for day in range(1, spill.days + 1):
            stats = spill.stats[day]
            files: list[str] = []
            if stats.rows:
                sql = query.format(seq=SEQ_COLUMN, time=TIME_COLUMN, path=_quote_sql(str(spill.path(day))))
                try:
                    pending: list[pa.RecordBatch] = []
                    size = 0
                    for batch in con.sql(sql).to_arrow_reader(batch_size=SORTED_BATCH_ROWS):
                        pending.append(batch.cast(target))
                        size += batch.nbytes
                        bar.update(batch.num_rows)
                        if size >= budget.part_bytes:
                            files.append(write_day(staging, day, pa.Table.from_batches(pending), len(files)))
                            pending, size = [], 0
                except duckdb.OutOfMemoryException as exc:
                    raise IngestError(
                        f"sorting day {day} ran out of memory (sort limit {budget.sort_mb} MB with"
                        f" {budget.sort_threads} thread(s)): raise memory_limit_mb"
                    ) from exc
                if pending:
                    files.append(write_day(staging, day, pa.Table.from_batches(pending), len(files)))
                spill.path(day).unlink()
            else:
                files.append(write_day(staging, day, target.empty_table(), 0))
            entries.append((day, int(boundaries[day - 1]), int(boundaries[day]), files, stats.summary()))
    return entries
