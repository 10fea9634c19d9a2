"""The streaming batch reader: day partitions, in time order, to :class:`~exfm.data.batch.Batch`.

Rows are read exactly once, in the order they were written (sorted by time within each day);
nothing is shuffled. Batches never span two days: the last batch of a day may be smaller. A
reader may start anywhere (:class:`ReaderPosition`), which is how a resumed run continues.

Decoding per batch of B rows:

* categorical hash h -> bucket id (:func:`exfm.data.hashing.bucketize`);
* sequences -> jagged ids (the stored lists, already truncated to ``max_len``);
* numerics -> fill missing, transform, and (for ``*standardize``) ``(x - μ) / σ`` where μ and σ
  are computed from all rows strictly before the batch (:class:`CausalNormalizer`) — including
  earlier days that this reader does not itself yield, so a reader that starts on day 5 uses
  exactly the statistics a reader that started on day 1 would have reached;
* labels -> float32 ``[B, T]``; logged FM predictions ``fm:<task>`` -> ``[B, T]`` with NaN where
  missing.

A ``row_filter`` (a :class:`~exfm.data.views.View`: one VM's slice of a shared store) drops rows
of each day *before* they are grouped into batches: batch numbers, resume positions, row counts
and the causal normaliser then all refer to the filtered stream, exactly as if the dataset held
only the view's rows.

A background thread decodes ahead (``prefetch`` batches) and can pin memory and copy to a device.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from exfm.data.batch import Batch, KeyedJagged
from exfm.data.dataset import DOMAIN_COLUMN, REQUEST_ID_COLUMN, TIME_COLUMN, Dataset, DatasetError
from exfm.data.hashing import bucketize
from exfm.data.views import RowFilter, missing_request_id_message
from exfm.schema import NumericFeature, Schema

FM_PREDICTION_PREFIX = "fm:"
_READ_ROWS = 65_536


def fm_prediction_column(task: str) -> str:
    """The partition column that holds the logged FM probability for ``task``."""
    return f"{FM_PREDICTION_PREFIX}{task}"


@dataclass(frozen=True, order=True)
class ReaderPosition:
    """Where a stream stands: the next batch is number ``batch`` of day ``day``."""

    day: int
    batch: int = 0


class CausalNormalizer:
    """Running moments of the transformed numeric features; each batch sees only the past.

    For feature j with a ``*standardize`` transform: ``x' = (x - μ_j) / σ_j`` with
    ``μ_j = S1_j / n_j``, ``σ_j = sqrt(max(S2_j / n_j - μ_j², 1e-12))`` over every row before the
    batch (``μ = 0, σ = 1`` before any row). Other transforms are stateless. A normaliser made
    by :meth:`frozen` applies fixed moments and observes nothing (serving a snapshot).
    """

    def __init__(self, features: Sequence[NumericFeature]):
        self.log1p = np.array([f.transform.log1p for f in features], dtype=bool)
        self.standardize = np.array([f.transform.standardizes for f in features], dtype=bool)
        self.fills = np.asarray([f.fill for f in features], dtype=np.float32)
        self.clips = np.array([np.inf if f.clip is None else f.clip for f in features], dtype=np.float32)
        width = len(features)
        self.count = 0
        self.sum = np.zeros(width)
        self.sumsq = np.zeros(width)
        self.observing = True

    @classmethod
    def frozen(cls, features: Sequence[NumericFeature], moments: Mapping[str, Sequence[float]]) -> CausalNormalizer:
        """A normaliser with fixed ``{feature: (μ, σ)}`` (as :meth:`moments` reported them) that never observes."""
        normalizer = cls(features)
        mean, std = normalizer.moments()
        for i, feature in enumerate(features):
            if normalizer.standardize[i]:
                mean[i], std[i] = moments[feature.name]
        normalizer.count, normalizer.sum, normalizer.sumsq = 1, mean, std**2 + mean**2
        normalizer.observing = False
        return normalizer

    def _pre(self, raw: np.ndarray) -> np.ndarray:
        """Fill missing values and apply log1p where configured. ``[B, F] -> [B, F]``."""
        x = np.where(np.isnan(raw), self.fills, raw)
        if self.log1p.any():
            x[:, self.log1p] = np.sign(x[:, self.log1p]) * np.log1p(np.abs(x[:, self.log1p]))
        return x

    def _add(self, x: np.ndarray) -> None:
        x = x.astype(np.float64)
        self.count += len(x)
        self.sum += x.sum(axis=0)
        self.sumsq += np.square(x).sum(axis=0)

    def observe(self, raw: np.ndarray) -> None:
        """Add rows ``[B, F]`` to the statistics without transforming them (warm-up)."""
        self._add(self._pre(raw))

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """``(μ, σ)``, each ``[F]``, of the rows observed so far (``μ = 0, σ = 1`` before any row)."""
        if not self.count:
            return np.zeros_like(self.sum), np.ones_like(self.sum)
        mean = self.sum / self.count
        return mean, np.sqrt(np.maximum(self.sumsq / self.count - mean**2, 1e-12))

    def transform(self, raw: np.ndarray) -> np.ndarray:
        """Transform a batch with the statistics of earlier rows, then observe it. ``[B, F] float32``."""
        x = self._pre(raw)
        if self.standardize.any():
            observed = x.copy()
            if self.count:
                mean, std = self.moments()
                x[:, self.standardize] = ((x - mean) / std)[:, self.standardize]
            if self.observing:
                self._add(observed)
        return np.clip(x, -self.clips, self.clips).astype(np.float32, copy=False)


class StreamReader:
    """Iterate a dataset's days in time order as batches.

    Args:
        dataset: an opened dataset (:func:`exfm.data.dataset.open_dataset`).
        days: the days to read, in order (e.g. ``range(1, 5)``).
        batch_size: rows per batch (the last batch of each day may be smaller).
        start: the position to start from (a resumed run); batches before it are skipped.
        with_fm_predictions: also decode the logged ``fm:<task>`` columns (NaN if absent).
        passthrough: passthrough columns to carry (e.g. ``["p_click"]``).
        prefetch: batches decoded ahead by a background thread (0 = decode inline).
        device: copy batches to this device in the background thread (pinned, non-blocking).
        row_filter: keep only the rows it selects (a :class:`~exfm.data.views.View`), applied to
            each day's rows before batching; checked against the dataset here (:class:`DatasetError`).
    """

    def __init__(
        self,
        dataset: Dataset,
        days: Sequence[int],
        batch_size: int,
        *,
        start: ReaderPosition | None = None,
        with_fm_predictions: bool = False,
        passthrough: Sequence[str] = (),
        prefetch: int = 4,
        device: torch.device | str | None = None,
        row_filter: RowFilter | None = None,
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        for day in days:
            dataset.day(day)  # raises for an unknown day
        if row_filter is not None and getattr(row_filter, "is_identity", False):
            row_filter = None  # keeps everything: read exactly as without a filter
        if row_filter is not None and days:
            last = max(days)  # the normaliser may read every earlier day
            row_filter.check(dataset, [info.day for info in dataset.manifest.days if info.day <= last])
        self.dataset = dataset
        self.schema = dataset.schema
        self.days = list(days)
        self.batch_size = batch_size
        self.start = start or ReaderPosition(self.days[0] if self.days else 1, 0)
        self.with_fm_predictions = with_fm_predictions
        self.passthrough = list(passthrough)
        self.prefetch = prefetch
        self.device = torch.device(device) if device is not None else None
        self.domains = dataset.manifest.domains
        self.row_filter = row_filter
        self._filter_columns = list(row_filter.columns()) if row_filter is not None else []
        self._numeric_names = [f.name for f in self.schema.numeric]
        self._day_rows: dict[int, int] = {}

    # --- sizes ---------------------------------------------------------------------------------
    def day_rows(self, day: int) -> int:
        """Rows of ``day`` this reader's stream holds (after the row filter; exact).

        Without a filter this is the manifest's count; with one, the filter's columns of the day
        are read once and the count is cached.
        """
        if self.row_filter is None:
            return self.dataset.day(day).rows
        if day not in self._day_rows:
            rows = 0
            for path in self.dataset.day_files(day):
                file = pq.ParquetFile(path)
                self._check_filter_columns(path, set(file.schema_arrow.names))
                for chunk in file.iter_batches(_READ_ROWS, columns=self._filter_columns):
                    rows += int(np.count_nonzero(self.row_filter.mask(chunk)))
            self._day_rows[day] = rows
        return self._day_rows[day]

    def batches_in_day(self, day: int) -> int:
        """Batches ``day`` is grouped into (``ceil(day_rows / batch_size)``; 0 for an empty day)."""
        return -(-self.day_rows(day) // self.batch_size)

    @property
    def total_rows(self) -> int:
        """Rows this reader will yield from its start position (after the row filter; exact)."""
        rows = 0
        for day in self.days:
            if day < self.start.day:
                continue
            skipped = self.start.batch * self.batch_size if day == self.start.day else 0
            rows += max(self.day_rows(day) - skipped, 0)
        return rows

    # --- iteration -----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        if self.prefetch <= 0:
            yield from self._batches()
            return
        yield from _prefetched(self._batches(), self.prefetch)

    def _batches(self) -> Iterator[Batch]:
        normalizer = self.start_normalizer()
        pin = self.device is not None and self.device.type == "cuda"
        for day in self.days:
            if day < self.start.day:
                continue
            first = self.start.batch if day == self.start.day else 0
            for index, table in enumerate(self._day_tables(day, first, self._columns()), start=first):
                batch = self._decode(table, day, index, normalizer)
                if pin:
                    batch = batch.pin_memory().to(self.device, non_blocking=True)
                elif self.device is not None:
                    batch = batch.to(self.device)
                yield batch

    def start_normalizer(self) -> CausalNormalizer:
        """A normaliser that has observed every row before the start position, batch by batch as a
        reader that started earlier would have (same grouping, so the statistics agree bit for bit)."""
        normalizer = CausalNormalizer(self.schema.numeric)
        if not normalizer.standardize.any():
            return normalizer
        for info in self.dataset.manifest.days:
            if info.day > self.start.day:
                break
            limit = self.start.batch if info.day == self.start.day else None
            tables = self._day_tables(info.day, 0, self._numeric_names)
            for index, table in enumerate(tables):
                if limit is not None and index >= limit:
                    break
                normalizer.observe(numeric_matrix(table, self._numeric_names))
        return normalizer

    def _day_tables(self, day: int, skip_batches: int, columns: list[str]) -> Iterator[pa.Table]:
        """The day's rows (those the row filter keeps) as tables of ``batch_size`` rows (the last
        may be shorter), each with exactly ``columns``."""
        to_skip = skip_batches * self.batch_size
        extra = [c for c in self._filter_columns if c not in columns]
        read = columns + extra
        pending: list[pa.RecordBatch] = []
        pending_rows = 0
        for path in self.dataset.day_files(day):
            file = pq.ParquetFile(path)
            available = set(file.schema_arrow.names)
            self._check_filter_columns(path, available)
            for chunk in file.iter_batches(_READ_ROWS, columns=[c for c in read if c in available]):
                chunk = _add_missing_columns(chunk, read)
                if self.row_filter is not None:
                    chunk = chunk.filter(pa.array(self.row_filter.mask(chunk), pa.bool_()))
                    if extra:
                        chunk = chunk.select(columns)
                    if not chunk.num_rows:
                        continue
                if to_skip >= chunk.num_rows:
                    to_skip -= chunk.num_rows
                    continue
                chunk, to_skip = chunk.slice(to_skip), 0
                pending.append(chunk)
                pending_rows += chunk.num_rows
                while pending_rows >= self.batch_size:
                    table = pa.Table.from_batches(pending)
                    yield table.slice(0, self.batch_size)
                    rest = table.slice(self.batch_size)
                    pending, pending_rows = rest.to_batches(), rest.num_rows
        if pending_rows:
            yield pa.Table.from_batches(pending)

    def _check_filter_columns(self, path: object, available: set[str]) -> None:
        missing = [c for c in self._filter_columns if c not in available]
        if not missing:
            return
        if missing == [REQUEST_ID_COLUMN]:
            raise DatasetError(missing_request_id_message(self.dataset, path))
        raise DatasetError(f"{path}: the reader's row filter needs column(s) {missing}, which the file lacks")

    def _columns(self) -> list[str]:
        schema = self.schema
        columns = [TIME_COLUMN, *(f.name for f in schema.features), *schema.tasks]
        if schema.domain is not None:
            columns.append(DOMAIN_COLUMN)
        if self.with_fm_predictions:
            columns += [fm_prediction_column(t) for t in schema.tasks]
        return columns + self.passthrough

    # --- decoding ------------------------------------------------------------------------------
    def _decode(self, table: pa.Table, day: int, index: int, normalizer: CausalNormalizer) -> Batch:
        return decode_table(
            table,
            self.schema,
            self.domains,
            normalizer,
            day=day,
            index_in_day=index,
            with_fm_predictions=self.with_fm_predictions,
            passthrough=self.passthrough,
        )


def decode_table(
    table: pa.Table,
    schema: Schema,
    domains: Sequence[str],
    normalizer: CausalNormalizer,
    *,
    day: int = 0,
    index_in_day: int = 0,
    with_fm_predictions: bool = False,
    passthrough: Sequence[str] = (),
) -> Batch:
    """Decode rows in the partition format into a :class:`Batch` (``B = table.num_rows``).

    Args:
        table: the columns :meth:`StreamReader._columns` names.
        schema: the feature schema.
        domains: the dataset's sorted domain values (a domain's code is its index; unknown = -1).
        normalizer: transforms the numeric features (and observes them unless frozen).
        day, index_in_day: where the batch is in the stream.
        with_fm_predictions: decode ``fm:<task>`` into ``fm_predictions`` (NaN where null).
        passthrough: passthrough columns to carry.
    """
    rows = table.num_rows
    categorical = schema.categorical
    sequences = schema.sequences
    # Sparse: single-valued categoricals first (key-major), then sequences.
    single = np.empty((len(categorical), rows), dtype=np.int64)
    for i, feature in enumerate(categorical):
        single[i] = table.column(feature.name).to_numpy()
    parts = [_bucket_rows(single, categorical)]
    lengths = [torch.ones(len(categorical) * rows, dtype=torch.int32)]
    for feature in sequences:
        column = table.column(feature.name).combine_chunks()
        flat = pc.list_flatten(column).to_numpy(zero_copy_only=False, writable=True)
        buckets = schema.feature(feature.embedding).buckets
        parts.append(bucketize(torch.from_numpy(flat.astype(np.int64, copy=False)), buckets))
        lengths.append(torch.from_numpy(pc.list_value_length(column).to_numpy().astype(np.int32)))
    sparse = KeyedJagged(
        keys=[f.name for f in categorical] + [f.name for f in sequences],
        values=torch.cat(parts),
        lengths=torch.cat(lengths),
        stride=rows,
        num_single=len(categorical),
    )
    labels = np.stack([table.column(t).to_numpy().astype(np.float32) for t in schema.tasks], axis=1)
    if schema.domain is not None:
        codes = pc.index_in(table.column(DOMAIN_COLUMN), value_set=pa.array(list(domains), pa.string()))
        domain = torch.from_numpy(pc.fill_null(codes, -1).to_numpy().astype(np.int64))
    else:
        domain = torch.full((rows,), -1, dtype=torch.int64)
    fm_predictions = None
    if with_fm_predictions:
        fm_predictions = torch.from_numpy(
            np.stack([_float_column(table.column(fm_prediction_column(t))) for t in schema.tasks], axis=1)
        )
    return Batch(
        sparse=sparse,
        dense=torch.from_numpy(normalizer.transform(numeric_matrix(table, [f.name for f in schema.numeric]))),
        labels=torch.from_numpy(labels),
        time_us=torch.from_numpy(table.column(TIME_COLUMN).to_numpy().copy()),
        domain=domain,
        day=day,
        index_in_day=index_in_day,
        fm_predictions=fm_predictions,
        passthrough={n: torch.from_numpy(_float_column(table.column(n))) for n in passthrough},
    )


def numeric_matrix(table: pa.Table | pa.RecordBatch, names: Sequence[str]) -> np.ndarray:
    """``[B, F_num]`` float32 raw numerics of the columns ``names``, NaN for missing."""
    if not names:
        return np.zeros((table.num_rows, 0), dtype=np.float32)
    return np.stack([_float_column(table.column(name)) for name in names], axis=1)


def _bucket_rows(single: np.ndarray, categorical) -> torch.Tensor:
    """Bucketize a ``[F, B]`` hash matrix row by row (each feature has its own bucket count)."""
    hashes = torch.from_numpy(single)
    out = torch.empty_like(hashes)
    for i, feature in enumerate(categorical):
        out[i] = bucketize(hashes[i], feature.buckets)
    return out.view(-1)


def _float_column(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A float column as float32 numpy with NaN for nulls."""
    filled = pc.fill_null(pc.cast(column, pa.float32()), float("nan"))
    return np.array(filled.to_numpy(zero_copy_only=False), dtype=np.float32, copy=True)


def _add_missing_columns(chunk: pa.RecordBatch, columns: list[str]) -> pa.RecordBatch:
    """Add all-null float32 columns for absent optional ones (e.g. no FM prediction logged)."""
    if chunk.num_columns == len(columns):
        return chunk
    arrays = [
        chunk.column(name) if name in chunk.schema.names else pa.nulls(chunk.num_rows, pa.float32()) for name in columns
    ]
    return pa.RecordBatch.from_arrays(arrays, names=columns)


_END = object()


def _prefetched(source: Iterator[Batch], depth: int) -> Iterator[Batch]:
    """Run ``source`` in a daemon thread, ``depth`` items ahead; re-raise its errors here."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        """Hand one item to the consumer; False once the consumer has gone."""
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in source:
                if not put(item):
                    return
            put(_END)
        except BaseException as exc:  # forwarded to the consumer
            put(exc)

    thread = threading.Thread(target=produce, name="exfm-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
