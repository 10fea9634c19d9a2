"""Factorization Machine (Rendle 2010; "FaM" in the ExFM paper) as a backbone plus heads.

With field vectors ``v_f ∈ R^k`` and first-order weights ``w_f``, a plain FM is::

    ŷ = w_0 + Σ_f w_f + Σ_{f<g} ⟨v_f, v_g⟩

exfm splits it into a backbone and a head. The representation is ``x = [s, p] ∈ R^{k+1}`` with the
first-order sum ``s = Σ_f w_f`` and the pairwise-interaction vector
``p = 0.5 ((Σ_f v_f)² − Σ_f v_f²) ∈ R^k`` (:class:`~exfm.models.blocks.FMInteraction`); each task's
serving head is ``Linear(k+1 → 1)`` initialised to unit weights and zero bias, so at init the model
*is* a plain FM with ``w_0`` = the head's bias: a plain FM is the special case of fixed unit weights.
Distillation heads read the same ``x``.

Fields: every selected categorical (``v_f`` = its embedding, ``w_f`` = its first-order weight),
every selected sequence (mean of its valid items' ``v`` and ``w``; an empty sequence gives 0), and
every selected numeric feature ``x_n`` (``v = x_n · u_n``, ``w = x_n · a_n`` with learned
``u_n ∈ R^k``, ``a_n ∈ R``). Missing ids contribute nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from exfm.models.base import RecModel
from exfm.models.blocks import FMInteraction
from exfm.models.embedding import EmbeddingCollection, FeatureTensors
from exfm.schema import Schema


class FMModel(RecModel):
    """Rendle's FM: representation ``[Σ w_f, FM(v)] ∈ R^{k+1}``, one linear head per task.

    Init: ``v ~ N(0, 0.01²)`` (ids and numeric vectors ``u_n``), first-order weights 0, heads unit
    weights and zero bias. Regularisation: none inside the model (losses never live in it).

    Args:
        schema: the dataset schema.
        tasks: task names; one serving head each.
        embedding_dim: k.
        features: the features the model uses (None = all).
    """

    def __init__(
        self, schema: Schema, tasks: Sequence[str], embedding_dim: int = 16, features: list[str] | None = None
    ) -> None:
        super().__init__(tasks)
        self.embedding = EmbeddingCollection(schema, features, embedding_dim, first_order=True)
        num_dense, std = self.embedding.num_dense, self.embedding.init_std
        self.numeric_first_order = nn.Parameter(torch.zeros(num_dense, 1)) if num_dense else None
        self.numeric_embedding = nn.Parameter(torch.randn(num_dense, embedding_dim) * std) if num_dense else None
        self.interaction = FMInteraction()
        self.representation_dim = embedding_dim + 1
        for task in self.serving_heads:
            head = nn.Linear(self.representation_dim, 1)
            nn.init.ones_(head.weight)
            nn.init.zeros_(head.bias)
            self.add_head(task, head)

    def encode(self, features: FeatureTensors) -> Tensor:
        """``[B, k+1]``: the first-order sum next to the pairwise-interaction vector."""
        emb = self.embedding(features)
        fields = emb.fields()
        first_order = emb.first_order.sum(1, keepdim=True)
        if self.numeric_embedding is not None:
            first_order = torch.addmm(first_order, emb.dense, self.numeric_first_order)
            fields = torch.cat([fields, emb.dense.unsqueeze(-1) * self.numeric_embedding], dim=1)
        return torch.cat([first_order, self.interaction(fields)], dim=1)
