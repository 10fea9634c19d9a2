"""DLRM (Naumov et al. 2019): bottom MLP on dense features, dot interactions, top MLP.

With N > 0 selected numeric features, the bottom MLP maps them to ``z = MLP(dense) ∈ R^k``
(``[N, *bottom_hidden, k]``, ReLU after every layer as in the reference implementation). The
interaction inputs are ``t = [z, v_1, …, v_{F+S}]`` (m = F + S + 1 vectors of width k: the
bottom output, the categorical embeddings and each sequence's pooled embedding); without numeric
features there is no bottom MLP, no ``z`` and m = F + S. Then::

    pairs = [⟨t_a, t_b⟩ for a < b]                   m(m−1)/2 dot products (upper triangle, no diagonal)
    x = MLP_top([z, pairs])                          (representation; d = top_hidden[-1])
    h_task(x) = Linear(d → 1)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from exfm.models.base import RecModel
from exfm.models.blocks import MLP
from exfm.models.embedding import EmbeddingCollection, FeatureTensors
from exfm.schema import Schema


class DotInteraction(nn.Module):
    """DLRM's pairwise dot products: the strict upper triangle of ``t tᵀ``, flattened.

    ``out_p = ⟨t_{a_p}, t_{b_p}⟩`` for the P = m(m−1)/2 pairs ``a < b`` in row-major order;
    one ``bmm`` (``B·m²·k`` multiply-adds) and one gather.

    Args:
        num_inputs: m.

    Shapes: ``t [B, m, k] → [B, m(m−1)/2]``.
    """

    def __init__(self, num_inputs: int) -> None:
        super().__init__()
        a, b = torch.triu_indices(num_inputs, num_inputs, offset=1)
        self.register_buffer("pairs", a * num_inputs + b, persistent=False)

    @property
    def output_dim(self) -> int:
        """P = m(m−1)/2."""
        return self.pairs.numel()

    def forward(self, t: Tensor) -> Tensor:
        return torch.bmm(t, t.transpose(1, 2)).flatten(1).index_select(1, self.pairs)


class DLRMModel(RecModel):
    """DLRM: bottom MLP, dot interaction, top MLP; a linear head per task.

    Init: embeddings ``N(0, 0.01²)``, MLPs PyTorch's default (Kaiming-uniform).
    Regularisation: none inside the model.

    Args:
        schema: the dataset schema.
        tasks: task names; one serving head each.
        embedding_dim: k (also the bottom MLP's output width).
        features: the features the model uses (None = all).
        bottom_hidden: hidden widths of the bottom MLP before its k-wide output layer.
        top_hidden: widths of the top MLP (ReLU after each); ``[]`` = the interaction output itself.
    """

    def __init__(
        self,
        schema: Schema,
        tasks: Sequence[str],
        embedding_dim: int = 16,
        features: list[str] | None = None,
        bottom_hidden: Sequence[int] = (64,),
        top_hidden: Sequence[int] = (256, 128),
    ) -> None:
        super().__init__(tasks)
        self.embedding = EmbeddingCollection(schema, features, embedding_dim)
        num_dense = self.embedding.num_dense
        self.bottom = MLP(num_dense, [*bottom_hidden, embedding_dim]) if num_dense else None
        self.interaction = DotInteraction(self.embedding.num_fields + (1 if num_dense else 0))
        top_in = self.interaction.output_dim + (embedding_dim if num_dense else 0)
        self.top = MLP(top_in, top_hidden)
        self.representation_dim = self.top.output_dim
        for task in self.serving_heads:
            self.add_head(task, MLP(self.representation_dim, [], 1))

    def encode(self, features: FeatureTensors) -> Tensor:
        """``[B, d]``: ``MLP_top([z, pairs(z, v)])`` (without numerics: ``MLP_top(pairs(v))``)."""
        emb = self.embedding(features)
        fields = emb.fields()
        if self.bottom is None:
            return self.top(self.interaction(fields))
        z = self.bottom(emb.dense)
        pairs = self.interaction(torch.cat([z.unsqueeze(1), fields], dim=1))
        return self.top(torch.cat([z, pairs], dim=1))
