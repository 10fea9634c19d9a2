"""DCN-V2 (Wang et al. 2021): a cross network and a deep network over the same input ``x_0``.

``x_0 = [v_1, …, v_{F+S}, dense] ∈ R^D`` with D = (F + S)·k + N: the flattened categorical
embeddings, each sequence's pooled (mean) embedding and the numeric features. Then::

    stacked:   x = MLP(Cross(x_0))                      d = deep_hidden[-1]  (D if deep_hidden = [])
    parallel:  x = [Cross(x_0), MLP(x_0)]               d = D + deep_hidden[-1]  (2D if [])

``Cross`` is ``num_cross_layers`` full-rank layers ``x_{l+1} = x_0 ⊙ (W x_l + b) + x_l``
(:class:`~exfm.models.blocks.CrossLayerV2`) or, with ``low_rank = r``, the mixture of ``num_experts``
low-rank experts (:class:`~exfm.models.blocks.LowRankMixtureCrossLayer`). Each task's serving head
is ``MLP(d, head_hidden, 1)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from exfm.models.base import RecModel
from exfm.models.blocks import MLP, CrossNetV2
from exfm.models.embedding import EmbeddingCollection, FeatureTensors
from exfm.schema import Schema


class DCNv2Model(RecModel):
    """DCN-V2 backbone (cross + deep network, stacked or parallel) with an MLP head per task.

    Init: embeddings ``N(0, 0.01²)``, cross layers Xavier-uniform with zero bias, MLPs PyTorch's
    default. Regularisation: ``dropout`` after every hidden ReLU of the deep network and heads.

    Args:
        schema: the dataset schema.
        tasks: task names; one serving head each.
        embedding_dim: k.
        features: the features the model uses (None = all).
        num_cross_layers: cross layers L.
        low_rank: None = full-rank cross layers; r = low-rank mixture of experts of rank r.
        num_experts: experts per low-rank cross layer.
        structure: ``stacked`` (deep after cross) or ``parallel`` (concatenated).
        deep_hidden: hidden widths of the deep network.
        dropout: dropout probability in the deep network and the heads.
        head_hidden: hidden widths of each head (``[]`` = one linear layer).
    """

    def __init__(
        self,
        schema: Schema,
        tasks: Sequence[str],
        embedding_dim: int = 16,
        features: list[str] | None = None,
        num_cross_layers: int = 3,
        low_rank: int | None = None,
        num_experts: int = 4,
        structure: Literal["stacked", "parallel"] = "parallel",
        deep_hidden: Sequence[int] = (256, 128),
        dropout: float = 0.0,
        head_hidden: Sequence[int] = (),
    ) -> None:
        super().__init__(tasks)
        if structure not in ("stacked", "parallel"):
            raise ValueError(f"structure must be 'stacked' or 'parallel', not {structure!r}")
        self.embedding = EmbeddingCollection(schema, features, embedding_dim)
        input_dim = self.embedding.num_fields * embedding_dim + self.embedding.num_dense
        self.structure = structure
        self.cross = CrossNetV2(input_dim, num_cross_layers, low_rank, num_experts)
        self.deep = MLP(input_dim, deep_hidden, dropout=dropout)
        self.representation_dim = self.deep.output_dim + (input_dim if structure == "parallel" else 0)
        for task in self.serving_heads:
            self.add_head(task, MLP(self.representation_dim, head_hidden, 1, dropout=dropout))

    def encode(self, features: FeatureTensors) -> Tensor:
        """``[B, d]``: ``MLP(Cross(x_0))`` (stacked) or ``[Cross(x_0), MLP(x_0)]`` (parallel)."""
        x0 = self.embedding(features).flat()
        if self.structure == "stacked":
            return self.deep(self.cross(x0))
        return torch.cat([self.cross(x0), self.deep(x0)], dim=1)
