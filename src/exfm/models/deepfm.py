"""DeepFM (Guo et al. 2017): an FM and a deep network on the same field embeddings.

Fields are those of :class:`~exfm.models.fm.FMModel`: m = F + S + N vectors ``v_f ∈ R^k``
(categoricals, pooled sequences, numerics ``x_n u_n``). With ``h = MLP(flatten(v)) ∈ R^H``::

    x = [Σ_f w_f,  FM(v),  h] ∈ R^{1 + k + H}                  (representation)
    h_task(x) = Linear(1 + k + H → 1)

The head is initialised as ``[1, …, 1 | w_deep]`` with bias ``b_deep``, where ``(w_deep, b_deep)``
is a freshly initialised ``Linear(H → 1)``, DeepFM's output layer: at init
``h_task(x) = (Σ_f w_f + Σ_{f<g} ⟨v_f, v_g⟩) + (⟨w_deep, h⟩ + b_deep)``, the sum of the FM logit
and the deep logit, exactly as in the paper.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from exfm.models.blocks import MLP, FMInteraction
from exfm.models.fm import FMModel
from exfm.schema import Schema


class DeepFMInteraction(nn.Module):
    """DeepFM's two components on the same fields: ``[FM(v), MLP(flatten(v))]``.

    Args:
        num_fields: m.
        dim: k.
        deep_hidden: hidden widths of the deep network (its output is the last one, H).
        dropout: dropout probability after every hidden ReLU.

    Shapes: ``fields [B, m, k] → [B, k + H]``.
    """

    def __init__(self, num_fields: int, dim: int, deep_hidden: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        self.fm = FMInteraction()
        self.deep = MLP(num_fields * dim, deep_hidden, dropout=dropout)

    def forward(self, fields: Tensor) -> Tensor:
        return torch.cat([self.fm(fields), self.deep(fields.flatten(1))], dim=1)


class DeepFMModel(FMModel):
    """DeepFM: :class:`~exfm.models.fm.FMModel` whose interaction also feeds a deep network.

    Representation ``[Σ_f w_f, FM(v), MLP(flatten(v))] ∈ R^{1+k+H}``; one linear head per task,
    initialised to the sum of the FM logit and the deep logit (module docstring).
    Init: embeddings as FM (``N(0, 0.01²)``, first-order weights 0), MLP PyTorch's default.
    Regularisation: ``dropout`` after every hidden ReLU of the deep network.

    Args:
        schema: the dataset schema.
        tasks: task names; one serving head each.
        embedding_dim: k.
        features: the features the model uses (None = all).
        deep_hidden: hidden widths of the deep network (at least one).
        dropout: dropout probability in the deep network.
    """

    def __init__(
        self,
        schema: Schema,
        tasks: Sequence[str],
        embedding_dim: int = 16,
        features: list[str] | None = None,
        deep_hidden: Sequence[int] = (256, 128),
        dropout: float = 0.0,
    ) -> None:
        if not deep_hidden:
            raise ValueError("DeepFM needs at least one hidden layer in deep_hidden")
        super().__init__(schema, tasks, embedding_dim, features)
        num_fields = self.embedding.num_fields + self.embedding.num_dense
        self.interaction = DeepFMInteraction(num_fields, embedding_dim, deep_hidden, dropout)
        deep_dim = self.interaction.deep.output_dim
        self.representation_dim += deep_dim
        for task in self.serving_heads:
            self.heads[task] = _sum_head(self.heads[task], nn.Linear(deep_dim, 1))


def _sum_head(fm_head: nn.Linear, deep_head: nn.Linear) -> nn.Linear:
    """One linear head on ``[x_fm, h]`` that computes ``fm_head(x_fm) + deep_head(h)``."""
    head = nn.Linear(fm_head.in_features + deep_head.in_features, 1)
    with torch.no_grad():
        head.weight.copy_(torch.cat([fm_head.weight, deep_head.weight], dim=1))
        head.bias.copy_(fm_head.bias + deep_head.bias)
    return head
