"""The schema-driven embedding collection: every sparse input of a model in one fused lookup.

One embedding table per categorical feature; a sequence feature shares the table of the
categorical it names (``SequenceFeature.embedding``). All tables live in ONE fused weight matrix
of ``num_rows`` rows with a row offset per table, so one batch is embedded by a single gather.

Fused row layout (``B_t`` = buckets of table ``t``, tables in schema order)::

    row 0                         the shared padding row: zero, never updated
    row base_t + i, i >= 1        id i of table t, where base_t = Σ_{s<t} (B_s - 1)
    num_rows = 1 + Σ_t (B_t - 1)

A missing id (bucket 0) of any table, and every padding slot of a sequence, maps to row 0, so it
embeds to the zero vector and its gradient is zero (``padding_idx`` semantics shared by all tables).

Gradients of the tables are sparse COO tensors (``torch.sparse_coo_tensor``, uncoalesced: one
entry per looked-up id; padding entries carry zero values rather than being filtered out, which
keeps row 0 exactly zero under SGD, Adagrad, Adam, SparseAdam and row-wise optimizers). Use a
sparse optimizer for them (``RecModel.sparse_parameters``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from exfm.data.batch import Batch
from exfm.schema import Schema, SchemaError


class _SparseLookup(torch.autograd.Function):
    """Gather ``rows`` from one or more tables; backward gives sparse gradients, row 0 masked.

    Same result as ``nn.Embedding(..., padding_idx=0, sparse=True)`` but several tables share one
    index computation, and row 0 is masked by a multiply instead of an index compaction.
    """

    @staticmethod
    def forward(ctx, rows: Tensor, *weights: Tensor) -> tuple[Tensor, ...]:
        flat = rows.reshape(-1)
        ctx.save_for_backward(flat)
        ctx.shapes = [w.shape for w in weights]
        return tuple(w.index_select(0, flat).view(*rows.shape, w.shape[1]) for w in weights)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        (flat,) = ctx.saved_tensors
        indices = flat.unsqueeze(0)
        keep = (flat != 0).unsqueeze(1)
        out: list[Tensor | None] = [None]
        for grad, shape in zip(grads, ctx.shapes, strict=True):
            if grad is None:
                out.append(None)
                continue
            values = grad.reshape(-1, shape[1]) * keep.to(grad.dtype)
            out.append(torch.sparse_coo_tensor(indices, values, shape, check_invariants=False))
        return tuple(out)


class SequenceEmbedding(NamedTuple):
    """One embedded sequence feature, right-padded.

    Attributes:
        values: ``[B, L, d]`` item embeddings, oldest first; zero at padding slots.
        mask: ``[B, L]`` bool, True at real items. An item whose id is missing (0) counts as padding.
    """

    values: Tensor
    mask: Tensor

    def pooled(self) -> Tensor:
        """Mean over the valid items: ``[B, d]``; an empty sequence pools to zeros.

        ``pooled_b = Σ_l mask[b, l] · values[b, l] / max(1, Σ_l mask[b, l])``: whatever the padding
        slots hold never reaches the result.
        """
        mask = self.mask.unsqueeze(-1).to(self.values.dtype)
        return (self.values * mask).sum(1) / mask.sum(1).clamp_(min=1)


@dataclass
class EmbeddedFeatures:
    """The output of :class:`EmbeddingCollection` for a batch of B examples.

    Attributes:
        single: ``[B, F, d]`` embeddings of the selected categorical features (schema order).
        sequences: selected sequence features by name (schema order), padded with a mask.
        dense: ``[B, N]`` selected numeric features (schema order), as the reader transformed them.
        first_order: ``[B, F + S]`` per-field scalar weights ``w_id`` (the categoricals, then each
            sequence's mean item weight) when the collection has ``first_order=True``, else None.
    """

    single: Tensor
    sequences: dict[str, SequenceEmbedding]
    dense: Tensor
    first_order: Tensor | None = None

    def fields(self) -> Tensor:
        """``[B, F + S, d]``: the categorical embeddings followed by each pooled sequence."""
        if not self.sequences:
            return self.single
        pooled = [seq.pooled().unsqueeze(1) for seq in self.sequences.values()]
        return torch.cat([self.single, *pooled], dim=1)

    def flat(self) -> Tensor:
        """``[B, (F + S)·d + N]``: the flattened fields followed by the dense features."""
        return torch.cat([self.fields().flatten(1), self.dense], dim=1)


class EmbeddingCollection(nn.Module):
    """Embeds a model's selection of a dataset's features with one fused table.

    Built from the *dataset* schema (the layout of the batches) and the model's ``features``
    (None = all). The selected categoricals become the single-valued fields, the selected
    sequences the sequence fields, the selected numerics the dense columns; a table is created for
    every selected categorical and for the table that each selected sequence shares (even if that
    categorical itself is not selected as a field). Columns are picked out of the batch by index,
    so excluded features never reach the model.

    Init: embeddings ``~ N(0, init_std²)`` (default 0.01), first-order weights zero, row 0 zero.

    Args:
        schema: the dataset schema (the batch layout).
        features: the feature names the model uses; None = every feature of the schema.
        dim: embedding width d.
        first_order: also keep a second fused table of width 1, the per-id first-order weights
            ``w_id`` of FM-family models (same layout and lookup as the embeddings).
        init_std: standard deviation of the embedding init.

    Raises:
        SchemaError: an unknown feature name, or a selection with no feature at all.
    """

    def __init__(
        self,
        schema: Schema,
        features: list[str] | None = None,
        dim: int = 16,
        *,
        first_order: bool = False,
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        selected = {f.name for f in schema.features} if features is None else set(features)
        unknown = sorted(selected - {f.name for f in schema.features})
        if unknown:
            raise SchemaError(f"unknown feature(s) {unknown} for schema {schema.name!r}")
        single = [f for f in schema.categorical if f.name in selected]
        sequences = [f for f in schema.sequences if f.name in selected]
        numeric_columns = [i for i, f in enumerate(schema.numeric) if f.name in selected]
        if not single and not sequences and not numeric_columns:
            raise SchemaError(f"no model feature selected from schema {schema.name!r}")

        needed = {f.name for f in single} | {s.embedding for s in sequences}
        base: dict[str, int] = {}
        num_rows = 1
        for f in schema.categorical:
            if f.name in needed:
                base[f.name] = num_rows - 1
                num_rows += f.buckets - 1

        self.dim = dim
        self.num_rows = num_rows
        self.single_features = [f.name for f in single]
        self.sequence_features = [s.name for s in sequences]
        self.numeric_features = [schema.numeric[i].name for i in numeric_columns]
        self._keys = [f.name for f in schema.categorical] + [s.name for s in schema.sequences]
        self._num_dense = len(schema.numeric)
        # (name, max_len, table base, slots in the looked-up rows) per selected sequence
        self._sequences: list[tuple[str, int, int, slice]] = []
        start = len(single)
        for s in sequences:
            self._sequences.append((s.name, s.max_len, base[s.embedding], slice(start, start + s.max_len)))
            start += s.max_len

        single_columns = [i for i, f in enumerate(schema.categorical) if f.name in selected]
        self._select_single = single_columns != list(range(len(schema.categorical)))
        self._select_dense = numeric_columns != list(range(len(schema.numeric)))
        self.register_buffer("_single_columns", torch.tensor(single_columns, dtype=torch.long), False)
        self.register_buffer("_dense_columns", torch.tensor(numeric_columns, dtype=torch.long), False)
        self.register_buffer("_single_base", torch.tensor([base[f.name] for f in single], dtype=torch.long), False)

        self.weight = nn.Parameter(torch.empty(num_rows, dim))
        self.first_order_weight = nn.Parameter(torch.empty(num_rows, 1)) if first_order else None
        self.init_std = init_std
        self.reset_parameters()

    @property
    def num_fields(self) -> int:
        """F + S: the categorical fields plus the (pooled) sequence fields."""
        return len(self.single_features) + len(self.sequence_features)

    @property
    def num_dense(self) -> int:
        """N: the selected numeric features."""
        return len(self.numeric_features)

    def reset_parameters(self) -> None:
        """Embeddings ``~ N(0, init_std²)``, first-order weights 0, padding row 0."""
        with torch.no_grad():
            self.weight.normal_(0.0, self.init_std)
            self.weight[0].zero_()
            if self.first_order_weight is not None:
                self.first_order_weight.zero_()

    def rows(self, batch: Batch) -> Tensor:
        """Fused table rows of every lookup of the batch: ``[B, F + Σ L_s]`` int64.

        The F categorical fields first, then each sequence's ``max_len`` slots; 0 = missing or
        padding. Ids must lie in ``[0, buckets)`` of their feature (the reader guarantees it).

        Raises:
            ValueError: the batch's keys or dense width do not match the dataset schema.
        """
        sparse = batch.sparse
        if sparse.keys != self._keys or batch.dense.shape[1] != self._num_dense:
            raise ValueError(
                f"batch layout (keys {sparse.keys}, {batch.dense.shape[1]} dense) does not match the "
                f"model's schema (keys {self._keys}, {self._num_dense} dense)"
            )
        ids = sparse.single_ids()
        if self._select_single:
            ids = ids.index_select(1, self._single_columns)
        parts = [torch.where(ids > 0, ids + self._single_base, 0)]
        for name, max_len, base, _ in self._sequences:
            items = sparse.padded(name, max_len)
            parts.append(torch.where(items > 0, items + base, 0))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def forward(self, batch: Batch) -> EmbeddedFeatures:
        """Embed a batch: one gather from the fused table (and one from the first-order table).

        Returns:
            :class:`EmbeddedFeatures` with ``single [B, F, d]``, the padded sequences, the
            selected ``dense [B, N]`` and, with ``first_order``, ``first_order [B, F + S]``.
        """
        rows = self.rows(batch)
        if self.first_order_weight is None:
            (values,) = _SparseLookup.apply(rows, self.weight)
        else:
            values, weights = _SparseLookup.apply(rows, self.weight, self.first_order_weight)
        num_single = len(self.single_features)
        sequences = {
            name: SequenceEmbedding(values[:, slots], rows[:, slots] != 0) for name, *_, slots in self._sequences
        }
        first_order = None
        if self.first_order_weight is not None:
            first_order = weights[:, :num_single, 0]
            if sequences:
                pooled = [
                    SequenceEmbedding(weights[:, slots], seq.mask).pooled()
                    for (*_, slots), seq in zip(self._sequences, sequences.values(), strict=True)
                ]
                first_order = torch.cat([first_order, *pooled], dim=1)
        dense = batch.dense.index_select(1, self._dense_columns) if self._select_dense else batch.dense
        return EmbeddedFeatures(values[:, :num_single], sequences, dense, first_order)
