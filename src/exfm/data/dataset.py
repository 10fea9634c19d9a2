"""The day-partitioned dataset format written by ``exfm ingest`` and ``exfm synth``.

Layout of a dataset directory::

    DIR/manifest.json          written last; a directory without it is not a dataset
    DIR/schema.yaml            the schema the data was ingested with
    DIR/day=01/part-00000.parquet, ...   one or more files per day, rows sorted by time

Partition columns (see :func:`partition_arrow_schema`):

    _time        int64    event time, microseconds since the Unix epoch (UTC)
    <categorical> int64   stable 64-bit hash of the id (0 = missing), see exfm.data.hashing
    <sequence>   list<int64>  hashes, oldest first, at most max_len (the most recent kept)
    <numeric>    float32  raw value (null = missing); transforms happen in the reader
    <label>      int8     0 / 1
    _domain      string   the domain value (only if the schema names a domain column)
    <passthrough> float32 carried unchanged (e.g. true probabilities of the synthetic stream)

Anything else in a partition (for example the DAS's logged FM predictions ``fm:<task>``) is
extra and read only when asked for.

The whole directory is produced under a temporary name and renamed into place at the end
(:func:`atomic_output_dir`), so a reader never sees a half-written dataset.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from exfm.schema import DaySplit, Schema, load_schema

FORMAT = "exfm-dataset/1"
MANIFEST_NAME = "manifest.json"
SCHEMA_NAME = "schema.yaml"
TIME_COLUMN = "_time"
DOMAIN_COLUMN = "_domain"
REQUEST_ID_COLUMN = "_request_id"  # DAS: the request an example was joined from (shared store rows)
US_PER_S = 1_000_000


class DatasetError(ValueError):
    """A directory is not a complete exfm dataset, or a day is out of range."""


class Moments(BaseModel):
    """Sufficient statistics of a numeric column over one day (non-missing values only)."""

    count: int = 0
    sum: float = 0.0
    sumsq: float = 0.0


class DayInfo(BaseModel):
    """One day of the dataset: its time span [start_us, end_us) and what it holds."""

    day: int
    start_us: int
    end_us: int
    files: list[str]
    rows: int
    domains: dict[str, int] = Field(default_factory=dict)
    label_rates: dict[str, float] = Field(default_factory=dict)
    numeric_moments: dict[str, Moments] = Field(default_factory=dict)


class Manifest(BaseModel):
    """The dataset's table of contents (``manifest.json``)."""

    format: str = FORMAT
    name: str
    schema_fingerprint: str
    created_by: str
    rows: int
    time_range_us: tuple[int, int] | None
    days: list[DayInfo]
    domains: list[str] = Field(default_factory=list, description="sorted domain values of all days")
    dropped_out_of_range: int = 0
    rejected_rows: int = 0
    sources: list[str] = Field(default_factory=list)


# --- day split ---------------------------------------------------------------------------------
def day_boundaries(split: DaySplit, t_min_us: int, t_max_us: int) -> np.ndarray:
    """The N+1 boundaries ``[b_0, ..., b_N]`` (µs, UTC): day d covers ``[b_{d-1}, b_d)``.

    Calendar days are local midnights in ``split.timezone`` (DST-correct); equal spans divide
    ``[t_min, t_max]`` into N equal parts, the last one closed so that t_max falls inside.
    """
    if split.mode == "equal_spans":
        edges = np.linspace(t_min_us, t_max_us, split.days + 1).round().astype(np.int64)
        edges[-1] = t_max_us + 1
        return edges
    zone = ZoneInfo(split.timezone)
    start: date = split.start or datetime.fromtimestamp(t_min_us / US_PER_S, zone).date()
    local_dates = [start + timedelta(days=d) for d in range(split.days + 1)]
    midnights = [datetime.combine(d, datetime.min.time(), tzinfo=zone) for d in local_dates]
    return np.array([int(m.timestamp()) * US_PER_S for m in midnights], dtype=np.int64)


def assign_days(time_us: np.ndarray, boundaries: np.ndarray) -> np.ndarray:
    """Day number (1..N) of each timestamp, or 0 if it is outside all days. ``[N] -> [N]``."""
    days = np.searchsorted(boundaries, time_us, side="right").astype(np.int64)
    days[(days < 1) | (days >= len(boundaries))] = 0
    return days


# --- partition layout --------------------------------------------------------------------------
def partition_arrow_schema(schema: Schema) -> pa.Schema:
    """The Arrow schema of every partition file of a dataset with this feature schema."""
    fields = [pa.field(TIME_COLUMN, pa.int64(), nullable=False)]
    for feature in schema.features:
        if feature.type == "categorical":
            fields.append(pa.field(feature.name, pa.int64(), nullable=False))
        elif feature.type == "sequence":
            fields.append(pa.field(feature.name, pa.list_(pa.int64()), nullable=False))
        else:
            fields.append(pa.field(feature.name, pa.float32()))
    fields += [pa.field(label.name, pa.int8(), nullable=False) for label in schema.labels]
    if schema.domain is not None:
        fields.append(pa.field(DOMAIN_COLUMN, pa.string(), nullable=False))
    fields += [pa.field(name, pa.float32()) for name in schema.passthrough]
    return pa.schema(fields)


def summarize_day(table: pa.Table, schema: Schema) -> dict:
    """Row count, domain counts, label rates and numeric moments of one day's table."""
    rows = table.num_rows
    summary: dict = {"rows": rows, "domains": {}, "label_rates": {}, "numeric_moments": {}}
    if schema.domain is not None and rows:
        counts = pc.value_counts(table[DOMAIN_COLUMN]).to_pylist()
        summary["domains"] = {c["values"]: c["counts"] for c in sorted(counts, key=lambda c: c["values"])}
    for label in schema.labels:
        summary["label_rates"][label.name] = float(pc.mean(table[label.name]).as_py() or 0.0) if rows else 0.0
    for feature in schema.numeric:
        values = table[feature.name].to_numpy(zero_copy_only=False).astype(np.float64)
        values = values[~np.isnan(values)]
        summary["numeric_moments"][feature.name] = Moments(
            count=len(values), sum=float(values.sum()), sumsq=float(np.square(values).sum())
        )
    return summary


def day_dir_name(day: int) -> str:
    return f"day={day:02d}"


def write_day(out_dir: Path, day: int, table: pa.Table, part: int = 0) -> str:
    """Write one day's (already time-sorted) table; returns the file's path relative to out_dir."""
    relative = f"{day_dir_name(day)}/part-{part:05d}.parquet"
    path = out_dir / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=65_536, compression="snappy")
    return relative


# --- atomic output -----------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success rename it to ``out``, on error delete it.

    Raises :class:`DatasetError` if ``out`` exists and ``overwrite`` is false.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise DatasetError(f"{out}: already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        trash = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, trash)
        os.replace(staging, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, out)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file under a temporary name, fsync it, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode())


def write_manifest(out_dir: Path, schema: Schema, manifest: Manifest) -> None:
    """Write ``schema.yaml`` then ``manifest.json`` (last: its presence marks completion)."""
    atomic_write_text(out_dir / SCHEMA_NAME, schema.to_yaml())
    atomic_write_text(out_dir / MANIFEST_NAME, manifest.model_dump_json(indent=2))


def build_manifest(
    schema: Schema, created_by: str, days: list[tuple[int, int, int, list[str], dict]], **extra
) -> Manifest:
    """Assemble a manifest from ``(day, start_us, end_us, files, summarize_day(...))`` tuples."""
    infos = [DayInfo(day=d, start_us=s, end_us=e, files=f, **summary) for d, s, e, f, summary in days]
    domains = sorted({name for info in infos for name in info.domains})
    rows = sum(info.rows for info in infos)
    return Manifest(
        name=schema.name,
        schema_fingerprint=schema.fingerprint(),
        created_by=created_by,
        rows=rows,
        time_range_us=(infos[0].start_us, infos[-1].end_us) if infos else None,
        days=infos,
        domains=domains,
        **extra,
    )


class DatasetWriter:
    """Writes the days of a dataset whose day boundaries are fixed by its schema (a calendar split
    with a ``start``) into a staging directory of :func:`atomic_output_dir`, then its manifest.

    ::

        with atomic_output_dir(out) as staging:
            writer = DatasetWriter(staging, schema)
            writer.add_day(1, table)        # a time-sorted table of partition_arrow_schema(schema)
            manifest = writer.finish("synth")
    """

    def __init__(self, staging: Path, schema: Schema):
        if schema.split.mode != "calendar" or schema.split.start is None:
            raise ValueError("DatasetWriter needs a calendar split with a start date (fixed day boundaries)")
        self.staging, self.schema = staging, schema
        self.boundaries = day_boundaries(schema.split, 0, 0)
        self._entries: list[tuple[int, int, int, list[str], dict]] = []

    def day_span(self, day: int) -> tuple[int, int]:
        """``[start_us, end_us)`` of a day."""
        return int(self.boundaries[day - 1]), int(self.boundaries[day])

    def add_day(self, day: int, table: pa.Table, parts: int = 1) -> None:
        """Write one day's time-sorted table as ``parts`` files and record its summary."""
        size = -(-table.num_rows // parts)
        files = [write_day(self.staging, day, table.slice(i * size, size), i) for i in range(parts)]
        self._entries.append((day, *self.day_span(day), files, summarize_day(table, self.schema)))

    def finish(self, created_by: str, **extra) -> Manifest:
        """Write ``schema.yaml`` and ``manifest.json`` (last) and return the manifest."""
        manifest = build_manifest(self.schema, created_by, self._entries, **extra)
        write_manifest(self.staging, self.schema, manifest)
        return manifest


# --- reading -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dataset:
    """An opened dataset: its root, schema and manifest."""

    root: Path
    schema: Schema
    manifest: Manifest

    @property
    def num_days(self) -> int:
        return len(self.manifest.days)

    def day(self, day: int) -> DayInfo:
        for info in self.manifest.days:
            if info.day == day:
                return info
        raise DatasetError(f"{self.root}: no day {day} (days 1..{self.num_days})")

    def day_files(self, day: int) -> list[Path]:
        return [self.root / f for f in self.day(day).files]


def open_dataset(root: str | Path) -> Dataset:
    """Open a complete dataset directory, checking its format and schema fingerprint."""
    root = Path(root)
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.exists():
        raise DatasetError(f"{root}: no {MANIFEST_NAME}; not an exfm dataset (or an incomplete one)")
    manifest = Manifest.model_validate(json.loads(manifest_path.read_text()))
    if manifest.format != FORMAT:
        raise DatasetError(f"{manifest_path}: format {manifest.format!r}, expected {FORMAT!r}")
    schema = load_schema(root / SCHEMA_NAME)
    if schema.fingerprint() != manifest.schema_fingerprint:
        raise DatasetError(f"{root}: schema.yaml does not match the manifest's schema fingerprint")
    return Dataset(root=root, schema=schema, manifest=manifest)


def trained_through_us(dataset: Dataset, day: int, rows: int) -> int:
    """The latest event time (µs) among the first ``rows`` rows of ``day`` in the reader's order:
    the train-through time of a model at that stream position (the day's start minus 1 µs if
    ``rows`` is 0). The maximum, not the last row's time: a DAS store's files are in commit order."""
    info = dataset.day(day)
    rows = min(rows, info.rows)
    if rows == 0:
        return info.start_us - 1
    latest, remaining = info.start_us - 1, rows
    for path in dataset.day_files(day):
        column = pq.read_table(path, columns=[TIME_COLUMN]).column(TIME_COLUMN).slice(0, remaining)
        if len(column):
            latest = max(latest, int(pc.max(column).as_py()))
        remaining -= len(column)
        if remaining == 0:
            break
    return latest
