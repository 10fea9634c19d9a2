"""Two-tower model (TTSN) for retrieval and early-stage ranking, with exportable towers.

Each tower is an MLP over the flattened embeddings of its own features only (own embedding
collection; a tower never sees the other tower's features)::

    u = MLP_user([v_user, dense_user]) ∈ R^D        i = MLP_item([v_item, dense_item]) ∈ R^D
    x = u ⊙ i ∈ R^D                                 (representation)
    h_task(x) = ⟨w_task, x⟩ + b_task,  w_task initialised to 1/τ

With the head weights fixed at ``1/τ`` (the default, ``learn_head_weights=False``) every serving
head is ``h_task(x) = ⟨u, i⟩ / τ + b_task``: the two-tower logit, with a learned bias per task
(``bias=True``) or none. So ``heads[task](representation)`` *is* the dot-product logit and the
model fits the :class:`~exfm.models.base.RecModel` interface unchanged (distillation heads read
the same ``x``). With ``learn_head_weights=True`` each task learns its own weighting,
``h_task(x) = ⟨u, w_task ⊙ i⟩ + b_task``, still a dot product of the separately computed towers
(fold ``w_task`` into the item vector at serving): one pair of towers serves several tasks.
Any *linear* head on ``x`` keeps this property; a head with hidden layers does not.

Serving export: :meth:`TwoTowerModel.user_tower_module` and :meth:`TwoTowerModel.item_tower_module`
return standalone :class:`ExportedTower` snapshots that take plain tensors (the tower's ids,
padded sequences and numerics, :meth:`~exfm.models.embedding.FeatureLayout.pack`) and run under
``torch.export``; the logit of a (user, item) pair is ``heads[task](user_vector * item_vector)``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import Tensor, nn

from exfm.data.batch import Batch
from exfm.models.base import RecModel
from exfm.models.blocks import MLP
from exfm.models.embedding import EmbeddingCollection, FeatureTensors
from exfm.schema import Schema


class TowerArch(nn.Module):
    """One tower: ``MLP(flatten(embeddings of its features), dense) ∈ R^D``.

    Args:
        schema: the dataset schema.
        features: the tower's features (at least one).
        dim: embedding width k.
        hidden: hidden widths of the tower MLP (ReLU after each).
        output_dim: D, the width of the tower's final linear layer (no activation).

    Shapes: ``batch`` (or its :class:`~exfm.models.embedding.FeatureTensors`) ``→ [B, D]``.
    """

    def __init__(self, schema: Schema, features: list[str], dim: int, hidden: Sequence[int], output_dim: int) -> None:
        super().__init__()
        self.embedding = EmbeddingCollection(schema, features, dim)
        in_dim = self.embedding.num_fields * dim + self.embedding.num_dense
        self.mlp = MLP(in_dim, hidden, output_dim)

    def forward(self, inputs: Batch | FeatureTensors) -> Tensor:
        return self.mlp(self.embedding(inputs).flat())


class ExportedTower(nn.Module):
    """An inference snapshot of a :class:`TowerArch` that takes plain tensors (``torch.export``-able).

    A copy of the tower (later training does not change it, no gradients) whose embedding
    collection reads the tower's own features (:meth:`~exfm.models.embedding.EmbeddingCollection.read_from`):
    the same embedding code as training, on inputs without the other tower's columns.

    Args:
        tower: the tower to snapshot.

    Inputs of ``forward`` (column orders in ``layout``; :meth:`inputs` builds them from a batch):
        ids: ``[B, F_t]`` int64 bucket ids of the tower's categoricals (0 = missing).
        sequences: ``[B, Σ_s L_s]`` int64, each sequence right-padded with 0 to its ``max_len``.
        dense: ``[B, N_t]`` float32 numerics, transformed as the reader does.

    Returns:
        ``[B, D]`` float32, equal to ``tower(batch)``.
    """

    def __init__(self, tower: TowerArch) -> None:
        super().__init__()
        self.source = tower.embedding.source
        self.layout = tower.embedding.layout
        self.tower = copy.deepcopy(tower).eval().requires_grad_(False)
        self.tower.embedding.read_from(self.layout)

    def inputs(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """``(ids, sequences, dense)`` of this tower, picked out of a dataset batch."""
        return self.layout.pack(self.layout.read(batch, self.source))

    def forward(self, ids: Tensor, sequences: Tensor, dense: Tensor) -> Tensor:
        return self.tower(self.layout.unpack(ids, sequences, dense))


class TwoTowerModel(RecModel):
    """Two towers, representation ``u ⊙ i``, heads ``⟨w_task, u ⊙ i⟩ + b_task`` with ``w = 1/τ``.

    Init: embeddings ``N(0, 0.01²)``, tower MLPs PyTorch's default; head weights ``1/τ`` (frozen
    unless ``learn_head_weights``), head bias 0. Regularisation: none inside the model.

    Args:
        schema: the dataset schema.
        tasks: task names; one serving head each.
        user_features: the user tower's features.
        item_features: the item tower's features (disjoint from ``user_features``).
        embedding_dim: k.
        tower_hidden: hidden widths of each tower MLP.
        output_dim: D, the width of each tower's output.
        temperature: τ > 0; the logit is ``⟨u, i⟩ / τ``.
        bias: a learned bias per task head.
        learn_head_weights: train each head's weights (``⟨u, w_task ⊙ i⟩``) instead of fixing them at ``1/τ``.

    Raises:
        ValueError: a tower without features, a feature in both towers, or ``temperature <= 0``.
    """

    def __init__(
        self,
        schema: Schema,
        tasks: Sequence[str],
        user_features: list[str],
        item_features: list[str],
        embedding_dim: int = 16,
        tower_hidden: Sequence[int] = (128, 64),
        output_dim: int = 32,
        temperature: float = 1.0,
        bias: bool = True,
        learn_head_weights: bool = False,
    ) -> None:
        super().__init__(tasks)
        if not user_features or not item_features:
            raise ValueError("a two-tower model needs user_features and item_features")
        shared = sorted(set(user_features) & set(item_features))
        if shared:
            raise ValueError(f"feature(s) {shared} are in both towers")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, not {temperature}")
        self.user_tower = TowerArch(schema, user_features, embedding_dim, tower_hidden, output_dim)
        self.item_tower = TowerArch(schema, item_features, embedding_dim, tower_hidden, output_dim)
        self.representation_dim = output_dim
        for task in self.serving_heads:
            head = nn.Linear(output_dim, 1, bias=bias)
            nn.init.constant_(head.weight, 1.0 / temperature)
            if bias:
                nn.init.zeros_(head.bias)
            head.weight.requires_grad_(learn_head_weights)
            self.add_head(task, head)

    def encode(self, features: FeatureTensors) -> Tensor:
        """``[B, D]``: ``u ⊙ i``, so that ``Σ_j x_j / τ = ⟨u, i⟩ / τ``."""
        return self.user_tower(features) * self.item_tower(features)

    def user_tower_module(self) -> ExportedTower:
        """A standalone snapshot of the user tower on plain tensors: ``→ u [B, D]``."""
        return ExportedTower(self.user_tower)

    def item_tower_module(self) -> ExportedTower:
        """A standalone snapshot of the item tower on plain tensors: ``→ i [B, D]``."""
        return ExportedTower(self.item_tower)
