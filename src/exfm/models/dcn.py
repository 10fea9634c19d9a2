"""DCN (Wang et al. 2017, "Deep & Cross Network for Ad Click Predictions"): cross network v1 and a DNN in parallel.

``x_0 = [v_1, …, v_{F+S}, dense] ∈ R^D`` with D = (F + S)·k + N: the flattened categorical
embeddings, each sequence's pooled (mean) embedding and the numeric features. Then::

    x_{l+1} = x_0 (x_lᵀ w_l) + b_l + x_l                  (cross layer, w_l, b_l ∈ R^D)
    x       = [Cross(x_0), MLP(x_0)]                      d = D + deep_hidden[-1]  (2D if [])

and each task's serving head is ``MLP(d, head_hidden, 1)``; with ``head_hidden = []`` it is the
paper's combination layer (one logistic unit on the concatenation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from exfm.models.base import RecModel
from exfm.models.blocks import MLP, CrossNetV1
from exfm.models.embedding import EmbeddingCollection, FeatureTensors
from exfm.schema import Schema


class DCNModel(RecModel):
    """DCN backbone (cross network v1 next to a deep network) with an MLP head per task.

    Init: embeddings ``N(0, 0.01²)``, cross weights Xavier-uniform with zero bias, MLPs PyTorch's
    default. Regularisation: ``dropout`` after every hidden ReLU of the deep network and heads.

    Args:
        schema: the dataset schema.
        tasks: task names; one serving head each.
        embedding_dim: k.
        features: the features the model uses (None = all).
        num_cross_layers: cross layers L.
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
        deep_hidden: Sequence[int] = (256, 128),
        dropout: float = 0.0,
        head_hidden: Sequence[int] = (),
    ) -> None:
        super().__init__(tasks)
        self.embedding = EmbeddingCollection(schema, features, embedding_dim)
        input_dim = self.embedding.num_fields * embedding_dim + self.embedding.num_dense
        self.cross = CrossNetV1(input_dim, num_cross_layers)
        self.deep = MLP(input_dim, deep_hidden, dropout=dropout)
        self.representation_dim = input_dim + self.deep.output_dim
        for task in self.serving_heads:
            self.add_head(task, MLP(self.representation_dim, head_hidden, 1, dropout=dropout))

    def encode(self, features: FeatureTensors) -> Tensor:
        """``[B, d]``: ``[Cross(x_0), MLP(x_0)]``."""
        x0 = self.embedding(features).flat()
        return torch.cat([self.cross(x0), self.deep(x0)], dim=1)
