"""Views: the slice of a shared store that one vertical model (VM) trains and is evaluated on.

The DAS writes every joined example, with the FM's logged predictions, once into a shared store
(an exfm dataset whose rows also carry ``_request_id``). Many VMs read that one store, each through
its own :class:`View`:

* a **domain filter** ``domains``: keep the rows whose ``_domain`` is one of them;
* a **traffic filter** ``traffic_fraction`` / ``traffic_salt``: keep a row iff
  ``stable_hash(traffic_salt + _request_id) mod 10_000 < traffic_fraction · 10_000``
  (:func:`exfm.data.hashing.stable_hash`: blake2b-64 of the UTF-8 text, signed, floor modulo).

Both conditions must hold. The selection of a row depends only on the row itself (its domain and
request id) and on the view, never on the order or the batching of the stream: the same view
always selects the same rows; views with different salts select independent slices; for one salt,
the slice of a smaller fraction is contained in that of a larger one. A row with a null or empty
request id is never selected by a traffic filter. The task selection of a VM is not a row filter:
it is :attr:`exfm.train.config.TrainConfig.tasks`.

The reader (:class:`exfm.data.reader.StreamReader`, ``row_filter=``) applies the mask to each day's
rows *before* grouping them into batches, so batch positions, the causal normaliser and row counts
all refer to the filtered stream.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from exfm.data.dataset import DOMAIN_COLUMN, REQUEST_ID_COLUMN, Dataset, DatasetError
from exfm.data.hashing import stable_hash

TRAFFIC_BUCKETS = 10_000


@runtime_checkable
class RowFilter(Protocol):
    """What :class:`~exfm.data.reader.StreamReader` needs of a row filter."""

    def columns(self) -> list[str]:
        """The partition columns :meth:`mask` reads."""
        ...

    def mask(self, table: pa.Table | pa.RecordBatch) -> np.ndarray:
        """``[N]`` bool: which rows to keep."""
        ...

    def check(self, dataset: Dataset, days: Iterable[int] | None = None) -> None:
        """Raise :class:`DatasetError` if the filter cannot apply to ``dataset`` (its ``days``)."""
        ...


class View(BaseModel):
    """One VM's slice of a (shared) dataset: a domain filter and a salted traffic filter.

    ::

        view:
          domains: [feed]            # optional; default every domain
          traffic_fraction: 0.25     # optional; default 1.0 (all traffic)
          traffic_salt: vm-feed-ctr  # optional; different salts give independent slices
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    domains: list[str] | None = Field(None, min_length=1, description="keep rows of these domains; None = all")
    traffic_fraction: float = Field(1.0, gt=0, le=1, description="share of the requests kept, by request-id hash")
    traffic_salt: str = Field("", description="prefix of the request id in the traffic hash")

    @property
    def filters_domains(self) -> bool:
        return self.domains is not None

    @property
    def filters_traffic(self) -> bool:
        return self.traffic_fraction < 1.0

    @property
    def is_identity(self) -> bool:
        """True if the view keeps every row (no filter at all)."""
        return not (self.filters_domains or self.filters_traffic)

    def columns(self) -> list[str]:
        """The partition columns :meth:`mask` reads (``_domain``, ``_request_id``, as needed)."""
        return ([DOMAIN_COLUMN] if self.filters_domains else []) + ([REQUEST_ID_COLUMN] if self.filters_traffic else [])

    def mask(self, table: pa.Table | pa.RecordBatch) -> np.ndarray:
        """``[N]`` bool: the rows of ``table`` this view keeps.

        Raises:
            ValueError: ``table`` lacks a column the view needs (:meth:`columns`).
        """
        names = table.schema.names
        for column in self.columns():
            if column not in names:
                raise ValueError(f"the view needs a {column!r} column, which the rows do not have ({names})")
        keep = np.ones(table.num_rows, dtype=bool)
        if self.filters_domains:
            chosen = pc.is_in(table.column(DOMAIN_COLUMN), value_set=pa.array(self.domains, pa.string()))
            keep &= pc.fill_null(chosen, False).to_numpy(zero_copy_only=False)
        if self.filters_traffic:
            keep &= self.traffic_mask(table.column(REQUEST_ID_COLUMN))
        return keep

    def traffic_mask(self, request_ids: pa.Array | pa.ChunkedArray | Sequence[str | None]) -> np.ndarray:
        """``[N]`` bool: ``stable_hash(salt + id) mod 10_000 < fraction · 10_000``; null or empty ids: False."""
        ids = request_ids
        if not isinstance(ids, (pa.Array, pa.ChunkedArray)):
            ids = pa.array(ids, pa.string())
        if not pa.types.is_string(ids.type) and not pa.types.is_large_string(ids.type):
            ids = pc.cast(ids, pa.string())
        valid = pc.fill_null(pc.greater(pc.utf8_length(ids), 0), False).to_numpy(zero_copy_only=False)
        salted = ids
        if self.traffic_salt:
            salted = pc.binary_join_element_wise(pa.scalar(self.traffic_salt, ids.type), ids, "")
        buckets = np.mod(stable_hash(salted), TRAFFIC_BUCKETS)
        return valid & (buckets < self.traffic_fraction * TRAFFIC_BUCKETS)

    def check(self, dataset: Dataset, days: Iterable[int] | None = None) -> None:
        """Check that this view can filter ``dataset``: it has a domain column and every named
        domain (per the manifest) for a domain filter, and a ``_request_id`` column in every file of
        ``days`` (default: all days) for a traffic filter.

        Raises:
            DatasetError: naming the dataset (or file) and what is missing.
        """
        if self.filters_domains:
            if dataset.schema.domain is None:
                raise DatasetError(
                    f"{dataset.root}: the view filters domains {self.domains}, but the schema "
                    f"{dataset.schema.name!r} has no domain column"
                )
            known = dataset.manifest.domains
            unknown = [d for d in self.domains if d not in known]
            if unknown:
                raise DatasetError(
                    f"{dataset.root}: unknown domain(s) {unknown} in the view (the dataset's domains: {known})"
                )
        if self.filters_traffic:
            wanted = set(days) if days is not None else None
            for info in dataset.manifest.days:
                if wanted is not None and info.day not in wanted:
                    continue
                for path in dataset.day_files(info.day):
                    if REQUEST_ID_COLUMN not in pq.read_schema(path).names:
                        raise DatasetError(missing_request_id_message(dataset, path))


def missing_request_id_message(dataset: Dataset, path: object) -> str:
    """The error of a traffic filter on rows without request ids."""
    return (
        f"{dataset.root}: a traffic filter (traffic_fraction < 1) needs a {REQUEST_ID_COLUMN!r} column "
        f"(rows of a DAS shared store), but {path} has none"
    )
