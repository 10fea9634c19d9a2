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

Inputs are plain tensors, :class:`FeatureTensors` (``ids [B, F]``, one right-padded ``[B, L_s]``
id matrix per sequence, ``dense [B, N]``), laid out as a :class:`FeatureLayout` says. A training
:class:`~exfm.data.batch.Batch` is first converted to them (:meth:`FeatureLayout.read`), so
training and the exported serving model (:mod:`exfm.serving`) run the same embedding code.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
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


class FeatureTensors(NamedTuple):
    """A batch of model inputs as plain tensors (what :class:`EmbeddingCollection` embeds).

    The columns of ``ids`` and ``dense`` are those of a :class:`FeatureLayout` (the collection's
    ``source``); a sequence id of 0, wherever it stands, is padding.

    Attributes:
        ids: ``[B, F]`` int64 bucket ids of the categorical features (0 = missing).
        sequences: ``{name: [B, max_len]}`` int64 item ids, oldest first, right-padded with 0.
        dense: ``[B, N]`` float32 numeric features, transformed as the reader does.
    """

    ids: Tensor
    sequences: dict[str, Tensor]
    dense: Tensor


@dataclass(frozen=True)
class FeatureLayout:
    """The features that plain-tensor inputs hold, in order: the columns of :class:`FeatureTensors`.

    Attributes:
        categorical: the columns of ``ids``.
        sequences: ``(name, max_len)`` of each sequence.
        numeric: the columns of ``dense``.
    """

    categorical: tuple[str, ...]
    sequences: tuple[tuple[str, int], ...]
    numeric: tuple[str, ...]

    @classmethod
    def of(cls, schema: Schema, features: Collection[str] | None = None) -> FeatureLayout:
        """The schema's features (or those named in ``features``), in schema order."""
        return cls(
            tuple(f.name for f in schema.categorical if features is None or f.name in features),
            tuple((s.name, s.max_len) for s in schema.sequences if features is None or s.name in features),
            tuple(f.name for f in schema.numeric if features is None or f.name in features),
        )

    @property
    def names(self) -> tuple[str, ...]:
        """Every feature name: categoricals, sequences, numerics."""
        return (*self.categorical, *(name for name, _ in self.sequences), *self.numeric)

    def subset(self, names: Collection[str]) -> FeatureLayout:
        """The named features only, in this layout's order."""
        return FeatureLayout(
            tuple(n for n in self.categorical if n in names),
            tuple(s for s in self.sequences if s[0] in names),
            tuple(n for n in self.numeric if n in names),
        )

    def read(self, batch: Batch, source: FeatureLayout) -> FeatureTensors:
        """This layout's inputs, picked out of a batch laid out as ``source`` (a dataset's layout).

        The sequences are padded to their ``max_len`` (:meth:`~exfm.data.batch.KeyedJagged.padded`);
        ids and dense columns are selected only where this layout differs from ``source``.

        Raises:
            ValueError: the batch's keys or dense width do not match ``source``.
        """
        sparse = batch.sparse
        keys = [*source.categorical, *(name for name, _ in source.sequences)]
        if sparse.keys != keys or batch.dense.shape[1] != len(source.numeric):
            raise ValueError(
                f"batch layout (keys {sparse.keys}, {batch.dense.shape[1]} dense) does not match the "
                f"model's schema (keys {keys}, {len(source.numeric)} dense)"
            )
        ids, dense = sparse.single_ids(), batch.dense
        if self.categorical != source.categorical:
            ids = ids.index_select(1, _positions(self.categorical, source.categorical, ids.device))
        if self.numeric != source.numeric:
            dense = dense.index_select(1, _positions(self.numeric, source.numeric, dense.device))
        sequences = {name: sparse.padded(name, max_len) for name, max_len in self.sequences}
        return FeatureTensors(ids, sequences, dense)

    @property
    def sequence_width(self) -> int:
        """``Σ_s max_len_s``: the width of the packed sequences."""
        return sum(max_len for _, max_len in self.sequences)

    def pack(self, features: FeatureTensors) -> tuple[Tensor, Tensor, Tensor]:
        """The three plain inputs of an exported model: ``(ids [B, F], sequences [B, Σ L_s], dense [B, N])``.

        ``sequences`` is this layout's sequences side by side, each padded to its ``max_len``.
        """
        ids = features.ids
        parts = [features.sequences[name] for name, _ in self.sequences]
        sequences = torch.cat(parts, dim=1) if parts else ids.new_zeros(ids.shape[0], 0)
        return ids, sequences, features.dense

    def unpack(self, ids: Tensor, sequences: Tensor, dense: Tensor) -> FeatureTensors:
        """The inverse of :meth:`pack`.

        Raises:
            ValueError: an input's width does not match this layout.
        """
        widths = (len(self.categorical), self.sequence_width, len(self.numeric))
        if (ids.shape[1], sequences.shape[1], dense.shape[1]) != widths:
            raise ValueError(
                f"inputs of widths ({ids.shape[1]}, {sequences.shape[1]}, {dense.shape[1]}) do not match the "
                f"layout's {widths} (ids, sequences, dense)"
            )
        split, start = {}, 0
        for name, max_len in self.sequences:
            split[name] = sequences[:, start : start + max_len]
            start += max_len
        return FeatureTensors(ids, split, dense)


def _positions(names: Sequence[str], source: Sequence[str], device: torch.device) -> Tensor:
    """``[len(names)]`` int64: the position of each name in ``source``."""
    return torch.tensor([source.index(n) for n in names], dtype=torch.long, device=device)


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
    categorical itself is not selected as a field). Columns are picked out of the inputs by index,
    so excluded features never reach the model.

    The collection reads :class:`FeatureTensors` laid out as ``source`` (by default the dataset
    schema's layout, so a :class:`~exfm.data.batch.Batch` converts without copying its ids);
    :meth:`read_from` rebinds it to another layout, e.g. the model's own features at serving.

    Init: embeddings ``~ N(0, init_std²)`` (default 0.01), first-order weights zero, row 0 zero.

    Args:
        schema: the dataset schema (the batch layout).
        features: the feature names the model uses; None = every feature of the schema.
        dim: embedding width d.
        first_order: also keep a second fused table of width 1, the per-id first-order weights
            ``w_id`` of FM-family models (same layout and lookup as the embeddings).
        init_std: standard deviation of the embedding init.

    Attributes:
        layout: the selected features (:class:`FeatureLayout`, schema order).
        source: the layout of the inputs the collection reads.

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
        layout = FeatureLayout.of(schema, selected)
        if not layout.names:
            raise SchemaError(f"no model feature selected from schema {schema.name!r}")

        needed = {*layout.categorical, *(schema.feature(name).embedding for name, _ in layout.sequences)}
        base: dict[str, int] = {}
        num_rows = 1
        for f in schema.categorical:
            if f.name in needed:
                base[f.name] = num_rows - 1
                num_rows += f.buckets - 1

        self.dim = dim
        self.num_rows = num_rows
        self.layout = layout
        self.single_features = list(layout.categorical)
        self.sequence_features = [name for name, _ in layout.sequences]
        self.numeric_features = list(layout.numeric)
        # (name, max_len, table base, slots in the looked-up rows) per selected sequence
        self._sequences: list[tuple[str, int, int, slice]] = []
        start = len(layout.categorical)
        for name, max_len in layout.sequences:
            self._sequences.append((name, max_len, base[schema.feature(name).embedding], slice(start, start + max_len)))
            start += max_len
        single_base = torch.tensor([base[n] for n in layout.categorical], dtype=torch.long)
        self.register_buffer("_single_base", single_base, False)
        self.register_buffer("_single_columns", None, False)
        self.register_buffer("_dense_columns", None, False)
        self.read_from(FeatureLayout.of(schema))

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

    def read_from(self, source: FeatureLayout) -> None:
        """Read inputs laid out as ``source`` from now on (it must hold every selected feature).

        Raises:
            ValueError: a selected feature is not in ``source``.
        """
        missing = [name for name in self.layout.names if name not in source.names]
        if missing:
            raise ValueError(f"input layout {source} lacks the collection's feature(s) {missing}")
        self.source = source
        self._select_single = self.layout.categorical != source.categorical
        self._select_dense = self.layout.numeric != source.numeric
        device = self._single_base.device
        self._single_columns = _positions(self.layout.categorical, source.categorical, device)
        self._dense_columns = _positions(self.layout.numeric, source.numeric, device)

    def feature_tensors(self, batch: Batch) -> FeatureTensors:
        """The batch as plain tensors: ``source``'s ids and dense columns, the selected sequences padded."""
        return replace(self.source, sequences=self.layout.sequences).read(batch, self.source)

    def rows(self, inputs: Batch | FeatureTensors) -> Tensor:
        """Fused table rows of every lookup: ``[B, F + Σ L_s]`` int64.

        The F categorical fields first, then each sequence's ``max_len`` slots; 0 = missing or
        padding. Ids must lie in ``[0, buckets)`` of their feature (the reader guarantees it).

        Args:
            inputs: a batch, or its :class:`FeatureTensors` laid out as ``source``.

        Raises:
            ValueError: the inputs do not match ``source`` (keys, widths or a missing sequence).
        """
        features = self.feature_tensors(inputs) if isinstance(inputs, Batch) else inputs
        ids = features.ids
        if ids.shape[1] != len(self.source.categorical):
            raise ValueError(f"ids have {ids.shape[1]} columns; the collection reads {self.source.categorical}")
        if self._select_single:
            ids = ids.index_select(1, self._single_columns)
        parts = [torch.where(ids > 0, ids + self._single_base, 0)]
        for name, max_len, base, _ in self._sequences:
            items = features.sequences.get(name)
            if items is None or items.shape[1] != max_len:
                raise ValueError(f"sequence {name!r} must be given as a [B, {max_len}] id matrix")
            parts.append(torch.where(items > 0, items + base, 0))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def forward(self, inputs: Batch | FeatureTensors) -> EmbeddedFeatures:
        """Embed a batch: one gather from the fused table (and one from the first-order table).

        Args:
            inputs: a batch, or its :class:`FeatureTensors` laid out as ``source``.

        Returns:
            :class:`EmbeddedFeatures` with ``single [B, F, d]``, the padded sequences, the
            selected ``dense [B, N]`` and, with ``first_order``, ``first_order [B, F + S]``.
        """
        features = self.feature_tensors(inputs) if isinstance(inputs, Batch) else inputs
        if features.dense.shape[1] != len(self.source.numeric):
            raise ValueError(f"dense has {features.dense.shape[1]} columns; the collection reads {self.source.numeric}")
        rows = self.rows(features)
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
        dense = features.dense
        if self._select_dense:
            dense = dense.index_select(1, self._dense_columns)
        return EmbeddedFeatures(values[:, :num_single], sequences, dense, first_order)
