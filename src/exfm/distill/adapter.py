"""The Student Adapter (SA, ExFM Eq. 6–7, Algorithm 1): a small, fresh recalibration of the FM's prediction.

The FM's logged prediction ``p_fm`` is stale (the FM trained through an earlier day) and biased
towards the FM's own traffic. The SA maps it, and optionally a few context features, to a
corrected probability, learned online on the VM's *fresh* labels only::

    z       = logit(clip(p_fm, ε, 1 − ε))                         ε = 1e-7
    c       = [numeric context values, E_f(id_f) for each categorical context feature f]
    SA(z,c) = z + MLP([z, c])                                     (one SA per task)
    p_sa    = σ(SA(z, c))
    L_SA    = Σ_t mean_{b: p_fm,bt known} BCE(σ(SA_t(z_bt, c_b)), y_bt)

**Identity init**: the MLP's output layer starts at zero weight and bias, so at the start
``SA(z, c) = z`` and ``p_sa = p_fm`` exactly: the SA begins as "trust the FM" and only moves as far
as the fresh labels pull it. With ``hidden: []`` the SA is an affine recalibration
``(1 + a)·z + ⟨w, c⟩ + b``.

Context features (``StudentAdapterConfig.context_features``) are schema features: a numeric one
is read from its column of ``batch.dense`` (transformed as the reader does); a categorical one
gets the SA's own embedding of width ``context_dim`` on its bucket id (``batch.sparse.single_ids()``,
``N(0, 1)`` init as ``nn.Embedding``, dense gradients: meant for low-cardinality context such as
device or hour). Sequence features are refused.

The SA has its own optimizer (:meth:`StudentAdapter.step`); it never sees the VM's representation
and the VM never sees the SA's graph (the VM reads ``p_sa`` under stop-gradient,
:meth:`StudentAdapter.predict`), see :mod:`exfm.distill.objectives` for Algorithm 1's order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exfm.data.batch import Batch
from exfm.models.blocks import MLP
from exfm.schema import CategoricalFeature, NumericFeature, Schema
from exfm.train.config import StudentAdapterConfig
from exfm.train.metrics import PROB_EPS

_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
}


def fm_logit(p_fm: Tensor) -> Tensor:
    """``logit(clip(p, 1e-7, 1 − 1e-7))``: a finite logit for any probability, 0 and 1 included."""
    return torch.logit(p_fm, eps=PROB_EPS)


class _TaskAdapter(nn.Module):
    """One task's SA: ``z + MLP([z, numeric, E_1(id_1), …])`` with a zero-initialised output layer."""

    def __init__(self, hidden: Sequence[int], num_numeric: int, buckets: Sequence[int], context_dim: int) -> None:
        super().__init__()
        # index_select on a plain table: its backward (index_add) is ~2.5x faster than nn.Embedding's on the CPU
        self.embeddings = nn.ParameterList(nn.Parameter(torch.randn(b, context_dim)) for b in buckets)
        self.mlp = MLP(1 + num_numeric + context_dim * len(buckets), hidden, 1)
        output = self.mlp[-1]
        nn.init.zeros_(output.weight)
        nn.init.zeros_(output.bias)

    def forward(self, z: Tensor, numeric: Tensor, ids: Sequence[Tensor]) -> Tensor:
        context = [table.index_select(0, i) for i, table in zip(ids, self.embeddings, strict=True)]
        parts = [z.unsqueeze(1), numeric, *context]
        return z + self.mlp(torch.cat(parts, dim=1)).squeeze(1)


class StudentAdapter(nn.Module):
    """The SA of every task, with its own optimizer.

    Args:
        config: widths, context features, optimizer and learning rate.
        schema: the dataset schema (resolves the context features to batch columns).
        tasks: the T tasks, in the column order of the ``p_fm`` and label matrices it is given.
        device: where the SA and its optimizer's state live (the model's device).

    Raises:
        ValueError: a context feature is unknown or a sequence feature.
    """

    def __init__(
        self,
        config: StudentAdapterConfig,
        schema: Schema,
        tasks: Sequence[str],
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        numeric_names = [f.name for f in schema.numeric]
        categorical_names = [f.name for f in schema.categorical]
        numeric, categorical, buckets = [], [], []
        for name in config.context_features:
            try:
                feature = schema.feature(name)
            except KeyError:
                raise ValueError(
                    f"distillation.adapter.context_features: {name!r} is not a feature of schema {schema.name!r}"
                ) from None
            if isinstance(feature, NumericFeature):
                numeric.append(numeric_names.index(name))
            elif isinstance(feature, CategoricalFeature):
                categorical.append(categorical_names.index(name))
                buckets.append(feature.buckets)
            else:
                raise ValueError(
                    f"distillation.adapter.context_features: {name!r} is a sequence feature;"
                    " only numeric and categorical features can be context"
                )
        self.tasks = list(tasks)
        self.register_buffer("numeric_columns", torch.tensor(numeric, dtype=torch.long), persistent=False)
        self.categorical_columns = categorical
        self.adapters = nn.ModuleList(
            _TaskAdapter(config.hidden, len(numeric), buckets, config.context_dim) for _ in self.tasks
        )
        self.to(device)
        # on the CPU the fused kernel steps the SA's small tensors in one call (3x faster than the
        # per-tensor loop); elsewhere torch's default
        fused = True if torch.device(device).type == "cpu" else None
        self.optimizer = _OPTIMIZERS[config.optimizer](self.parameters(), lr=config.lr, fused=fused)

    def forward(self, p_fm: Tensor, batch: Batch, columns: Sequence[int]) -> Tensor:
        """SA logits ``[B, T']`` of the tasks ``columns`` (indices into ``tasks``).

        Args:
            p_fm: ``[B, T']`` FM probabilities of those tasks (no NaN).
            batch: the batch (context features).
            columns: which tasks' adapters to run.
        """
        z = fm_logit(p_fm)
        numeric = batch.dense.index_select(1, self.numeric_columns)
        single = batch.sparse.single_ids()
        ids = [single[:, c] for c in self.categorical_columns]  # contiguous rows of the key-major layout
        return torch.stack([self.adapters[t](z[:, i], numeric, ids) for i, t in enumerate(columns)], dim=1)

    def step(self, p_fm: Tensor, labels: Tensor, weight: Tensor, batch: Batch, columns: Sequence[int]) -> Tensor:
        """Algorithm 1, step 1: one optimizer step on ``L_SA = Σ_bt weight_bt · BCE(σ(SA(p_fm)_bt), y_bt)``.

        Args:
            p_fm: ``[B, T']`` FM probabilities of the tasks ``columns`` (missing ones filled with any
                valid value).
            labels: ``[B, T']`` the batch's fresh labels of those tasks.
            weight: ``[B, T']`` ``1 / n_t`` on the rows with a prediction for task t, 0 elsewhere
                (a mean over the supervised rows of each task).
            batch: the batch (context features).
            columns: the tasks (indices into ``tasks``); the other tasks' adapters are not touched.

        Returns:
            ``L_SA`` before the step (detached).
        """
        logits = self(p_fm, batch, columns)
        loss = F.binary_cross_entropy_with_logits(logits, labels, weight=weight, reduction="sum")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    @torch.no_grad()
    def predict(self, p_fm: Tensor, batch: Batch, columns: Sequence[int]) -> Tensor:
        """Algorithm 1, step 2: ``sg(p_sa) = σ(SA(p_fm))`` ``[B, T']``, without a graph."""
        return torch.sigmoid(self(p_fm, batch, columns))

    def training_state(self) -> dict[str, Any]:
        """The SA's parameters and its optimizer's state (``weights_only``-safe)."""
        return {"parameters": self.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_training_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`training_state`."""
        self.load_state_dict(state["parameters"])
        self.optimizer.load_state_dict(state["optimizer"])
